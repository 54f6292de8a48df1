#!/usr/bin/env bash
# Validates the platform API's OpenAPI document (docs/API.md):
#
#   scripts/check-openapi.sh
#
# 1. builds dcs-aggregator and prints the document (`dcs-aggregator openapi`,
#    the same document the aggregator serves at /openapi.json)
# 2. installs openapi-spec-validator from PyPI into a virtualenv under
#    .dcs/openapi-venv if it is not there yet (python3-venv with apt if needed)
# 3. validates the document with it
#
# Exits non-zero if the document does not validate. Needs no database.
set -Eeuo pipefail

DCS_SCRIPT_NAME="check-openapi"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Pinned, so a new validator release cannot fail CI on its own.
VALIDATOR_VERSION=0.9.0
VENV=.dcs/openapi-venv
DOC=.dcs/openapi.json

section "build and print the document"
# The workspace build test.sh has already made (a no-op then): building the
# one package would resolve its dependencies' features differently and
# rebuild them, and the aggregator, for every later step.
cargo build --quiet --workspace --bins
mkdir -p .dcs
target/debug/dcs-aggregator openapi >"$DOC"
say "wrote $DOC ($(wc -c <"$DOC") bytes)"

section "openapi-spec-validator"
if [[ ! -x $VENV/bin/openapi-spec-validator ]]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet "openapi-spec-validator==$VALIDATOR_VERSION" ||
        die "could not install openapi-spec-validator $VALIDATOR_VERSION from PyPI"
fi
"$VENV/bin/openapi-spec-validator" "$DOC"
say "the OpenAPI document is valid"
