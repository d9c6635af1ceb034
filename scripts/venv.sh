# Sourced by demo.sh and test.sh: make or reuse .venv and install a requirements file into it.
# Usage: source scripts/venv.sh REQUIREMENTS_FILE
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo_root/$1"
venv="$repo_root/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python_bin" -m venv "$venv"
fi
# Reinstall only when the requirements changed since the last install.
stamp="$venv/.installed-$(basename "$requirements")"
digest="$(cat "$repo_root"/requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "[setup] installing $(basename "$requirements") (first run takes about a minute)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$digest" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
cd "$repo_root"
