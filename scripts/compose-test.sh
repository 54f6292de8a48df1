#!/usr/bin/env bash
# The compose stack run for real (docs/DEPLOYMENT.md, "Installing at a site
# without registry access"): compose/docker-compose.yml, unchanged but for
# its variables, on podman, with every image built on this machine, no
# container registry needed.
#
#   scripts/compose-test.sh [--keep]
#
# 1. Installs what it needs when missing: podman, runc, the CNI dnsname
#    plugin, debootstrap (apt) and a pinned podman-compose (pip, in a venv in
#    the cache: Debian's is too old for compose profiles).
# 2. Keeps podman's settings, images and volumes in its own cache directory
#    (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF);
#    the system's container configuration is never read or changed.
# 3. Builds a Debian base image with debootstrap once, reused while its inputs
#    are unchanged; stand-in images for PostgreSQL, HAProxy and Prometheus
#    from Debian's packages (docker/standins/); the DCS images from
#    docker/*.Dockerfile with BINARIES=host, from binaries built on the host.
# 4. Starts the stack, pushes records into the agent's published port, kills
#    one aggregator container with SIGKILL under load, and checks in
#    PostgreSQL (psql in the postgres container) that every acknowledged
#    record is there exactly once; checks every healthcheck and every
#    Prometheus target; `down -v` and checks that nothing is left. Prints
#      scenario=compose acked=N missing=0 duplicated=0 targets_up=K/K healthy=H/H
#
# Environment:
#   DCS_BIN_DIR          dcs-aggregator, dcs-certs and dcs-edge to put in the
#                        images (default: ${CARGO_TARGET_DIR:-target}/debug;
#                        scripts/test.sh builds them first). Production images
#                        are built with BINARIES=cargo (release) instead.
#   DCS_COMPOSE_CACHE    podman's settings, storage and the tools
#                        (default: ${XDG_CACHE_HOME:-~/.cache}/dcs/compose)
#   DCS_DEBIAN_MIRROR    Debian mirror for debootstrap (default: the first
#                        Debian mirror in this machine's apt sources)
#   DCS_COMPOSE_RECORDS  records to push (default 10000)
#
#   --keep   leave the stack running at the end (for a look around); remove it
#            later with the `down -v` command the script prints.
set -Eeuo pipefail

DCS_SCRIPT_NAME="compose-test"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

KEEP=0
while (($#)); do
    case "$1" in
    --keep) KEEP=1 ;;
    -h | --help)
        sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN_DIR=${DCS_BIN_DIR:-$TARGET_DIR/debug}
CACHE=${DCS_COMPOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcs/compose}
RECORDS=${DCS_COMPOSE_RECORDS:-10000}
[[ "$RECORDS" =~ ^[1-9][0-9]{0,6}$ ]] || die "DCS_COMPOSE_RECORDS must be a positive number, got '$RECORDS'"
# Pinned: 1.6.0 knows compose profiles and waits for one-shot services.
PODMAN_COMPOSE_VERSION=1.6.0
COMPOSE_FILE=compose/docker-compose.yml
STARTED=$SECONDS

for b in dcs-aggregator dcs-certs dcs-edge; do
    [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b not found: build with 'cargo build --workspace --bins' or set DCS_BIN_DIR"
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

# --- tools ---------------------------------------------------------------------

section "Tools"
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
[[ -x /usr/lib/cni/dnsname ]] || missing+=(golang-github-containernetworking-plugin-dnsname)
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
command -v curl >/dev/null 2>&1 || missing+=(curl)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

VENV="$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION"
if [[ ! -x "$VENV/bin/podman-compose" ]]; then
    say "installing podman-compose $PODMAN_COMPOSE_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || {
        apt_install python3-venv
        python3 -m venv "$VENV"
    }
    "$VENV/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi

# --- podman's settings, all inside the cache -----------------------------------

# crun fails on these hosts ("cgroups in hybrid mode not supported"), and
# raising the descriptor limits of a container is refused: runc, cgroupfs
# and 1024 descriptors for every container. CNI, because the dnsname plugin
# resolves the compose services' names.
mkdir -p "$CACHE/cni" "$CACHE/storage" "$CACHE/run" "$CACHE/tmp"
cat >"$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$CACHE/tmp"

