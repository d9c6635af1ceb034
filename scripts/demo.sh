#!/usr/bin/env bash
# The main job on the built-in synthetic data:
#   generate ROPE-format data -> prepare ArrayRecord shards -> train -> evaluate.
# Usage: bash scripts/demo.sh [WORKDIR]   (default ./demo_run; reruns reuse what is there)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements.txt
# The test requirements add libtpu (TPU compiles without a TPU). On a host without TPU
# chips or a CUDA plugin, keep JAX from trying to start a TPU backend (it fails noisily).
if [ -z "${JAX_PLATFORMS:-}" ] && python - <<'PY'
import glob, importlib.util, sys
no_tpu_chips = not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")
no_cuda = not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
sys.exit(0 if importlib.util.find_spec("libtpu") and no_tpu_chips and no_cuda else 1)
PY
then
  export JAX_PLATFORMS=cpu
fi
workdir="${1:-demo_run}"
config="configs/synthetic_tiny.py"
overrides=(
  "--config.data.rope_dir=$workdir/rope"
  "--config.data.prepared_dir=$workdir/prepared"
  "--config.data.vocab_path=$workdir/rope/vocab.txt"
)
if [ ! -f "$workdir/rope/test_product_pages_pair.txt" ]; then
  echo "== 1/4 generating the synthetic ROPE-format dataset in $workdir/rope"
  python -m data_pipelines.synthetic --out "$workdir/rope" --seed 0
else
  echo "== 1/4 reusing the synthetic dataset in $workdir/rope"
fi
echo "== 2/4 preparing ArrayRecord shards in $workdir/prepared"
python -m data_pipelines.prepare --rope_dir "$workdir/rope" --out "$workdir/prepared"
echo "== 3/4 training $config (resumes from the last checkpoint if any)"
python -m cope_jax.train --config "$config" --workdir "$workdir" "${overrides[@]}"
echo "== 4/4 evaluating cross-domain retrieval on the test split"
# The run's config is in $workdir/run.json: --workdir is all evaluate needs.
python -m cope_jax.evaluate --workdir "$workdir"
echo
echo "metrics: $workdir/eval/metrics.json"
echo "report:  $workdir/eval/report.md  (plots and examples.html beside it)"
