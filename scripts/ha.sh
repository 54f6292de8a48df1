#!/usr/bin/env bash
# A PostgreSQL HA cluster on one machine, for the failover scenarios
# (tests/tests/patroni.rs) and for trying the HA layout by hand: one etcd,
# three PostgreSQL 15 members managed by Patroni, and HAProxy routing to the
# primary with Patroni's /primary health check. Debian packages only:
# patroni, etcd-server, haproxy (installed when missing).
#
# Each member runs in its own network namespace (dcsha<id>-1..3), joined to a
# bridge in the root namespace, so a member can be cut off for real (its link
# set down) while the others, etcd and HAProxy keep talking:
#
#   root namespace: bridge dcsha<id> 10.232.<n>.1/24, etcd, HAProxy on 127.0.0.1
#   member i:       eth0 10.232.<n>.1<i>/24, PostgreSQL port BASE+i, REST BASE+100+i
#
# The bridge switches frames, so nothing needs IP forwarding. Everything else
# lives under the scratch directory DIR; `down` removes it. The machine's own
# PostgreSQL (port 5432) is never touched.
#
# Usage:
#   scripts/ha.sh install                 install the packages if missing (root)
#   scripts/ha.sh up DIR [--async]        start everything; --async sets
#                                         synchronous_mode: false
#   scripts/ha.sh down DIR                stop everything, delete DIR
#   scripts/ha.sh status DIR              patronictl list
#   scripts/ha.sh primary DIR             the primary's member name (pg1..pg3)
#   scripts/ha.sh kill-primary DIR        SIGKILL the primary's Patroni and postmaster
#   scripts/ha.sh switchover DIR          patronictl switchover to the sync standby
#   scripts/ha.sh partition DIR           cut the primary's link; prints its name
#   scripts/ha.sh heal DIR MEMBER         restore MEMBER's link
#
# `up` writes DIR/env: HA_PG_URL (postgres:// through HAProxy), HA_DIR.
# Ports: HA_BASE_PORT (default 25430): HAProxy BASE, PostgreSQL BASE+1..3,
# REST BASE+101..103, etcd BASE+200 (client) and BASE+201 (peer).
# HA_SUBNET (default 232 + a number derived from the port) picks 10.<X>.<n>.
set -euo pipefail

