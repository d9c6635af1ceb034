#!/usr/bin/env bash
# The accelerator benchmarks of the project in one run, under 8 minutes on one GPU.
#
#   bash benchmarks/accelerator.sh             # on a machine with one NVIDIA GPU
#   bash benchmarks/accelerator.sh --dry-run   # anywhere (CPU): tiny shapes, a step or two
#
# Parts, in this order, each under its own time limit inside the total (ACCELERATOR_SECONDS,
# default 470 s; a part gets what is left when that is less), each guarded so that a
# failure or a timeout loses only its own figures. The benchmarks write their JSON as
# each figure is measured (a train-step row right after its JAX timing, again with
# PyTorch's figure, again with the profile), and each part's JSON is copied to
# $COPY_RESULTS_TO, when set, as soon as the part ends:
#   1. attention   cuDNN flash attention vs XLA in bfloat16, to 2e-2 (tests/test_models.py)
#   2. step_b8     train step at the paper's shape, batch 8 per device, cuDNN attention:
#                  JAX vs the PyTorch reference with fp16 AMP, same run; then three more
#                  JAX steps traced with jax.profiler (device time per model part)
#   3. stall       the real training loop (realistic JPEGs stored pre-resized; host, then
#                  device augmentation) vs the same step on one in-memory batch
#   4. step_best   batch 32 with remat none, the largest batch that fits up to 64
#                  (doubling), batch 32 with remat dots_saveable; PyTorch AMP at batch 32
#   5. step_xla    with the time left: batch 8 with XLA attention (the kernel's share)
# Host-only work runs beside the accelerator parts, on the host's other cores:
#   - stall_data   from the start: generating and preparing the stall part's realistic
#                  data (it took most of 90 s on the GPU machine's host);
#   - pipeline     beside step_best: the input pipeline at the paper's shape on realistic
#                  JPEGs (720 x 1280 frames, 800 x 800 pages, q90), as released and stored
#                  pre-resized, 8 worker processes, and the host cores per accelerator
#                  that this run's step rate needs. It shares the host with a training
#                  step, as in training (its JSON records the load average).
# Results: benchmarks/results/accelerator/<device>_*.json, a summary
# (<device>_summary.json: each part's status, seconds and the device), and the logs;
# the JSON files and a tarball of the logs are also copied to $COPY_RESULTS_TO when set
# (a folder that outlives the machine, say).
#
# Where the time goes on a fresh machine (H200, JAX 0.11): the attention tests take
# 50 s; at the paper's shape each train-step setting spends most of a minute creating
# the state and compiling before its first timed step (each part's log has a line per
# set-up stage). A part stopped at its limit keeps what it wrote; raise
# ACCELERATOR_SECONDS (and the part limits here) where the 8 minutes do not suffice.
#
# A machine without registry access but with JAX, Flax, Optax, Orbax, PyTorch and
# Pillow gets the remaining packages as wheels: run benchmarks/accelerator_wheels.sh
# where pip works and bring its .whl folder; this script installs .whl/*.whl first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
total_seconds="${ACCELERATOR_SECONDS:-470}"
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

# The device's name without starting JAX on it (nvidia-smi names it as JAX does).
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$device" ] || device=$("$python" -c "import jax; print(jax.devices()[0].device_kind)" \
  2>/dev/null || echo unknown)
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
  record "$name" $? "$limit" "$part_start"
}

# record NAME EXIT_STATUS LIMIT START: the outcome in the summary, the log's end, the
# JSON copied out.
record() {
  local name="$1" status="$2" limit="$3" part_start="$4" concurrent="${5:-}"
  local seconds=$(( $(date +%s) - part_start ))
  local outcome="ok"
  (( status == 124 || status == 137 )) && outcome="timed out after ${limit}s"
  (( status != 0 && status != 124 && status != 137 )) && outcome="failed (exit $status)"
  echo "{\"part\": \"$name\", \"status\": \"$outcome\", \"seconds\": $seconds${concurrent:+, \"beside\": \"$concurrent\"}}" \
    >> "$summary"
  tail -n 25 "$results/${slug}_$name.log"
  echo "== $name: $outcome in ${seconds}s"
  # Each part's figures leave at once, so that a run stopped later keeps them.
  [ -n "${COPY_RESULTS_TO:-}" ] && cp "$results/${slug}_$name.json" "$COPY_RESULTS_TO"/ 2>/dev/null
  return 0
}

