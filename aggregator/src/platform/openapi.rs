//! The OpenAPI 3 document of the platform API, generated from the handlers'
//! annotations (utoipa), and a human-readable page rendered from it.
//!
//! The page is plain HTML built on the server from the same document: no
//! script, no CDN, so it works on an operator's machine without Internet
//! access and cannot drift from `/openapi.json`.

use std::fmt::Write as _;

use serde_json::Value;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{agents, audit, enrollment, records, tenants, tokens};

/// Every error body of the API (`dcs_shared::wire::ErrorBody`).
#[derive(utoipa::ToSchema)]
#[schema(as = ErrorBody)]
pub struct ErrorSchema {
    /// A stable machine-readable code: `unauthorized`, `forbidden`,
    /// `bad_request`, `not_found`, `conflict`, `database_unavailable`, ...
    pub error: String,
    /// A sentence for humans.
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "DCS platform API",
        description = "Query collected records, manage agents, tenants and tokens, read the audit trail, \
            enroll agents. Every call but `POST /api/v1/enroll` needs `Authorization: Bearer <token>`; \
            tokens carry a role (admin, reader) and a tenant scope. Enrollment authenticates with a \
            one-time enrollment token in its body.",
    ),
    paths(
        records::list,
        agents::list,
        agents::get_one,
        agents::revoke,
        agents::unrevoke,
        agents::list_serials,
        agents::revoke_serial,
        agents::unrevoke_serial,
        tenants::list,
        tenants::create,
        tenants::disable,
        tenants::enable,
        tokens::list,
        tokens::create,
        tokens::revoke,
        audit::list,
        enrollment::create,
        enrollment::list,
        enrollment::disable,
        enrollment::enroll,
    ),
    components(schemas(ErrorSchema)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as served at `/openapi.json`: the handlers' annotations,
/// completed with what every operation can answer whatever its handler
/// does (see [`complete`]).
pub fn document() -> utoipa::openapi::OpenApi {
    let doc = ApiDoc::openapi();
    let Ok(mut value) = serde_json::to_value(&doc) else {
        return doc;
    };
    complete(&mut value);
    serde_json::from_value(value).unwrap_or(doc)
}

/// Adds to every operation the statuses it can answer before or after its
/// handler runs, and to well-known parameters their constraints:
/// - 400: a path or query parameter that does not parse, or holds a NUL
///   (refused by the `error_shape` layer);
/// - 401: a missing, unknown, expired or revoked bearer token (every
///   operation with bearer security);
/// - 413, 415 and 422: on operations with a JSON body: too large, not
///   `application/json`, or JSON of the wrong shape (unknown fields);
/// - 404: on operations with a path parameter;
/// - 429: the caller's address or network was refused too often in the
///   current window (every operation that takes a token, enrollment too);
/// - 503: the database did not answer; nothing was changed.
fn complete(doc: &mut Value) {
    let error = |description: &str| {
        serde_json::json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    constrain_schemas(doc);
    // Bodies with a `tenant` field: naming one that does not exist is 404.
    let tenant_bodies: Vec<String> = doc["components"]["schemas"]
        .as_object()
        .map(|schemas| {
            schemas
                .iter()
                .filter(|(_, s)| s["properties"].get("tenant").is_some())
                .map(|(name, _)| format!("#/components/schemas/{name}"))
                .collect()
        })
        .unwrap_or_default();
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                continue;
            }
            let public = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
            });
            let has_body = op.get("requestBody").is_some();
            let names_tenant = body_names_tenant(op, &tenant_bodies);
            let mut add = |status: &str, description: &str| {
                if let Some(responses) = op["responses"].as_object_mut() {
                    responses
                        .entry(status)
                        .or_insert_with(|| error(description));
                }
            };
            add(
                "400",
                "a parameter or the body is invalid (the message names it)",
            );
            if !public {
                add(
                    "401",
                    "no bearer token, or one that is unknown, expired or revoked",
                );
            }
            if path.contains('{') {
                add("404", "not found, or outside the token's scope");
            }
            if names_tenant {
                add("404", "the tenant the body names does not exist");
            }
            if has_body {
                add("413", "the body is larger than 2 MiB");
                add("415", "the body is not sent as application/json");
                add(
                    "422",
                    "the body is JSON of the wrong shape (a missing or unknown field)",
                );
            }
            if !public || path.ends_with("/enroll") {
                add(
                    "429",
                    "too many refused requests from the caller's address or network: retry after Retry-After seconds",
                );
            }
            add(
                "503",
                "the database is unavailable; nothing was changed, retry later",
            );
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                for param in params {
                    constrain(path, param);
                }
            }
        }
    }
}

