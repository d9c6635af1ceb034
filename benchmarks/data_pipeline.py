"""Data preparation and training input throughput, each against its baseline.

  python -m benchmarks.data_pipeline [--sources realistic,256] [--batches 16] [--workers 0,2]
  python -m benchmarks.data_pipeline --prepare_only [--prepare_images 20000] \
      [--prepare_workers 1,2] [--max_image_side 256]

Generates a synthetic ROPE-format dataset in a temporary folder, as `--sources` asks:

  256        the generator's 256 px JPEGs (8 frames per clip)
  realistic  the same images re-encoded at the sizes real ROPE images have: 720 x 1280
             video and live frames, 800 x 800 page images, JPEG quality 90, with fine
             texture so that they compress like photographs (about 2 bits per pixel)

1. Preparation (`--prepare_only`; `data_pipelines.prepare`: decode-check every image,
   re-encode it within `--max_image_side`, write the `rope` TFDS dataset) on realistic
   JPEGs (720 x 1280 frames, 800 x 800 pages, as `realistic` below), every frame of
   every clip: at least `--prepare_images` images. `--prepare_distinct` of them are
   distinct files, the others hard links to them (the decode work per image is the
   same; the disk holds a few hundred MB instead of gigabytes, so the files are read
   from the page cache). The shard writer at each `--prepare_workers` count (the first,
   1, is the baseline) and, with `--prepare_beam_workers` > 0, the Beam DirectRunner,
   same input, same run; every run's records must be identical. Per run: wall seconds,
   images/s, and a CPU profile: CPU seconds of the writing process and of its worker
   processes (`getrusage`), cores used (CPU seconds / wall seconds), the load average
   and how busy all the machine's cores were (`/proc/stat`), which show what limits the
   scaling on a shared machine.

2. Training input at the paper's shape (224 px, T = 8, batch 8: 17 frames an example)
   and, with `--shapes paper,tiny`, the demo's (64 px, T = 4, batch 32). Loaders, all
   in the same run:

     naive loop   the baseline: a plain Python loop that reads the records as released
                  (prepared without resizing) and decodes (PIL, full size), crops,
                  resizes and tokenises them one after another
     host         `pipelines.make_train_dataset` with augment_on="host" (libjpeg-turbo
                  DCT-scaled decoding in reader threads, crop + resize + flip with PIL)
     device       augment_on="device": the host's half only (decode, resize to the
                  canvas, draw the box); the crop runs in the train step
                  (benchmarks/train_step.py --augment_on device times that)

   each on the records as released ("original") and on records prepared with frames
   stored pre-resized (`prepare --max_image_side 576`: 720 x 1280 -> 324 x 576, the
   side a 224 px crop of scale >= 0.64 decodes from, `transforms.min_decode_side`),
   for each worker-process count. The first batch of each run (worker start-up) is
   timed separately; then the batches the pipeline can hold ready in its buffers are
   taken untimed, and the rate is measured on the next `--batches` batches.

   Reported: examples/s, decoded frames/s, frames/s per core (cores = os.cpu_count()),
   the ratio to the naive loop, and the host cores one accelerator needs at the
   measured GPU step rate (`--gpu_step_results`, default
   benchmarks/results/train_step_gpu_paper.json).

Prints the tables and writes JSON (`--out`, default benchmarks/results/data_pipeline.json;
with --prepare_only benchmarks/results/data_pipeline_prepare.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import PIL.Image

from benchmarks import common
from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from cope_jax.base import domains
from data_pipelines import pipelines
from data_pipelines import prepare
from data_pipelines import rope_format
from data_pipelines import synthetic
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import transforms

SHAPES = {  # name -> (image side, frames per clip, per-process batch)
    "paper": (224, 8, 8),
    "tiny": (64, 4, 32),
}
CANVAS = {"paper": 256, "tiny": 64}  # data.canvas_size for augment_on="device"


@dataclasses.dataclass
class Measurement:
  shape: str
  source: str
  stored: str
  loader: str
  workers: int
  batch_size: int
  batches: int
  first_batch_s: float
  seconds: float
  examples_per_s: float
  frames_per_s: float
  frames_per_s_per_core: float


@dataclasses.dataclass
class PrepareMeasurement:
  path: str
  workers: int
  seconds: float
  records: int
  images: int
  images_per_s: float
  writer_cpu_s: float = 0.0  # the process that writes the shards
  worker_cpu_s: float = 0.0  # its worker processes (terminated children)
  cores_used: float = 0.0  # (writer + worker CPU seconds) / wall seconds
  load_average_before: float = 0.0
  machine_busy: float = 0.0  # share of all cores' time busy during the run (/proc/stat)


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
  return [item for split in ("training", "test") for domain in domains.NAMES
          for item in prepare.open_domain(prepared_dir, split, domain)]


REALISTIC_SIZES = {"page": (800, 800), "clip": (720, 1280)}  # (height, width)


def _grain_texture(height: int, width: int, seed: int) -> np.ndarray:
  """Fine luminance texture (float32 [H, W, 1], zero mean) that makes an upscaled
  image compress like a photograph at quality 90."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 3 + 1, width // 3 + 1), dtype=np.uint8)
  texture = np.asarray(PIL.Image.fromarray(small).resize((width, height),
                                                         PIL.Image.Resampling.BILINEAR))
  return (texture.astype(np.float32)[..., None] - 128.0) * 0.25


