"""Grain input pipelines: training batches of products, eval batches per domain.

Training (`make_train_dataset`): one example is one product that has a page, a video
and a live clip; it shows one page, one video and one live clip of that product, chosen
at random. Products are shuffled anew every epoch and repeated forever; with several
processes, process p takes positions p, p + P, p + 2P, ... of the shuffled stream, so
the processes see disjoint products within an epoch. Every random choice of an example
(records, crop, flip, title noise) comes from a generator seeded with
`(data.shuffle_seed, epoch, position in epoch)`, so batches do not depend on thread or
worker counts, and the iterator state (`it.get_state()` / `it.set_state(...)`) resumes
the exact same stream.

Pipeline: products -> shuffle -> repeat -> [p::P] -> example -> batch -> threads
(`data.num_threads`, buffer `data.prefetch_buffer_size`) -> worker processes
(`data.num_workers`, 0 = in-process). Batching happens before the workers split the
stream, so each worker builds whole batches.

Where the training crop runs (`data.augment_on`): "host" (default) decodes, crops,
resizes and flips here, and batches carry uint8 [.., image_size, image_size, 3] pixels.
"device" decodes and resizes every frame to a fixed square canvas
(`data.canvas_size`), draws the same crop box and flip with the same generator calls,
and leaves the crop, resize and flip to the jitted train step (`cope_jax.augment`):
batches then carry canvas-sized pixels plus, per domain, `<media key>_crop_box`
float32 [B, 4] (top, left, height, width as shares of the image) and
`<media key>_flip` bool [B] (`cope_jax.base.batch.pipeline_batch_spec` gives that layout).

Evaluation (`make_eval_dataset`): every record of one domain of a split, in record
order, with eval transforms (rows built by `eval_inputs`); the last batch is padded to
`eval.batch_size` with rows whose `valid` is False. Process p takes the p-th contiguous
part; all processes yield the same number of batches.

Batches are dicts of NumPy arrays; the keys and shapes are those of
`docs/interfaces.md` (`cope_jax/base/batch.py` gives them for a config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from cope_jax.base import batch as batch_contract
from cope_jax.base import domains
from data_pipelines import eval_inputs
from data_pipelines import prepare
from cope_jax.base import stop_signals
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import transforms

# Keys of the host-only string columns of eval batches.
_STRING_KEYS = ("id", "product_id")

# Source of the records of one domain: `len()` and `[i]` -> record dict.
RecordSource = Any


# ---- examples -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ExampleOptions:
  """The data-config values an example needs (picklable, for worker processes)."""
  image_size: int
  num_frames: int
  title_max_length: int
  asr_max_length: int
  crop_scale: tuple[float, float]
  title_augment_prob: float
  title_augment_char_rate: float
  augment_on: str = "host"  # where the training crop, resize and flip run
  canvas_size: int = 0  # square side of the frames sent to the device ("device" only)

  @classmethod
  def from_config(cls, data_config) -> _ExampleOptions:
    canvas_size = batch_contract.canvas_size(data_config)  # checks augment_on too
    return cls(
        image_size=data_config.image_size, num_frames=data_config.num_frames,
        title_max_length=data_config.title_max_length,
        asr_max_length=data_config.asr_max_length,
        crop_scale=tuple(data_config.crop_scale),
        title_augment_prob=data_config.title_augment_prob,
        title_augment_char_rate=data_config.title_augment_char_rate,
        augment_on=data_config.augment_on, canvas_size=canvas_size)


def _decode_images(record: Mapping[str, Any], domain: domains.Domain, num_frames: int,
                   min_side: int | None = None) -> list[np.ndarray]:
  """A record's pixels as uint8 [H, W, 3] images: the image of an image domain, the T
  segment-middle frames of a clip."""
  name = f"{domain.name} {record['id']}"
  return [transforms.decode_jpeg(data, name, min_side)
          for data in eval_inputs.model_frames(record, domain, num_frames)]


def _encode_text(tokenizer: tokenizer_lib.Tokenizer, text: str, max_length: int):
  ids, mask = tokenizer.encode([text], max_length)
  return ids[0], mask[0]


class _TrainExample:
  """(global index, product) -> one training example (the row of a training batch)."""

  def __init__(self, sources: Mapping[str, RecordSource],
               tokenizer: tokenizer_lib.Tokenizer, options: _ExampleOptions,
               num_products: int, seed: int):
    self._sources = dict(sources)
    self._tokenizer = tokenizer
    self._options = options
    self._num_products = num_products
    self._seed = seed

  def __call__(self, indexed_product: tuple[int, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    global_index, product = indexed_product
    epoch, position = divmod(global_index, self._num_products)
    rng = np.random.default_rng((self._seed, epoch, position))
    options = self._options
    on_device = options.augment_on == "device"
    # Large JPEGs are decoded at a reduced scale that still leaves every crop at
    # least `image_size` pixels wide (on the device: the canvas at least canvas_size;
    # training only, eval decodes at full size).
    min_side = (options.canvas_size if on_device else
                transforms.min_decode_side(options.image_size, options.crop_scale))
    example = {"product_index": np.int32(product["product_index"])}
    for domain in domains.DOMAINS:
      record = self._record(domain.name, product, rng)
      images = _decode_images(record, domain, options.num_frames, min_side)
      # One crop and flip for all frames of a clip (an image is a clip of one frame).
      if on_device:
        clip = transforms.canvas_clip(images, rng, options.canvas_size, options.crop_scale)
        pixels = clip.frames
        example[batch_contract.crop_box_key(domain)] = clip.crop_box
        example[batch_contract.flip_key(domain)] = np.bool_(clip.flip)
      else:
        pixels = transforms.train_transform_clip(images, rng, options.image_size,
                                                 options.crop_scale)
      example[domain.media_key] = pixels if domain.is_clip else pixels[0]
      text = record["text"]
      if domain.text == "title":  # the release perturbs titles, not ASR texts
        text = transforms.augment_title(text, rng, options.title_augment_prob,
                                        options.title_augment_char_rate)
      example[domain.text_ids_key], example[domain.text_mask_key] = _encode_text(
          self._tokenizer, text, getattr(options, domain.text_length_field))
    return example

  def _record(self, domain: str, product: Mapping[str, Any],
              rng: np.random.Generator) -> Mapping[str, Any]:
    record_index = product[domain][rng.integers(len(product[domain]))]
    record = self._sources[domain][record_index]
    if record["product_id"] != product["product_id"]:
      raise ValueError(
          f"{domain} record {record_index} ({record['id']!r}) belongs to product "
          f"{record['product_id']!r}, but the product table lists it under "
          f"{product['product_id']!r}")
    return record


class _EvalExample:
  """Record index (or -1 for padding) -> one eval row of `domain`."""

  def __init__(self, domain: domains.Domain, source: RecordSource,
               tokenizer: tokenizer_lib.Tokenizer, options: _ExampleOptions):
    self._domain = domain
    self._source = source
    self._tokenizer = tokenizer
    self._options = options

  def __call__(self, record_index: int) -> dict[str, Any]:
    domain, options = self._domain, self._options
    if record_index < 0:
      return self._padding()
    record = self._source[record_index]
    example = {"id": str(record["id"]), "product_id": str(record["product_id"]),
               "valid": np.bool_(True)}
    example.update(eval_inputs.eval_inputs(
        record, domain, self._tokenizer, options.image_size, options.num_frames,
        getattr(options, domain.text_length_field)))
    return example

  def _padding(self) -> dict[str, Any]:
    options, domain = self._options, self._domain
    size = options.image_size
    pixels = (options.num_frames, size, size, 3) if domain.is_clip else (size, size, 3)
    text_length = getattr(options, domain.text_length_field)
    return {"id": "", "product_id": "", "valid": np.bool_(False),
            domain.media_key: np.zeros(pixels, np.uint8),
            domain.text_ids_key: np.full(text_length, self._tokenizer.pad_id, np.int32),
            domain.text_mask_key: np.zeros(text_length, np.int32)}


def _stack_eval_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks eval rows; `id` and `product_id` become object arrays (host only)."""
  batch = {}
  for key in rows[0]:
    if key in _STRING_KEYS:
      column = np.empty(len(rows), dtype=object)
      column[:] = [row[key] for row in rows]
      batch[key] = column
    else:
      batch[key] = np.stack([row[key] for row in rows])
  return batch


