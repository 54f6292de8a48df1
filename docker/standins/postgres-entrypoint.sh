#!/bin/bash
# Entrypoint of the PostgreSQL stand-in image (postgres.Dockerfile): the part
# of the official image's docker-entrypoint.sh that the compose stack relies
# on. On an empty data directory it runs initdb as POSTGRES_USER with
# POSTGRES_PASSWORD (scram-sha-256 over TCP, trust on the local socket),
# creates POSTGRES_DB, runs /docker-entrypoint-initdb.d/*.sh|*.sql, then
# starts the server listening on every interface.
set -Eeuo pipefail

if [[ "${1:0:1}" == - ]]; then
    set -- postgres "$@"
fi

if [[ "$1" == postgres && "$(id -u)" == 0 ]]; then
    # A fresh named volume belongs to root: hand it to postgres, then drop
    # root for good.
    install -d -m 0700 -o postgres -g postgres "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    install -d -m 2777 -o postgres -g postgres /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [[ "$1" == postgres && ! -s "$PGDATA/PG_VERSION" ]]; then
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    method=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [[ -z "${POSTGRES_PASSWORD:-}" && "$method" != trust ]]; then
        echo "error: database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options
    initdb --username="$user" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
        --auth-local=trust --auth-host="$method" ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA"
    printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" start
    if [[ "$db" != postgres ]]; then
        psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$user" -d postgres \
            -c "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
        *.sh) bash "$f" ;;
        *.sql) psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$user" -d "$db" -f "$f" ;;
        *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
