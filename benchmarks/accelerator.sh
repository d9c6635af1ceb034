#!/usr/bin/env bash
# The accelerator benchmarks of the project in one run, under 8 minutes on one GPU.
#
#   bash benchmarks/accelerator.sh             # on a machine with one NVIDIA GPU
#   bash benchmarks/accelerator.sh --dry-run   # anywhere (CPU): tiny shapes, a step or two
#
# Parts, in this order, each under its own time limit inside the total (ACCELERATOR_SECONDS,
# default 465 s; a part gets what is left when that is less), each guarded so that a
# failure or a timeout loses only its own figures (the train-step benchmark writes its
# JSON after each row, and each part's JSON is copied to $COPY_RESULTS_TO, when set,
# as soon as the part ends):
#   1. attention   cuDNN flash attention vs XLA in bfloat16, to 2e-2 (tests/test_models.py)
#   2. step_b8     train step at the paper's shape, batch 8 per device: JAX (cuDNN and
#                  XLA attention) vs the PyTorch reference with fp16 AMP, same run; the
#                  first setting is traced with jax.profiler (device time per model part)
#   3. step_best   cuDNN attention at batch 32 with remat none and dots_saveable, the
#                  largest batch that fits up to 64 (doubling, first policy), and
#                  PyTorch AMP at batch 32
#   4. stall       the real training loop (realistic JPEGs stored pre-resized, host and
#                  device augmentation) vs the same step on one in-memory batch
#   5. pipeline    the time left: the input pipeline at the paper's shape on realistic
#                  JPEGs (720 x 1280 frames, 800 x 800 pages, q90), as released and
#                  stored pre-resized, 8 worker processes
# Results: benchmarks/results/accelerator/<device>_*.json, a summary
# (<device>_summary.json: each part's status, seconds and the device), and the logs;
# the JSON files and a tarball of the logs are also copied to $COPY_RESULTS_TO when set
# (a folder that outlives the machine, say).
#
# On an H200 with JAX 0.11, the first paper-shape row (state, compilation, 11 steps and
# the profiled steps) took over 120 s, and generating and preparing the stall
# benchmark's realistic data most of 90 s: each part's log has a line per set-up stage.
# A part stopped at its limit keeps the rows it wrote; raise ACCELERATOR_SECONDS (and
# the part limits here) on a machine where the 8 minutes do not suffice.
#
# A machine without registry access but with JAX, Flax, Optax, Orbax, PyTorch and
# Pillow gets the remaining packages as wheels: run benchmarks/accelerator_wheels.sh
# where pip works and bring its .whl folder; this script installs .whl/*.whl first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
total_seconds="${ACCELERATOR_SECONDS:-465}"
start_time=$(date +%s)
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One XLA compilation cache for all parts: what one part compiled (parameter
# initialisation, a step of the same configuration), a later part loads.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/cope_accelerator_xla_cache}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

device=$("$python" -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null || echo unknown)
slug=$(echo "$device" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
[ "$dry_run" = 1 ] && slug="dryrun_$slug"
results="benchmarks/results/accelerator"
mkdir -p "$results"
summary="$results/${slug}_summary.jsonl"
: > "$summary"
echo "accelerator benchmarks on '$device' (dry run: $dry_run), total limit ${total_seconds}s"

# part NAME LIMIT_SECONDS COMMAND...: runs COMMAND with at most LIMIT seconds (less if
# the total limit is nearer), logs to $results/<slug>_NAME.log, records the outcome.
part() {
  local name="$1" limit="$2"
  shift 2
  local remaining=$(( total_seconds - ($(date +%s) - start_time) ))
  (( limit > remaining )) && limit=$remaining
  if (( limit < 20 )); then
    echo "{\"part\": \"$name\", \"status\": \"skipped: total time limit\"}" >> "$summary"
    echo "== $name: skipped (total time limit)"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local part_start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$results/${slug}_$name.log" 2>&1
  local status=$?
  local seconds=$(( $(date +%s) - part_start ))
  local outcome="ok"
  (( status == 124 || status == 137 )) && outcome="timed out after ${limit}s"
  (( status != 0 && status != 124 && status != 137 )) && outcome="failed (exit $status)"
  echo "{\"part\": \"$name\", \"status\": \"$outcome\", \"seconds\": $seconds}" >> "$summary"
  tail -n 25 "$results/${slug}_$name.log"
  echo "== $name: $outcome in ${seconds}s"
  # Each part's figures leave at once, so that a run stopped later keeps them.
  [ -n "${COPY_RESULTS_TO:-}" ] && cp "$results/${slug}_$name.json" "$COPY_RESULTS_TO"/ 2>/dev/null
}

if [ "$dry_run" = 1 ]; then
  step_args=(--shapes tiny --steps 1 --warmup 1)
  part attention 300 "$python" -m pytest -q -p no:cacheprovider tests/test_models.py -k "cudnn"
  part step_b8 300 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 4 \
    --attention xla --profile /tmp/cope_profile_dryrun --out "$results/${slug}_step_b8.json"
  part step_best 300 "$python" -m benchmarks.train_step "${step_args[@]}" --skip_torch \
    --batch_sizes 4,max --max_batch_limit 8 --remat dots_saveable,none \
    --out "$results/${slug}_step_best.json"
  part stall 300 "$python" -m benchmarks.stall --products 4 --steps 4 --log_every 2 \
    --batch_size 8 --realistic --max_image_side 576 --attention xla \
    --out "$results/${slug}_stall.json"
  part pipeline 300 "$python" -m benchmarks.data_pipeline --shapes tiny --sources realistic \
    --products 4 --batches 1 --workers 0 --out "$results/${slug}_pipeline.json"
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
  step_args=(--shapes paper --steps 8 --warmup 3)
  part attention 50 "$python" -m pytest -q -p no:cacheprovider tests/test_models.py -k "cudnn"
  part step_b8 190 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 8 \
    --attention cudnn,xla --profile /tmp/cope_profile_b8 --out "$results/${slug}_step_b8.json"
  # Remat policy at batch 32 (and the largest batch that fits with the first policy),
  # PyTorch AMP at batch 32.
  part step_best 130 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 32,max \
    --attention cudnn --remat none,dots_saveable --max_batch_limit 64 \
    --out "$results/${slug}_step_best.json"
  part stall 95 "$python" -m benchmarks.stall --shape paper --realistic --max_image_side 576 \
    --products 8 --steps 20 --log_every 10 --attention cudnn \
    --out "$results/${slug}_stall.json"
  part pipeline 90 "$python" -m benchmarks.data_pipeline --sources realistic --products 8 \
    --batches 4 --workers 8 --out "$results/${slug}_pipeline.json"
fi

"$python" - "$summary" "$device" "$results/${slug}_summary.json" <<'EOF'
import json, sys
parts = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"device": sys.argv[2], "parts": parts}, open(sys.argv[3], "w"), indent=1)
print(json.dumps({"device": sys.argv[2], "parts": parts}))
EOF
rm -f "$summary"
if [ -n "${COPY_RESULTS_TO:-}" ]; then
  cp "$results/${slug}"_*.json "$COPY_RESULTS_TO"/ 2>/dev/null
  tar czf "$COPY_RESULTS_TO/${slug}_logs.tar.gz" "$results/${slug}"_*.log 2>/dev/null
fi
echo "total $(( $(date +%s) - start_time ))s; results in $results/${slug}_*"