# ---- datasets from sources ----------------------------------------------------------


def _ensure_absl_flags_parsed():
  """Grain's worker processes read absl flags; outside an absl app, use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _read_and_prefetch(dataset: grain.MapDataset, data_config) -> grain.IterDataset:
  """MapDataset of batches -> IterDataset read by threads and worker processes."""
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.num_threads,
      prefetch_buffer_size=data_config.prefetch_buffer_size))
  if data_config.num_workers > 0:
    _ensure_absl_flags_parsed()
    # Workers leave SIGINT/SIGTERM to the job, which stops at a step boundary.
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=data_config.prefetch_buffer_size),
        worker_init_fn=stop_signals.ignore_in_worker)
  return iter_dataset


def train_products(products: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The products usable as training examples: those with a record in every domain."""
  return [product for product in products
          if all(len(product[domain]) > 0 for domain in domains.NAMES)]


def train_dataset_from_sources(
    config, products: Sequence[Mapping[str, Any]],
    sources: Mapping[str, RecordSource], tokenizer: tokenizer_lib.Tokenizer,
    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Training batches from a product table and per-domain record sources.

  Args:
    config: run config (reads `data.*` and `train.batch_size`).
    products: `prepare.load_products`-style dicts; products lacking a domain are left
      out.
    sources: domain -> random-access record source (`prepare.open_domain`).
    tokenizer: tokenizer for titles and ASR texts.
    process_index, process_count: this process and the number of processes.

  Returns:
    An infinite `grain.IterDataset` of batches (see `batch_contract.pipeline_batch_spec`).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  batch_size = batch_contract.per_process_batch_size(config.train.batch_size, process_count)
  usable = train_products(products)
  if len(usable) < process_count:
    raise ValueError(
        f"only {len(usable)} of {len(products)} products have a page, a video and a "
        f"live clip; {process_count} process(es) need at least one each")
  make_example = _TrainExample(
      sources, tokenizer, _ExampleOptions.from_config(config.data),
      num_products=len(usable), seed=config.data.shuffle_seed)
  dataset = (
      grain.MapDataset.source(usable)
      .shuffle(seed=config.data.shuffle_seed)
      .repeat()
      .map_with_index(lambda index, product: (index, product))
      [process_index::process_count]
      .map(make_example)
      .batch(batch_size, drop_remainder=True))
  return _read_and_prefetch(dataset, config.data)


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """Eval batches of one domain for this process.

  Iterate it (any number of times) for the batches: dicts with `id`, `product_id`
  (object [B]), `valid` (bool [B]) and the domain's arrays (`batch_contract.eval_batch_spec`).

  Attributes:
    dataset: the underlying `grain.IterDataset`.
    domain: `page`, `video` or `live`.
    num_records: records of the domain in the split (all processes together).
    record_range: (start, stop) record indices this process yields.
    num_batches: batches each process yields (the same for every process).
  """
  dataset: grain.IterDataset
  domain: str
  num_records: int
  record_range: tuple[int, int]
  num_batches: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.dataset)

  def __len__(self) -> int:
    return self.num_batches


