"""Data preparation and training input throughput, each against its baseline.

  python -m benchmarks.data_pipeline [--batches 16] [--products 40] [--workers 0,1,2]
  python -m benchmarks.data_pipeline --prepare_only [--products 200]

Generates a synthetic ROPE-format dataset with 256 px JPEGs in a temporary folder, then

1. Preparation (`data_pipelines.prepare`: decode-check every image, write the `rope`
   TFDS dataset): the single-process generator (the baseline) and the Apache Beam
   DirectRunner with `--prepare_beam_workers` processes (multi-processing mode), on the
   same input in the same run. Reported: wall seconds (Beam's start-up included),
   images/s, and the ratio to the single process. Both must write the same records.
   Skipped (with a note) when apache-beam is not installed.

2. Training input: examples/s and decoded frames/s (1 page image + T video frames + T
   live frames per example) of `pipelines.make_train_dataset`, reading the single
   process's output, at two shapes:

     paper  224 px, T = 8 (the released recipe), batch 8 (its per-GPU batch)
     tiny   configs/synthetic_tiny.py's shape (64 px, T = 4), batch 32

   for each worker-process count, and a naive baseline in the same run: a plain Python
   loop that reads the same records and decodes, crops, resizes and tokenises them one
   after another with PIL, building batches of the same layout. The first batch of each
   run (worker start-up) is timed separately; then the batches the pipeline can hold
   ready in its buffers are taken untimed, and the rate is measured on the next
   `--batches` batches (steady state).

Prints the tables and writes JSON (`--out`, default benchmarks/results/data_pipeline.json;
with --prepare_only benchmarks/results/data_pipeline_prepare.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time

import numpy as np
import PIL.Image

from configs import synthetic_tiny
from cope_jax import result_files
from data_pipelines import domains
from data_pipelines import pipelines
from data_pipelines import prepare
from data_pipelines import synthetic
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import transforms

SHAPES = {  # name -> (image side, frames per clip, per-process batch)
    "paper": (224, 8, 8),
    "tiny": (64, 4, 32),
}


@dataclasses.dataclass
class Measurement:
  shape: str
  loader: str
  workers: int
  batch_size: int
  batches: int
  first_batch_s: float
  seconds: float
  examples_per_s: float
  frames_per_s: float


@dataclasses.dataclass
class PrepareMeasurement:
  path: str
  workers: int
  seconds: float
  records: int
  images: int
  images_per_s: float


def _make_rope(root: str, products: int, seed: int) -> str:
  """Writes synthetic ROPE data (256 px JPEGs, 8 frames per clip) under `root`."""
  rope_dir = os.path.join(root, "rope")
  synthetic.generate(rope_dir, products=products, test_products=2, frames_per_clip=8,
                     image_size=256, seed=seed)
  return rope_dir


def _count_images(rope_dir: str) -> int:
  return sum(1 for name in os.listdir(os.path.join(rope_dir, "images"))
             if name.endswith(".jpg"))


def _prepared_records(prepared_dir: str) -> list:
  return [item for split in ("training", "test") for domain in pipelines.DOMAINS
          for item in prepare.open_domain(prepared_dir, split, domain)]


def measure_prepare(rope_dir: str, root: str, beam_workers: int
                    ) -> tuple[list[PrepareMeasurement], str, str | None]:
  """Times prepare single-process and on the Beam DirectRunner; checks equal output.

  Returns the measurements, the single-process output folder, and a note when the
  Beam run was skipped.
  """
  images = _count_images(rope_dir)
  runs = [("single process", 1, {})]
  note = None
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
    runs.append(("Beam DirectRunner", beam_workers,
                 {"workers": beam_workers, "beam_runner": "DirectRunner"}))
  except ImportError:
    note = "Beam row skipped: apache-beam is not installed (requirements-beam.txt)"
  measurements, outputs = [], []
  for path, workers, options in runs:
    out = os.path.join(root, f"prepared_{len(outputs)}")
    start = time.perf_counter()
    report = prepare.prepare(rope_dir, out, progress=False, log=lambda line: None,
                             **options)
    seconds = time.perf_counter() - start
    records = sum(d["records"] for s in report["splits"].values()
                  for d in s["domains"].values())
    measurements.append(PrepareMeasurement(path, workers, round(seconds, 2), records,
                                           images, round(images / seconds, 1)))
    outputs.append(out)
  if len(outputs) == 2 and _prepared_records(outputs[0]) != _prepared_records(outputs[1]):
    raise AssertionError("the Beam build wrote other records than the single process")
  return measurements, outputs[0], note


def _print_prepare_table(measurements: list[PrepareMeasurement]) -> None:
  header = (f"{'preparation':<18} {'workers':>7} {'seconds':>8} {'records':>8} "
            f"{'images':>7} {'images/s':>9} {'vs single':>9}")
  print(header)
  print("-" * len(header))
  for m in measurements:
    ratio = measurements[0].seconds / m.seconds
    print(f"{m.path:<18} {m.workers:>7} {m.seconds:>8.2f} {m.records:>8} {m.images:>7} "
          f"{m.images_per_s:>9.1f} {ratio:>8.2f}x")


def _config(shape: str, rope_dir: str, prepared_dir: str, workers: int):
  image_size, num_frames, batch_size = SHAPES[shape]
  config = synthetic_tiny.get_config()
  config.data.rope_dir = rope_dir
  config.data.prepared_dir = prepared_dir
  config.data.vocab_path = os.path.join(rope_dir, "vocab.txt")
  config.data.image_size = image_size
  config.data.num_frames = num_frames
  config.data.num_workers = workers
  config.train.batch_size = batch_size
  return config


def _frames_per_example(config) -> int:
  return 1 + 2 * config.data.num_frames


def _buffered_batches(config) -> int:
  """Upper bound on batches a pipeline can hold ready (reader + worker buffers)."""
  data = config.data
  per_process = data.prefetch_buffer_size * (2 if data.num_workers else 1)
  return max(1, data.num_workers) * per_process + 1


def _time_batches(batches, num_batches: int, drain: int = 0) -> tuple[float, float]:
  """(seconds for the first batch, seconds for `num_batches` in steady state).

  After the first batch, `drain` batches are taken untimed: those the pipeline
  prepared while the first one was awaited would otherwise count as instant.
  """
  start = time.perf_counter()
  next(batches)
  first = time.perf_counter() - start
  for _ in range(drain):
    next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return first, time.perf_counter() - start


def _measurement(shape, loader, workers, config, num_batches, first, seconds):
  batch_size = config.train.batch_size
  examples = batch_size * num_batches
  return Measurement(shape, loader, workers, batch_size, num_batches, round(first, 3),
                     round(seconds, 3), round(examples / seconds, 2),
                     round(examples * _frames_per_example(config) / seconds, 1))


def measure_grain(config, shape: str, num_batches: int) -> Measurement:
  iterator = iter(pipelines.make_train_dataset(config))
  try:
    first, seconds = _time_batches(iterator, num_batches, _buffered_batches(config))
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return _measurement(shape, "grain", config.data.num_workers, config, num_batches,
                      first, seconds)


def _naive_clip(frames: list[bytes], num_frames: int, size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Sequential PIL decode, one random resized crop + flip for the clip, resize."""
  chosen = [frames[i] for i in transforms.sample_frame_indices(len(frames), num_frames)]
  images = [transforms.decode_jpeg(data) for data in chosen]
  crop = transforms.random_resized_crop_params(rng, *images[0].shape[:2])
  flip = rng.random() < 0.5
  out = []
  for image in images:
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    resized = PIL.Image.fromarray(image).resize((size, size), box=box)
    if flip:
      resized = resized.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    out.append(np.asarray(resized))
  return np.stack(out)


