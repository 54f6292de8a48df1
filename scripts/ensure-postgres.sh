#!/usr/bin/env bash
# Makes sure PostgreSQL 15 answers on 127.0.0.1:5432 and lets the `postgres`
# role in without a password, which is what the tests and the demo use.
#
#   running             -> nothing to do
#   installed, stopped  -> starts the cluster 15/main
#   not installed       -> apt-get installs postgresql-15, allows password-less
#                          loopback connections on that new cluster, starts it
#
# An existing cluster's authentication is never changed: if it asks for a
# password, this script stops with an explanation instead.
# Idempotent; safe to run any number of times.
#
# DCS_PG_CLUSTER and DCS_PG_PORT pick another cluster of version 15 (default
# main on 5432), e.g. to try this script without touching the shared server.
set -euo pipefail

DCS_SCRIPT_NAME=ensure-postgres
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_VERSION=15
PG_CLUSTER=${DCS_PG_CLUSTER:-main}
PG_HOST=127.0.0.1
PG_PORT=${DCS_PG_PORT:-5432}
PG_USER=postgres
READY_TIMEOUT_SECS=60

PG_BIN_DIR="/usr/lib/postgresql/$PG_VERSION/bin"
PG_CONF_DIR="/etc/postgresql/$PG_VERSION/$PG_CLUSTER"
PG_LOG="/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log"

is_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
    else
        port_in_use "$PG_PORT"
    fi
}

server_installed() { [[ -x "$PG_BIN_DIR/postgres" ]]; }

cluster_exists() { [[ -f "$PG_CONF_DIR/postgresql.conf" ]]; }

# The port the cluster is configured for, as pg_lsclusters reports it.
cluster_port() {
    pg_lsclusters -h 2>/dev/null |
        awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $3 }'
}

# Lets the postgres role connect over loopback without a password. Only ever
# called on a cluster this script has just created: Debian's default asks
# loopback clients for a password, and the postgres role has none.
allow_loopback_trust() {
    local hba="$PG_CONF_DIR/pg_hba.conf"
    grep -q 'DCS ensure-postgres' "$hba" 2>/dev/null && return 0
    say "NOTE: this PostgreSQL was installed just now for DCS's tests and demo;"
    say "      allowing the '$PG_USER' role to connect from loopback without a password ($hba)"
    local tmp
    tmp=$(mktemp)
    {
        echo "# Added by DCS ensure-postgres on a cluster it installed: the tests and"
        echo "# the demo connect as $PG_USER from loopback without a password."
        echo "host    all    $PG_USER    127.0.0.1/32    trust"
        echo "host    all    $PG_USER    ::1/128         trust"
        as_root cat "$hba"
    } >"$tmp"
    as_root install -m 0640 -o postgres -g postgres "$tmp" "$hba"
    rm -f "$tmp"
}

start_cluster() {
    say "starting PostgreSQL cluster $PG_VERSION/$PG_CLUSTER"
    # Without systemd (containers, CI) pg_ctlcluster starts the server itself;
    # under systemd it redirects to systemctl, which --skip-systemctl-redirect
    # bypasses if that fails.
    if ! as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start; then
        as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start ||
            warn "pg_ctlcluster could not start $PG_VERSION/$PG_CLUSTER (see $PG_LOG)"
    fi
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_SECS))
    until is_ready; do
        if ((SECONDS >= deadline)); then
            die "PostgreSQL is not accepting connections on $PG_HOST:$PG_PORT after ${READY_TIMEOUT_SECS}s; its log is $PG_LOG"
        fi
        sleep 0.5
    done
}

check_login() {
    local out
    if ! out=$(psql -w -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres \
        -tAc 'select 1' </dev/null 2>&1); then
        cat >&2 <<EOF
ensure-postgres: error: PostgreSQL is running on $PG_HOST:$PG_PORT, but the '$PG_USER' role
cannot log in without a password:
  $out
The DCS tests and demo connect as postgres://$PG_USER@$PG_HOST:$PG_PORT (no password).
This script does not change an existing server's authentication. To allow it,
add this line above the other 'host' lines of $PG_CONF_DIR/pg_hba.conf
  host  all  $PG_USER  127.0.0.1/32  trust
and reload: pg_ctlcluster $PG_VERSION $PG_CLUSTER reload
EOF
        exit 1
    fi
}

main() {
    if is_ready; then
        command -v psql >/dev/null 2>&1 || apt_install "postgresql-client-$PG_VERSION"
        check_login
        say "PostgreSQL is ready on $PG_HOST:$PG_PORT"
        return 0
    fi

    local fresh=0
    if ! server_installed; then
        say "PostgreSQL $PG_VERSION is not installed"
        apt_install "postgresql-$PG_VERSION"
        server_installed || die "postgresql-$PG_VERSION installed, but $PG_BIN_DIR/postgres is missing"
        fresh=1
    fi
    if ! cluster_exists; then
        say "creating cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
        as_root pg_createcluster -p "$PG_PORT" "$PG_VERSION" "$PG_CLUSTER"
        fresh=1
    fi
    local port
    port=$(cluster_port)
    if [[ -n "$port" && "$port" != "$PG_PORT" ]]; then
        die "cluster $PG_VERSION/$PG_CLUSTER is configured for port $port, not $PG_PORT (see $PG_CONF_DIR/postgresql.conf)"
    fi
    if ((fresh)); then
        allow_loopback_trust
    fi

    start_cluster
    wait_ready
    check_login
    say "PostgreSQL is ready on $PG_HOST:$PG_PORT"
}

main "$@"
