//! The `http` source: polls a URL and buffers each item of the answer.
//!
//! # Checkpoint
//! One row (key `http`) holds the first page's `ETag` and `Last-Modified`
//! (sent back as `If-None-Match` / `If-Modified-Since`, so an unchanged
//! resource costs a 304 and yields nothing), plus where to continue:
//! - `pagination = "link"`: the `rel="next"` URL of the `Link` header of the
//!   last stored page, while a run is under way. A run interrupted between
//!   pages resumes there; a run that reached the last page clears it and the
//!   next run starts at `url` again (conditionally).
//! - `pagination = "cursor"`: the value found at `cursor_pointer` in the last
//!   page that had one. Every request sends it as `cursor_param`, so the API
//!   returns only what came after it: an incremental feed.
//!
//! Each page is stored with its checkpoint in one transaction, so a crash
//! between pages neither loses nor repeats a page.
//!
//! # Credentials stay with the configured origin
//! `Authorization` and the custom `headers` are meant for `url`'s origin
//! (scheme, host and port) only. A redirect to another origin, or a `Link`
//! `rel="next"` naming one, fails the run: following it would hand the
//! credentials to a host the operator never named, and saving it as the
//! checkpoint would keep doing so. No `Referer` is ever sent, and an answer
//! larger than `max_response_bytes` fails the run instead of filling memory.
//!
//! # Errors
//! 408, 429, 5xx and transport errors are retried within the run with
//! exponential backoff (`retries` times, from 200 ms); other statuses fail
//! the job at once. The next scheduled run starts afresh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{
    ETAG, HeaderMap, HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, LINK,
};
use serde::{Deserialize, Serialize};

use dcs_shared::config::{ByteSize, Issues, duration};

use super::{RunContext, RunReport, Source, SourceError};
use crate::buffer::{Rejected, SourceBatch};

const CHECKPOINT_KEY: &str = "http";
/// First retry delay; doubled per attempt.
const RETRY_INITIAL: Duration = Duration::from_millis(200);
/// Long enough for a slow report endpoint, short enough that a hung server
/// does not hold the source's single run for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds one run: a server whose `next` never ends cannot keep it going.
pub const DEFAULT_MAX_PAGES: u32 = 1000;
/// One page is held in memory while its items are split out; 32 MiB is far
/// beyond a paginated API's page and far below what would hurt the agent.
pub const DEFAULT_MAX_RESPONSE_BYTES: ByteSize = ByteSize(32 << 20);
/// Redirects followed within the origin before the request fails.
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    /// Extra request headers (no secrets: use the bearer token settings).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A file whose first line is a bearer token, or an environment variable.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    #[serde(default = "default_format")]
    pub format: HttpFormat,
    /// JSON pointer to the array of items (`/data`); empty: the body itself
    /// is the array (or one object, one item).
    #[serde(default)]
    pub records_pointer: String,
    /// JSON pointer (within an item) to its unique id, e.g. `/id`. The record
    /// id becomes `NAME:ID`, so an item served again (a whole resource
    /// re-read after it changed) is recognised and buffered once, within
    /// `buffer.dedup_window`.
    #[serde(default)]
    pub id_pointer: Option<String>,
    #[serde(default)]
    pub pagination: Pagination,
    /// With `pagination = "cursor"`: where the next cursor is in the body.
    #[serde(default)]
    pub cursor_pointer: Option<String>,
    /// With `pagination = "cursor"`: the query parameter it is sent as.
    #[serde(default)]
    pub cursor_param: Option<String>,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
    /// Largest answer read; a larger one fails the run.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: ByteSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpFormat {
    /// A JSON document: an array, or an object holding one (`records_pointer`).
    Json,
    /// One JSON object per line.
    Ndjson,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    #[default]
    None,
    Link,
    Cursor,
}

