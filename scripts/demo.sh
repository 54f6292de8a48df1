#!/usr/bin/env bash
# The whole pipeline on this machine: producer (curl) -> dcs-edge (SQLite
# buffer) -> mutual TLS + gzip -> dcs-aggregator -> PostgreSQL.
#
#   scripts/demo.sh [--once] [--records N]
#
# Builds the binaries, creates the database dcs_demo, certificates and configs
# under .dcs/demo/, starts both services in the background (logs in
# .dcs/demo/*.log), pushes N sample records (default 10000) as NDJSON and waits
# until PostgreSQL holds every one of them. The agent also collects by itself:
# a file source (cron "*/2 * * * * *") reads an NDJSON file the demo writes,
# maps its fields and checks them against a JSON Schema (one bad line becomes
# a dead letter), and a database source reads a demo table in the same local
# PostgreSQL. With --once it then stops both and exits 0 only if every pushed
# record, file line and table row arrived exactly once; without it, both keep
# running until Ctrl-C so you can push more.
#
# Re-running is fine: services left over from an earlier run are stopped, the
# certificates and database are reused, and each run pushes to a stream of its
# own, so it counts only its own records.
set -euo pipefail

DCS_SCRIPT_NAME=demo
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/demo.sh [--once] [--records N]

  --once         push, wait for delivery, print a summary, stop everything and
                 exit 0 if every record reached PostgreSQL exactly once
  --records N    how many sample records to push (default 10000)
  -h, --help     this text

Without --once the aggregator and the agent keep running until Ctrl-C.
EOF
}

