//! `GET /api/v1/records`: a tenant's records in time order, paginated by key.
//!
//! Design constraints:
//! - **Keyset pagination.** Rows are ordered by `(ts, agent_id, epoch, seq)`,
//!   which is unique, and the cursor is the last row's key: a page is "the
//!   next `limit` rows after this key", so rows inserted while a client pages
//!   never shift a page and no stored row is returned twice or skipped. (A row
//!   inserted *behind* the cursor, with an older `ts`, is seen by the next
//!   export, not this one.) The cursor is opaque to clients.
//! - **Always one tenant's rows** for a scoped token: the tenant condition is
//!   added by [`Principal::tenant_scope`], never taken from the client alone.
//! - `Accept: application/x-ndjson` streams every matching row, one JSON
//!   object per line, fetched page by page so memory stays flat for any range.

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::PgPool;
use uuid::Uuid;

use super::auth::Principal;
use super::{ApiError, PlatformState};

/// Rows per query of an NDJSON export: large enough that round trips do not
/// dominate, small enough to keep each query short and memory flat.
const EXPORT_PAGE: i64 = 1000;
pub const NDJSON: &str = "application/x-ndjson";

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// Required for an unscoped token that wants one tenant; a scoped token's
    /// own tenant is implied and any other is refused.
    pub tenant: Option<String>,
    pub stream: Option<String>,
    /// The agent id (as in its certificate).
    pub agent: Option<String>,
    /// RFC 3339, inclusive, on the record's `ts`.
    pub from: Option<String>,
    /// RFC 3339, exclusive.
    pub to: Option<String>,
    /// Rows per page, 1 to 1000 (default 100). With
    /// `Accept: application/x-ndjson` it caps the whole export instead, and
    /// may be larger.
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordView {
    pub tenant: String,
    pub agent: String,
    pub epoch: Uuid,
    pub seq: i64,
    /// The producer's idempotency id.
    pub id: String,
    pub stream: String,
    pub ts: String,
    pub received_at: String,
    /// The producer's JSON object, as stored.
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordsPage {
    pub records: Vec<RecordView>,
    /// Pass as `cursor` for the next page; absent when this page was the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z: every timestamp a
/// row can have, well inside what PostgreSQL's interval arithmetic takes.
const MIN_CURSOR_US: i64 = -62_135_596_800_000_000;
const MAX_CURSOR_US: i64 = 253_402_300_799_999_999;

/// Every cursor [`Key::encode`] writes matches this, and every string that
/// matches it is a position [`Key::decode`] accepts: microseconds within
/// ±16 digits (years 1653 to 2286, inside the bounds below), an agent id,
/// an epoch UUID and a sequence number.
pub(crate) const CURSOR_PATTERN: &str = "^(-?[0-9]{1,16}\\.[0-9]{1,18}\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\\.[0-9]{1,18})?$";

/// A row's position in the order: `(ts, agent_id, epoch, seq)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    ts_us: i64,
    agent_id: i64,
    epoch: Uuid,
    seq: i64,
}

impl Key {
    /// `ts.agent_id.epoch.seq`: a grammar the OpenAPI document states
    /// ([`CURSOR_PATTERN`]), so every cursor it allows names a position.
    fn encode(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.ts_us, self.agent_id, self.epoch, self.seq
        )
    }

    fn decode(cursor: &str) -> Result<Key, ApiError> {
        let bad = || ApiError::BadRequest("cursor is not one this API returned".into());
        // Cursors handed out before the dotted form were base64 of
        // `ts:agent_id:epoch:seq`; they stay valid.
        let (text, separator) = if cursor.contains('.') {
            (cursor.to_owned(), '.')
        } else {
            (super::decode_cursor(cursor)?, ':')
        };
        let mut parts = text.split(separator);
        let mut next = || parts.next().ok_or_else(bad);
        let key = Key {
            ts_us: next()?.parse().map_err(|_| bad())?,
            agent_id: next()?.parse().map_err(|_| bad())?,
            epoch: next()?.parse().map_err(|_| bad())?,
            seq: next()?.parse().map_err(|_| bad())?,
        };
        // PostgreSQL's timestamps end long before i64 microseconds do; a
        // crafted cursor must be a 400 here, not "interval out of range" there.
        if !(MIN_CURSOR_US..=MAX_CURSOR_US).contains(&key.ts_us) {
            return Err(bad());
        }
        Ok(key)
    }
}

