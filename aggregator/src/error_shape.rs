//! One error shape on every listener, whoever produced the error.
//!
//! Design constraints:
//! - Handlers answer with their own error types, which already write the
//!   shared [`ErrorBody`]. What they never see is refused earlier by axum
//!   itself: a query string or path that does not parse, a JSON body that is
//!   malformed, has unknown fields or no `Content-Type`. Those rejections
//!   are plain text; [`json_errors`] rewrites any 4xx or 5xx that is not JSON
//!   into an [`ErrorBody`] with the same status and the rejection's text
//!   (which names the field) as its message.
//! - PostgreSQL refuses a NUL character in any text value, and the refusal
//!   would surface as a 500. A NUL in a path segment, a query parameter or a
//!   JSON string is refused here first with 400 naming where it was.

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dcs_shared::wire::ErrorBody;
use http_body_util::{BodyExt, Limited};

/// Rejection texts are one line; anything longer is cut.
const MAX_REJECTION_TEXT: usize = 4096;
/// JSON request bodies on these listeners are small (tokens, tenants, CSRs);
/// axum's own default body limit is the same 2 MiB.
const MAX_JSON_BODY: usize = 2 << 20;

/// The middleware: refuses NULs, then gives every error response the JSON
/// error shape.
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let request = match refuse_nul(request).await {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    let response = next.run(request).await;
    reshape(response).await
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(ErrorBody::new("bad_request", message)),
    )
        .into_response()
}

async fn refuse_nul(request: Request) -> Result<Request, Response> {
    if let Some(field) = nul_in_path(&request) {
        return Err(bad_request(format!(
            "path parameter {field} contains a NUL character"
        )));
    }
    if let Some(query) = request.uri().query() {
        // A URI cannot carry a raw NUL, so a NUL is always `%00`.
        for pair in query.split('&') {
            let key = pair.split('=').next().unwrap_or("");
            if has_encoded_nul(pair) {
                return Err(bad_request(format!(
                    "query parameter {key:?} contains a NUL character"
                )));
            }
        }
    }
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    // A batch is gzip: its records are checked by the batch handler.
    let encoded = request.headers().contains_key(header::CONTENT_ENCODING);
    if !is_json || encoded {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let bytes = match Limited::new(body, MAX_JSON_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(ErrorBody::new(
                    "payload_too_large",
                    format!("the request body exceeds {MAX_JSON_BODY} bytes or could not be read"),
                )),
            )
                .into_response());
        }
    };
    // What does not parse is left to the handler's extractor, which names
    // the problem; only NULs in otherwise valid JSON are caught here.
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(pointer) = nul_in_json(&value, String::new())
    {
        return Err(bad_request(format!(
            "JSON field {:?} contains a NUL character",
            if pointer.is_empty() { "/" } else { &pointer }
        )));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The route's name for the first path segment holding a NUL (`{id}`), or
/// its position when no route matched.
fn nul_in_path(request: &Request) -> Option<String> {
    let path = request.uri().path();
    let template: Vec<&str> = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().split('/').collect())
        .unwrap_or_default();
    path.split('/').enumerate().find_map(|(i, segment)| {
        has_encoded_nul(segment).then(|| {
            template
                .get(i)
                .filter(|t| t.starts_with('{'))
                .map_or_else(|| format!("segment {i}"), |t| (*t).to_owned())
        })
    })
}

fn has_encoded_nul(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

/// The JSON pointer of the first string or key holding a NUL.
fn nul_in_json(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0').then_some(at),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_in_json(v, format!("{at}/{i}"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            if k.contains('\0') {
                Some(here.replace('\0', "\\0"))
            } else {
                nul_in_json(v, here)
            }
        }),
        _ => None,
    }
}

/// Rewrites a non-JSON error response into an [`ErrorBody`].
async fn reshape(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match Limited::new(body, MAX_REJECTION_TEXT).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_ascii_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&ErrorBody::new(code_for(status), message))
        .unwrap_or_else(|_| b"{}".to_vec());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The stable `error` code of a status that reached us as a bare rejection.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable_entity",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::extract::{Path, Query};
    use axum::routing::{get, post};
    use tower::ServiceExt as _;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body1 {
        name: String,
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Page {
        limit: Option<i64>,
        tenant: Option<String>,
    }

    fn app() -> Router {
        Router::new()
            .route("/items/{id}", get(|Path(_id): Path<i64>| async { "ok" }))
            .route("/list", get(|Query(_q): Query<Page>| async { "ok" }))
            .route(
                "/create",
                post(|axum::Json(_b): axum::Json<Body1>| async { "ok" }),
            )
            .layer(axum::middleware::from_fn(json_errors))
    }

    async fn call(request: axum::http::Request<Body>) -> (StatusCode, ErrorBody) {
        let response = app().oneshot(request).await.unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "{status}"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
        (status, body)
    }

    fn get_req(uri: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(uri).body(Body::empty()).unwrap()
    }

    fn post_req(content_type: Option<&str>, body: &str) -> axum::http::Request<Body> {
        let mut builder = axum::http::Request::post("/create");
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        builder.body(Body::from(body.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn extractor_rejections_get_the_json_error_shape_naming_the_field() {
        let (status, body) = call(get_req("/list?limit=abc")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.message.contains("limit"), "{}", body.message);

        let (status, body) = call(get_req("/items/abc")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body.error, "bad_request");

        let (status, body) = call(post_req(None, r#"{"name":"a"}"#)).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(body.error, "unsupported_media_type");

        let (status, body) = call(post_req(Some("application/json"), "{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(!body.message.is_empty());

        let (status, body) = call(post_req(
            Some("application/json"),
            r#"{"name":"a","extra":1}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(body.message.contains("extra"), "{}", body.message);
    }

    #[tokio::test]
    async fn a_nul_anywhere_is_a_400_naming_where() {
        let (status, body) = call(get_req("/list?tenant=a%00b")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.message.contains("\"tenant\""), "{}", body.message);

        let (status, body) = call(get_req("/items/1%00")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.message.contains("{id}"), "{}", body.message);

        let (status, body) =
            call(post_req(Some("application/json"), r#"{"name":"a\u0000b"}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.message.contains("/name"), "{}", body.message);
    }

    #[tokio::test]
    async fn a_valid_request_passes_untouched() {
        let response = app()
            .oneshot(post_req(Some("application/json"), r#"{"name":"a"}"#))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
