#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (made on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`. The suite runs on
# two worker processes, each test file on one worker (its module fixtures built once);
# COPE_TEST_WORKERS=0 runs it in this process instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements-dev.txt
workers="${COPE_TEST_WORKERS:-2}"
if [ "$workers" -gt 0 ]; then
  python -m pytest -q -n "$workers" --dist loadfile "$@"
else
  python -m pytest -q "$@"
fi