MEMBERS=3
PG_BIN=${DCS_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
BASE=${HA_BASE_PORT:-25430}
# One subnet per base port, so two clusters on one machine do not collide.
NET=${HA_NET:-10.232.$(( BASE % 200 ))}
TAG=${HA_TAG:-$(( BASE % 10000 ))}
BRIDGE=dcsha${TAG}

die() { echo "ha.sh: $*" >&2; exit 1; }
ns() { echo "dcsha${TAG}-$1"; }
member_ip() { echo "${NET}.1$1"; }
pg_port() { echo $(( BASE + $1 )); }
rest_port() { echo $(( BASE + 100 + $1 )); }
etcd_port() { echo $(( BASE + 200 )); }

install() {
    local missing=()
    command -v patroni >/dev/null || missing+=(patroni)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v setpriv >/dev/null || missing+=(util-linux)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
        echo "ha.sh: installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
    fi
    # The Debian packages start nothing we rely on; the harness starts its own.
}

patroni_config() {
    local dir=$1 i=$2 sync=$3
    local ip; ip=$(member_ip "$i")
    cat <<EOF
scope: dcs-ha
name: pg$i
log:
  level: WARNING
restapi:
  listen: ${ip}:$(rest_port "$i")
  connect_address: ${ip}:$(rest_port "$i")
etcd3:
  hosts: ${NET}.1:$(etcd_port)
bootstrap:
  dcs:
    # Small figures for a fast failover on one machine: the leader key lives
    # ttl seconds, and loop_wait + 2 * retry_timeout must stay below ttl.
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: ${sync}
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        max_connections: 100
        shared_buffers: 64MB
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
  pg_hba:
    - local all all trust
    - host replication all ${NET}.0/24 trust
    - host all all ${NET}.0/24 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: ${ip},127.0.0.1:$(pg_port "$i")
  connect_address: ${ip}:$(pg_port "$i")
  data_dir: ${dir}/pg$i/data
  bin_dir: ${PG_BIN}
  pgpass: ${dir}/pg$i/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: ${dir}/pg$i
EOF
}

haproxy_config() {
    local dir=$1
    cat <<EOF
global
    maxconn 500
    pidfile ${dir}/haproxy.pid
defaults
    mode tcp
    timeout connect 2s
    timeout client 30m
    timeout server 30m
    timeout check 1s
# The standard Patroni pattern: only the member whose REST API answers 200 on
# /primary gets connections, and sessions to a member marked down are cut.
listen primary
    bind 127.0.0.1:${BASE}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions
EOF
    for i in $(seq 1 $MEMBERS); do
        echo "    server pg$i $(member_ip "$i"):$(pg_port "$i") maxconn 200 check port $(rest_port "$i")"
    done
}

start_bg() {
    # start_bg PIDFILE LOG CMD...: CMD exec's down to the service itself, so
    # the pid recorded is the service's.
    local pidfile=$1 log=$2; shift 2
    nohup "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

network_up() {
    ip link add "$BRIDGE" type bridge
    ip addr add "${NET}.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq 1 $MEMBERS); do
        local n; n=$(ns "$i")
        ip netns add "$n"
        ip -n "$n" link set lo up
        ip link add "${BRIDGE}v$i" type veth peer name eth0 netns "$n"
        ip link set "${BRIDGE}v$i" master "$BRIDGE"
        ip link set "${BRIDGE}v$i" up
        ip -n "$n" addr add "$(member_ip "$i")/24" dev eth0
        ip -n "$n" link set eth0 up
    done
}

network_down() {
    for i in $(seq 1 $MEMBERS); do
        ip netns del "$(ns "$i")" 2>/dev/null || true
        ip link del "${BRIDGE}v$i" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

wait_for() {
    # wait_for SECONDS WHAT CMD...
    local secs=$1 what=$2; shift 2
    local until=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$until" ] || die "timed out waiting for $what"
        sleep 0.5
    done
}

rest() { curl -fsS --max-time 2 "http://$(member_ip "$1"):$(rest_port "$1")$2"; }

primary() {
    for i in $(seq 1 $MEMBERS); do
        if rest "$i" /primary >/dev/null 2>&1; then echo "pg$i"; return 0; fi
    done
    return 1
}

sync_standby() {
    for i in $(seq 1 $MEMBERS); do
        if rest "$i" /sync >/dev/null 2>&1; then echo "pg$i"; return 0; fi
    done
    return 1
}

primary_through_haproxy() {
    local n
    for n in 1 2 3 4 5 6; do
        [ "$("$PG_BIN/psql" -qAt -h 127.0.0.1 -p "$BASE" -U postgres -c "SELECT pg_is_in_recovery()")" = f ] || return 1
    done
}

up() {
    local dir=$1 sync=true
    [ "${2:-}" = "--async" ] && sync=false
    [ "$(id -u)" = 0 ] || die "up needs root (network namespaces, the postgres user)"
    install
    [ -e "$dir/env" ] && die "$dir already holds a cluster; run down first"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir"
    network_down
    network_up

    mkdir -p "$dir/etcd"
    start_bg "$dir/etcd.pid" "$dir/etcd.log" etcd --name ha --data-dir "$dir/etcd/data" \
        --listen-client-urls "http://${NET}.1:$(etcd_port),http://127.0.0.1:$(etcd_port)" \
        --advertise-client-urls "http://${NET}.1:$(etcd_port)" \
        --listen-peer-urls "http://127.0.0.1:$(( BASE + 201 ))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(( BASE + 201 ))" \
        --initial-cluster "ha=http://127.0.0.1:$(( BASE + 201 ))" \
        --initial-cluster-state new
    wait_for 30 etcd curl -fsS "http://127.0.0.1:$(etcd_port)/health"

    for i in $(seq 1 $MEMBERS); do
        mkdir -p "$dir/pg$i"
        patroni_config "$dir" "$i" "$sync" >"$dir/pg$i/patroni.yml"
        chown -R postgres:postgres "$dir/pg$i"
        chmod 700 "$dir/pg$i"
    done
    # The first member bootstraps alone, so it is the first primary; the
    # others then clone it with pg_basebackup.
    for i in $(seq 1 $MEMBERS); do
        start_bg "$dir/pg$i/patroni.pid" "$dir/pg$i/patroni.log" \
            ip netns exec "$(ns "$i")" env HOME="$dir/pg$i" \
            setpriv --reuid=postgres --regid=postgres --init-groups \
            patroni "$dir/pg$i/patroni.yml"
        if [ "$i" = 1 ]; then
            wait_for 90 "pg1 to bootstrap" rest 1 /primary
        fi
    done
    for i in $(seq 2 $MEMBERS); do
        wait_for 90 "pg$i to replicate" rest "$i" /replica
    done
    if [ "$sync" = true ]; then
        wait_for 60 "a synchronous standby" sync_standby
    fi

    haproxy_config "$dir" >"$dir/haproxy.cfg"
    haproxy -f "$dir/haproxy.cfg" -D
    # HAProxy 2.6 starts every server as up until its first checks fail, so
    # the standbys take connections for a moment: wait past a few checks.
    sleep 2
    wait_for 30 "HAProxy to reach the primary only" primary_through_haproxy

    cat >"$dir/env" <<EOF
HA_DIR=$dir
HA_PG_URL=postgres://postgres@127.0.0.1:${BASE}/postgres
HA_SYNC=$sync
EOF
    echo "ha.sh: up: primary $(primary), sync standby $(sync_standby || echo none), HAProxy 127.0.0.1:${BASE}"
}

kill_pidfile() {
    local f=$1
    [ -f "$f" ] || return 0
    local pid; pid=$(cat "$f")
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

postmaster_pid() {
    local f="$1/pg$2/data/postmaster.pid"
    [ -f "$f" ] && head -1 "$f"
}

down() {
    local dir=$1
    [ -d "$dir" ] || { network_down; return 0; }
    dir=$(cd "$dir" && pwd)
    kill_pidfile "$dir/haproxy.pid"
    for i in $(seq 1 $MEMBERS); do
        kill_pidfile "$dir/pg$i/patroni.pid"
        local pm; pm=$(postmaster_pid "$dir" "$i" || true)
        if [ -n "$pm" ]; then
            kill -9 "$pm" 2>/dev/null || true
        fi
    done
    kill_pidfile "$dir/etcd.pid"
    network_down
    rm -rf "$dir"
}

patronictl_() { patronictl -c "$1/pg1/patroni.yml" "${@:2}"; }

cmd=${1:-}
case "$cmd" in
    install) install ;;
    up) [ $# -ge 2 ] || die "usage: up DIR [--async]"; up "$2" "${3:-}" ;;
    down) [ $# -ge 2 ] || die "usage: down DIR"; down "$2" ;;
    status) patronictl_ "$2" list ;;
    primary) primary ;;
    sync-standby) sync_standby ;;
    kill-primary)
        dir=$(cd "$2" && pwd)
        p=$(primary) || die "no primary"
        i=${p#pg}
        pm=$(postmaster_pid "$dir" "$i")
        # Patroni first, so it cannot restart the postmaster: the node is gone.
        kill_pidfile "$dir/pg$i/patroni.pid"
        kill -9 "$pm"
        echo "$p"
        ;;
    switchover)
        dir=$(cd "$2" && pwd)
        p=$(primary) || die "no primary"
        c=$(sync_standby) || die "no synchronous standby"
        patronictl_ "$dir" switchover --leader "$p" --candidate "$c" --force >/dev/null
        echo "$p"
        ;;
    partition)
        p=$(primary) || die "no primary"
        ip link set "${BRIDGE}v${p#pg}" down
        echo "$p"
        ;;
    heal)
        ip link set "${BRIDGE}v${3#pg}" up
        ;;
    *) sed -n '2,35p' "$0"; exit 2 ;;
esac
