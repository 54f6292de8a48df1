#!/usr/bin/env bash
# The OpenTelemetry Python SDK recipe (docs/INTEGRATIONS.md, "OpenTelemetry"):
#
#   scripts/otlp-python.sh
#
# 1. installs the OpenTelemetry Python SDK and its OTLP/HTTP exporter (PyPI,
#    pinned) into a virtualenv cached outside the repository, keyed by their
#    versions: ~/.cache/dcs/otel-python-SDK_VERSION (XDG_CACHE_HOME is
#    honoured; python3-venv with apt if needed)
# 2. runs tests/tests/otlp_recipe.rs: a real aggregator and PostgreSQL, a
#    real agent, and tests/recipes/otlp_python.py sending 10,000 log records
#    through the SDK's exporter to the agent's /v1/logs; every one must be in
#    PostgreSQL exactly once. Prints
#    `scenario=otlp-python sent=N in_pg=M missing=0 duplicated=0`.
#
# Needs PostgreSQL on 127.0.0.1:5432 (scripts/ensure-postgres.sh).
# DCS_OTLP_RECIPE_COUNT sends another number of records.
set -Eeuo pipefail

DCS_SCRIPT_NAME="otlp-python"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Pinned together: the exporter and the SDK are released in lockstep.
OTEL_SDK_VERSION=1.45.2
OTEL_EXPORTER_VERSION=1.45.2
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/dcs/otel-python-$OTEL_SDK_VERSION-$OTEL_EXPORTER_VERSION"

section "OpenTelemetry Python SDK $OTEL_SDK_VERSION"
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet \
        "opentelemetry-sdk==$OTEL_SDK_VERSION" \
        "opentelemetry-exporter-otlp-proto-http==$OTEL_EXPORTER_VERSION" || {
        rm -rf "$VENV"
        die "could not install the OpenTelemetry SDK $OTEL_SDK_VERSION from PyPI"
    }
fi
say "$("$VENV/bin/pip" freeze | grep -E '^opentelemetry-(sdk|exporter-otlp-proto-http)==' | tr '\n' ' ')"

section "10,000 log records: SDK exporter → agent /v1/logs → aggregator → PostgreSQL"
DCS_OTLP_PYTHON="$VENV/bin/python" \
    cargo test --workspace --test e2e -- --ignored --nocapture otlp_recipe::