/// What every request string may hold but that no other rule constrains:
/// anything but NUL, which is refused with 400 (see `error_shape`).
const NO_NUL: &str = "^[^\\x00]*$";
/// A serial as `normalize_serial` takes it: hex, with `:`/`-`/space
/// separators or a `0x` prefix.
const SERIAL: &str = "^\\s*(0[xX])?[0-9A-Fa-f:\\- ]*[0-9A-Fa-f][0-9A-Fa-f:\\- ]*\\s*$";
/// A lifetime humantime reads, one to three parts such as `90d` or `1w 2d`,
/// each below 10 000 so the expiry stays inside PostgreSQL's timestamps.
const LIFETIME: &str = "^[1-9][0-9]{0,3}[smhdw]( [1-9][0-9]{0,3}[smhdw]){0,2}$";

/// Whether a schema is a string (or nullable string) that no pattern,
/// format or enum constrains yet.
fn is_free_string(schema: &serde_json::Map<String, Value>) -> bool {
    let string = match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(types)) => types.iter().any(|t| t == "string"),
        _ => false,
    };
    string
        && !["pattern", "format", "enum"]
            .iter()
            .any(|k| schema.contains_key(*k))
}

/// The constraints the handlers enforce on request bodies: the token roles,
/// names and lifetimes, the tenant id rules
/// (`dcs_shared::identity::validate_identifier`), the forms a serial may be
/// typed in, and no NUL in any other string.
fn constrain_schemas(doc: &mut Value) {
    let identifier = serde_json::json!({
        "pattern": "^[a-z0-9][a-z0-9_.-]*$", "minLength": 1,
        "maxLength": dcs_shared::identity::MAX_IDENTIFIER_LEN,
    });
    let rules = [
        (
            "NewToken",
            "role",
            serde_json::json!({ "enum": ["admin", "reader"] }),
        ),
        ("NewTenant", "id", identifier.clone()),
        ("NewEnrollmentToken", "agent", identifier),
        (
            "NewToken",
            "name",
            // 1 to 200 characters, not only whitespace (tokens::create_token).
            serde_json::json!({
                "minLength": 1, "maxLength": 200,
                "pattern": "^[^\\x00]*[^\\s\\x00][^\\x00]*$",
            }),
        ),
        (
            "NewToken",
            "expires_in",
            serde_json::json!({ "pattern": LIFETIME }),
        ),
        (
            "NewEnrollmentToken",
            "expires_in",
            serde_json::json!({ "pattern": LIFETIME }),
        ),
        (
            "NewRevokedSerial",
            "serial",
            serde_json::json!({ "pattern": SERIAL }),
        ),
    ];
    for (schema, field, rule) in rules {
        if let (Some(prop), Some(rule)) = (
            doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
                .and_then(Value::as_object_mut),
            rule.as_object(),
        ) {
            for (k, v) in rule {
                prop.insert(k.clone(), v.clone());
            }
        }
    }
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for name in REQUEST_BODIES {
        let Some(schema) = schemas.get_mut(*name).and_then(Value::as_object_mut) else {
            continue;
        };
        // Every request body type is `deny_unknown_fields`: an unknown
        // field is 422 (or 400 when it holds a NUL), never accepted.
        schema.insert("additionalProperties".into(), false.into());
        let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for prop in props.values_mut().filter_map(Value::as_object_mut) {
            if is_free_string(prop) {
                prop.insert("pattern".into(), NO_NUL.into());
            }
        }
    }
}

