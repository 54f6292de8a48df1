#!/bin/bash
# dcs-healthcheck PORT [PATH]: the container HEALTHCHECK of the DCS images.
#
# Sends GET PATH (default /health) to 127.0.0.1:PORT over plain HTTP and exits
# 0 only for a 200 answer. Bash's /dev/tcp does the networking, so the
# runtime images need neither curl nor wget. The HEALTHCHECK's --timeout
# bounds a connection that hangs.
set -euo pipefail

port=${1:?usage: dcs-healthcheck PORT [PATH]}
path=${2:-/health}

exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$path" "$port" >&3
IFS= read -r -t 5 status <&3
exec 3<&-

case "$status" in
"HTTP/1."[01]" 200"*) exit 0 ;;
*)
    printf 'dcs-healthcheck: GET %s answered: %s\n' "$path" "${status%$'\r'}" >&2
    exit 1
    ;;
esac