def make_realistic(rope_dir: str) -> dict:
  """Re-encodes every image of a synthetic ROPE dir at real ROPE sizes, quality 90.

  Page images become 800 x 800, video and live frames 720 x 1280 (the content scaled,
  plus fine texture). Returns {"page"/"clip": mean bytes per image}.
  """
  kinds = {}
  for split in ("training", "test"):
    for domain in domains.DOMAINS:
      path = os.path.join(rope_dir, rope_format.file_name(split, domain.files.media))
      if not os.path.exists(path):
        continue
      with open(path, encoding="utf-8") as f:
        for line in f:
          name = line.rsplit(",", 1)[-1].strip()
          if name:
            kinds[name] = "clip" if domain.is_clip else "page"
  textures = {kind: [_grain_texture(*size, seed) for seed in range(4)]
              for kind, size in REALISTIC_SIZES.items()}
  sizes = {"page": [], "clip": []}
  image_dir = os.path.join(rope_dir, "images")
  for index, (name, kind) in enumerate(sorted(kinds.items())):
    path = os.path.join(image_dir, name)
    try:
      with PIL.Image.open(path) as image:
        rgb = image.convert("RGB")
    except (OSError, ValueError):
      continue  # the generator's injected broken files stay broken
    height, width = REALISTIC_SIZES[kind]
    pixels = np.asarray(rgb.resize((width, height), PIL.Image.Resampling.BICUBIC),
                        np.float32) + textures[kind][index % 4]
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        path, format="JPEG", quality=90)
    sizes[kind].append(os.path.getsize(path))
  return {kind: round(float(np.mean(values))) for kind, values in sizes.items() if values}


