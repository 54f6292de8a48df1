#!/usr/bin/env bash
# The disaster-recovery drill (tests/src/drill.rs): a scratch PostgreSQL 15
# cluster archived and backed up with pgBackRest while records flow,
# destroyed, restored to a point in time, and completed by the agents'
# replay (`dcs-aggregator replay --since T`, `buffer.retain_delivered`).
#
#   scripts/dr-drill.sh [--records N]
#
# 1. installs pgbackrest with apt if missing (the cluster runs as the
#    postgres user, which the PostgreSQL 15 package creates)
# 2. cargo build --workspace --bins (a no-op within scripts/test.sh)
# 3. runs target/debug/dcs-drill, which prints
#    scenario=pitr-restore acked=N in_pg=M missing=0 duplicated=0 ... rto_s=T
#
# Exits non-zero if an acknowledged record is missing or doubled after the
# restore and the replay. The scratch cluster uses its own port and data
# directory; the machine's own cluster is not touched.
set -Eeuo pipefail

DCS_SCRIPT_NAME="dr-drill"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RECORDS=20000
while (($#)); do
    case "$1" in
    --records)
        RECORDS=${2:?--records needs a number}
        shift
        ;;
    -h | --help)
        sed -n '2,16p' "$0"
        exit 0
        ;;
    *) die "unknown argument: $1" ;;
    esac
    shift
done

command -v pgbackrest >/dev/null 2>&1 || apt_install pgbackrest
command -v pgbackrest >/dev/null 2>&1 || die "pgbackrest is not available"
[[ -x /usr/lib/postgresql/15/bin/initdb ]] ||
    bash "$ROOT/scripts/ensure-postgres.sh" >/dev/null
id postgres >/dev/null 2>&1 || die "no postgres user: install PostgreSQL 15 (scripts/ensure-postgres.sh)"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
cargo build --workspace --bins
STARTED=$SECONDS
say "drill with $RECORDS records"
"$TARGET_DIR/debug/dcs-drill" --records "$RECORDS"
say "drill passed in $((SECONDS - STARTED))s"
