#!/usr/bin/env bash
# Checks the monitoring files in compose/ (docs/OBSERVABILITY.md):
#
#   scripts/check-observability.sh
#
# 1. promtool (Debian's `prometheus` package; installed with apt if missing)
# 2. promtool check config compose/prometheus/prometheus.yml, once as it is and
#    once with agents/example.json.sample in place as a file_sd target file
# 3. promtool check rules compose/prometheus/alerts.yml
# 4. promtool test rules compose/prometheus/alerts_test.yml (alert unit tests)
# 5. compose/grafana: the dashboard is valid JSON, every panel query parses as
#    PromQL (checked by promtool as recording rules), the provisioned data
#    source uid is the one the dashboard uses, and every dcs_* metric the
#    alerts and the dashboard use is documented in docs/OBSERVABILITY.md
#
# Exits non-zero as soon as a check fails. Needs no running Prometheus.
set -Eeuo pipefail

DCS_SCRIPT_NAME="check-observability"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PROM_DIR=compose/prometheus
GRAFANA_DIR=compose/grafana
DASHBOARD=$GRAFANA_DIR/dashboards/dcs-fleet.json
DATASOURCE=$GRAFANA_DIR/provisioning/datasources/prometheus.yml
DOC=docs/OBSERVABILITY.md

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
trap 'printf "\n%s: FAILED\n" "$DCS_SCRIPT_NAME" >&2' ERR

# The package's own Prometheus server is not wanted: our tests start theirs on
# free ports. Stop only that service: under systemd by its unit; otherwise
# the daemon the package's init script started, which runs as the package's
# `prometheus` user (a test's Prometheus runs as the invoking user, so it is
# never matched).
stop_packaged_prometheus() {
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now prometheus >/dev/null 2>&1 ||
            as_root systemctl stop prometheus 2>/dev/null || true
    fi
    if id -u prometheus >/dev/null 2>&1 && pgrep -x -u prometheus prometheus >/dev/null 2>&1; then
        say "stopping the prometheus service the package started (the tests run their own)"
        as_root /etc/init.d/prometheus stop >/dev/null 2>&1 ||
            as_root pkill -x -u prometheus prometheus || true
    fi
}

ensure_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        say "promtool is installed: $(command -v promtool)"
        return 0
    fi
    apt_install prometheus
    stop_packaged_prometheus
    command -v promtool >/dev/null 2>&1 || die "prometheus was installed but promtool is not on PATH"
}

ensure_python() {
    command -v python3 >/dev/null 2>&1 || apt_install python3
}

section "promtool"
ensure_promtool
promtool --version 2>&1 | head -n 1

section "promtool check config $PROM_DIR/prometheus.yml"
promtool check config "$PROM_DIR/prometheus.yml"

section "promtool check config with the example file_sd target file"
mkdir -p "$SCRATCH/prometheus/agents"
cp "$PROM_DIR/prometheus.yml" "$PROM_DIR/alerts.yml" "$SCRATCH/prometheus/"
cp "$PROM_DIR/agents/example.json.sample" "$SCRATCH/prometheus/agents/example.json"
promtool check config "$SCRATCH/prometheus/prometheus.yml"

section "promtool check rules $PROM_DIR/alerts.yml"
promtool check rules "$PROM_DIR/alerts.yml"

section "promtool test rules $PROM_DIR/alerts_test.yml"
promtool test rules "$PROM_DIR/alerts_test.yml"

section "Grafana dashboard and provisioning"
ensure_python
python3 - "$DASHBOARD" "$DATASOURCE" "$PROM_DIR/alerts.yml" "$DOC" "$SCRATCH/dashboard-rules.yml" <<'PY'
import json, re, sys

dashboard_path, datasource_path, alerts_path, doc_path, rules_out = sys.argv[1:]
failures = []

with open(dashboard_path) as f:
    try:
        dashboard = json.load(f)
    except json.JSONDecodeError as e:
        sys.exit(f"{dashboard_path}: invalid JSON: {e}")

# Each query becomes a recording rule, so promtool parses it as PromQL.
# Grafana's variables are replaced by values of the right kind first.
variables = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
    "$agent_job": "dcs-agent", "$aggregator_job": "dcs-aggregator",
    "$instance": ".*", "$tenant": ".*",
}
rules, ids, exprs = [], set(), []
for panel in dashboard.get("panels", []):
    if panel.get("id") in ids:
        failures.append(f"duplicate panel id {panel.get('id')}")
    ids.add(panel.get("id"))
    if panel.get("type") == "row":
        continue
    if not panel.get("targets"):
        failures.append(f"panel {panel.get('title')!r} has no queries")
    for t in panel.get("targets", []):
        expr = t["expr"]
        exprs.append(expr)
        for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(name, value)
        if "$" in expr:
            failures.append(f"panel {panel['title']!r}: unknown variable in {t['expr']!r}")
            continue
        rules.append({"record": f"dashboard:panel_{panel['id']}_{t['refId']}", "expr": expr})
for var in dashboard.get("templating", {}).get("list", []):
    if var.get("type") == "query":
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
        if not m:
            failures.append(f"variable {var['name']}: unexpected query {q!r}")
        else:
            expr = m.group(1)
            for name, value in variables.items():
                expr = expr.replace(name, value)
            rules.append({"record": f"dashboard:variable_{var['name']}", "expr": expr})
with open(rules_out, "w") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)

# The data source uid the dashboard defaults to is the provisioned one.
with open(datasource_path) as f:
    m = re.search(r"^\s*uid:\s*(\S+)\s*$", f.read(), re.M)
provisioned = m.group(1) if m else None
ds_var = [v for v in dashboard["templating"]["list"] if v.get("type") == "datasource"]
if not ds_var or ds_var[0].get("current", {}).get("value") != provisioned:
    failures.append(f"dashboard's default data source is not the provisioned uid {provisioned!r}")

# Every metric the alerts and the dashboard use is documented.
with open(doc_path) as f:
    documented = set(re.findall(r"\b((?:dcs|process)_[a-z0-9_]+)", f.read()))
with open(alerts_path) as f:
    used = set(re.findall(r"\b(dcs_[a-z0-9_]+)", f.read()))
for expr in exprs:
    used |= set(re.findall(r"\b(dcs_[a-z0-9_]+)", expr))
for name in sorted(used):
    if name.endswith("_"):  # `dcs_aggregator_agent_*` in prose: a family
        continue
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    if name not in documented and base not in documented:
        failures.append(f"metric {name} is used but not documented in {doc_path}")

print(f"{len(rules)} dashboard queries extracted; {len(used)} dcs_* metrics used")
if failures:
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    sys.exit(1)
PY
promtool check rules "$SCRATCH/dashboard-rules.yml"

section "All observability checks passed"
