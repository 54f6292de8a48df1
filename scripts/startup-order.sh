#!/usr/bin/env bash
# Regenerates edge-agent/startup-order.txt: the functions the release agent
# runs while it starts, takes a few records, idles and stops, for the linker
# to place together (edge-agent/build.rs; docs/PERFORMANCE.md, "Footprint").
#
#   scripts/startup-order.sh [--no-build]
#
# --no-build takes target/release/dcs-edge (and dcs-certs) as they are and
# adds the names it runs to the list, keeping the names already there (of
# the other build); without it, both builds are made and the list is
# written afresh.
#
# Why: an idle agent's resident memory is mostly its own code, and the
# kernel maps the 64 KiB around every page a process touches. Start-up code
# scattered over the whole binary made 8.8 of its 10.3 MiB of code resident
# while only about 2 MiB of it ever ran. Listed together, they fill few
# 64 KiB blocks.
#
# The list is names of symbols, so it goes stale as the code changes: a
# name the build no longer has is skipped, and the agent is as large as
# without the list, never wrong. Regenerate it after a toolchain or
# dependency update, or when the benchmark's idle RSS grows. It runs the
# agent under valgrind's callgrind (installed with apt if missing) with an
# aggregator that does not answer, so nothing but the agent is needed.
set -euo pipefail

DCS_SCRIPT_NAME=startup-order
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
OUT=$ROOT/edge-agent/startup-order.txt

command -v valgrind >/dev/null 2>&1 || apt_install valgrind
command -v curl >/dev/null 2>&1 || apt_install curl

WORK=$(mktemp -d)
AGENT_PID=
cleanup() {
    [[ -n "$AGENT_PID" ]] && kill -KILL "$AGENT_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# Symbol names carry a hash of each crate's build, and cargo resolves
# features for the packages it is asked to build: the agent built with the
# workspace (scripts/bench.sh) and alone (`cargo deb -p dcs-edge`, the
# package) name their dependencies' functions differently. The list holds
# the names of both builds.
BUILDS=("--workspace --bins" "-p dcs-edge")
if [[ "${1:-}" == "--no-build" ]]; then
    BUILDS=("")
    if [[ -f "$OUT" ]]; then
        grep -v '^#' "$OUT" >"$WORK/ran.kept" || true
    fi
fi

trace() { # BINARY CERTS_BIN OUT: the functions BINARY ran, one a line
    local bin=$1 certs=$2 out=$3 dir
    dir=$(mktemp -d -p "$WORK")
    "$certs" init --out "$dir/ca" >/dev/null
    "$certs" agent --ca "$dir/ca" --tenant order --agent order --out "$dir/agent" >/dev/null
    local port agent
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    agent=http://127.0.0.1:$port
    DCS_EDGE_LISTEN__ADDRESS=127.0.0.1:$port \
        DCS_EDGE_BUFFER__PATH=$dir/buffer.db \
        DCS_EDGE_AGGREGATOR__URL=https://127.0.0.1:1 \
        DCS_EDGE_AGGREGATOR__CA=$dir/agent/ca.pem \
        DCS_EDGE_AGGREGATOR__CERT=$dir/agent/agent.pem \
        DCS_EDGE_AGGREGATOR__KEY=$dir/agent/agent-key.pem \
        valgrind --tool=callgrind --demangle=no --callgrind-out-file="$dir/callgrind.out" \
        "$bin" run >"$dir/agent.log" 2>&1 &
    AGENT_PID=$!
    for _ in $(seq 1 600); do
        curl -fsS "$agent/health" >/dev/null 2>&1 && break
        kill -0 "$AGENT_PID" 2>/dev/null || { cat "$dir/agent.log" >&2; die "the agent stopped"; }
        sleep 0.2
    done
    curl -fsS "$agent/health" >/dev/null || die "the agent did not answer on $agent"
    # What a producer and a scraper do first: each body kind, a refusal,
    # the status and the metrics; then idle, while the forwarder retries.
    curl -fsS -H 'content-type: application/json' \
        -d '{"stream":"app.logs","payload":{"level":"info","msg":"started"}}' "$agent/v1/records" >/dev/null
    curl -fsS -H 'content-type: application/json' \
        -d '[{"stream":"m.cpu","ts":"2026-11-23T10:00:00Z","payload":{"pct":12.5}},{"stream":"m.cpu","id":"c-1","payload":{"pct":14}}]' \
        "$agent/v1/records" >/dev/null
    printf '%s\n' '{"stream":"app.logs","payload":{"msg":"one"}}' '{"stream":"app.logs","payload":{"msg":"two"}}' |
        gzip | curl -fsS -H 'content-type: application/x-ndjson' -H 'content-encoding: gzip' \
        --data-binary @- "$agent/v1/records" >/dev/null
    curl -sS -H 'content-type: application/json' -d '{"stream":"Bad Name","payload":{}}' \
        "$agent/v1/records" >/dev/null
    curl -fsS "$agent/v1/status" >/dev/null
    curl -fsS "$agent/metrics" >/dev/null
    sleep 10
    kill -TERM "$AGENT_PID"
    wait "$AGENT_PID" || true
    AGENT_PID=
    # callgrind names a function in full the first time (fn=(id) name), by
    # id after; keep the agent's own symbols, not libc's.
    grep -ohP '^c?fn=\(\d+\) \K\S+' "$dir/callgrind.out" | sort -u >"$dir/ran"
    nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$dir/defined"
    comm -12 "$dir/ran" "$dir/defined" >"$out"
}

for build in "${BUILDS[@]}"; do
    if [[ -n "$build" ]]; then
        section "cargo build --release $build"
        # shellcheck disable=SC2086 # two words each
        cargo build --release $build
        cargo build --release -p dcs-certs
    fi
    BIN=$TARGET_DIR/release/dcs-edge
    [[ -x "$BIN" ]] || die "$BIN not found: build it, or run without --no-build"
    section "the agent (${build:-as built}) under callgrind"
    cp "$BIN" "$WORK/dcs-edge"
    trace "$WORK/dcs-edge" "$TARGET_DIR/release/dcs-certs" "$WORK/ran.$(date +%s%N)"
done

section "write $OUT"
# Sorted, so a regenerated list diffs well.
{
    echo "# The release agent's start-up functions, placed together by the linker"
    echo "# (edge-agent/build.rs). Generated by scripts/startup-order.sh; do not edit."
    sort -u "$WORK"/ran.*
} >"$OUT"
say "$(($(wc -l <"$OUT") - 2)) functions in $OUT"