/// The schemas of request bodies (responses never hold a NUL to refuse).
const REQUEST_BODIES: &[&str] = &[
    "NewToken",
    "NewTenant",
    "NewEnrollmentToken",
    "NewRevokedSerial",
    "EnrollRequest",
];

/// Whether the operation's JSON body is one of `schemas` (by reference).
fn body_names_tenant(op: &Value, schemas: &[String]) -> bool {
    op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .is_some_and(|r| schemas.iter().any(|s| s == r))
}

/// The constraints the handlers enforce, on the parameters that have them.
fn constrain(path: &str, param: &mut Value) {
    let name = param["name"].as_str().unwrap_or("").to_owned();
    let Some(schema) = param.get_mut("schema").and_then(Value::as_object_mut) else {
        return;
    };
    match name.as_str() {
        "limit" => {
            schema.insert("minimum".into(), 1.into());
            // A page is capped; the NDJSON export of /api/v1/records takes
            // any count (its description says so), which the document's one
            // schema per parameter cannot tell apart from a page.
            schema.insert("maximum".into(), super::MAX_PAGE.into());
        }
        "from" | "to" => {
            schema.insert("format".into(), "date-time".into());
        }
        "cursor" => {
            let pattern = if path == "/api/v1/audit" {
                super::audit::CURSOR_PATTERN
            } else {
                super::records::CURSOR_PATTERN
            };
            schema.insert("pattern".into(), pattern.into());
        }
        "serial" => {
            schema.insert("pattern".into(), SERIAL.into());
        }
        _ if is_free_string(schema) => {
            schema.insert("pattern".into(), NO_NUL.into());
        }
        _ => {}
    }
}

/// The HTML page served at `/api/docs`.
pub fn html() -> String {
    let doc = serde_json::to_value(document()).unwrap_or(Value::Null);
    let mut out = String::with_capacity(32 * 1024);
    let title = esc(doc["info"]["title"].as_str().unwrap_or("API"));
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}\
         code,pre{{background:#f4f4f4;padding:0 .2rem}}h2{{border-top:1px solid #ccc;padding-top:1rem}}\
         .m{{display:inline-block;min-width:4rem;font-weight:bold}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}}</style>\
         </head><body><h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>",
        esc(doc["info"]["version"].as_str().unwrap_or("")),
        esc(doc["info"]["description"].as_str().unwrap_or("")),
    );
    out.push_str("<h2>Operations</h2>");
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in ["get", "post", "put", "patch", "delete"] {
                let Some(op) = item.get(method) else { continue };
                let _ = write!(
                    out,
                    "<h3><span class=\"m\">{}</span><code>{}</code></h3><p>{}</p>",
                    method.to_uppercase(),
                    esc(path),
                    esc(op["description"]
                        .as_str()
                        .or(op["summary"].as_str())
                        .unwrap_or(""))
                );
                if let Some(params) = op["parameters"].as_array() {
                    out.push_str("<table><tr><th>parameter</th><th>in</th><th>required</th><th>description</th></tr>");
                    for p in params {
                        let _ = write!(
                            out,
                            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            esc(p["name"].as_str().unwrap_or("")),
                            esc(p["in"].as_str().unwrap_or("")),
                            p["required"].as_bool().unwrap_or(false),
                            esc(p["description"].as_str().unwrap_or("")),
                        );
                    }
                    out.push_str("</table>");
                }
                if let Some(body) = op["requestBody"]["content"].as_object() {
                    for (media, content) in body {
                        let _ = write!(
                            out,
                            "<p>Request body ({}): {}</p>",
                            esc(media),
                            schema_name(&content["schema"])
                        );
                    }
                }
                if let Some(responses) = op["responses"].as_object() {
                    out.push_str("<ul>");
                    for (status, response) in responses {
                        let schemas: Vec<String> = response["content"]
                            .as_object()
                            .map(|c| {
                                c.iter()
                                    .map(|(m, v)| {
                                        format!("{} ({})", schema_name(&v["schema"]), esc(m))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let _ = write!(
                            out,
                            "<li><b>{}</b> {} {}</li>",
                            esc(status),
                            esc(response["description"].as_str().unwrap_or("")),
                            schemas.join(", ")
                        );
                    }
                    out.push_str("</ul>");
                }
            }
        }
    }
    out.push_str("<h2>Schemas</h2>");
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for (name, schema) in schemas {
            let _ = write!(
                out,
                "<h3 id=\"{0}\">{0}</h3><p>{1}</p>",
                esc(name),
                esc(schema["description"].as_str().unwrap_or(""))
            );
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema["properties"].as_object() {
                out.push_str("<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>");
                for (field, prop) in props {
                    let _ = write!(
                        out,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(field),
                        schema_name(prop),
                        required.contains(&field.as_str()),
                        esc(prop["description"].as_str().unwrap_or("")),
                    );
                }
                out.push_str("</table>");
            }
        }
    }
    out.push_str("</body></html>");
    out
}

