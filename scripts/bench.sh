#!/usr/bin/env bash
# The performance benchmark on this machine (see docs/PERFORMANCE.md):
#
#   scripts/bench.sh [dcs-bench flags...]
#
# Builds every binary in release mode (dcs-bench runs the dcs-edge and
# dcs-aggregator processes it finds beside itself in target/release), makes
# sure PostgreSQL answers on 127.0.0.1:5432, then runs dcs-bench: 3 runs of
# every step, each step sized by a calibration to run about 20 seconds,
# printing each run, the headline (median and min-max of the runs) and one
# PASS/FAIL line per target, and writing everything to target/bench.json
# (`target/release/dcs-bench report target/bench.json --doc
# docs/PERFORMANCE.md` puts its headline table into the docs). Takes about
# 20 minutes. Extra arguments go to dcs-bench, e.g.
#
#   scripts/bench.sh --quick                 # smoke run: one run of 2-second steps
#   scripts/bench.sh --runs 1 --records 10000000 --skip copy,copy-parallel,ingest,e2e,freshness,latency,wire \
#       --out target/bench-10m.json          # the 10M-record drain
#   scripts/bench.sh --skip copy,ingest,drain,latency,wire --max-in-flight 4
#
# A later --out (or --runs) wins over the default one. DCS_TEST_PG_URL points the bench
# at another server (it creates and drops one database per step there).
#
#   scripts/bench.sh --fleet [dcs-fleet flags...]
#
# runs the fleet benchmark instead (docs/PERFORMANCE.md, "Fleet"): N = 1, 10,
# 100 and 1000 agents through HAProxy (installed with apt if missing) to two
# aggregator replicas, a table, and one PASS/FAIL line per target; results in
# target/fleet.json. E.g. `scripts/bench.sh --fleet --runs 3 --handshakes`.
set -euo pipefail

DCS_SCRIPT_NAME=bench
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"

command -v cargo >/dev/null 2>&1 || die "cargo not found"

if [[ -z "${DCS_TEST_PG_URL:-}" ]]; then
    section "PostgreSQL"
    bash "$ROOT/scripts/ensure-postgres.sh"
fi

FLEET=0
if [[ "${1:-}" == "--fleet" ]]; then
    FLEET=1
    shift
    section "HAProxy"
    ensure_haproxy
    export PATH="$PATH:/usr/sbin:/sbin"
fi

section "build (release)"
cargo build --release --workspace --bins

section "benchmark"
say "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
if ((FLEET)); then
    # A thousand agents hold a buffer file and a connection each.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    exec "$TARGET_DIR/release/dcs-fleet" --out "$TARGET_DIR/fleet.json" \
        --certs "$TARGET_DIR/fleet-certs" "$@"
fi
exec "$TARGET_DIR/release/dcs-bench" --runs 3 --out "$TARGET_DIR/bench.json" "$@"