def naive_batches(config, seed: int = 0):
  """Batches of the training layout built in a plain loop (no Grain, no threads)."""
  data = config.data
  sources = {domain: prepare.open_domain(data.prepared_dir, data.train_split, domain)
             for domain in domains.NAMES}
  products = pipelines.train_products(
      prepare.load_products(data.prepared_dir, data.train_split))
  tokenizer = tokenizer_lib.Tokenizer(data.vocab_path)
  rng = np.random.default_rng(seed)
  batch_size, size, num_frames = config.train.batch_size, data.image_size, data.num_frames
  while True:
    rows = []
    for product_position in rng.integers(len(products), size=batch_size):
      product = products[product_position]
      records = {domain: sources[domain][int(rng.choice(product[domain]))]
                 for domain in domains.NAMES}
      title = transforms.augment_title(records["page"]["text"], rng)
      row = {"product_index": np.int32(product["product_index"]),
             "page_image": _naive_clip([records["page"]["image"]], 1, size, rng)[0]}
      ids, mask = tokenizer.encode([title], data.title_max_length)
      row["page_title_ids"], row["page_title_mask"] = ids[0], mask[0]
      for domain in ("video", "live"):
        row[f"{domain}_frames"] = _naive_clip(records[domain]["frames"], num_frames,
                                              size, rng)
        ids, mask = tokenizer.encode([records[domain]["text"]], data.asr_max_length)
        row[f"{domain}_asr_ids"], row[f"{domain}_asr_mask"] = ids[0], mask[0]
      rows.append(row)
    yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def measure_naive(config, shape: str, num_batches: int) -> Measurement:
  batches = naive_batches(config)
  spec = pipelines.batch_spec(config)
  first_batch = next(batches)
  assert {k: (v.shape, v.dtype) for k, v in first_batch.items()} == spec
  first, seconds = _time_batches(batches, num_batches)
  return _measurement(shape, "naive loop", 0, config, num_batches, first, seconds)