/// A query with every parameter checked, ready to run page after page.
#[derive(Debug, Clone)]
struct Filter {
    tenant: Option<String>,
    stream: Option<String>,
    agent: Option<String>,
    from_us: Option<i64>,
    to_us: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Row {
    agent_id: i64,
    agent: String,
    tenant_id: String,
    epoch: Uuid,
    seq: i64,
    record_id: String,
    stream: String,
    ts_us: i64,
    received_us: i64,
    payload: String,
}

impl Row {
    fn key(&self) -> Key {
        Key {
            ts_us: self.ts_us,
            agent_id: self.agent_id,
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    fn view(self) -> Result<RecordView, ApiError> {
        Ok(RecordView {
            tenant: self.tenant_id,
            agent: self.agent,
            epoch: self.epoch,
            seq: self.seq,
            id: self.record_id,
            stream: self.stream,
            ts: super::format_time(self.ts_us),
            received_at: super::format_time(self.received_us),
            // jsonb renders valid JSON; failing here is a bug, not bad input.
            payload: RawValue::from_string(self.payload).map_err(|_| ApiError::Internal)?,
        })
    }
}

enum Arg {
    Text(String),
    Int(i64),
    Uuid(Uuid),
}

async fn fetch_page(
    pool: &PgPool,
    filter: &Filter,
    after: Option<&Key>,
    limit: i64,
) -> Result<Vec<Row>, sqlx::Error> {
    let mut conditions = Vec::new();
    let mut args = Vec::new();
    let mut arg = |a: Arg| {
        args.push(a);
        format!("${}", args.len())
    };
    if let Some(t) = &filter.tenant {
        conditions.push(format!("r.tenant_id = {}", arg(Arg::Text(t.clone()))));
    }
    if let Some(s) = &filter.stream {
        conditions.push(format!("r.stream = {}", arg(Arg::Text(s.clone()))));
    }
    if let Some(a) = &filter.agent {
        conditions.push(format!("a.name = {}", arg(Arg::Text(a.clone()))));
    }
    if let Some(from) = filter.from_us {
        conditions.push(format!("r.ts >= {}", super::sql_ts(&arg(Arg::Int(from)))));
    }
    if let Some(to) = filter.to_us {
        conditions.push(format!("r.ts < {}", super::sql_ts(&arg(Arg::Int(to)))));
    }
    if let Some(k) = after {
        let ts = super::sql_ts(&arg(Arg::Int(k.ts_us)));
        let agent = arg(Arg::Int(k.agent_id));
        let epoch = arg(Arg::Uuid(k.epoch));
        let seq = arg(Arg::Int(k.seq));
        conditions.push(format!(
            "(r.ts, r.agent_id, r.epoch, r.seq) > ({ts}, {agent}, {epoch}, {seq})"
        ));
    }
    let limit = arg(Arg::Int(limit));
    let sql = format!(
        "SELECT r.agent_id, a.name AS agent, r.tenant_id, r.epoch, r.seq, r.record_id, r.stream, \
                {ts} AS ts_us, {received} AS received_us, r.payload::text AS payload \
         FROM records r JOIN agents a ON a.id = r.agent_id \
         {where_} {conditions} \
         ORDER BY r.ts, r.agent_id, r.epoch, r.seq LIMIT {limit}",
        ts = super::sql_us("r.ts"),
        received = super::sql_us("r.received_at"),
        where_ = if conditions.is_empty() { "" } else { "WHERE" },
        conditions = conditions.join(" AND "),
    );
    let mut query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql));
    for a in args {
        query = match a {
            Arg::Text(s) => query.bind(s),
            Arg::Int(i) => query.bind(i),
            Arg::Uuid(u) => query.bind(u),
        };
    }
    query.fetch_all(pool).await
}

/// A tenant's records in time order, a page at a time, or every matching
/// record as NDJSON with `Accept: application/x-ndjson`.
#[utoipa::path(get, path = "/api/v1/records", tag = "records", operation_id = "records_list", params(RecordsQuery),
    responses(
        (status = 200, description = "a page (JSON) or the whole range (NDJSON, one RecordView per line)",
            content((RecordsPage = "application/json"), (RecordView = "application/x-ndjson"))),
        (status = 400, description = "a parameter or body is invalid", body = super::openapi::ErrorSchema),
        (status = 403, description = "another tenant", body = super::openapi::ErrorSchema)))]