def make_realistic_linked(root: str, images: int, distinct: int, seed: int) -> tuple[str, dict]:
  """A synthetic ROPE dir naming at least `images` images, all at real ROPE sizes:
  `distinct` realistic files per kind (page / clip), the other names hard links to
  them. Returns (rope_dir, {"page"/"clip": mean bytes})."""
  rope_dir = os.path.join(root, "rope_prepare")
  products = max(2, images // 60)
  while True:
    shutil.rmtree(rope_dir, ignore_errors=True)
    synthetic.generate(rope_dir, products=products, test_products=2, frames_per_clip=8,
                       image_size=16, seed=seed)
    names = {}
    for split in ("training", "test"):
      for domain in domains.DOMAINS:
        path = os.path.join(rope_dir, rope_format.file_name(split, domain.files.media))
        with open(path, encoding="utf-8") as f:
          for line in f:
            names[line.rsplit(",", 1)[-1].strip()] = "clip" if domain.is_clip else "page"
    if len(names) >= images:
      break
    products = int(products * images / len(names)) + 1
  image_dir = os.path.join(rope_dir, "images")
  by_kind = {"page": sorted(n for n, k in names.items() if k == "page"),
             "clip": sorted(n for n, k in names.items() if k == "clip")}
  sizes = {}
  for kind, kind_names in by_kind.items():
    sources = kind_names[:distinct]
    height, width = REALISTIC_SIZES[kind]
    textures = [_grain_texture(height, width, s) for s in range(4)]
    for index, name in enumerate(sources):
      path = os.path.join(image_dir, name)
      with PIL.Image.open(path) as image:
        rgb = image.convert("RGB")
      pixels = np.asarray(rgb.resize((width, height), PIL.Image.Resampling.BICUBIC),
                          np.float32) + textures[index % 4]
      PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          path, format="JPEG", quality=90)
    for index, name in enumerate(kind_names[len(sources):]):
      path = os.path.join(image_dir, name)
      os.remove(path)
      os.link(os.path.join(image_dir, sources[index % len(sources)]), path)
    sizes[kind] = round(float(np.mean([os.path.getsize(os.path.join(image_dir, n))
                                       for n in sources])))
  return rope_dir, sizes


def _records_digest(prepared_dir: str) -> str:
  digest = hashlib.sha256()
  for item in _prepared_records(prepared_dir):
    digest.update(repr(sorted(item.items())).encode())
  return digest.hexdigest()


def measure_prepare(rope_dir: str, root: str, worker_counts: list[int], beam_workers: int,
                    max_side: int) -> tuple[list[PrepareMeasurement], str | None]:
  """Times prepare with the shard writer at each worker count (and Beam), same input;
  checks that every run wrote the same records. Returns the measurements and a note
  when the Beam run was skipped."""
  images = _count_images(rope_dir)
  runs = [("shard writer", workers, {"workers": workers}) for workers in worker_counts]
  note = None
  if beam_workers:
    try:
      import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
      runs.append(("Beam DirectRunner", beam_workers,
                   {"workers": beam_workers, "beam_runner": "DirectRunner"}))
    except ImportError:
      note = "Beam row skipped: apache-beam is not installed (requirements-beam.txt)"
  measurements, digests = [], []
  for path, workers, options in runs:
    out = os.path.join(root, f"prepared_{len(digests)}")
    load = os.getloadavg()[0]
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = common.core_jiffies()
    start = time.perf_counter()
    report = prepare.prepare(rope_dir, out, progress=False, log=lambda line: None,
                             max_image_side=max_side, **options)
    seconds = time.perf_counter() - start
    busy = common.busy_share(machine_before, common.core_jiffies())
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    writer_cpu = (own.ru_utime - own_before.ru_utime) + (own.ru_stime - own_before.ru_stime)
    worker_cpu = ((children.ru_utime - children_before.ru_utime)
                  + (children.ru_stime - children_before.ru_stime))
    records = sum(d["records"] for s in report["splits"].values()
                  for d in s["domains"].values())
    measurements.append(PrepareMeasurement(
        path, workers, round(seconds, 2), records, images, round(images / seconds, 1),
        round(writer_cpu, 1), round(worker_cpu, 1),
        round((writer_cpu + worker_cpu) / seconds, 2), round(load, 2), busy))
    digests.append(_records_digest(out))
    shutil.rmtree(out)
  if len(set(digests)) != 1:
    raise AssertionError("the preparation runs wrote different records")
  return measurements, note


def _print_prepare_table(measurements: list[PrepareMeasurement]) -> None:
  first = measurements[0]
  print(common.table(
      ["preparation", "workers", "seconds", "images", "images/s", "vs 1st", "writer cpu",
       "worker cpu", "cores", "load", "busy"],
      [[m.path, m.workers, f"{m.seconds:.2f}", m.images, f"{m.images_per_s:.1f}",
        f"{first.seconds / m.seconds:.2f}x", f"{m.writer_cpu_s:.1f}",
        f"{m.worker_cpu_s:.1f}", f"{m.cores_used:.2f}", f"{m.load_average_before:.1f}",
        f"{m.machine_busy:.0%}"] for m in measurements]))


