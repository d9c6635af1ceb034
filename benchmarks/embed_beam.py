"""The Beam embedding job against `cope_jax.export`: items/s on one split, in one run.

  python -m benchmarks.embed_beam [--test_products 300] [--small_products 4] \
      [--image_size 64] [--workers 1,2] [--out benchmarks/results/embed_beam.json]

Generates a synthetic ROPE split (`data_pipelines.synthetic`: --test_products products
with about three pages, videos and live clips each, 8 frames per clip, JPEGs of
--image_size px), a model of the `synthetic_tiny` config with random weights (saved as
converted weights), its serving artifact (`python -m cope_jax.serving`), and prepares
the split (`data_pipelines.prepare`, without re-encoding). Then, in the same run, each
as its own command, start-up and compilation included, as a nightly job pays them:

  export      `python -m cope_jax.export` of the prepared split (the baseline; prepare's
              own time is reported beside it: the Beam job needs no preparation)
  beam xN     `python -m cope_jax.embed_beam --workers N` over the ROPE files, on the
              DirectRunner with N worker processes, for each N of --workers

Per run: wall seconds, items/s (every row of every domain / wall seconds), the CPU
seconds of the command and its child processes (`getrusage`), the cores the job got
(CPU seconds / wall seconds), how busy the machine's cores were (`/proc/stat`) and the
load average: on a shared machine these say what limits the scaling. The ratio of the
largest worker count to one is stated. Every Beam run's embeddings are checked against
the export's (the same ids in the same order, within 1e-5).

The same commands also run on a split of --small_products products first (0: not), so
that each command's CPU time splits into a fixed part (start-up: imports, worker
processes, compilation; the small run's CPU seconds less its items' share) and a part
per item: (CPU seconds of the large run - of the small one) / (items - items). These
say what a worker process costs and what an item costs, whatever the machine's load.

Prints the table and writes JSON (`--out`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from configs import synthetic_tiny
from cope_jax import checkpoints
from cope_jax import export_format
from cope_jax import sharding
from cope_jax import state
from cope_jax.base import domains
from data_pipelines import prepare
from data_pipelines import synthetic

REPO_ROOT = common.REPO_ROOT
SPLIT = "test"
TOLERANCE = 1e-5


@dataclasses.dataclass
class Run:
  """One timed command."""
  name: str
  workers: int
  seconds: float
  items: int
  items_per_second: float
  cpu_seconds: float  # the command and its child processes
  cores_used: float  # cpu_seconds / seconds
  machine_busy: float  # share of all cores' time busy during the run (/proc/stat)
  load_average: float  # 1-minute load average at the start
  max_abs_difference: float | None = None  # against the export's embeddings
  items_per_cpu_second: float = 0.0


def _env() -> dict:
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  return {**env, "PYTHONPATH": REPO_ROOT}


def _timed(name: str, workers: int, command: list[str], out: str) -> Run:
  load = os.getloadavg()[0]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  machine_before = common.core_jiffies()
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"{name} failed:\n{result.stderr[-4000:]}")
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  busy = common.busy_share(machine_before, common.core_jiffies())
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  manifest = export_format.Manifest.read(out)
  items = sum(entry.count for entry in manifest.domains.values())
  return Run(name, workers, round(seconds, 2), items, round(items / seconds, 2),
             round(cpu, 1), round(cpu / seconds, 2), busy, round(load, 2),
             items_per_cpu_second=round(items / cpu, 1))


def _rows(folder: str) -> dict[str, export_format.ExportRows]:
  manifest = export_format.Manifest.read(folder)
  return {domain: export_format.read_rows(
      [os.path.join(folder, f["file"]) for f in entry.files], domain)
          for domain, entry in manifest.domains.items()}


def _max_difference(folder: str, reference: dict[str, export_format.ExportRows]) -> float:
  got = _rows(folder)
  worst = 0.0
  for domain in domains.NAMES:
    if list(got[domain].ids) != list(reference[domain].ids):
      raise AssertionError(f"{folder}: {domain} ids differ from the export's")
    worst = max(worst, float(np.max(np.abs(got[domain].embeddings
                                           - reference[domain].embeddings))))
  if worst > TOLERANCE:
    raise AssertionError(f"{folder}: embeddings differ from the export's by {worst}")
  return worst


def _config_flags(rope_dir: str, prepared: str, weights: str, image_size: int) -> list[str]:
  return [f"--config={os.path.join(REPO_ROOT, 'configs', 'synthetic_tiny.py')}",
          f"--config.data.rope_dir={rope_dir}", f"--config.data.prepared_dir={prepared}",
          f"--config.data.vocab_path={os.path.join(rope_dir, 'vocab.txt')}",
          f"--config.data.image_size={image_size}", f"--config.train.init_from={weights}"]


def _commands(root: str, rope_dir: str, prepared: str, weights: str, image_size: int,
              worker_counts: list[int], label: str) -> list[Run]:
  """Serving artifact (untimed), then the export and the Beam job at each worker count."""
  flags = _config_flags(rope_dir, prepared, weights, image_size)
  serving_dir, workdir = os.path.join(root, f"serving_{label}"), os.path.join(root, f"run_{label}")
  made = subprocess.run([sys.executable, "-m", "cope_jax.serving", *flags,
                         f"--workdir={workdir}", f"--out={serving_dir}"],
                        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
  if made.returncode != 0:
    raise RuntimeError(f"serving failed:\n{made.stderr[-4000:]}")
  export_out = os.path.join(root, f"export_{label}")
  runs = [_timed("cope_jax.export", 1, [
      sys.executable, "-m", "cope_jax.export", *flags, f"--workdir={workdir}",
      f"--out={export_out}", f"--split={SPLIT}"], export_out)]
  reference = _rows(export_out)
  for workers in worker_counts:
    out = os.path.join(root, f"beam_{label}_{workers}")
    measured = _timed(f"cope_jax.embed_beam x{workers}", workers, [
        sys.executable, "-m", "cope_jax.embed_beam", f"--serving={serving_dir}",
        f"--rope_dir={rope_dir}", f"--split={SPLIT}", f"--out={out}",
        f"--workers={workers}"], out)
    measured.max_abs_difference = _max_difference(out, reference)
    runs.append(measured)
    shutil.rmtree(out)
  return runs


def _catalog(root: str, label: str, test_products: int) -> tuple[str, str, float]:
  """A synthetic split, prepared: (ROPE folder, prepared folder, prepare's seconds)."""
  rope_dir, prepared = os.path.join(root, f"rope_{label}"), os.path.join(root, f"prepared_{label}")
  synthetic.generate(rope_dir, products=2, test_products=test_products, image_size=64,
                     frames_per_clip=8, seed=0)
  start = time.perf_counter()
  prepare.prepare(rope_dir, prepared, splits=[SPLIT], progress=False, log=lambda line: None)
  return rope_dir, prepared, time.perf_counter() - start


def run(root: str, test_products: int, small_products: int, image_size: int,
        worker_counts: list[int]) -> dict:
  config = synthetic_tiny.get_config()
  rope_dir, prepared, prepare_seconds = _catalog(root, "large", test_products)
  config.data.vocab_path = os.path.join(rope_dir, "vocab.txt")
  config.data.image_size = image_size
  config.model.text.vocab_size = sum(1 for _ in open(config.data.vocab_path, encoding="utf-8"))
  params, _ = state.init_model_params(config, sharding.make_mesh(config.mesh))
  weights = os.path.join(root, "weights")
  checkpoints.save_params(weights, {"model": jax.tree.map(np.asarray, params)})

  small = []
  if small_products:
    small_rope, small_prepared, _ = _catalog(root, "small", small_products)
    # The large split's vocabulary: the same model reads both.
    shutil.copy(config.data.vocab_path, os.path.join(small_rope, "vocab.txt"))
    small = _commands(root, small_rope, small_prepared, weights, image_size, worker_counts,
                      "small")
  runs = _commands(root, rope_dir, prepared, weights, image_size, worker_counts, "large")
  costs = []
  for large, short in zip(runs, small):
    per_item = (large.cpu_seconds - short.cpu_seconds) / max(large.items - short.items, 1)
    costs.append({"name": large.name, "workers": large.workers,
                  "cpu_ms_per_item": round(1000 * per_item, 2),
                  "fixed_cpu_seconds": round(short.cpu_seconds - per_item * short.items, 1)})

  beam = {run.workers: run for run in runs[1:]}
  most = max(worker_counts)
  ratio = (round(beam[most].items_per_second / beam[1].items_per_second, 2)
           if 1 in beam and most != 1 else None)
  return {
      "benchmark": "embed_beam", "split": SPLIT, "test_products": test_products,
      "small_products": small_products, "image_size": image_size, "frames_per_clip": 8,
      "num_frames": int(config.data.num_frames),
      "eval_batch_size": int(config.eval.batch_size),
      "items": runs[0].items, "prepare_seconds": round(prepare_seconds, 2),
      "runs": [dataclasses.asdict(run) for run in runs],
      "small_runs": [dataclasses.asdict(run) for run in small], "costs": costs,
      "ratio_most_workers_to_one": ratio, "most_workers": most,
      "machine": common.machine(jax=True),
  }


def table(result: dict) -> str:
  lines = [f"{result['items']} items ({result['test_products']} products, "
           f"{result['image_size']} px, T={result['num_frames']}); prepare (untimed in the "
           f"export row): {result['prepare_seconds']} s",
           common.table(
               ["run", "workers", "seconds", "items/s", "CPU s", "items per CPU s",
                "cores used", "machine busy", "load", "max abs diff"],
               [[run["name"], run["workers"], run["seconds"], run["items_per_second"],
                 run["cpu_seconds"], run["items_per_cpu_second"], run["cores_used"],
                 f"{run['machine_busy']:.0%}", run["load_average"],
                 "-" if run["max_abs_difference"] is None
                 else f"{run['max_abs_difference']:.1e}"] for run in result["runs"]],
               markdown=True)]
  if result["costs"]:
    lines += ["", f"CPU split from a {result['small_products']}-product run of each command:",
              common.table(["run", "fixed CPU s (start-up)", "CPU ms per item"],
                           [[cost["name"], cost["fixed_cpu_seconds"], cost["cpu_ms_per_item"]]
                            for cost in result["costs"]], markdown=True)]
  if result["ratio_most_workers_to_one"] is not None:
    lines.append(f"Beam items/s, {result['most_workers']} workers / 1: "
                 f"{result['ratio_most_workers_to_one']}x on {result['machine']['cpu_count']} "
                 "cores")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = common.parser(__doc__, "embed_beam.json")
  parser.add_argument("--test_products", type=int, default=300)
  parser.add_argument("--small_products", type=int, default=4,
                      help="products of the split that measures start-up (0: none)")
  parser.add_argument("--image_size", type=int, default=64, help="the model's input side")
  parser.add_argument("--workers", default="1,2", help="Beam worker process counts")
  args = parser.parse_args(argv)
  worker_counts = [int(w) for w in args.workers.split(",") if w]
  root = tempfile.mkdtemp(prefix="embed_beam_benchmark_")
  try:
    result = run(root, args.test_products, args.small_products, args.image_size,
                 worker_counts)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(table(result))
  common.write_result(args.out, result)


if __name__ == "__main__":
  main()