def eval_dataset_from_source(
    config, domain: str, source: RecordSource, tokenizer: tokenizer_lib.Tokenizer,
    process_index: int = 0, process_count: int = 1) -> EvalDataset:
  """Eval batches of every record of `source` (one domain); see `make_eval_dataset`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  batch_size = config.eval.batch_size
  num_records = len(source)
  start = num_records * process_index // process_count
  stop = num_records * (process_index + 1) // process_count
  largest_part = math.ceil(num_records / process_count)
  num_batches = max(1, math.ceil(largest_part / batch_size))
  make_example = _EvalExample(domains.get(domain), source, tokenizer,
                              _ExampleOptions.from_config(config.data))
  # Row r of this process shows record start + r, or padding (-1) past `stop`.
  dataset = (
      grain.MapDataset.range(num_batches * batch_size)
      .map(lambda row: start + row if start + row < stop else -1)
      .map(make_example)
      .batch(batch_size, batch_fn=_stack_eval_rows))
  return EvalDataset(_read_and_prefetch(dataset, config.data), domain, num_records,
                     (start, stop), num_batches)


# ---- entry points on prepared data --------------------------------------------------


def prepared_config(data_config) -> str:
  """The prepared config a run reads: `data.prepared_config`, "" (the default config of
  `data.prepared_dir`) when the config has no such field or leaves it empty."""
  return data_config.get("prepared_config", "") or ""


def _open_prepared(prepared_dir: str, split: str, domains: Sequence[str],
                   config_name: str = ""):
  """Opens the prepared record sources of `domains` of a split, with clear errors."""
  try:
    splits = prepare.prepared_splits(prepared_dir, config_name)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"no prepared data in {prepared_dir!r}: {error}") from error
  if split not in splits:
    raise FileNotFoundError(
        f"no prepared split {split!r} in {prepared_dir!r} (prepared: {', '.join(splits)}; "
        "run `python -m data_pipelines.prepare`)")
  sources = {}
  for domain in domains:
    try:
      sources[domain] = prepare.open_domain(prepared_dir, split, domain, config_name)
    except (FileNotFoundError, OSError) as error:
      raise FileNotFoundError(
          f"no prepared {domain!r} records for split {split!r} in {prepared_dir!r}: "
          f"{error}") from error
  return sources


def make_train_dataset(config, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Infinite training batches of this process from `config.data.prepared_dir`.

  Each batch holds `config.train.batch_size // process_count` rows; keys, shapes and
  dtypes are `batch_contract.pipeline_batch_spec(config, process_count)`. The iterator is checkpointable
  (`get_state` / `set_state`).
  """
  data_config = config.data
  sources = _open_prepared(data_config.prepared_dir, data_config.train_split,
                           domains.NAMES, prepared_config(data_config))
  products = prepare.load_products(data_config.prepared_dir, data_config.train_split,
                                   prepared_config(data_config))
  tokenizer = tokenizer_lib.Tokenizer(data_config.vocab_path)
  return train_dataset_from_sources(config, products, sources, tokenizer,
                                    process_index, process_count)


def make_eval_dataset(config, domain: str, split: str | None = None,
                      process_index: int = 0, process_count: int = 1) -> EvalDataset:
  """Eval batches of every record of `domain` in `split` (default `data.eval_split`).

  Fixed record order, eval transforms, last batch padded to `config.eval.batch_size`
  with `valid=False` rows; process p yields its contiguous share of the records.
  """
  domains.get(domain)  # ValueError for an unknown domain, before any file is opened
  split = split or config.data.eval_split
  sources = _open_prepared(config.data.prepared_dir, split, (domain,),
                           prepared_config(config.data))
  tokenizer = tokenizer_lib.Tokenizer(config.data.vocab_path)
  return eval_dataset_from_source(config, domain, sources[domain], tokenizer,
                                  process_index, process_count)
