#!/usr/bin/env bash
# A cache of the compiled third-party crates of the debug build, kept
# outside the checkout, so that a fresh clone compiles only our own crates:
#
#   scripts/build-cache.sh restore   before the first build of a checkout
#   scripts/build-cache.sh save      after a successful build
#   scripts/build-cache.sh key       print the cache key
#
# Compiling the ~400 dependencies takes about 6 minutes on 2 cores, our six
# crates about one; CI starts from a clean checkout every time. This is what
# CI caches of Rust projects commonly do (target/ keyed by Cargo.lock); only
# the dependencies' artifacts are kept, never our crates', so every run
# compiles and lints all of our code.
#
# The key covers everything that decides how a dependency is compiled:
# Cargo.lock, every Cargo.toml of the workspace (features and profiles), the
# compiler and cargo versions, RUSTFLAGS and CARGO_PROFILE_*/CARGO_BUILD_*
# settings in the environment. One key is kept; saving a new
# one removes the others. Cargo still checks every restored unit's
# fingerprint and rebuilds any that does not match, so a stale or partial
# cache costs time, never correctness.
#
#   DCS_BUILD_CACHE  the cache directory (default:
#                    ${XDG_CACHE_HOME:-~/.cache}/dcs/build); "off" disables it
#
# `restore` does nothing when the target directory already holds a debug
# build (a developer's own target/ is never touched), `save` nothing when the
# key is already saved.
set -Eeuo pipefail

DCS_SCRIPT_NAME="build-cache"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/build-cache.sh restore|save|key

  restore     copy the cached dependency artifacts into a target directory
              that has no debug build yet
  save        store this build's dependency artifacts under its key (once)
  key         print the key of this checkout's dependency build
  -h, --help  this text

Environment: DCS_BUILD_CACHE (directory, or "off"), CARGO_TARGET_DIR.
EOF
}

(($# == 1)) || {
    usage >&2
    exit 2
}
case "$1" in
-h | --help)
    usage
    exit 0
    ;;
restore | save | key) ACTION=$1 ;;
*)
    usage >&2
    die "unknown argument: $1"
    ;;
esac

HOME_DIR=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_ROOT=${DCS_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME_DIR/.cache}/dcs/build}
if [[ "$CACHE_ROOT" == off ]]; then
    say "DCS_BUILD_CACHE=off: not used"
    exit 0
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
DEBUG_DIR="$TARGET_DIR/debug"

key() {
    {
        rustc -vV
        cargo -V
        printf 'RUSTFLAGS=%s\nCARGO_ENCODED_RUSTFLAGS=%s\n' "${RUSTFLAGS:-}" "${CARGO_ENCODED_RUSTFLAGS:-}"
        # Profile and build settings given in the environment (none in CI).
        env | grep -E '^CARGO_(PROFILE|BUILD)_' | grep -v '^CARGO_BUILD_TARGET_DIR=' | LC_ALL=C sort || true
        cat Cargo.lock
        # Sorted, so the key does not depend on the order find walks in.
        while read -r manifest; do
            printf '%s\n' "$manifest"
            cat "$manifest"
        done < <(find . -path ./target -prune -o -path ./fuzz -prune -o -name Cargo.toml -print | LC_ALL=C sort)
    } | sha256sum | cut -c1-16
}

# The file-name stems (crate names, `-` as `_`) of our own targets, and our
# package names: what `save` leaves out.
own_names() {
    cargo metadata --no-deps --format-version 1 --offline |
        python3 -c '
import json, sys
meta = json.load(sys.stdin)
for package in meta["packages"]:
    print(package["name"])
    for target in package["targets"]:
        print(target["name"].replace("-", "_"))
'
}

KEY=$(key)
CACHE="$CACHE_ROOT/$KEY"

case "$ACTION" in
key)
    printf '%s\n' "$KEY"
    ;;
restore)
    if [[ -d "$DEBUG_DIR/.fingerprint" ]]; then
        say "$DEBUG_DIR already holds a build: left as it is"
        exit 0
    fi
    if [[ ! -d "$CACHE" ]]; then
        say "no cached dependencies for key $KEY: the build compiles them (about 6 minutes on 2 cores)"
        exit 0
    fi
    mkdir -p "$DEBUG_DIR"
    # --preserve keeps the build scripts' output times, which cargo compares
    # with the files they watch.
    cp -a --reflink=auto "$CACHE/." "$DEBUG_DIR/"
    say "restored the dependencies of key $KEY ($(du -sh "$CACHE" | cut -f1)) into $DEBUG_DIR"
    ;;
save)
    [[ -d "$DEBUG_DIR/.fingerprint" ]] || die "$DEBUG_DIR holds no build to save"
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.lock"
    flock 9
    if [[ -d "$CACHE" ]]; then
        say "dependencies of key $KEY already cached"
        exit 0
    fi
    mapfile -t OWN < <(own_names)
    ((${#OWN[@]} > 0)) || die "cargo metadata listed no workspace targets"
    # Ours: a unit directory named PACKAGE-HASH (.fingerprint/, build/), or
    # an artifact named [lib]CRATE-HASH[.ext] (deps/).
    is_own() {
        local name=${1#lib} own
        for own in "${OWN[@]}"; do
            [[ "$name" == "$own"-* ]] && return 0
        done
        return 1
    }
    tmp="$CACHE.tmp.$$"
    rm -rf "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    kept=0 left=0
    for dir in .fingerprint build deps; do
        [[ -d "$DEBUG_DIR/$dir" ]] || continue
        mkdir -p "$tmp/$dir"
        for entry in "$DEBUG_DIR/$dir"/*; do
            [[ -e "$entry" ]] || continue
            if is_own "$(basename "$entry")"; then
                left=$((left + 1))
            else
                cp -a "$entry" "$tmp/$dir/"
                kept=$((kept + 1))
            fi
        done
    done
    mv "$tmp" "$CACHE"
    trap - EXIT
    # Older keys are of no further use.
    for old in "$CACHE_ROOT"/*; do
        [[ "$old" == "$CACHE" ]] || rm -rf "$old"
    done
    say "saved $kept dependency artifacts ($(du -sh "$CACHE" | cut -f1)) under key $KEY; left out $left of our own"
    ;;
esac