def _config(shape: str, rope_dir: str, prepared_dir: str, workers: int,
            augment_on: str = "host"):
  image_size, num_frames, batch_size = SHAPES[shape]
  config = synthetic_tiny.get_config()
  config.data.rope_dir = rope_dir
  config.data.prepared_dir = prepared_dir
  config.data.vocab_path = os.path.join(rope_dir, "vocab.txt")
  config.data.image_size = image_size
  config.data.num_frames = num_frames
  config.data.num_workers = workers
  config.data.augment_on = augment_on
  config.data.canvas_size = CANVAS[shape]
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


def _measurement(shape, source, stored, loader, workers, config, num_batches, first,
                 seconds):
  batch_size = config.train.batch_size
  examples = batch_size * num_batches
  frames_per_s = examples * _frames_per_example(config) / seconds
  return Measurement(shape, source, stored, loader, workers, batch_size, num_batches,
                     round(first, 3), round(seconds, 3), round(examples / seconds, 2),
                     round(frames_per_s, 1), round(frames_per_s / os.cpu_count(), 1))


def measure_grain(config, shape: str, source: str, stored: str,
                  num_batches: int) -> Measurement:
  iterator = iter(pipelines.make_train_dataset(config))
  try:
    first, seconds = _time_batches(iterator, num_batches, _buffered_batches(config))
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return _measurement(shape, source, stored, config.data.augment_on,
                      config.data.num_workers, config, num_batches, first, seconds)


