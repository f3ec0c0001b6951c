#!/usr/bin/env bash
# The test command: sets up .venv on first use (see _env.sh), then runs the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/ops -k grad).
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
# pytest exits non-zero on failures and with 5 when nothing was collected: both fail this script.
"$PY" -m pytest "$@"