[network]
network_backend = "cni"
network_config_dir = "$CACHE/cni"
EOF
cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$CACHE/run"
EOF
# No registry is reachable: never try one. Every image is local.
cat >"$CACHE/registries.conf" <<'EOF'
unqualified-search-registries = []
short-name-mode = "permissive"
EOF
export CONTAINERS_CONF="$CACHE/containers.conf"
export CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$CACHE/registries.conf"
PODMAN=(podman)
# A container given any --ulimit (the compose file's nofile, from
# DCS_NOFILE_LIMIT) loses all of containers.conf's default_ulimits, and the
# host's limits are refused: give every container both limits explicitly.
COMPOSE=("$VENV/bin/podman-compose" -f "$COMPOSE_FILE" --env-file "$WORK/compose.env"
    "--podman-run-args=--ulimit nproc=1024:1024 --ulimit nofile=1024:1024")
say "$(podman --version), podman-compose $PODMAN_COMPOSE_VERSION, settings in $CACHE"

# --- the base image ----------------------------------------------------------------

section "Base image (debootstrap)"
SUITE=bookworm
# Anything that changes the image goes into its tag: a new tag means a new
# image, an unchanged one is reused.
BASE_RECIPE="debootstrap --variant=minbase $SUITE; apt lists removed; v1"
BASE_IMAGE="localhost/dcs-debian:$SUITE-$(printf '%s' "$BASE_RECIPE" | sha256sum | cut -c1-12)"

