#!/usr/bin/env bash
# Fuzzes the platform API against its own OpenAPI document (docs/API.md,
# docs/SECURITY.md "One error shape"):
#
#   scripts/check-api-fuzz.sh
#
# 1. installs schemathesis (PyPI, pinned) into a virtualenv cached outside the
#    repository, keyed by its version: ~/.cache/dcs/schemathesis-VERSION
#    (XDG_CACHE_HOME is honoured; python3-venv with apt if needed)
# 2. creates a fresh database, certificates and an admin token, and starts the
#    real dcs-aggregator with the platform API on a free loopback port
# 3. runs `schemathesis run --checks all` against the served /openapi.json,
#    bounded in examples and time, and fails on any 5xx, undocumented status,
#    response that does not match its schema, or any other check
#
# Needs PostgreSQL on 127.0.0.1:5432 (scripts/ensure-postgres.sh) and the
# debug binaries (cargo build --workspace --bins). DCS_FUZZ_SEED picks another
# seed (the default one keeps CI reproducible); DCS_FUZZ_MAX_TIME and
# DCS_FUZZ_MAX_EXAMPLES widen the search for a longer local run (the test
# command runs the short default; the long run is
# `DCS_FUZZ_MAX_TIME=900 DCS_FUZZ_MAX_EXAMPLES=100 scripts/check-api-fuzz.sh`).
set -Eeuo pipefail

DCS_SCRIPT_NAME="check-api-fuzz"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Pinned, so a new schemathesis release (new checks) cannot fail CI on its own.
SCHEMATHESIS_VERSION=4.32.5
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/dcs/schemathesis-$SCHEMATHESIS_VERSION"
SEED=${DCS_FUZZ_SEED:-20261206}
# About two minutes on a shared 2-core machine; the whole step stays under
# five with the wall-clock guard below.
MAX_TIME=${DCS_FUZZ_MAX_TIME:-75}
MAX_EXAMPLES=${DCS_FUZZ_MAX_EXAMPLES:-20}
DB_NAME=dcs_api_fuzz
PG_URL_BASE="postgres://postgres@127.0.0.1:5432"
PSQL=(psql -w -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d postgres)

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN_DIR="$TARGET_DIR/debug"

SCRATCH=$(mktemp -d)
AGG_PID=
cleanup() {
    local status=$?
    if [[ -n "$AGG_PID" ]] && kill -0 "$AGG_PID" 2>/dev/null; then
        kill -TERM "$AGG_PID" 2>/dev/null || true
        wait "$AGG_PID" 2>/dev/null || true
    fi
    "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB_NAME" </dev/null >/dev/null 2>&1 || true
    rm -rf "$SCRATCH"
    exit "$status"
}
trap cleanup EXIT

# A free port on 127.0.0.1, from the kernel.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

section "schemathesis $SCHEMATHESIS_VERSION"
if [[ ! -x $VENV/bin/schemathesis ]]; then
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION" || {
        rm -rf "$VENV"
        die "could not install schemathesis $SCHEMATHESIS_VERSION from PyPI"
    }
fi
say "$("$VENV/bin/schemathesis" --version)"

section "start dcs-aggregator with the platform API"
# The workspace build test.sh makes: building single packages would resolve
# other dependency features and rebuild them.
cargo build --quiet --workspace --bins
PKI="$SCRATCH/pki"
"$BIN_DIR/dcs-certs" init --out "$PKI/ca" >/dev/null
"$BIN_DIR/dcs-certs" server --ca "$PKI/ca" --dns localhost --ip 127.0.0.1 --out "$PKI/server" >/dev/null
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB_NAME" </dev/null
"${PSQL[@]}" -c "CREATE DATABASE $DB_NAME" </dev/null

AGENTS_PORT=$(free_port)
PLATFORM_PORT=$(free_port)
ADMIN_PORT=$(free_port)
export DCS_AGG_LISTEN__ADDRESS="127.0.0.1:$AGENTS_PORT"
export DCS_AGG_PLATFORM__ENABLED=true
export DCS_AGG_PLATFORM__ADDRESS="127.0.0.1:$PLATFORM_PORT"
export DCS_AGG_ADMIN__ADDRESS="127.0.0.1:$ADMIN_PORT"
export DCS_AGG_TLS__CA="$PKI/ca/ca.pem"
export DCS_AGG_TLS__CERT="$PKI/server/server.pem"
export DCS_AGG_TLS__KEY="$PKI/server/server-key.pem"
export DCS_AGG_DATABASE__URL="$PG_URL_BASE/$DB_NAME"
export DCS_AGG_LOG__FORMAT=json
export DCS_AGG_LOG__LEVEL=warn
export NO_COLOR=1

"$BIN_DIR/dcs-aggregator" migrate >/dev/null
"$BIN_DIR/dcs-aggregator" tenant create acme >/dev/null
# The fuzzer revokes tokens by id; the run's own token gets an id it will
# not guess, so the run keeps testing past authentication.
"${PSQL[@]}" -d "$DB_NAME" -c "SELECT setval(pg_get_serial_sequence('api_tokens', 'id'), 900000000000)" </dev/null >/dev/null
TOKEN=$("$BIN_DIR/dcs-aggregator" token create --name api-fuzz --role admin 2>/dev/null | tail -n 1)
[[ $TOKEN == dcs_* ]] || die "could not create an admin token (got: $TOKEN)"

AGG_LOG="$SCRATCH/aggregator.log"
"$BIN_DIR/dcs-aggregator" serve </dev/null >"$AGG_LOG" 2>&1 &
AGG_PID=$!
BASE="https://localhost:$PLATFORM_PORT"
for _ in $(seq 1 100); do
    if curl --silent --fail --max-time 2 --cacert "$PKI/ca/ca.pem" "$BASE/openapi.json" -o "$SCRATCH/openapi.json"; then
        break
    fi
    kill -0 "$AGG_PID" 2>/dev/null || {
        cat "$AGG_LOG" >&2
        die "dcs-aggregator exited"
    }
    sleep 0.2
done
[[ -s $SCRATCH/openapi.json ]] || die "the platform API did not serve /openapi.json"
say "serving $BASE/openapi.json ($(wc -c <"$SCRATCH/openapi.json") bytes)"

section "schemathesis run --checks all (seed $SEED, at most ${MAX_TIME}s)"
status=0
# The guard only fires if schemathesis itself hangs: --max-time bounds it.
# One worker: with two, this Python (3.11.7) raised "AST constructor
# recursion depth mismatch" inside hypothesis (ast.parse in two threads at
# once, CPython gh-106905), failing the run on the tool, not the API.
timeout --kill-after=10 $((MAX_TIME + 120)) \
    env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy -u ALL_PROXY -u all_proxy \
    "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --checks all \
    --tls-verify "$PKI/ca/ca.pem" \
    --header "Authorization: Bearer $TOKEN" \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 30 \
    --generation-database none \
    --no-color ||
    status=$?

if grep -q '"level":"ERROR"' "$AGG_LOG"; then
    warn "the aggregator logged errors during the run:"
    grep '"level":"ERROR"' "$AGG_LOG" | head -n 20 >&2
    status=1
fi
if ((status != 0)); then
    die "schemathesis found problems (exit $status); aggregator log tail:$(printf '\n')$(tail -n 20 "$AGG_LOG")"
fi
say "no 5xx, no undocumented status, every check passed"
