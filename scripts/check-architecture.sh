#!/usr/bin/env bash
# Checks that docs/ARCHITECTURE.md names every Rust module of the project:
# every *.rs file under the crates' src/, tests/src, tests/tests and fuzz/
# (build output and the fuzz corpus and artifacts aside) must appear in it
# literally, as its path from the repository root in backticks, e.g.
# `edge-agent/src/syslog/tcp.rs` (the backticks keep `checks.rs` from being
# found inside `syslog_checks.rs`).
#
#   scripts/check-architecture.sh
#
# Exits 1 and prints each path the document does not name. Runs from any
# directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DOC=docs/ARCHITECTURE.md
DIRS=(shared/src certs/src edge-agent/src aggregator/src bench/src tests/src tests/tests fuzz)

[[ -f "$DOC" ]] || {
    echo "check-architecture: $DOC is missing" >&2
    exit 1
}

existing=()
for dir in "${DIRS[@]}"; do
    [[ -d "$dir" ]] && existing+=("$dir")
done

mapfile -t files < <(
    find "${existing[@]}" \
        \( -name target -o -path fuzz/corpus -o -path fuzz/artifacts \) -prune -o \
        -type f -name '*.rs' -print | LC_ALL=C sort
)

if ((${#files[@]} == 0)); then
    echo "check-architecture: no *.rs files found under ${DIRS[*]}" >&2
    exit 1
fi

missing=()
for file in "${files[@]}"; do
    grep -qF -- "\`$file\`" "$DOC" || missing+=("$file")
done

if ((${#missing[@]})); then
    echo "check-architecture: $DOC does not name ${#missing[@]} of ${#files[@]} modules:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

echo "architecture map: ${#files[@]} modules, all named"
