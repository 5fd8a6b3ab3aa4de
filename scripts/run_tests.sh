#!/usr/bin/env bash
# Runs the test suite in ./.venv; starts the services the tests need when they are down.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# The layering (import-linter contracts in pyproject.toml) and the style (ruff lint and format)
# are part of the test: a new import circle or a stage reaching into another fails CI.
"$VENV/bin/lint-imports" || exit 1
"$VENV/bin/ruff" check . || exit 1
"$VENV/bin/ruff" format --check . || exit 1
bash scripts/services.sh
"$VENV/bin/python" -m pytest "$@"
rc=$?
# pytest exits 5 when no test ran: that must fail CI, not pass it.
exit $rc