fn default_format() -> HttpFormat {
    HttpFormat::Json
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_retries() -> u32 {
    3
}
fn default_max_pages() -> u32 {
    DEFAULT_MAX_PAGES
}
fn default_max_response_bytes() -> ByteSize {
    DEFAULT_MAX_RESPONSE_BYTES
}

impl HttpConfig {
    pub fn validate(&self, key: &str, issues: &mut Issues) {
        let k = |f: &str| format!("{key}.{f}");
        issues.check(
            reqwest::Url::parse(&self.url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()),
            &k("url"),
            format!("{:?} is not an http:// or https:// URL", self.url),
        );
        for name in self.headers.keys() {
            issues.check(
                HeaderName::from_bytes(name.as_bytes()).is_ok(),
                &format!("{key}.headers.{name}"),
                "is not a valid header name",
            );
        }
        issues.check(
            self.bearer_token_file.is_none() || self.bearer_token_env.is_none(),
            &k("bearer_token_env"),
            "set bearer_token_file or bearer_token_env, not both",
        );
        if (self.bearer_token_file.is_some() || self.bearer_token_env.is_some())
            && let Err(reason) = self.token()
        {
            issues.check(false, &k("bearer_token_file"), reason);
        }
        issues.check(
            self.id_pointer
                .as_deref()
                .is_none_or(|p| p.starts_with('/')),
            &k("id_pointer"),
            "a JSON pointer starts with '/' (e.g. \"/id\")",
        );
        issues.check(
            self.records_pointer.is_empty() || self.records_pointer.starts_with('/'),
            &k("records_pointer"),
            "a JSON pointer starts with '/' (e.g. \"/data\")",
        );
        let cursor = self.pagination == Pagination::Cursor;
        issues.check(
            !cursor
                || self
                    .cursor_pointer
                    .as_deref()
                    .is_some_and(|p| p.starts_with('/')),
            &k("cursor_pointer"),
            "pagination = \"cursor\" needs a JSON pointer to the next cursor (e.g. \"/next\")",
        );
        issues.check(
            !cursor || self.cursor_param.as_deref().is_some_and(|p| !p.is_empty()),
            &k("cursor_param"),
            "pagination = \"cursor\" needs the query parameter to send it as",
        );
        issues.check(
            self.max_response_bytes.0 >= 1,
            &k("max_response_bytes"),
            "must be at least 1 byte",
        );
        issues.check(
            (1..=100_000).contains(&self.max_pages),
            &k("max_pages"),
            "must be between 1 and 100000",
        );
    }

    fn token(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.bearer_token_env {
            return std::env::var(var)
                .map(|v| Some(v.trim().to_owned()))
                .map_err(|_| format!("environment variable {var} is not set"));
        }
        match &self.bearer_token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.lines().next().unwrap_or("").trim().to_owned()))
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
            None => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCheckpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// Link pagination: the page to resume at after an interrupted run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Cursor pagination: the last cursor the API gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

fn failed(text: impl Into<String>) -> SourceError {
    SourceError::Http(text.into())
}

pub async fn collect(
    source: &Source,
    cfg: &HttpConfig,
    ctx: &RunContext,
    report: &mut RunReport,
) -> Result<(), SourceError> {
    let stored = {
        let buffer = ctx.buffer.clone();
        let name = source.name.clone();
        tokio::task::spawn_blocking(move || buffer.checkpoints(&name))
            .await
            .map_err(|_| SourceError::Stopped)??
    };
    let mut cp: HttpCheckpoint = match stored.get(CHECKPOINT_KEY) {
        Some(v) => serde_json::from_str(v).unwrap_or_default(),
        None => HttpCheckpoint::default(),
    };
    let base = reqwest::Url::parse(&cfg.url).map_err(|e| failed(e.to_string()))?;
    let client = client(cfg, &base)?;
    let mut headers = HeaderMap::new();
    for (name, value) in &cfg.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| failed(e.to_string()))?;
        let value = HeaderValue::from_str(value).map_err(|e| failed(e.to_string()))?;
        headers.insert(name, value);
    }
    if let Some(token) = cfg.token().map_err(failed)? {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| failed("the bearer token is not a valid header value"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let with_cursor = |cursor: &Option<String>| {
        let mut url = base.clone();
        if let (Pagination::Cursor, Some(c), Some(param)) =
            (cfg.pagination, cursor, &cfg.cursor_param)
        {
            url.query_pairs_mut().append_pair(param, c);
        }
        url
    };
    // A resumed link run skips the conditional request: its pages are not
    // the resource the ETag describes.
    // A saved page of another origin (written before origins were checked)
    // is not resumed: the run starts at `url` again.
    let resume = cp
        .next
        .as_deref()
        .and_then(|n| reqwest::Url::parse(n).ok())
        .filter(|n| n.origin() == base.origin());
    let (mut url, mut conditional) = match (resume, cfg.pagination) {
        (Some(next), Pagination::Link) => (next, false),
        _ => (with_cursor(&cp.cursor), true),
    };
    for _ in 0..cfg.max_pages {
        let mut request = headers.clone();
        if conditional {
            if let Some(etag) = cp
                .etag
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                request.insert(IF_NONE_MATCH, etag);
            }
            if let Some(lm) = cp
                .last_modified
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                request.insert(IF_MODIFIED_SINCE, lm);
            }
        }
        let response = fetch(&client, &url, request, cfg.retries, ctx).await?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(());
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        if conditional {
            cp.etag = header(ETAG);
            cp.last_modified = header(LAST_MODIFIED);
        }
        let link_next = header(LINK)
            .and_then(|l| next_link(&l, &url))
            .map(|next| same_origin(next, &base, "a Link rel=\"next\""))
            .transpose()?;
        let body = read_capped(response, cfg.max_response_bytes.0, &url).await?;
        let (items, next_cursor) = items(cfg, &body)?;
        let mut batch = SourceBatch {
            source: source.name.clone(),
            stream: source.stream.clone(),
            ..Default::default()
        };
        for (i, item) in items.into_iter().enumerate() {
            let checked = ctx
                .prepare(&source.stream, &item)
                .and_then(|record| with_id(record, &source.name, cfg, &item));
            match checked {
                Ok(record) => batch.records.push(record),
                Err(reason) => batch.rejected.push(Rejected {
                    position: format!("{url}#{i}"),
                    raw: item,
                    reason,
                }),
            }
        }
        let next = match cfg.pagination {
            Pagination::None => None,
            Pagination::Link => link_next,
            Pagination::Cursor => next_cursor.clone().map(|c| with_cursor(&Some(c))),
        };
        match cfg.pagination {
            Pagination::Link => cp.next = next.as_ref().map(|u| u.to_string()),
            Pagination::Cursor => {
                if next_cursor.is_some() {
                    cp.cursor = next_cursor;
                }
            }
            Pagination::None => {}
        }
        batch.checkpoints = vec![(
            CHECKPOINT_KEY.to_owned(),
            Some(serde_json::to_string(&cp).expect("checkpoint is JSON")),
        )];
        ctx.commit(batch, report).await?;
        match next {
            Some(n) if !ctx.stopping() => {
                url = n;
                conditional = false;
            }
            _ => return Ok(()),
        }
    }
    report.errors.push(format!(
        "stopped after max_pages = {}; the next run continues",
        cfg.max_pages
    ));
    Ok(())
}

