# shellcheck shell=bash
# Helpers shared by the scripts in this directory. Source it; do not run it.

# The name of the script that sourced us, for messages.
DCS_SCRIPT_NAME=${DCS_SCRIPT_NAME:-$(basename "${BASH_SOURCE[1]:-$0}" .sh)}

say() { printf '%s: %s\n' "$DCS_SCRIPT_NAME" "$*"; }
warn() { printf '%s: warning: %s\n' "$DCS_SCRIPT_NAME" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$DCS_SCRIPT_NAME" "$*" >&2
    exit 1
}

# A banner before each step of a longer script.
section() { printf '\n==== %s ====\n' "$*"; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (not root, and sudo is not installed)"
    fi
}

# Installs Debian packages by name, without questions. Tries the package lists
# the machine already has first and runs `apt-get update` only if that fails
# (a fresh machine often has no lists at all).
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install $* with your system's package manager"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q
        -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@")
    say "installing $* with apt-get"
    if as_root "${apt[@]}"; then
        return 0
    fi
    say "install failed; refreshing the package lists and trying again"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update ||
        die "apt-get update failed"
    as_root "${apt[@]}" || die "apt-get install $* failed"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The scale-out and fleet tests and the fleet benchmark start their own HAProxy
# (Debian package haproxy) with their own configuration; the package's
# system-wide service is not needed.
ensure_haproxy() {
    local found
    found=$(PATH="$PATH:/usr/sbin:/sbin" command -v haproxy || true)
    if [[ -n "$found" ]]; then
        say "haproxy is installed: $found"
        return 0
    fi
    apt_install haproxy
    PATH="$PATH:/usr/sbin:/sbin" command -v haproxy >/dev/null 2>&1 ||
        die "haproxy was installed but is not on PATH or in /usr/sbin"
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        say "disabling the haproxy system service the package enabled (the test runs its own)"
        as_root systemctl disable --now haproxy >/dev/null 2>&1 ||
            warn "could not disable the haproxy service"
    fi
}
