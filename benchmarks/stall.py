r"""Data stall: the real training loop vs the same step fed one in-memory batch.

  python -m benchmarks.stall                                   # the demo config, CPU
  python -m benchmarks.stall --augment_on host,device --steps 300
  python -m benchmarks.stall --config configs/rope_vitb16.py --shape paper   # accelerator

For each `data.augment_on` value, in one process and on the same data:

1. the real loop: `train.setup` + `train.run_steps` with the real input pipeline and
   the FiniteCheck and Logger hooks (no checkpoints), `--steps` steps; the Logger's
   `data_stall` (share of wall time spent in `next(data_iterator)` and the transfer to
   the devices) and examples/s per log window, the first window (compilation) left out;
2. the same compiled step on one batch already on the devices, `--steps` steps.

The ratio of 1 to 2 is what the input pipeline costs the loop; 1 - ratio and the
logged stall should agree roughly (on a CPU-only machine the pipeline's threads also
take cores from the step, which the stall figure does not see).

Without `--prepared_dir` a synthetic ROPE dataset is generated and prepared in a
temporary folder (the demo's: 240 products, 64 px JPEGs; `--shape paper`: 224 px,
T = 8, batch 8 per device, `--jpeg_side` px JPEGs). `--prepare_to DIR` only generates
and prepares it, into DIR/rope and DIR/prepared, for a later run's `--rope_dir` and
`--prepared_dir` (host work that can run while the accelerator does something else).
Prints a table, writes JSON (default benchmarks/results/stall_<backend>_<shape>.json).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TQDM_DISABLE", "1")  # the Logger's progress bar (read at import)

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import data_pipeline
from configs import rope_vitb16
from configs import synthetic_tiny
from cope_jax.base import workdir as workdir_layout
from cope_jax import sharding
from cope_jax import train
from data_pipelines import prepare
from data_pipelines import synthetic


def make_config(shape: str, data_dir: str, prepared_dir: str, steps: int, log_every: int,
                augment_on: str, canvas_size: int, batch_size: int, attention: str = "",
                prefetch_buffer_size: int = 0):
  if shape == "demo":
    config = synthetic_tiny.get_config()
  else:
    config = rope_vitb16.get_config()
    config.train.init_from = ""
    config.model.text.vocab_size = 0  # the synthetic vocabulary
    config.train.batch_size = 8 * jax.device_count()
  if batch_size:
    config.train.batch_size = batch_size
  config.data.rope_dir = data_dir
  config.data.prepared_dir = prepared_dir
  config.data.vocab_path = os.path.join(data_dir, "vocab.txt")
  config.data.augment_on = augment_on
  if attention:
    config.model.attention = attention
  if prefetch_buffer_size:
    config.data.prefetch_buffer_size = prefetch_buffer_size
  if canvas_size:
    config.data.canvas_size = canvas_size
  config.train.num_steps = steps
  if not config.optim.decay_steps:  # the cosine ends with the run: keep a warm-up below it
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 2)
  config.train.log_every = log_every
  config.train.checkpoint_every = 10 ** 9
  for entry in config.evals.values():
    entry.every = 0
  return config


def real_loop(config, workdir: str) -> dict:
  """The training loop with the real pipeline, checkpoints off; per-window figures."""
  run = train.setup(config, workdir)
  logger = train.Logger(run)
  hooks = [train.FiniteCheck(run), logger]
  start = time.perf_counter()
  state = train.run_steps(run, hooks)
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - start
  with open(workdir_layout.training_log(workdir), encoding="utf-8") as f:
    windows = [json.loads(line) for line in f]
  steady = windows[1:] or windows
  result = {
      "steps": config.train.num_steps, "seconds_with_compile": round(seconds, 2),
      "windows": [{"step": w["step"], "data_stall": round(w["data_stall"], 4),
                   "examples_per_second": round(w["examples_per_second"], 2)}
                  for w in windows],
      "data_stall": float(np.mean([w["data_stall"] for w in steady])),
      "data_stall_max": float(np.max([w["data_stall"] for w in steady])),
      "examples_per_second": float(np.mean([w["examples_per_second"] for w in steady])),
  }
  return result, run, state


def in_memory_loop(run, state, steps: int) -> dict:
  """The same compiled step on one batch placed on the devices once."""
  batch = sharding.host_batch_to_global(next(run.data_iterator), run.mesh)
  with jax.set_mesh(run.mesh):
    state, metrics = run.step_fn(state, batch)  # already compiled: same shapes
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = run.step_fn(state, batch)
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - start
  return {"steps": steps, "seconds": round(seconds, 3),
          "examples_per_second": steps * run.config.train.batch_size / seconds}


def _data(root: str, shape: str, jpeg_side: int, products: int | None, realistic: bool,
          max_image_side: int) -> tuple[str, str]:
  """Generates (and prepares) the synthetic data; `realistic`: real ROPE image sizes."""
  rope_dir, prepared_dir = os.path.join(root, "rope"), os.path.join(root, "prepared")
  kwargs = {} if shape == "demo" else {"test_products": 4, "frames_per_clip": 8,
                                       "image_size": jpeg_side}
  if products:
    kwargs["products"] = products
  synthetic.generate(rope_dir, seed=0, **kwargs)
  if realistic:
    data_pipeline.make_realistic(rope_dir)
  prepare.prepare(rope_dir, prepared_dir, progress=False, log=lambda line: None,
                  max_image_side=max_image_side)
  return rope_dir, prepared_dir


def measure(config, workdir: str, steps: int) -> dict:
  """One row: the real loop, then the same compiled step on one in-memory batch."""
  real, run, state = real_loop(config, workdir)
  memory = in_memory_loop(run, state, steps)
  return {"augment_on": config.data.augment_on, "batch_size": config.train.batch_size,
          "image_size": config.data.image_size, "num_frames": config.data.num_frames,
          "num_threads": config.data.num_threads, "num_workers": config.data.num_workers,
          "prefetch_buffer_size": config.data.prefetch_buffer_size,
          "real_pipeline": real, "in_memory_batch": memory,
          "real_over_in_memory": real["examples_per_second"]
                                 / memory["examples_per_second"]}


def print_table(rows: list[dict], args) -> None:
  print(f"\ndata stall, {args.shape} shape on {jax.devices()[0].device_kind}; {args.steps} "
        f"steps, windows of {args.log_every} (first left out); load average "
        f"{os.getloadavg()[0]:.1f}")
  print(common.table(
      ["augment_on", "batch", "real ex/s", "in-memory ex/s", "ratio", "data_stall", "max"],
      [[row["augment_on"], row["batch_size"],
        f"{row['real_pipeline']['examples_per_second']:.1f}",
        f"{row['in_memory_batch']['examples_per_second']:.1f}",
        f"{row['real_over_in_memory']:.2f}", f"{row['real_pipeline']['data_stall']:.1%}",
        f"{row['real_pipeline']['data_stall_max']:.1%}"] for row in rows]))


def _parser():
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "stall_<backend>_<shape>.json)")
  parser.add_argument("--shape", default="demo", choices=("demo", "paper"))
  parser.add_argument("--augment_on", default="host,device")
  parser.add_argument("--canvas_size", type=int, default=0,
                      help="data.canvas_size for augment_on=device (0: the config's)")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  parser.add_argument("--prefetch_buffer_size", type=int, default=0,
                      help="data.prefetch_buffer_size (0: the config's)")
  parser.add_argument("--attention", default="", help="config.model.attention (default: "
                      "the config's)")
  parser.add_argument("--rope_dir", default="")
  parser.add_argument("--prepared_dir", default="")
  parser.add_argument("--jpeg_side", type=int, default=256,
                      help="side of the generated JPEGs for --shape paper")
  parser.add_argument("--products", type=int, default=0,
                      help="training products (0: 240 for demo, the generator's default)")
  parser.add_argument("--realistic", action="store_true",
                      help="re-encode the images at real ROPE sizes (720 x 1280 frames, "
                           "800 x 800 pages; benchmarks/data_pipeline.py)")
  parser.add_argument("--max_image_side", type=int, default=0,
                      help="prepare --max_image_side (frames stored pre-resized; 0: no)")
  parser.add_argument("--prepare_to", default="",
                      help="only generate and prepare the data into this folder, then exit")
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.prepare_to:
    start = time.perf_counter()
    rope_dir, prepared_dir = _data(args.prepare_to, args.shape, args.jpeg_side,
                                   args.products, args.realistic, args.max_image_side)
    print(f"generated {rope_dir} and prepared {prepared_dir} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return

  result = common.ResultRows(
      args.out or common.result_path(f"stall_{jax.default_backend()}_{args.shape}.json"),
      jax=True, shape=args.shape, steps=args.steps, log_every=args.log_every,
      data={"realistic": args.realistic, "max_image_side": args.max_image_side,
            "jpeg_side": args.jpeg_side, "products": args.products})
  with tempfile.TemporaryDirectory(prefix="cope_stall_") as root:
    if args.prepared_dir:
      rope_dir, prepared_dir = args.rope_dir, args.prepared_dir
    else:
      rope_dir, prepared_dir = _data(root, args.shape, args.jpeg_side, args.products,
                                     args.realistic, args.max_image_side)
    for augment_on in args.augment_on.split(","):
      config = make_config(args.shape, rope_dir, prepared_dir, args.steps, args.log_every,
                           augment_on, args.canvas_size, args.batch_size, args.attention,
                           args.prefetch_buffer_size)
      row = result.add(measure(config, os.path.join(root, f"run_{augment_on}"), args.steps))
      print(json.dumps({k: v for k, v in row.items() if k != "real_pipeline"}), flush=True)
  print_table(result.rows, args)
  result.write(quiet=False)


if __name__ == "__main__":
  main()