def _pil_decode(data: bytes) -> np.ndarray:
  """Full-size decode with PIL (the baseline's decoder)."""
  with PIL.Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _naive_clip(frames: list[bytes], num_frames: int, size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Sequential PIL decode, one random resized crop + flip for the clip, resize."""
  chosen = [frames[i] for i in transforms.sample_frame_indices(len(frames), num_frames)]
  images = [_pil_decode(data) for data in chosen]
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


def measure_naive(config, shape: str, source: str, num_batches: int) -> Measurement:
  batches = naive_batches(config)
  spec = batch_contract.batch_spec(config)
  first_batch = next(batches)
  assert {k: (v.shape, v.dtype) for k, v in first_batch.items()} == spec
  first, seconds = _time_batches(batches, num_batches)
  return _measurement(shape, source, "original", "naive loop", 0, config, num_batches,
                      first, seconds)


def _print_table(measurements: list[Measurement], speedups: dict) -> None:
  rows = []
  for m in measurements:
    ratio = speedups.get(_row_name(m))
    rows.append([m.shape, m.source, m.stored, m.loader, m.workers, m.batch_size,
                 f"{m.first_batch_s:.2f}", f"{m.examples_per_s:.1f}",
                 f"{m.frames_per_s:.0f}", f"{m.frames_per_s_per_core:.0f}",
                 f"{ratio:.2f}x" if ratio else ""])
  print(common.table(["shape", "source", "stored", "loader", "workers", "batch", "first s",
                      "examples/s", "frames/s", "/core", "vs naive"], rows, left=4))


def _row_name(m: Measurement) -> str:
  return f"{m.shape}/{m.source}/{m.stored}/{m.loader}/{m.workers}_workers"


def _gpu_step_rate(paths: str) -> dict | None:
  """The best measured examples/s per accelerator at the paper's shape in the
  train-step results `paths` (comma-separated; unreadable ones skipped), or None."""
  best = None
  for path in paths.split(","):
    try:
      with open(path, encoding="utf-8") as f:
        results = json.load(f)
    except (OSError, ValueError):
      continue
    for row in results.get("rows", []):
      if row.get("shape") != "paper" or not row.get("jax"):
        continue
      rate = row["jax"]["examples_per_second"]
      if best is None or rate > best["examples_per_second_per_device"]:
        # The device is in "machine" (results before: at the top).
        device = results.get("machine", {}).get("device", results.get("device"))
        best = {"file": path, "device": device,
                "batch_size": row["batch_size"], "examples_per_second_per_device": rate}
  return best


def _prepare_quietly(rope_dir: str, out: str, **options) -> str:
  prepare.prepare(rope_dir, out, progress=False, log=lambda line: None, **options)
  return out


def measure_loaders(args, root: str, rope_dir: str, shapes: list[str]
                    ) -> tuple[list[Measurement], dict[str, float], dict]:
  """Part 2 of the module docstring: for each source, the naive loop and each Grain
  loader, stored form and worker count. Returns the measurements, each Grain row's
  speed-up over the naive loop of its shape and source, and the realistic images' mean
  sizes in bytes."""
  measurements, speedups, image_bytes = [], {}, {}
  for source in args.sources.split(","):
    source_dir = os.path.join(root, f"rope_{source}")
    shutil.copytree(rope_dir, source_dir)
    if source == "realistic":
      image_bytes = make_realistic(source_dir)
    prepared = {"original": _prepare_quietly(source_dir, os.path.join(root, f"{source}_o"),
                                             num_frames=8)}
    if "resized" in args.stored and source == "realistic":
      prepared["resized"] = _prepare_quietly(source_dir, os.path.join(root, f"{source}_r"),
                                             num_frames=8, max_image_side=576)
    for shape in shapes:
      naive = measure_naive(_config(shape, source_dir, prepared["original"], 0), shape,
                            source, args.batches)
      measurements.append(naive)
      for stored in (s for s in args.stored.split(",") if s in prepared):
        for loader in args.loaders.split(","):
          for workers in (int(w) for w in args.workers.split(",")):
            result = measure_grain(
                _config(shape, source_dir, prepared[stored], workers, loader), shape,
                source, stored, args.batches)
            measurements.append(result)
            speedups[_row_name(result)] = result.examples_per_s / naive.examples_per_s
  return measurements, speedups, image_bytes


def host_cores_per_accelerator(measurements: list[Measurement], gpu: dict) -> dict:
  """Per paper-shape row: the host cores that feed one accelerator at `gpu`'s step rate
  (17 frames an example); prints the best realistic row and the naive loop's."""
  frames_needed = gpu["examples_per_second_per_device"] * 17
  cores_needed = {_row_name(m): round(frames_needed / m.frames_per_s_per_core, 1)
                  for m in measurements if m.shape == "paper"}
  if not cores_needed:
    return cores_needed
  realistic = {k: v for k, v in cores_needed.items() if "/realistic/" in k}
  best = min((realistic or cores_needed).items(), key=lambda item: item[1])
  print(f"\nat {gpu['examples_per_second_per_device']:.0f} examples/s per "
        f"{gpu['device']} ({gpu['file']}), {frames_needed:.0f} frames/s: host cores "
        f"per accelerator {best[1]} ({best[0]}); naive loop "
        + ", ".join(f"{v}" for k, v in cores_needed.items() if "naive" in k))
  return cores_needed


def prepare_report(args, measurements: list[PrepareMeasurement], note: str | None) -> dict:
  return {
      "measurements": [dataclasses.asdict(m) for m in measurements],
      "speedup_vs_single_process": {
          f"{m.path}/{m.workers}_workers": round(measurements[0].seconds / m.seconds, 2)
          for m in measurements[1:]},
      "images": measurements[0].images, "max_image_side": args.max_image_side,
      "distinct_files_per_kind": args.prepare_distinct, "note": note}


def _parser():
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "data_pipeline.json, with --prepare_only data_pipeline_prepare.json)")
  parser.add_argument("--batches", type=int, default=16,
                      help="timed batches per measurement (after the warm-up ones)")
  parser.add_argument("--products", type=int, default=40,
                      help="training products of the generated dataset")
  parser.add_argument("--workers", default="0,2",
                      help="comma-separated Grain worker-process counts")
  parser.add_argument("--loaders", default="host,device",
                      help="comma-separated: host, device (the naive loop always runs)")
  parser.add_argument("--stored", default="original,resized",
                      help="comma-separated: original, resized (--max_image_side 576)")
  parser.add_argument("--sources", default="realistic,256")
  parser.add_argument("--shapes", default="paper")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prepare_beam_workers", type=int, default=0,
                      help="Beam DirectRunner processes in the preparation comparison "
                      "(0: no Beam row)")
  parser.add_argument("--prepare_images", type=int, default=20000,
                      help="images (at least) in the preparation comparison")
  parser.add_argument("--prepare_distinct", type=int, default=256,
                      help="distinct image files per kind there (the rest hard links)")
  parser.add_argument("--prepare_workers", default="1,2",
                      help="comma-separated shard-writer worker counts (first: baseline)")
  parser.add_argument("--max_image_side", type=int, default=256,
                      help="prepare --max_image_side in the preparation comparison")
  parser.add_argument("--prepare_only", action="store_true",
                      help="measure only the preparation comparison")
  parser.add_argument("--gpu_step_results",
                      default=common.result_path("train_step_gpu_paper.json"),
                      help="comma-separated train-step results; the best paper-shape rate "
                           "gives the host cores an accelerator needs")
  return parser


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  shapes = [] if args.prepare_only else args.shapes.split(",")
  prepare_measurements, prepare_note, image_bytes = [], None, {}
  measurements, speedups = [], {}
  with tempfile.TemporaryDirectory(prefix="cope_data_bench_") as root:
    start = time.perf_counter()
    if args.prepare_only:
      rope_dir, image_bytes = make_realistic_linked(root, args.prepare_images,
                                                    args.prepare_distinct, args.seed)
    else:
      rope_dir = _make_rope(root, args.products, args.seed)
    setup_seconds = time.perf_counter() - start
    if args.prepare_only:
      prepare_measurements, prepare_note = measure_prepare(
          rope_dir, root, [int(w) for w in args.prepare_workers.split(",")],
          args.prepare_beam_workers, args.max_image_side)
    else:
      measurements, speedups, image_bytes = measure_loaders(args, root, rope_dir, shapes)

  if prepare_measurements:
    _print_prepare_table(prepare_measurements)
    if prepare_note:
      print(prepare_note)
  gpu = _gpu_step_rate(args.gpu_step_results)
  cores_needed = {}
  if measurements:
    print()
    _print_table(measurements, speedups)
    if gpu:
      cores_needed = host_cores_per_accelerator(measurements, gpu)
  config = synthetic_tiny.get_config()
  report = {
      "machine": common.machine(),
      "dataset": {"train_products": args.products, "frames_per_clip": 8,
                  "sources": {"256": "256 x 256 JPEGs of the generator",
                              "realistic": "800 x 800 pages, 720 x 1280 frames, quality 90"},
                  "realistic_mean_bytes": image_bytes,
                  "resized": "prepare --max_image_side 576 (720 x 1280 -> 324 x 576)",
                  "setup_seconds": round(setup_seconds, 1)},
      "config": {"num_threads": config.data.num_threads,
                 "prefetch_buffer_size": config.data.prefetch_buffer_size,
                 "canvas_size": CANVAS},
      "shapes": {name: dict(zip(("image_size", "num_frames", "batch_size"), value))
                 for name, value in SHAPES.items() if name in shapes},
      "measurements": [dataclasses.asdict(m) for m in measurements],
      "speedup_vs_naive": {name: round(ratio, 2) for name, ratio in speedups.items()},
      "gpu_step_rate": gpu,
      "host_cores_per_accelerator": cores_needed,
  }
  if prepare_measurements:
    report["prepare"] = prepare_report(args, prepare_measurements, prepare_note)
  print(f"dataset set-up {setup_seconds:.0f} s")
  common.write_result(args.out or common.result_path(
      "data_pipeline_prepare.json" if args.prepare_only else "data_pipeline.json"), report)


if __name__ == "__main__":
  main()