def _print_table(measurements: list[Measurement], speedups: dict) -> None:
  header = (f"{'shape':<6} {'loader':<11} {'workers':>7} {'batch':>5} {'first s':>8} "
            f"{'examples/s':>11} {'frames/s':>9} {'vs naive':>8}")
  print(header)
  print("-" * len(header))
  for m in measurements:
    ratio = speedups.get((m.shape, m.loader, m.workers))
    ratio_text = f"{ratio:.2f}x" if ratio else ""
    print(f"{m.shape:<6} {m.loader:<11} {m.workers:>7} {m.batch_size:>5} "
          f"{m.first_batch_s:>8.2f} {m.examples_per_s:>11.1f} {m.frames_per_s:>9.0f} "
          f"{ratio_text:>8}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/data_pipeline.json, "
                           "with --prepare_only data_pipeline_prepare.json)")
  parser.add_argument("--batches", type=int, default=16,
                      help="timed batches per measurement (after the warm-up ones)")
  parser.add_argument("--products", type=int, default=40,
                      help="training products of the generated dataset")
  parser.add_argument("--workers", default="0,1,2",
                      help="comma-separated Grain worker-process counts")
  parser.add_argument("--shapes", default="paper,tiny")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prepare_beam_workers", type=int, default=2,
                      help="Beam DirectRunner processes in the preparation comparison")
  parser.add_argument("--prepare_only", action="store_true",
                      help="measure only the preparation comparison")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = ("benchmarks/results/data_pipeline_prepare.json" if args.prepare_only
                else "benchmarks/results/data_pipeline.json")
  worker_counts = [int(w) for w in args.workers.split(",")]
  shapes = [] if args.prepare_only else args.shapes.split(",")

  with tempfile.TemporaryDirectory(prefix="cope_data_bench_") as root:
    start = time.perf_counter()
    rope_dir = _make_rope(root, args.products, args.seed)
    setup_seconds = time.perf_counter() - start
    prepare_measurements, prepared_dir, prepare_note = measure_prepare(
        rope_dir, root, args.prepare_beam_workers)
    measurements, speedups = [], {}
    for shape in shapes:
      naive = measure_naive(_config(shape, rope_dir, prepared_dir, 0), shape,
                            args.batches)
      measurements.append(naive)
      for workers in worker_counts:
        result = measure_grain(_config(shape, rope_dir, prepared_dir, workers), shape,
                               args.batches)
        measurements.append(result)
        speedups[(shape, "grain", workers)] = (
            result.examples_per_s / naive.examples_per_s)

  _print_prepare_table(prepare_measurements)
  if prepare_note:
    print(prepare_note)
  if measurements:
    print()
    _print_table(measurements, speedups)
  report = {
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(),
                  "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
      "dataset": {"train_products": args.products, "jpeg_side": 256,
                  "frames_per_clip": 8, "setup_seconds": round(setup_seconds, 1)},
      "config": {"num_threads": synthetic_tiny.get_config().data.num_threads,
                 "prefetch_buffer_size":
                     synthetic_tiny.get_config().data.prefetch_buffer_size},
      "shapes": {name: dict(zip(("image_size", "num_frames", "batch_size"), value))
                 for name, value in SHAPES.items() if name in shapes},
      "prepare": {
          "measurements": [dataclasses.asdict(m) for m in prepare_measurements],
          "speedup_vs_single_process": {
              f"{m.path}/{m.workers}_workers": round(
                  prepare_measurements[0].seconds / m.seconds, 2)
              for m in prepare_measurements[1:]},
          "note": prepare_note},
      "measurements": [dataclasses.asdict(m) for m in measurements],
      "speedup_vs_naive": {f"{shape}/{loader}/{workers}_workers": round(ratio, 2)
                           for (shape, loader, workers), ratio in speedups.items()},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result_files.strict(report), f, indent=1, allow_nan=False)
  print(f"dataset set-up {setup_seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
