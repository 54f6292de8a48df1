#!/usr/bin/env bash
# Makes syslog-ng (with its http() module) and rsyslog (with gnutls) available
# to tests/tests/integrations.rs without installing either as the machine's
# system logger: Debian's packages of the two conflict (both provide
# system-log-daemon), and installing one on a systemd host would start it
# as the host's logger. So only their libraries are installed with apt; the
# programs themselves are unpacked (dpkg -x) into a cache directory and run
# from there as unprivileged foreground processes with their own configs.
#
# Prints the directory to use as DCS_SYSLOG_TOOLS on its last line.
# Idempotent: a second run finds the unpacked tree and does nothing.
set -Eeuo pipefail

DCS_SCRIPT_NAME="ensure-syslog-tools"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PACKAGES=(syslog-ng-core syslog-ng-mod-http rsyslog rsyslog-gnutls)
LIBRARIES=(libcap2 libglib2.0-0 libivykis0 libjson-c5 libnet1 libpcre3 libssl3 libwrap0
    libcurl4 libestr0 libfastjson4 liblognorm5 libuuid1 libzstd1 zlib1g libgnutls30)

CACHE=${DCS_SYSLOG_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcs/syslog-tools}
ROOT="$CACHE/root"

if [[ -x "$ROOT/usr/sbin/syslog-ng" && -x "$ROOT/usr/sbin/rsyslogd" && -f "$ROOT/.complete" ]]; then
    say "syslog-ng and rsyslog are unpacked in $ROOT"
    echo "$ROOT"
    exit 0
fi

missing=()
for lib in "${LIBRARIES[@]}"; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed" || missing+=("$lib")
done
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi

mkdir -p "$CACHE/debs" "$ROOT"
(
    cd "$CACHE/debs"
    apt-get download "${PACKAGES[@]}" >/dev/null ||
        { as_root apt-get update -q >/dev/null && apt-get download "${PACKAGES[@]}" >/dev/null; }
)
for deb in "$CACHE"/debs/*.deb; do
    dpkg -x "$deb" "$ROOT"
done
[[ -x "$ROOT/usr/sbin/syslog-ng" && -x "$ROOT/usr/sbin/rsyslogd" ]] ||
    die "unpacking ${PACKAGES[*]} into $ROOT gave no syslog-ng or rsyslogd"
touch "$ROOT/.complete"
say "syslog-ng and rsyslog unpacked in $ROOT"
echo "$ROOT"