pub async fn list(
    State(state): State<PlatformState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(q): Query<RecordsQuery>,
) -> Result<Response, ApiError> {
    let tenant = principal.tenant_scope(q.tenant.as_deref())?;
    let filter = Filter {
        tenant,
        stream: q.stream,
        agent: q.agent,
        from_us: q
            .from
            .as_deref()
            .map(|v| super::parse_time("from", v))
            .transpose()?,
        to_us: q
            .to
            .as_deref()
            .map(|v| super::parse_time("to", v))
            .transpose()?,
    };
    // An empty cursor is the first page, like none.
    let after = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(Key::decode)
        .transpose()?;
    let wants_ndjson = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON));
    if wants_ndjson {
        // For an export, `limit` caps the whole stream rather than a page.
        let total = match q.limit {
            Some(n) if n < 1 => {
                return Err(ApiError::BadRequest("limit must be at least 1".into()));
            }
            other => other,
        };
        return Ok(export(state.pool.clone(), filter, after, total));
    }
    let limit = super::page_limit(q.limit)?;
    let rows = fetch_page(&state.pool, &filter, after.as_ref(), limit).await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.key().encode()))
        .flatten();
    let records = rows.into_iter().map(Row::view).collect::<Result<_, _>>()?;
    Ok(Json(RecordsPage {
        records,
        next_cursor,
    })
    .into_response())
}

struct ExportState {
    pool: PgPool,
    filter: Filter,
    after: Option<Key>,
    /// Rows still to send when the client set a limit.
    remaining: Option<i64>,
    done: bool,
}

/// Streams the rows page by page. A database error mid-stream ends the
/// response early (the client sees a truncated body and can resume from the
/// last line's key with a normal page query).
fn export(pool: PgPool, filter: Filter, after: Option<Key>, total: Option<i64>) -> Response {
    let state = ExportState {
        pool,
        filter,
        after,
        remaining: total,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let page = s.remaining.map_or(EXPORT_PAGE, |r| r.min(EXPORT_PAGE));
        let rows = match fetch_page(&s.pool, &s.filter, s.after.as_ref(), page).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(message = "records export ended by a database error", %error);
                s.done = true;
                return Some((Err(std::io::Error::other("database error")), s));
            }
        };
        let n = rows.len() as i64;
        s.done = n < page;
        if let Some(r) = &mut s.remaining {
            *r -= n;
            s.done |= *r <= 0;
        }
        s.after = rows.last().map(Row::key);
        let mut out = Vec::with_capacity(rows.len() * 256);
        for row in rows {
            let Ok(view) = row.view() else { continue };
            if serde_json::to_writer(&mut out, &view).is_ok() {
                out.push(b'\n');
            }
        }
        Some((Ok(Bytes::from(out)), s))
    });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_encodes_the_whole_key() {
        let key = Key {
            ts_us: -5,
            agent_id: 9,
            epoch: Uuid::from_u128(7),
            seq: 1 << 40,
        };
        assert_eq!(Key::decode(&key.encode()).unwrap(), key);
        let old = super::super::encode_cursor(&format!("-5:9:{}:{}", key.epoch, key.seq));
        assert_eq!(Key::decode(&old).unwrap(), key);
        assert!(Key::decode(&super::super::encode_cursor("1:2:3")).is_err());
        let far = format!("{}:1:{}:1", i64::MAX, Uuid::nil());
        assert!(Key::decode(&super::super::encode_cursor(&far)).is_err());
    }
}
