#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while:
#
#   scripts/fuzz.sh [SECONDS]      (default 30 per target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain. When
# either is missing it says so and exits 0: the seed corpus is replayed on
# stable by tests/tests/fuzz_corpus.rs in every test run, so nothing is lost
# where fuzzing cannot run.
#
# Seeds come from fuzz/corpus/<target>/ and are never modified; inputs a run
# discovers go to a scratch directory (kept and named if the run fails).
# Crashes land in fuzz/artifacts/<target>/ and fail the script.
set -Eeuo pipefail

DCS_SCRIPT_NAME="fuzz"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/fuzz.sh [SECONDS]

  SECONDS     how long to fuzz each target (default 30)
  -h, --help  this text
EOF
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
esac
(($# <= 1)) || {
    usage >&2
    die "too many arguments"
}
DURATION=30
if (($#)); then
    # libFuzzer reads -max_total_time=0 as "forever": refuse it.
    if ! [[ "$1" =~ ^[0-9]+$ ]] || ((10#$1 == 0)); then
        usage >&2
        die "SECONDS must be a positive whole number, got '$1'"
    fi
    DURATION=$((10#$1))
fi

skip() {
    say "skipped: cargo-fuzz/nightly not available (corpus replay runs in tests/fuzz_corpus.rs)"
    say "($1)"
    exit 0
}

# Probe without side effects: no toolchain download, no install.
command -v cargo >/dev/null 2>&1 || skip "cargo is not on PATH"
cargo fuzz --help >/dev/null 2>&1 || skip "cargo-fuzz is not installed; cargo install cargo-fuzz"
if command -v rustup >/dev/null 2>&1; then
    rustup toolchain list 2>/dev/null | grep -q '^nightly' ||
        skip "no nightly toolchain; rustup toolchain install nightly"
fi
RUSTUP_AUTO_INSTALL=0 cargo +nightly --version >/dev/null 2>&1 ||
    skip "cargo +nightly does not run"

mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)
((${#TARGETS[@]} > 0)) || die "cargo fuzz list found no targets in fuzz/"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dcs-fuzz.XXXXXX")
FAILED=()
for target in "${TARGETS[@]}"; do
    section "$target: ${DURATION}s"
    seeds="fuzz/corpus/$target"
    [[ -d "$seeds" ]] || die "no seed corpus at $seeds"
    mkdir -p "$SCRATCH/$target"
    # libFuzzer writes new inputs into the first corpus directory only.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$SCRATCH/$target" "$seeds" -- \
        -max_total_time="$DURATION" -rss_limit_mb=2048 -timeout=10; then
        FAILED+=("$target")
    fi
done

if ((${#FAILED[@]})); then
    say "failed: ${FAILED[*]}"
    say "crash inputs: fuzz/artifacts/<target>/ (reproduce: cargo +nightly fuzz run <target> <file>)"
    say "inputs found by this run are kept in $SCRATCH"
    exit 1
fi
rm -rf "$SCRATCH"
say "all targets ran ${DURATION}s without a crash: ${TARGETS[*]}"
