#!/usr/bin/env bash
# Power-cut tests: the real dcs-edge in a qemu VM, the power cut a kill -9 of
# qemu (tests/src/powercut.rs, tests/powercut/).
#
#   scripts/powercut.sh [--scenario NAME|all] [--records N] [--rebuild-image]
#                       [--no-build]
#
# 1. installs qemu-system-x86, debootstrap and e2fsprogs with apt if missing
# 2. builds the guest image (debootstrap --variant=minbase bookworm with
#    linux-image-amd64 and iproute2) once, cached outside the repository in
#    ${DCS_POWERCUT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcs/powercut}/<hash>,
#    where <hash> covers tests/powercut/build-image.sh and tests/powercut/init:
#    a change to either builds a new image (about 4 minutes, needs root)
# 3. PostgreSQL (scripts/ensure-postgres.sh) and cargo build --workspace
#    --bins (--no-build uses the binaries as they are: scripts/test.sh
#    starts this script while it compiles the tests)
# 4. runs target/debug/dcs-powercut, which prints one line per scenario:
#    scenario=NAME acked=N in_pg=M missing=X duplicated=Y refused=R ...
#
# Exits non-zero if a scenario lost or doubled an acknowledged record, or if
# the machine cannot run the VM: it never skips.
set -Eeuo pipefail

DCS_SCRIPT_NAME="powercut"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() {
    cat <<'EOF_USAGE'
Usage: scripts/powercut.sh [--scenario NAME|all] [--records N] [--rebuild-image]
                           [--no-build]

  --scenario NAME   power-cut, power-cut-during-rotation,
                    power-cut-during-delivery, power-cut-process-crash-mode,
                    power-cut-during-renewal, power-cut-during-pull,
                    or all (the default); may be repeated
  --records N       records acknowledged before each cut (default 20000)
  --rebuild-image   build the guest image even if a cached one matches
  --no-build        use target/debug's binaries without cargo build
  -h, --help        this text
EOF_USAGE
}

SCENARIOS=()
RECORDS=20000
REBUILD=0
BUILD=1
while (($#)); do
    case "$1" in
    --scenario)
        SCENARIOS+=(--scenario "${2:?--scenario needs a name}")
        shift
        ;;
    --records)
        RECORDS=${2:?--records needs a number}
        shift
        ;;
    --rebuild-image) REBUILD=1 ;;
    --no-build) BUILD=0 ;;
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
((${#SCENARIOS[@]})) || SCENARIOS=(--scenario all)

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
HOME_DIR=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_ROOT=${DCS_POWERCUT_CACHE:-${XDG_CACHE_HOME:-$HOME_DIR/.cache}/dcs/powercut}
STARTED=$SECONDS

# --- 1. tools -------------------------------------------------------------
# qemu-system-x86 and qemu-utils at one release, apt's candidate for the
# former. A host may carry a qemu-img (qemu-utils) newer than its apt
# sources' qemu, which qemu-system-x86 cannot be installed beside: naming
# qemu-utils at that release replaces it (a downgrade if need be) where apt
# would otherwise remove it, so the host keeps a qemu-img.
qemu_candidate() {
    apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ { print $2 }'
}

install_qemu() {
    local version
    version=$(qemu_candidate)
    if [[ -z "$version" || "$version" == "(none)" ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update ||
            die "apt-get update failed"
        version=$(qemu_candidate)
    fi
    [[ -n "$version" && "$version" != "(none)" ]] ||
        die "apt has no qemu-system-x86: the power-cut tests cannot run here"
    apt_install --allow-downgrades "qemu-system-x86=$version" "qemu-utils=$version"
}

command -v qemu-system-x86_64 >/dev/null 2>&1 || install_qemu
command -v mkfs.ext4 >/dev/null 2>&1 || apt_install e2fsprogs
command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    die "qemu-system-x86_64 is not available: the power-cut tests cannot run here"

# --- 2. the guest image ---------------------------------------------------
HASH=$(cat tests/powercut/build-image.sh tests/powercut/init | sha256sum | cut -c1-16)
IMAGE="$CACHE_ROOT/$HASH"
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9
if ((REBUILD)) || [[ ! -f "$IMAGE/rootfs.img" || ! -f "$IMAGE/vmlinuz" || ! -f "$IMAGE/initrd.img" ]]; then
    [[ ${EUID:-$(id -u)} -eq 0 ]] ||
        die "building the guest image needs root (debootstrap); run once as root, or set DCS_POWERCUT_CACHE to a built image's parent"
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    say "building the guest image in $IMAGE (debootstrap; a few minutes, once)"
    built_at=$SECONDS
    rm -rf "$IMAGE.tmp" "$IMAGE"
    bash tests/powercut/build-image.sh "$IMAGE.tmp" ||
        die "building the guest image failed"
    mv "$IMAGE.tmp" "$IMAGE"
    say "guest image built in $((SECONDS - built_at))s"
    # Older images (other hashes) are of no further use.
    for old in "$CACHE_ROOT"/*; do
        [[ "$old" == "$IMAGE" ]] || rm -rf "$old"
    done
else
    say "guest image: $IMAGE (cached)"
fi
flock -u 9

# --- 3. PostgreSQL and the binaries -----------------------------------------
bash "$ROOT/scripts/ensure-postgres.sh" >/dev/null
if ((BUILD)); then
    cargo build --workspace --bins
fi
for bin in dcs-powercut dcs-edge dcs-aggregator; do
    [[ -x "$TARGET_DIR/debug/$bin" ]] || die "$TARGET_DIR/debug/$bin not found: cargo build --workspace --bins"
done

# --- 4. the scenarios -----------------------------------------------------
# The disk images need a file system that supports O_DIRECT (cache=none):
# the target directory, not a tmpfs /tmp.
WORK="$TARGET_DIR/powercut"
rm -rf "$WORK"
mkdir -p "$WORK"
say "running ${SCENARIOS[*]} with $RECORDS records each (qemu TCG)"
"$TARGET_DIR/debug/dcs-powercut" --image "$IMAGE" --work "$WORK" --records "$RECORDS" "${SCENARIOS[@]}"
say "all power-cut scenarios passed in $((SECONDS - STARTED))s"