# beside NAME LIMIT COMMAND...: starts host-only COMMAND in the background (JAX on the
# CPU, so that it takes nothing from the accelerator); `joined NAME` waits for it.
declare -A beside_pid beside_start beside_limit
beside() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (beside the accelerator parts, limit ${limit}s): $*"
  beside_start[$name]=$(date +%s)
  beside_limit[$name]=$limit
  JAX_PLATFORMS=cpu timeout --kill-after=10 "$limit" "$@" > "$results/${slug}_$name.log" 2>&1 &
  beside_pid[$name]=$!
}
joined() {
  local name="$1" concurrent="${2:-}"
  wait "${beside_pid[$name]}"
  record "$name" $? "${beside_limit[$name]}" "${beside_start[$name]}" "$concurrent"
}

stall_data="$(mktemp -d /tmp/cope_stall_data_XXXX)"
if [ "$dry_run" = 1 ]; then
  step_args=(--shapes tiny --steps 1 --warmup 1)
  beside stall_data 300 "$python" -m benchmarks.stall --products 4 --realistic \
    --max_image_side 576 --prepare_to "$stall_data"
  part attention 300 "$python" -m pytest -q -p no:cacheprovider tests/test_models.py -k "cudnn"
  part step_b8 300 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 4 \
    --attention xla --profile /tmp/cope_profile_dryrun --out "$results/${slug}_step_b8.json"
  joined stall_data "attention, step_b8"
  part stall 300 "$python" -m benchmarks.stall --steps 4 --log_every 2 --batch_size 8 \
    --rope_dir "$stall_data/rope" --prepared_dir "$stall_data/prepared" --realistic \
    --max_image_side 576 --attention xla --out "$results/${slug}_stall.json"
  beside pipeline 300 "$python" -m benchmarks.data_pipeline --shapes tiny --sources realistic \
    --products 4 --batches 1 --workers 0 --gpu_step_results "$results/${slug}_step_b8.json" \
    --out "$results/${slug}_pipeline.json"
  part step_best 300 "$python" -m benchmarks.train_step "${step_args[@]}" --skip_torch \
    --batch_sizes 4,max --max_batch_limit 8 --remat none,dots_saveable \
    --out "$results/${slug}_step_best.json"
  joined pipeline step_best
  part step_xla 300 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 4 \
    --attention xla --skip_torch --out "$results/${slug}_step_xla.json"
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
  step_args=(--shapes paper --steps 8 --warmup 3)
  beside stall_data 240 "$python" -m benchmarks.stall --shape paper --products 8 --realistic \
    --max_image_side 576 --prepare_to "$stall_data"
  part attention 50 "$python" -m pytest -q -p no:cacheprovider tests/test_models.py -k "cudnn"
  part step_b8 150 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 8 \
    --attention cudnn --profile /tmp/cope_profile_b8 --out "$results/${slug}_step_b8.json"
  joined stall_data "attention, step_b8"
  part stall 100 "$python" -m benchmarks.stall --shape paper --steps 20 --log_every 10 \
    --rope_dir "$stall_data/rope" --prepared_dir "$stall_data/prepared" --realistic \
    --max_image_side 576 --attention cudnn --out "$results/${slug}_stall.json"
  beside pipeline 140 "$python" -m benchmarks.data_pipeline --sources realistic --products 8 \
    --batches 4 --workers 8 \
    --gpu_step_results "$results/${slug}_step_b8.json,$results/${slug}_step_best.json" \
    --out "$results/${slug}_pipeline.json"
  part step_best 140 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 32,max \
    --attention cudnn --remat none,dots_saveable --max_batch_limit 64 \
    --out "$results/${slug}_step_best.json"
  joined pipeline step_best
  part step_xla 90 "$python" -m benchmarks.train_step "${step_args[@]}" --batch_sizes 8 \
    --attention xla --skip_torch --out "$results/${slug}_step_xla.json"
fi
rm -rf "$stall_data"

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
