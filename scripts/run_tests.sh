#!/usr/bin/env bash
# Runs the test suite in ./.venv; starts the services the tests need when they are down.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/services.sh
"$VENV/bin/python" -m pytest "$@"
rc=$?
# pytest exits 5 when no test ran: that must fail CI, not pass it.
exit $rc
