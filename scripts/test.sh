#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (made on first use).
#   bash scripts/test.sh            every test (what CI runs)
#   bash scripts/test.sh --quick    the quick tier: every test not marked `slow` (a few
#                                   minutes on 2 cores; every library module is imported)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`. The suite runs on
# two worker processes, each test file on one worker (its module fixtures built once);
# COPE_TEST_WORKERS=0 runs it in this process instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements-dev.txt
tier=()
if [ "${1:-}" = "--quick" ]; then
  shift
  tier=(-m "not slow")
fi
workers="${COPE_TEST_WORKERS:-2}"
if [ "$workers" -gt 0 ]; then
  python -m pytest -q -n "$workers" --dist loadfile "${tier[@]}" "$@"
else
  python -m pytest -q "${tier[@]}" "$@"
fi
