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

/// The document as served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
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
