r"""Restoring a training checkpoint for evaluation: whole train state vs model params only.

  python -m benchmarks.restore --workdir demo_run [--config configs/synthetic_tiny.py] \
      [--repeats 3] [--out benchmarks/results/restore.json]

Before, evaluation restored the whole `TrainState` (parameters, both AdamW moments, the
classifier, the RNG) and sized the classifier from the training split's product table;
now it restores `params["model"]` alone (an Orbax partial restore). Each way runs in a
fresh process (so peak memory is its own), `--repeats` times; the table shows the median
restore time, the process's peak resident memory, and the bytes of the restored arrays.
The config's data paths must point at the run's data (the demo's defaults do).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import common

METHODS = ("train_state", "model_params")


def _measure(method: str, config_path: str, workdir: str) -> dict:
  """Runs in the child process: one restore, timed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cope_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from cope_jax import config_checks  # pylint: disable=g-import-not-at-top
  from cope_jax import sharding  # pylint: disable=g-import-not-at-top
  from cope_jax import state as state_lib  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("run_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_checks.resolve_vocab_size(module.get_config())
  mesh = sharding.make_mesh(config.mesh)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  if method == "train_state":
    abstract = state_lib.abstract_train_state(config, mesh, state_lib.classifier_size(config))
    restored, step = checkpoints.restore_verified(workdir, abstract)
  else:
    abstract = {"params": {"model": state_lib.abstract_model_params(config, mesh)}}
    restored, step = checkpoints.restore_verified(workdir, abstract, partial=True)
  jax.block_until_ready(restored)
  seconds = time.perf_counter() - start
  return {"method": method, "step": int(step), "seconds": seconds,
          "restored_bytes": int(sum(x.nbytes for x in jax.tree.leaves(restored))),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 - rss_before) / 1024}


def measure_in_fresh_processes(config: str, workdir: str, repeats: int) -> dict:
  """{method: [one `_measure` per repeat]}, each in a process of its own."""
  runs = {method: [] for method in METHODS}
  for _ in range(repeats):
    for method in METHODS:
      result = subprocess.run(
          [sys.executable, "-m", "benchmarks.restore", "--child", method, "--config",
           config, "--workdir", workdir], capture_output=True, text=True, check=True,
          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
      runs[method].append(json.loads(result.stdout.strip().splitlines()[-1]))
  return runs


def summarise(runs: dict) -> dict:
  """Per method: the medians over the repeats, the restored bytes and the step."""
  return {method: {
      "median_seconds": statistics.median(r["seconds"] for r in results),
      "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
      "median_peak_rss_growth_mb": statistics.median(r["peak_rss_growth_mb"]
                                                     for r in results),
      "restored_bytes": results[0]["restored_bytes"], "step": results[0]["step"]}
          for method, results in runs.items()}


def main(argv=None) -> None:
  parser = common.parser(__doc__, "restore.json")
  parser.add_argument("--workdir", default="demo_run")
  parser.add_argument("--config", default="configs/synthetic_tiny.py")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args.child, args.config, args.workdir)))
    return

  runs = measure_in_fresh_processes(args.config, args.workdir, args.repeats)
  summary = summarise(runs)
  before, after = summary["train_state"], summary["model_params"]
  print(f"checkpoint {args.workdir}/checkpoints/{before['step']} ({args.config}), "
        f"median of {args.repeats}")
  print(common.table(
      ["restore", "seconds", "peak RSS MB", "RSS growth MB", "arrays MB"],
      [[method, f"{row['median_seconds']:.3f}", f"{row['median_peak_rss_mb']:.0f}",
        f"{row['median_peak_rss_growth_mb']:.1f}", f"{row['restored_bytes'] / 2**20:.2f}"]
       for method, row in summary.items()]))
  ratios = {"time": before["median_seconds"] / after["median_seconds"],
            "restored_bytes": before["restored_bytes"] / after["restored_bytes"]}
  print(f"model params only: {ratios['time']:.2f}x faster, "
        f"{ratios['restored_bytes']:.2f}x fewer bytes restored")
  common.write_result(args.out, {
      "machine": common.machine(), "workdir": args.workdir, "config": args.config,
      "repeats": args.repeats, "summary": summary, "ratios_before_over_after": ratios,
      "runs": runs})


if __name__ == "__main__":
  main()