ONCE=0
RECORDS=10000
while (($#)); do
    case "$1" in
    --once) ONCE=1 ;;
    --records)
        (($# >= 2)) || die "--records needs a number"
        RECORDS=$2
        shift
        ;;
    --records=*) RECORDS=${1#--records=} ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
    shift
done
[[ "$RECORDS" =~ ^[1-9][0-9]{0,8}$ ]] || die "--records must be a positive whole number, got '$RECORDS'"

CHUNK=1000
# Records the pull sources collect: lines of the demo file (plus one line
# that fails the stream's schema) and rows of the demo table.
FILE_LINES=50
DB_ROWS=50
# Items of the JSON array the http source fetches (run through the jobs API).
HTTP_ITEMS=20
DELIVERY_TIMEOUT_SECS=120
START_TIMEOUT_SECS=30
STOP_TIMEOUT_SECS=20

DB_NAME=dcs_demo
PG_URL_BASE=postgres://postgres@127.0.0.1:5432
PSQL=(psql -w -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres)

DEMO_DIR="$ROOT/.dcs/demo"
PKI_DIR="$DEMO_DIR/pki"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN_DIR="$TARGET_DIR/debug"

AGG_CONF="$DEMO_DIR/aggregator.toml"
EDGE_CONF="$DEMO_DIR/edge.toml"
AGG_LOG="$DEMO_DIR/aggregator.log"
EDGE_LOG="$DEMO_DIR/edge.log"
AGG_PIDFILE="$DEMO_DIR/aggregator.pid"
EDGE_PIDFILE="$DEMO_DIR/edge.pid"
HTTP_LOG="$DEMO_DIR/http-server.log"
HTTP_PIDFILE="$DEMO_DIR/http-server.pid"

# curl must never send loopback traffic through a proxy from the environment.
CURL=(curl --silent --show-error --noproxy '*')

AGG_PID=
EDGE_PID=
HTTP_PID=

# --- process management ------------------------------------------------------

# True when $1 is a live process running the binary named $2.
is_our_process() {
    local pid=$1 name=$2
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

# SIGTERM, wait for a clean exit, SIGKILL if it takes too long.
stop_pid() {
    local pid=$1 what=$2
    kill -0 "$pid" 2>/dev/null || return 0
    say "stopping $what (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_SECS))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "$what did not stop within ${STOP_TIMEOUT_SECS}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    # Reap our own child so its exit status does not linger.
    wait "$pid" 2>/dev/null || true
}

# Stops a process an earlier run left behind, found through its pid file.
stop_stale() {
    local pidfile=$1 name=$2 pid
    [[ -f "$pidfile" ]] || return 0
    pid=$(<"$pidfile")
    if is_our_process "$pid" "$name"; then
        say "a previous demo's $name is still running"
        stop_pid "$pid" "$name"
    fi
    rm -f "$pidfile"
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # The agent first, so it is not left retrying against a stopped aggregator.
    if [[ -n "$EDGE_PID" ]]; then stop_pid "$EDGE_PID" dcs-edge; fi
    if [[ -n "$AGG_PID" ]]; then stop_pid "$AGG_PID" dcs-aggregator; fi
    if [[ -n "$HTTP_PID" ]]; then stop_pid "$HTTP_PID" "the demo's HTTP server"; fi
    rm -f "$EDGE_PIDFILE" "$AGG_PIDFILE" "$HTTP_PIDFILE"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# First port from $1 upward that nothing on 127.0.0.1 accepts connections on.
pick_port() {
    local port=$1 last=$(($1 + 200))
    while ((port <= last)); do
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
        port=$((port + 1))
    done
    die "no free port between $1 and $last"
}

# Waits until `$2...` succeeds, as long as process $1 is alive.
wait_for() {
    local pid=$1 what=$2 log=$3
    shift 3
    local deadline=$((SECONDS + START_TIMEOUT_SECS))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "$what exited during start-up; log: $log"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$log" >&2 || true
            die "$what did not become ready within ${START_TIMEOUT_SECS}s; log: $log"
        fi
        sleep 0.2
    done
}

psql_value() { "${PSQL[@]}" -d "$DB_NAME" -tAc "$1" </dev/null; }

# --- steps -------------------------------------------------------------------

section "PostgreSQL"
bash "$ROOT/scripts/ensure-postgres.sh"

section "Build (cargo build --bins -p dcs-aggregator -p dcs-edge -p dcs-certs)"
# Only what the demo runs, so a crate it does not need cannot stop it.
cargo build --bins -p dcs-aggregator -p dcs-edge -p dcs-certs
for bin in dcs-aggregator dcs-edge dcs-certs; do
    [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin was not built"
done

section "Set-up in .dcs/demo"
mkdir -p "$DEMO_DIR"
stop_stale "$EDGE_PIDFILE" dcs-edge
stop_stale "$AGG_PIDFILE" dcs-aggregator

if [[ -z "$("${PSQL[@]}" -d postgres -tAc "select 1 from pg_database where datname = '$DB_NAME'" </dev/null)" ]]; then
    say "creating database $DB_NAME"
    "${PSQL[@]}" -d postgres -c "create database $DB_NAME" </dev/null
else
    say "reusing database $DB_NAME"
fi

if [[ ! -f "$PKI_DIR/ca/ca.pem" || ! -f "$PKI_DIR/ca/ca-key.pem" ]]; then
    say "creating a demo CA"
    rm -rf "$PKI_DIR"
    "$BIN_DIR/dcs-certs" init --out "$PKI_DIR/ca" --cn "DCS demo CA"
fi
if [[ ! -f "$PKI_DIR/server/server.pem" || ! -f "$PKI_DIR/server/server-key.pem" ]]; then
    "$BIN_DIR/dcs-certs" server --ca "$PKI_DIR/ca" --dns localhost --ip 127.0.0.1 --out "$PKI_DIR/server"
fi
if [[ ! -f "$PKI_DIR/agent/agent.pem" || ! -f "$PKI_DIR/agent/agent-key.pem" ]]; then
    "$BIN_DIR/dcs-certs" agent --ca "$PKI_DIR/ca" --tenant demo --agent edge-01 --out "$PKI_DIR/agent"
fi
say "certificates in $PKI_DIR (CA, server for localhost/127.0.0.1, agent demo/edge-01)"

# Streams of this run's own: earlier runs' rows in dcs_demo are not counted.
RUN_ID="$(date -u +%Y%m%dt%H%M%S)-$$"
STREAM="demo.run-$RUN_ID"
FILE_STREAM="demo.file-$RUN_ID"
DB_STREAM="demo.db-$RUN_ID"
HTTP_STREAM="demo.http-$RUN_ID"

# Pull sources. The file source reads $SOURCES_DIR/files/*.ndjson; files of
# earlier runs are removed first, so the agent forgets their checkpoints. The
# database source reads this run's rows of a demo table in dcs_demo.
SOURCES_DIR="$DEMO_DIR/sources"
mkdir -p "$SOURCES_DIR/files"
rm -f "$SOURCES_DIR"/files/*.ndjson "$SOURCES_DIR"/files/*.tmp
DEMO_FILE="$SOURCES_DIR/files/readings-$RUN_ID.ndjson"
DB_URL_FILE="$SOURCES_DIR/demo-db.url"
(
    umask 077
    echo "$PG_URL_BASE/$DB_NAME" >"$DB_URL_FILE"
)
"${PSQL[@]}" -d "$DB_NAME" -c "
    create table if not exists demo_source_readings (
        id bigserial primary key,
        run text not null,
        probe text not null,
        reading numeric not null,
        taken_at timestamptz not null default now());
    insert into demo_source_readings (run, probe, reading)
    select '$RUN_ID', 'probe-' || (i % 4), round((15 + random() * 10)::numeric, 2)
      from generate_series(1, $DB_ROWS) as i;" </dev/null
say "demo table demo_source_readings: $DB_ROWS rows for run $RUN_ID"

# The http source's API: a JSON array served by Python's static file server
# (python3 is installed with apt when missing), answering If-Modified-Since
# with 304 like a real API answering a conditional request.
HTTP_DIR="$SOURCES_DIR/http"
mkdir -p "$HTTP_DIR"
rm -f "$HTTP_DIR"/*.json
awk -v n="$HTTP_ITEMS" -v run="$RUN_ID" 'BEGIN {
    printf "{\"data\":["
    for (i = 0; i < n; i++)
        printf "%s{\"id\":\"%s-%d\",\"ticket\":%d,\"state\":\"%s\"}", (i ? "," : ""), run, i, i, (i % 3 ? "open" : "closed")
    printf "]}\n"
}' >"$HTTP_DIR/tickets.json"
command -v python3 >/dev/null 2>&1 || apt_install python3

AGG_PORT=$(pick_port 18443)
EDGE_PORT=$(pick_port 18780)
((EDGE_PORT != AGG_PORT)) || EDGE_PORT=$(pick_port $((AGG_PORT + 1)))
AGG_URL="https://localhost:$AGG_PORT"
EDGE_URL="http://127.0.0.1:$EDGE_PORT"
HTTP_PORT=$(pick_port 18880)

cat >"$AGG_CONF" <<EOF
# Written by scripts/demo.sh; rewritten on every run.
[listen]
address = "127.0.0.1:$AGG_PORT"

[tls]
ca = "$PKI_DIR/ca/ca.pem"
cert = "$PKI_DIR/server/server.pem"
key = "$PKI_DIR/server/server-key.pem"

[database]
url = "$PG_URL_BASE/$DB_NAME"
max_connections = 4
migrate_on_start = false

[log]
format = "text"
level = "info"
EOF

cat >"$EDGE_CONF" <<EOF
# Written by scripts/demo.sh; rewritten on every run.
[listen]
address = "127.0.0.1:$EDGE_PORT"

[buffer]
path = "$DEMO_DIR/edge-buffer.db"

[aggregator]
url = "$AGG_URL"
ca = "$PKI_DIR/agent/ca.pem"
cert = "$PKI_DIR/agent/agent.pem"
key = "$PKI_DIR/agent/agent-key.pem"

[retry]
max = "2s"

[log]
format = "text"
level = "info"

# The file the demo writes, read every 2 seconds (cron with a seconds field);
# fields renamed and a constant added, then checked against the schema below.
[[sources]]
name = "demo-file"
kind = "file"
stream = "$FILE_STREAM"
schedule = "*/2 * * * * *"
[sources.file]
paths = ["$SOURCES_DIR/files/*.ndjson"]
format = "ndjson"
[sources.transform]
rename = { "temp_c" = "temperature", "/probe/id" = "sensor" }
drop = ["probe"]
set = { site = "demo-site" }

# This run's rows of a table in the local PostgreSQL, by growing id.
[[sources]]
name = "demo-db"
kind = "database"
stream = "$DB_STREAM"
schedule = "1s"
[sources.database]
url_file = "$DB_URL_FILE"
query = "SELECT id, probe, reading, taken_at FROM demo_source_readings WHERE run = '$RUN_ID'"
cursor = ["id"]

# A JSON API, fetched only when asked through the jobs API (see below).
[[sources]]
name = "demo-http"
kind = "http"
stream = "$HTTP_STREAM"
schedule = "manual"
[sources.http]
url = "http://127.0.0.1:$HTTP_PORT/tickets.json"
format = "json"
records_pointer = "/data"
id_pointer = "/id"

[streams."$FILE_STREAM"]
schema = '{"type": "object", "required": ["sensor", "temperature"], "properties": {"sensor": {"type": "string"}, "temperature": {"type": "number"}}}'
EOF
# Newer aggregators also serve /metrics on a plain-HTTP admin listener
# (default 127.0.0.1:9464); give it a free port when this build has one.
ADMIN_URL=
ADMIN_PORT=$(pick_port 19464)
if DCS_AGG_ADMIN__ADDRESS="127.0.0.1:$ADMIN_PORT" \
    "$BIN_DIR/dcs-aggregator" check-config --config "$AGG_CONF" >/dev/null 2>&1; then
    printf '\n[admin]\naddress = "127.0.0.1:%s"\n' "$ADMIN_PORT" >>"$AGG_CONF"
    ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
fi
say "configs: $AGG_CONF, $EDGE_CONF"

"$BIN_DIR/dcs-aggregator" check-config --config "$AGG_CONF" >/dev/null
"$BIN_DIR/dcs-edge" check-config --config "$EDGE_CONF" >/dev/null

section "Start dcs-aggregator and dcs-edge"
# Proxy variables from the environment would send the agent's loopback
# traffic elsewhere (the demo talks to 127.0.0.1 only), and the logs are files,
# so no colour codes. `env` execs the binary, so $! is the service's own pid.
CLEAN_ENV=(env -u HTTPS_PROXY -u https_proxy -u ALL_PROXY -u all_proxy NO_COLOR=1)

say "migrating $DB_NAME"
"${CLEAN_ENV[@]}" "$BIN_DIR/dcs-aggregator" migrate --config "$AGG_CONF" >>"$AGG_LOG" 2>&1 ||
    die "dcs-aggregator migrate failed; log: $AGG_LOG"

"${CLEAN_ENV[@]}" "$BIN_DIR/dcs-aggregator" serve --config "$AGG_CONF" </dev/null >>"$AGG_LOG" 2>&1 &
AGG_PID=$!
echo "$AGG_PID" >"$AGG_PIDFILE"
wait_for "$AGG_PID" dcs-aggregator "$AGG_LOG" \
    "${CURL[@]}" --fail --max-time 2 --cacert "$PKI_DIR/agent/ca.pem" \
    --cert "$PKI_DIR/agent/agent.pem" --key "$PKI_DIR/agent/agent-key.pem" "$AGG_URL/health"
say "dcs-aggregator (pid $AGG_PID) listening on $AGG_URL, log $AGG_LOG"
if [[ -n "$ADMIN_URL" ]]; then say "dcs-aggregator metrics: $ADMIN_URL/metrics"; fi

"${CLEAN_ENV[@]}" "$BIN_DIR/dcs-edge" run --config "$EDGE_CONF" </dev/null >>"$EDGE_LOG" 2>&1 &
EDGE_PID=$!
echo "$EDGE_PID" >"$EDGE_PIDFILE"
wait_for "$EDGE_PID" dcs-edge "$EDGE_LOG" "${CURL[@]}" --fail --max-time 2 "$EDGE_URL/health"
say "dcs-edge (pid $EDGE_PID) listening on $EDGE_URL, log $EDGE_LOG"

stop_stale "$HTTP_PIDFILE" http.server
python3 -m http.server "$HTTP_PORT" --bind 127.0.0.1 --directory "$HTTP_DIR" </dev/null >>"$HTTP_LOG" 2>&1 &
HTTP_PID=$!
echo "$HTTP_PID" >"$HTTP_PIDFILE"
wait_for "$HTTP_PID" http.server "$HTTP_LOG" "${CURL[@]}" --fail --max-time 2 -o /dev/null \
    "http://127.0.0.1:$HTTP_PORT/tickets.json"
say "the http source's API (pid $HTTP_PID): http://127.0.0.1:$HTTP_PORT/tickets.json, log $HTTP_LOG"

section "Run the http source through the jobs API"
trigger=$("${CURL[@]}" --max-time 10 -H 'content-type: application/json' \
    -d '{"source":"demo-http"}' "$EDGE_URL/api/v1/jobs/trigger") || die "jobs API: trigger failed"
JOB_ID=$(grep -o '"job_id":"[^"]*"' <<<"$trigger" | cut -d'"' -f4)
[[ -n "$JOB_ID" ]] || die "jobs API: no job_id in $trigger"
say "POST /api/v1/jobs/trigger {\"source\":\"demo-http\"} -> job $JOB_ID"
deadline=$((SECONDS + DELIVERY_TIMEOUT_SECS))
job_state=
while :; do
    job_state=$("${CURL[@]}" --max-time 5 "$EDGE_URL/api/v1/jobs/status/$JOB_ID" |
        grep -o '"state":"[^"]*"' | cut -d'"' -f4)
    [[ "$job_state" == succeeded || "$job_state" == failed ]] && break
    ((SECONDS < deadline)) || break
    sleep 0.25
done
say "GET /api/v1/jobs/status/$JOB_ID -> $job_state; GET /api/v1/jobs/result/$JOB_ID:"
"${CURL[@]}" --max-time 5 "$EDGE_URL/api/v1/jobs/result/$JOB_ID" || true
echo

section "Write the file the file source reads"
awk -v n="$FILE_LINES" 'BEGIN {
    for (i = 0; i < n; i++)
        printf "{\"line\":%d,\"temp_c\":%.1f,\"probe\":{\"id\":\"probe-%d\",\"slot\":%d}}\n", i, 18 + (i % 30) / 10, i % 4, i % 8
    # Fails the stream schema (the temperature is text): a dead letter.
    printf "{\"line\":%d,\"temp_c\":\"warm\",\"probe\":{\"id\":\"probe-x\"}}\n", n
}' >"$DEMO_FILE.tmp"
# Renamed into place whole, so the source never sees half a file.
mv "$DEMO_FILE.tmp" "$DEMO_FILE"
say "$DEMO_FILE: $FILE_LINES good lines and 1 that fails the schema"

section "Push $RECORDS records"
say "stream $STREAM, NDJSON in chunks of $CHUNK"

# NDJSON for records [$1, $1 + $2) of this run.
sample_records() {
    awk -v stream="$STREAM" -v first="$1" -v n="$2" 'BEGIN {
        for (i = first; i < first + n; i++)
            printf "{\"stream\":\"%s\",\"id\":\"%s-%d\",\"payload\":{\"i\":%d,\"sensor\":\"s-%02d\",\"temp_c\":%.1f,\"msg\":\"sample record %d\"}}\n",
                stream, stream, i, i, i % 16, 18 + (i % 70) / 10, i
    }'
}

START_NS=$(date +%s%N)
pushed=0
while ((pushed < RECORDS)); do
    n=$((RECORDS - pushed < CHUNK ? RECORDS - pushed : CHUNK))
    response=$(sample_records "$pushed" "$n" |
        "${CURL[@]}" --max-time 60 -w '\n%{http_code}' -H 'content-type: application/x-ndjson' \
            --data-binary @- "$EDGE_URL/v1/records") || die "push to $EDGE_URL failed"
    code=${response##*$'\n'}
    body=${response%$'\n'*}
    [[ "$code" == 200 ]] || die "the agent answered $code to records $pushed..$((pushed + n - 1)): $body"
    accepted=$(grep -o '"accepted":[0-9]*' <<<"$body" | cut -d: -f2)
    [[ "$accepted" == "$n" ]] || die "the agent accepted ${accepted:-?} of $n records: $body"
    pushed=$((pushed + n))
done
PUSHED_NS=$(date +%s%N)
say "$pushed records committed to the agent's SQLite buffer"

section "Wait for PostgreSQL"
COUNT_SQL="select count(*) from records where stream = '$STREAM'"
deadline=$((SECONDS + DELIVERY_TIMEOUT_SECS))
count=0
while :; do
    count=$(psql_value "$COUNT_SQL")
    ((count >= RECORDS)) && break
    if ((SECONDS >= deadline)); then
        warn "only $count of $RECORDS records reached PostgreSQL within ${DELIVERY_TIMEOUT_SECS}s"
        break
    fi
    if ! kill -0 "$EDGE_PID" 2>/dev/null || ! kill -0 "$AGG_PID" 2>/dev/null; then
        warn "a service exited while records were in transit; logs: $EDGE_LOG, $AGG_LOG"
        break
    fi
    sleep 0.25
done
DONE_NS=$(date +%s%N)
distinct=$(psql_value "select count(distinct record_id) from records where stream = '$STREAM'")

# The pull sources: every good file line and every table row, once.
source_rows() { psql_value "select count(*) || ' ' || count(distinct payload) from records where stream = '$1'"; }
deadline=$((SECONDS + DELIVERY_TIMEOUT_SECS))
while :; do
    read -r file_count file_distinct <<<"$(source_rows "$FILE_STREAM")"
    read -r db_count db_distinct <<<"$(source_rows "$DB_STREAM")"
    read -r http_count http_distinct <<<"$(source_rows "$HTTP_STREAM")"
    ((file_count >= FILE_LINES && db_count >= DB_ROWS && http_count >= HTTP_ITEMS)) && break
    if ((SECONDS >= deadline)); then
        warn "sources: $file_count of $FILE_LINES file lines, $db_count of $DB_ROWS table rows and $http_count of $HTTP_ITEMS API items within ${DELIVERY_TIMEOUT_SECS}s"
        break
    fi
    sleep 0.25
done
# This agent process's count (the buffer's dead letters include earlier runs').
rejected=$("${CURL[@]}" --max-time 5 "$EDGE_URL/metrics" |
    awk '/^dcs_agent_source_records_total\{/ && /source="demo-file"/ && /result="rejected"/ { print $NF }')

section "Summary"
rate() { awk -v n="$1" -v ns="$2" 'BEGIN { s = ns / 1e9; if (s <= 0) s = 1e-9; printf "%.2f s, %.0f records/s", s, n / s }'; }
say "pushed     $RECORDS records: $(rate "$RECORDS" $((PUSHED_NS - START_NS))) (HTTP + SQLite commit)"
say "delivered  $count rows, $distinct distinct ids: $(rate "$count" $((DONE_NS - START_NS))) end to end"
echo
say "sample rows:"
"${PSQL[@]}" -d "$DB_NAME" -P pager=off -c \
    "select r.seq, a.tenant_id || '/' || a.name as agent, r.record_id, r.ts, r.payload
       from records r join agents a on a.id = r.agent_id
      where r.stream = '$STREAM' order by r.epoch, r.seq limit 5" </dev/null
say "file source, stream $FILE_STREAM ($file_count rows), fields mapped:"
"${PSQL[@]}" -d "$DB_NAME" -P pager=off -c \
    "select record_id, payload from records where stream = '$FILE_STREAM' order by seq limit 3" </dev/null
say "database source, stream $DB_STREAM ($db_count rows):"
"${PSQL[@]}" -d "$DB_NAME" -P pager=off -c \
    "select record_id, payload from records where stream = '$DB_STREAM' order by seq limit 3" </dev/null
say "http source, stream $HTTP_STREAM ($http_count rows):"
"${PSQL[@]}" -d "$DB_NAME" -P pager=off -c \
    "select record_id, payload from records where stream = '$HTTP_STREAM' order by seq limit 3" </dev/null
say "the agent's latest jobs:"
"${CURL[@]}" --max-time 5 "$EDGE_URL/api/v1/jobs?limit=3" || true
echo
say "the agent's /v1/status:"
status_json=$("${CURL[@]}" --max-time 5 "$EDGE_URL/v1/status" || echo '{}')
if command -v python3 >/dev/null 2>&1; then
    python3 -m json.tool <<<"$status_json" 2>/dev/null || echo "$status_json"
else
    echo "$status_json"
fi

ok=0
if ((count == RECORDS && distinct == RECORDS)); then
    ok=1
    say "OK: all $RECORDS records arrived in PostgreSQL exactly once"
else
    warn "FAILED: expected $RECORDS rows with distinct ids, got $count rows and $distinct distinct ids"
fi
if ((file_count == FILE_LINES && file_distinct == FILE_LINES && db_count == DB_ROWS && db_distinct == DB_ROWS)); then
    say "OK: the file source's $FILE_LINES lines and the database source's $DB_ROWS rows arrived exactly once"
else
    ok=0
    warn "FAILED: expected $FILE_LINES file rows and $DB_ROWS table rows, each once; got $file_count ($file_distinct distinct) and $db_count ($db_distinct distinct)"
fi
if [[ "$job_state" == succeeded ]] && ((http_count == HTTP_ITEMS && http_distinct == HTTP_ITEMS)); then
    say "OK: the http source's job $JOB_ID succeeded and its $HTTP_ITEMS items arrived exactly once"
else
    ok=0
    warn "FAILED: expected job $JOB_ID to succeed (it is ${job_state:-unknown}) and $HTTP_ITEMS API items once; got $http_count ($http_distinct distinct)"
fi
if [[ "$rejected" == 1 ]]; then
    say "OK: the file line that fails the schema went to the dead letters (dcs-edge buffer export shows it)"
else
    ok=0
    warn "FAILED: expected 1 rejected file line (failing the schema), the agent counted ${rejected:-none}"
fi

if ((ONCE)); then
    ((ok)) || exit 1
    exit 0
fi
((ok)) || warn "keeping the services running so you can look; logs: $EDGE_LOG, $AGG_LOG"

section "Running: Ctrl-C stops both"
cat <<EOF
Push more records to the agent, e.g.

  curl -H 'content-type: application/json' \\
       -d '{"stream":"demo.manual","payload":{"hello":"world"}}' \\
       $EDGE_URL/v1/records

  curl $EDGE_URL/v1/status

and look at them in PostgreSQL:

  psql -h 127.0.0.1 -U postgres $DB_NAME -c "select stream, count(*) from records group by stream"

Logs: $EDGE_LOG and $AGG_LOG
EOF
if [[ -n "$ADMIN_URL" ]]; then echo "Aggregator metrics: curl $ADMIN_URL/metrics"; fi
while kill -0 "$EDGE_PID" 2>/dev/null && kill -0 "$AGG_PID" 2>/dev/null; do
    sleep 1
done
die "a service exited on its own; logs: $EDGE_LOG, $AGG_LOG"
