#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (made on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements-dev.txt
python -m pytest -q "$@"