/// Sets the record id from `id_pointer`, if configured.
fn with_id(
    mut record: dcs_shared::record::Record,
    source: &str,
    cfg: &HttpConfig,
    item: &str,
) -> Result<dcs_shared::record::Record, String> {
    let Some(pointer) = &cfg.id_pointer else {
        return Ok(record);
    };
    let doc: serde_json::Value = serde_json::from_str(item).map_err(|e| e.to_string())?;
    let id = match doc.pointer(pointer) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(format!("id_pointer {pointer}: no string or number there")),
    };
    let id = format!("{source}:{id}");
    dcs_shared::record::validate_id(&id).map_err(|e| format!("id: {e}"))?;
    record.id = Some(id);
    Ok(record)
}

/// The client of one source: no `Referer`, and redirects only within the
/// configured origin (credentials travel with every request it sends).
fn client(cfg: &HttpConfig, base: &reqwest::Url) -> Result<reqwest::Client, SourceError> {
    let origin = base.origin();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.url().origin() != origin {
            let refused = format!(
                "a redirect to another origin ({}) was refused: the source's credentials are for {} only",
                attempt.url().origin().ascii_serialization(),
                origin.ascii_serialization()
            );
            attempt.error(refused)
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .timeout(cfg.timeout)
        .redirect(policy)
        .referer(false)
        .build()
        .map_err(|e| failed(format!("build HTTP client: {e}")))
}

/// `next` if it is on `base`'s origin; otherwise the run fails naming both.
fn same_origin(
    next: reqwest::Url,
    base: &reqwest::Url,
    what: &str,
) -> Result<reqwest::Url, SourceError> {
    if next.origin() == base.origin() {
        Ok(next)
    } else {
        Err(failed(format!(
            "{what} to another origin ({}) was refused: the source's credentials are for {} only",
            next.origin().ascii_serialization(),
            base.origin().ascii_serialization()
        )))
    }
}

/// The whole body, or an error as soon as it passes `cap` bytes.
async fn read_capped(
    mut response: reqwest::Response,
    cap: u64,
    url: &reqwest::Url,
) -> Result<Vec<u8>, SourceError> {
    let too_large = || {
        failed(format!(
            "GET {url}: the answer exceeds max_response_bytes ({cap} bytes)"
        ))
    };
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| failed(format!("read {url}: {e}")))?
    {
        if (body.len() + chunk.len()) as u64 > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// GET with retries on 408, 429, 5xx and transport errors.
async fn fetch(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: HeaderMap,
    retries: u32,
    ctx: &RunContext,
) -> Result<reqwest::Response, SourceError> {
    let mut delay = RETRY_INITIAL;
    let mut attempt = 0;
    loop {
        let outcome = client
            .get(url.clone())
            .headers(headers.clone())
            .send()
            .await;
        let retry_reason = match outcome {
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_MODIFIED => {
                return Ok(r);
            }
            Ok(r) => {
                let s = r.status();
                if !(s == 408 || s == 429 || s.is_server_error()) {
                    return Err(failed(format!("GET {url}: {s}")));
                }
                format!("GET {url}: {s}")
            }
            Err(e) => format!("GET {url}: {e}"),
        };
        if attempt >= retries || ctx.stopping() {
            return Err(failed(retry_reason));
        }
        attempt += 1;
        tracing::info!(message = "source request failed; retrying", reason = %retry_reason, attempt);
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        delay *= 2;
    }
}

/// The items of one answer (each as JSON object text) and the next cursor.
fn items(cfg: &HttpConfig, body: &[u8]) -> Result<(Vec<String>, Option<String>), SourceError> {
    match cfg.format {
        HttpFormat::Ndjson => {
            let text = String::from_utf8_lossy(body);
            Ok((
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect(),
                None,
            ))
        }
        HttpFormat::Json => {
            let doc: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| failed(format!("the answer is not JSON: {e}")))?;
            let cursor = cfg
                .cursor_pointer
                .as_deref()
                .and_then(|p| doc.pointer(p))
                .and_then(|v| match v {
                    serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
            let target = if cfg.records_pointer.is_empty() {
                Some(&doc)
            } else {
                doc.pointer(&cfg.records_pointer)
            };
            let items = match target {
                Some(serde_json::Value::Array(items)) => {
                    items.iter().map(|v| v.to_string()).collect()
                }
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(one) => vec![one.to_string()],
            };
            Ok((items, cursor))
        }
    }
}

/// The `rel="next"` target of a `Link` header, resolved against `base`.
fn next_link(header: &str, base: &reqwest::Url) -> Option<reqwest::Url> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| base.join(target).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_link_is_found_and_resolved() {
        let base = reqwest::Url::parse("http://h/api/items?page=1").unwrap();
        let next = next_link(
            r#"<http://h/api/items?page=1>; rel="prev", </api/items?page=3>; rel="next""#,
            &base,
        );
        assert_eq!(next.unwrap().as_str(), "http://h/api/items?page=3");
        assert!(next_link(r#"<x>; rel="last""#, &base).is_none());
    }

    #[test]
    fn a_next_page_on_another_origin_is_refused() {
        let base = reqwest::Url::parse("https://api.example/items").unwrap();
        for foreign in [
            "http://api.example/items?page=2",
            "https://other.example/items?page=2",
            "https://api.example:8443/items?page=2",
        ] {
            let next = reqwest::Url::parse(foreign).unwrap();
            let error = same_origin(next, &base, "a Link").unwrap_err().to_string();
            assert!(error.contains("another origin"), "{foreign}: {error}");
        }
        let next = reqwest::Url::parse("https://api.example/items?page=2").unwrap();
        assert!(same_origin(next, &base, "a Link").is_ok());
    }

    /// Two origins on loopback: `home` redirects `/away` to `foreign`, and
    /// serves `/big` larger than the cap; `foreign` records what reached it.
    #[tokio::test]
    async fn credentials_never_leave_the_origin_and_big_answers_are_cut() {
        dcs_shared::tls::install_crypto_provider();
        use std::sync::{Arc, Mutex};
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let foreign_url = format!("http://{}", foreign.local_addr().unwrap());
        let record = seen.clone();
        let foreign_app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let mut names: Vec<String> =
                    headers.keys().map(|k| k.as_str().to_owned()).collect();
                names.sort();
                record.lock().unwrap().push(names.join(","));
                "[]"
            }
        });
        tokio::spawn(async move { axum::serve(foreign, foreign_app).await });
        let home = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let home_url = format!("http://{}", home.local_addr().unwrap());
        let target = foreign_url.clone();
        let home_app = axum::Router::new()
            .route(
                "/away",
                axum::routing::get(move || {
                    let target = target.clone();
                    async move { axum::response::Redirect::temporary(&format!("{target}/x")) }
                }),
            )
            .route(
                "/here",
                axum::routing::get(|| async { axum::response::Redirect::temporary("/items") }),
            )
            .route("/items", axum::routing::get(|| async { "[1]" }))
            .route("/big", axum::routing::get(|| async { vec![b' '; 4096] }));
        tokio::spawn(async move { axum::serve(home, home_app).await });

        let cfg: HttpConfig = toml::from_str(&format!(
            "url = \"{home_url}/away\"\nmax_response_bytes = 1024\n[headers]\nx-api-key = \"secret\"\n"
        ))
        .unwrap();
        let base = reqwest::Url::parse(&cfg.url).unwrap();
        let client = client(&cfg, &base).unwrap();
        let error = client
            .get(base.clone())
            .header("x-api-key", "secret")
            .header("authorization", "Bearer secret")
            .send()
            .await
            .unwrap_err();
        assert!(error.is_redirect(), "{error}");
        assert!(
            seen.lock().unwrap().is_empty(),
            "the foreign origin was reached"
        );

        // Within the origin, redirects are followed, with no Referer.
        let here = reqwest::Url::parse(&format!("{home_url}/here")).unwrap();
        let response = client.get(here.clone()).send().await.unwrap();
        assert_eq!(read_capped(response, 1024, &here).await.unwrap(), b"[1]");

        let big = reqwest::Url::parse(&format!("{home_url}/big")).unwrap();
        let response = client.get(big.clone()).send().await.unwrap();
        let error = read_capped(response, 1024, &big)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_response_bytes"), "{error}");
    }
}