/// A short, linked description of a schema: a reference, an array of one,
/// or a type.
fn schema_name(schema: &Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        let name = esc(r.rsplit('/').next().unwrap_or(r));
        return format!("<a href=\"#{name}\">{name}</a>");
    }
    if schema["type"] == "array" {
        return format!("array of {}", schema_name(&schema["items"]));
    }
    match &schema["type"] {
        Value::String(t) => esc(t),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .map(esc)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => schema["oneOf"]
            .as_array()
            .map(|v| v.iter().map(schema_name).collect::<Vec<_>>().join(" or "))
            .unwrap_or_else(|| "object".into()),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_bearer_security() {
        let doc = serde_json::to_value(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/api/v1/records",
            "/api/v1/agents",
            "/api/v1/agents/{id}",
            "/api/v1/agents/{id}/revoke",
            "/api/v1/agents/{id}/unrevoke",
            "/api/v1/revoked-serials",
            "/api/v1/revoked-serials/{serial}",
            "/api/v1/tenants",
            "/api/v1/tenants/{id}/disable",
            "/api/v1/tenants/{id}/enable",
            "/api/v1/tokens",
            "/api/v1/tokens/{id}/revoke",
            "/api/v1/audit",
        ] {
            assert!(paths.contains_key(path), "{path} is not documented");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        // Every referenced schema exists.
        let text = doc.to_string();
        for name in text.split("#/components/schemas/").skip(1) {
            let name = name.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "missing schema {name}"
            );
        }
    }

    #[test]
    fn every_operation_lists_the_statuses_it_can_answer() {
        let doc = serde_json::to_value(document()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let what = format!("{method} {path}");
                for status in ["400", "503"] {
                    assert!(responses.contains_key(status), "{what}: no {status}");
                }
                let public = path == "/api/v1/enroll";
                assert!(responses.contains_key("401") || public, "{what}: no 401");
                if op.get("requestBody").is_some() {
                    for status in ["413", "415", "422"] {
                        assert!(responses.contains_key(status), "{what}: no {status}");
                    }
                }
            }
        }
        let limit = doc["paths"]["/api/v1/audit"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert_eq!(limit["schema"]["minimum"], 1);
        assert_eq!(limit["schema"]["maximum"], 1000);
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["NewToken"]["properties"]["role"]["enum"],
            serde_json::json!(["admin", "reader"])
        );
        assert!(schemas["NewTenant"]["properties"]["id"]["pattern"].is_string());
    }

    #[test]
    fn the_page_is_self_contained_and_escaped() {
        let page = html();
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("/api/v1/records"));
        assert!(page.contains("RecordView"));
        assert!(!page.contains("<script"), "no scripts, so no CDN");
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert_eq!(esc("<a&\">"), "&lt;a&amp;&quot;&gt;");
    }
}