debian_mirror() {
    if [[ -n "${DCS_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$DCS_DEBIAN_MIRROR"
        return
    fi
    # The machine's own apt sources: the mirror it is allowed to use.
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | grep -v -- '-security' | head -n 1 | tr -d ' ') || true
    [[ -n "$m" ]] || die "no Debian mirror found in /etc/apt/sources*: set DCS_DEBIAN_MIRROR"
    printf '%s\n' "${m%/}"
}

if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    say "reusing $BASE_IMAGE"
else
    t0=$SECONDS
    mirror=$(debian_mirror)
    rootfs="$CACHE/tmp/rootfs-$SUITE"
    rm -rf "$rootfs"
    say "debootstrap --variant=minbase $SUITE from $mirror"
    as_root debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        {
            tail -n 20 "$WORK/debootstrap.log" >&2
            die "debootstrap failed"
        }
    as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    as_root tar -C "$rootfs" --numeric-owner -c . | "${PODMAN[@]}" import -q \
        --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
    say "built $BASE_IMAGE in $((SECONDS - t0)) s"
fi

# --- stand-in images ---------------------------------------------------------------

section "Stand-in images for PostgreSQL, HAProxy and Prometheus (Debian packages)"
# Built with --format docker: OCI images drop the HEALTHCHECK instruction.
BUILD=("${PODMAN[@]}" build --format docker --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
standin() {
    local name=$1 tag
    tag="localhost/dcs-standin-$name:$(cat "docker/standins/$name.Dockerfile" docker/standins/*.sh |
        { cat; printf '%s' "$BASE_IMAGE"; } | sha256sum | cut -c1-12)"
    if ! "${PODMAN[@]}" image exists "$tag"; then
        local t0=$SECONDS
        "${BUILD[@]}" -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "docker/standins/$name.Dockerfile" \
            -t "$tag" docker/standins >"$WORK/build-$name.log" 2>&1 || {
            tail -n 30 "$WORK/build-$name.log" >&2
            die "building the $name stand-in failed"
        }
        say "built $tag in $((SECONDS - t0)) s"
    else
        say "reusing $tag"
    fi
    printf -v "STANDIN_${name^^}" '%s' "$tag"
}
standin postgres
standin haproxy
standin prometheus

# --- DCS images ----------------------------------------------------------------------

section "DCS images (docker/*.Dockerfile, BINARIES=host)"
# A small build context: what the runtime stage copies, and the binaries.
# Debug information is stripped (a debug build carries hundreds of MB).
ctx="$WORK/context"
mkdir -p "$ctx/bin"
cp -r docker "$ctx/docker"
for b in dcs-aggregator dcs-certs dcs-edge; do
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug -o "$ctx/bin/$b" "$BIN_DIR/$b"
    else
        cp "$BIN_DIR/$b" "$ctx/bin/$b"
    fi
done
AGG_IMAGE=localhost/dcs-aggregator:compose-test
EDGE_IMAGE=localhost/dcs-edge:compose-test
for pair in "aggregator:$AGG_IMAGE" "edge:$EDGE_IMAGE"; do
    t0=$SECONDS
    "${BUILD[@]}" -q --build-arg BINARIES=host --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
        -f "docker/${pair%%:*}.Dockerfile" -t "${pair#*:}" "$ctx" >"$WORK/build-${pair%%:*}.log" 2>&1 || {
        tail -n 30 "$WORK/build-${pair%%:*}.log" >&2
        die "building docker/${pair%%:*}.Dockerfile failed"
    }
    say "built ${pair#*:} in $((SECONDS - t0)) s"
done
rm -rf "$ctx"

# --- the stack -----------------------------------------------------------------------

# Free ports below the ephemeral range: a port the kernel hands out for
# bind(0) may be taken by someone's outgoing connection before podman binds
# it (seen on a busy CI machine).
read -r AGENT_PORT EDGE_PORT PROM_PORT GRAFANA_PORT < <(python3 -c 'import random, socket
ports = []
while len(ports) < 4:
    p = random.randint(20000, 32000)
    try:
        with socket.socket() as s:
            s.bind(("0.0.0.0", p))
    except OSError:
        continue
    if p not in ports:
        ports.append(p)
print(*ports)')
[[ -n "${GRAFANA_PORT:-}" ]] || die "no free ports found"
secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
# Only variables change: the images, the ports, the descriptor limit.
cat >"$WORK/compose.env" <<EOF
POSTGRES_PASSWORD=$(secret)
DCS_APP_PASSWORD=$(secret)
GRAFANA_ADMIN_PASSWORD=$(secret)
DCS_AGENT_PORT=$AGENT_PORT
DCS_EDGE_PORT=$EDGE_PORT
DCS_PROMETHEUS_PORT=$PROM_PORT
DCS_GRAFANA_PORT=$GRAFANA_PORT
DCS_AGGREGATOR_IMAGE=$AGG_IMAGE
DCS_EDGE_IMAGE=$EDGE_IMAGE
DCS_POSTGRES_IMAGE=$STANDIN_POSTGRES
DCS_HAPROXY_IMAGE=$STANDIN_HAPROXY
DCS_PROMETHEUS_IMAGE=$STANDIN_PROMETHEUS
DCS_NOFILE_LIMIT=1024
DCS_HAPROXY_MAXCONN=400
EOF

# The container of a compose service, by the labels podman-compose sets.
container_of() {
    "${PODMAN[@]}" ps -a --filter "label=io.podman.compose.project=dcs" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}

# down -v, and the anonymous volumes of the stack's containers (db-app-role
# runs the PostgreSQL image, whose VOLUME gives it one): docker compose's
# down -v removes those, podman-compose's keeps them.
teardown() {
    local anonymous c
    anonymous=$(for c in $("${PODMAN[@]}" ps -aq --filter label=io.podman.compose.project=dcs); do
        "${PODMAN[@]}" inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' "$c"
    done | tr ' ' '\n' | grep -vE '^(dcs_|$)' || true)
    "${COMPOSE[@]}" down -v -t 5 >"$WORK/down.log" 2>&1 || {
        cat "$WORK/down.log" >&2
        return 1
    }
    if [[ -n "$anonymous" ]]; then
        # shellcheck disable=SC2086 # one volume name a word
        "${PODMAN[@]}" volume rm -f $anonymous >/dev/null
    fi
}

on_exit() {
    local rc=$?
    if ((rc != 0)); then
        warn "failed; the last lines of each container's log:"
        local c
        for c in $("${PODMAN[@]}" ps -a --filter label=io.podman.compose.project=dcs --format '{{.Names}}' 2>/dev/null); do
            printf -- '--- %s (%s)\n' "$c" "$("${PODMAN[@]}" inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$c" 2>/dev/null)" >&2
            "${PODMAN[@]}" logs --tail 15 "$c" >&2 2>&1 || true
        done
        ((KEEP)) || teardown || true
    fi
    # The DCS images are rebuilt on every run: do not let them pile up (the
    # base and stand-in images stay, they are the cache).
    if ((!KEEP)); then
        "${PODMAN[@]}" rmi "$AGG_IMAGE" "$EDGE_IMAGE" >/dev/null 2>&1 || true
        "${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap on_exit EXIT

section "Start the stack"
# A previous run killed half-way may have left its containers and volumes.
"${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1 || true
VOLUMES_BEFORE=$("${PODMAN[@]}" volume ls -q | sort)
t0=$SECONDS

# Runs a container's healthcheck until it passes. podman runs healthchecks
# from systemd timers; without systemd nothing runs them, so run them here.
wait_healthy() {
    local c=$1 limit=${2:-120} deadline=$((SECONDS + ${2:-120}))
    until "${PODMAN[@]}" healthcheck run "$c" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || {
            warn "$c is not healthy after ${limit}s"
            return 1
        }
        sleep 2
    done
}
up() {
    "${COMPOSE[@]}" up -d --no-deps "$@" >>"$WORK/up.log" 2>&1 || {
        cat "$WORK/up.log" >&2
        die "up $* failed"
    }
}
one_shots() {
    local s c rc
    for s in "$@"; do
        c=$(container_of "$s")
        [[ -n "$c" ]] || die "no container for the one-shot $s"
        rc=$("${PODMAN[@]}" wait "$c")
        [[ "$rc" == 0 ]] || die "the one-shot $s exited with $rc"
    done
}
# The order of the compose file's depends_on, a phase at a time: podman 4.3
# cannot wait for a healthy container (podman-compose skips `condition:
# service_healthy` there), and podman-compose 1.6 starts services in an order
# where HAProxy waits for replicas not started yet.
up postgres
wait_healthy "$(container_of postgres)" 120 || die "postgres never became healthy"
up certs migrate
one_shots certs migrate
up db-app-role
one_shots db-app-role
up aggregator-1 aggregator-2
for s in aggregator-1 aggregator-2; do
    wait_healthy "$(container_of "$s")" 120 || die "$s never became healthy"
done
up aggregator edge prometheus
for s in aggregator edge prometheus; do
    wait_healthy "$(container_of "$s")" 120 || die "$s never became healthy"
done
say "stack up and healthy in $((SECONDS - t0)) s: agent port $AGENT_PORT, edge $EDGE_PORT, prometheus $PROM_PORT"

# --- records ------------------------------------------------------------------------

section "Push $RECORDS records; SIGKILL aggregator-1 under load"
EDGE_URL="http://127.0.0.1:$EDGE_PORT"
STREAM="compose-test-$(date +%s)"
CHUNK=250
KILL_AT=$((RECORDS * 3 / 10))
CURL=(curl --silent --show-error --noproxy '*')
acked=0
killed=0
while ((acked < RECORDS)); do
    n=$((RECORDS - acked < CHUNK ? RECORDS - acked : CHUNK))
    response=$(awk -v stream="$STREAM" -v first="$acked" -v n="$n" 'BEGIN {
        for (i = first; i < first + n; i++)
            printf "{\"stream\":\"%s\",\"id\":\"r-%d\",\"payload\":{\"i\":%d}}\n", stream, i, i }' |
        "${CURL[@]}" --max-time 60 -w '\n%{http_code}' -H 'content-type: application/x-ndjson' \
            --data-binary @- "$EDGE_URL/v1/records") || die "push to the agent's published port failed"
    code=${response##*$'\n'}
    [[ "$code" == 200 ]] || die "the agent answered $code: ${response%$'\n'*}"
    accepted=$(grep -o '"accepted":[0-9]*' <<<"$response" | cut -d: -f2)
    [[ "$accepted" == "$n" ]] || die "the agent accepted ${accepted:-?} of $n records: $response"
    acked=$((acked + n))
    if ((!killed && acked >= KILL_AT)); then
        victim=$(container_of aggregator-1)
        "${PODMAN[@]}" kill --signal KILL "$victim" >/dev/null
        killed=1
        say "SIGKILL to $victim after $acked acknowledged records"
    fi
done
say "$acked records acknowledged by the agent"

psql_in_postgres() {
    "${PODMAN[@]}" exec "$(container_of postgres)" psql -X -q -v ON_ERROR_STOP=1 -U dcs -d dcs -tAc "$1"
}
deadline=$((SECONDS + 180))
while :; do
    got=$(psql_in_postgres "select count(distinct record_id) from records where stream = '$STREAM'")
    ((got >= acked)) && break
    ((SECONDS < deadline)) || break
    sleep 2
done
read -r missing duplicated unexpected < <(psql_in_postgres "
    with expected as (select 'r-' || g as id from generate_series(0, $acked - 1) g),
         got as (select record_id, count(*) as n from records where stream = '$STREAM' group by record_id)
    select (select count(*) from expected e where not exists (select 1 from got where got.record_id = e.id)),
           (select coalesce(sum(n - 1), 0) from got),
           (select count(*) from got where record_id not in (select id from expected))" | tr '|' ' ')
say "in PostgreSQL: missing=$missing duplicated=$duplicated unexpected=$unexpected"

# The killed replica comes back: by its restart policy, or here, as an
# orchestrator would restart it.
victim=$(container_of aggregator-1)
if [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$victim")" != true ]]; then
    say "$victim was not restarted by podman; starting it"
    # Without systemd podman complains it cannot schedule the healthcheck
    # (they are run by hand below): keep that out of the log.
    "${PODMAN[@]}" start "$victim" >/dev/null 2>"$WORK/start.log" || {
        cat "$WORK/start.log" >&2
        die "starting $victim again failed"
    }
fi

# --- health and targets --------------------------------------------------------------

section "Healthchecks and Prometheus targets"
healthy=0
checked=0
for c in $("${PODMAN[@]}" ps --filter label=io.podman.compose.project=dcs --format '{{.Names}}'); do
    [[ "$("${PODMAN[@]}" inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$c")" == yes ]] || continue
    checked=$((checked + 1))
    if wait_healthy "$c" 90; then
        healthy=$((healthy + 1))
    fi
done
((checked >= 6)) || warn "only $checked containers have a healthcheck (expected 6)"

# Targets are scraped every 15 s: give the restarted replica a few rounds.
targets() {
    "${CURL[@]}" --max-time 10 "http://127.0.0.1:$PROM_PORT/api/v1/targets?state=active" |
        python3 -c 'import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
print(sum(x["health"] == "up" for x in t), len(t))
for x in t:
    if x["health"] != "up":
        print(x["scrapeUrl"], x["health"], x.get("lastError", ""), file=sys.stderr)'
}
up=0
total=0
deadline=$((SECONDS + 120))
while :; do
    read -r up total < <(targets 2>"$WORK/targets.err") || true
    [[ -n "${total:-}" && "$total" -gt 0 && "$up" == "$total" ]] && break
    ((SECONDS < deadline)) || {
        cat "$WORK/targets.err" >&2
        break
    }
    sleep 3
done

# --- down -v --------------------------------------------------------------------------

leftovers=""
if ((KEEP)); then
    say "left running; remove with: CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF CONTAINERS_REGISTRIES_CONF=$CONTAINERS_REGISTRIES_CONF ${COMPOSE[*]} down -v"
else
    section "down -v"
    teardown || die "down -v failed"
    leftovers=$(
        "${PODMAN[@]}" ps -a --filter label=io.podman.compose.project=dcs --format 'container {{.Names}}'
        comm -13 <(printf '%s\n' "$VOLUMES_BEFORE") <("${PODMAN[@]}" volume ls -q | sort) | sed 's/^/volume /'
        "${PODMAN[@]}" volume ls --format '{{.Name}}' | grep -E '^dcs_' | sed 's/^/volume /'
        "${PODMAN[@]}" network ls --format '{{.Name}}' | grep -E '^dcs_' | sed 's/^/network /'
        "${PODMAN[@]}" pod ls --format '{{.Name}}' | grep -E '^pod_dcs' | sed 's/^/pod /'
    ) || true
    [[ -z "$leftovers" ]] || warn "down -v left behind: $leftovers"
fi

line="scenario=compose acked=$acked missing=$missing duplicated=$duplicated targets_up=$up/$total healthy=$healthy/$checked"
printf '%s\n' "$line"
say "done in $((SECONDS - STARTED)) s"
[[ "$missing" == 0 && "$duplicated" == 0 && "$unexpected" == 0 ]] || die "records lost or duplicated"
[[ "$up" == "$total" ]] || die "Prometheus targets down"
if [[ "$healthy" != "$checked" ]] || ((checked < 6)); then
    die "containers not healthy"
fi
[[ -z "$leftovers" ]] || die "down -v left resources behind"
