"""The local build of the `rope` dataset: ArrayRecord shards written one at a time by
this process, fed by a pool of worker processes, resumable per shard.

  finished = build_shards(builder, build, plans, staging_dir, workers=N)

What `prepare` runs on one machine (Beam stays for cluster runners). The dataset it
leaves is the one TFDS's own writer leaves (`tfds.builder("rope/<config>")`,
`tfds.data_source`): shards named by TFDS's default template
(`rope-<split>.array_record-00000-of-00004`), written with TFDS's ArrayRecord options
(`group_size:1`), records serialized by the builder's `FeaturesDict`, and the metadata
(`dataset_info.json`, `features.json`) written by TFDS from the builder's `DatasetInfo`
with the split infos of the shards (`DatasetInfo.set_splits`, `write_to_directory`).

Shards. Each TFDS split's rows (its plan file, `rope_plan`: catalog order, integer key =
catalog position) are cut into contiguous shards before anything is encoded:
`num_shards` equal parts when given, else shards of about `IMAGES_PER_SHARD` images.
Records go into the shards in row order, so the dataset is the same for any number of
workers and any number of interruptions.

Resumption. All of it happens in `staging_dir`, named for the fingerprint of the
inputs and options. `build_state.json` records the fingerprint, the plan's digest
(`rope_tfds.plan_build`: which images were found) and the shard bounds; a shard is
written to `<shard>.tmp`, renamed into place, and then its
`<shard>.done.json` (records, bytes, the decode problems of its rows) is written
atomically. A rerun with the same fingerprint and rows keeps every shard whose done
file and shard file agree (their files are not touched) and writes the others, so a
kill -9 at any moment loses at most the shard being written. A state that does not
match (other inputs, other rows) empties `staging_dir` first.

Workers. `workers` > 1 starts that many processes (forked); each reads chunks of
`CHUNK_ROWS` rows from the memory-mapped plan file (a task is a plan path and a row
range) and decodes, checks and re-encodes them (`rope_plan.encode_plan_rows`); this
process serializes the examples and writes the shards in order, with at most
`4 * workers` chunks in flight. `workers` = 1 encodes in this process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator

from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

from cope_jax.base import result_files
from cope_jax.base import progress as progress_display
from data_pipelines import rope_plan

STATE_NAME = "build_state.json"
DONE_SUFFIX = ".done.json"
IMAGES_PER_SHARD = 16384  # about 250 MB of 256 px JPEGs; the most a kill can lose
CHUNK_ROWS = 8
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def shard_bounds(images_per_row, num_shards: int | None,
                 images_per_shard: int = IMAGES_PER_SHARD) -> list[tuple[int, int]]:
  """[(start, stop)] row ranges of the shards of one split, contiguous and in order.

  `images_per_row`: int [n rows], the images of each row. A shard closes before the
  row that would take it past `images_per_shard` (a row of more images is a shard of
  its own).
  """
  images = np.asarray(images_per_row, np.int64)
  count = len(images)
  if num_shards:
    shards = max(1, min(num_shards, count))
    edges = [count * i // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))
  bounds, start = [], 0
  cumulative = np.concatenate([[0], np.cumsum(images)])
  while start < count:
    # the last row whose images still fit after `start` (at least one row)
    stop = int(np.searchsorted(cumulative, cumulative[start] + images_per_shard, "right")) - 1
    stop = min(count, max(start + 1, stop))
    bounds.append((start, stop))
    start = stop
  return bounds or [(0, 0)]


def _write_json_atomically(path: str, value) -> None:
  result_files.write_json(path, value, indent=None, sort_keys=False, ensure_ascii=False)


def read_json(path: str):
  """The JSON value in `path`, or None when the file is missing, unreadable or not JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class _Shard:
  """One shard to build: its split, position, plan rows and file names."""

  def __init__(self, staging_dir: str, name: str, index: int, count: int, plan: str,
               start: int, stop: int, images: np.ndarray):
    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=staging_dir, template=_TEMPLATE, dataset_name="rope", split=name,
        filetype_suffix="array_record")
    self.name, self.index, self.plan, self.start, self.stop = name, index, plan, start, stop
    self.path = os.fspath(template.sharded_filepath(shard_index=index, num_shards=count))
    self.done_path = self.path + DONE_SUFFIX
    self._images = images[start:stop]  # a view: images of each row
    self.images = int(self._images.sum())

  def chunks(self) -> list[tuple[str, int, int]]:
    """(plan path, first row, last row) of each chunk of CHUNK_ROWS rows."""
    return [(self.plan, a, min(self.stop, a + CHUNK_ROWS))
            for a in range(self.start, self.stop, CHUNK_ROWS)]

  def chunk_images(self) -> list[int]:
    """The images of each chunk."""
    if not len(self._images):
      return []
    return np.add.reduceat(self._images, np.arange(0, len(self._images), CHUNK_ROWS)).tolist()

  def finished(self) -> dict | None:
    """The done file's record when the shard is complete on disk, else None."""
    done = read_json(self.done_path)
    if done is None:
      return None
    try:
      if os.path.getsize(self.path) != done["file_bytes"]:
        return None
    except OSError:
      return None
    return done


def _encoded(shards: list[_Shard], max_side: int, workers: int
             ) -> Iterator[list[tuple[dict | None, list[dict]]]]:
  """Encoded chunks of every shard's rows, in order (CHUNK_ROWS rows each)."""
  chunks = itertools.chain.from_iterable(shard.chunks() for shard in shards)  # lazily
  if workers <= 1:
    for plan, start, stop in chunks:
      yield rope_plan.encode_plan_rows(plan, start, stop, max_side)
    return
  # fork where there is one: a spawned worker would import the launching program's main
  # module again (TFDS and, under a benchmark, JAX: seconds per worker); the workers run
  # only PIL, NumPy, pyarrow and libjpeg-turbo, none of which a fork puts at risk.
  context = multiprocessing.get_context(
      "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    in_flight: collections.deque = collections.deque()
    for chunk in chunks:
      if len(in_flight) == 4 * workers:
        yield in_flight.popleft().result()
      in_flight.append(pool.submit(rope_plan.encode_plan_rows, *chunk, max_side))
    while in_flight:
      yield in_flight.popleft().result()


def build_shards(builder, build: dict, plans: dict[str, str], staging_dir: str, *,
                 num_shards: int | None = None, workers: int = 1, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
  """Writes (or finishes) the shards and TFDS metadata of every split in `staging_dir`.

  Args:
    builder: the `rope_tfds.Rope` builder of the config (features, `DatasetInfo`).
    build: `rope_tfds.plan_build`'s description (its fingerprint and plan digest name
      the state).
    plans: TFDS split name -> its plan file (`rope_plan`; non-empty splits only).
    staging_dir: the build's folder (created; kept between interrupted runs).
    num_shards: shards per split (None: about IMAGES_PER_SHARD images each).
    workers: encoding processes (1: this process).

  Returns:
    {"decode_problems": {split name: [problem]}, "split_counts": {split name:
    (records, shards)}, "shards_written": n, "shards_reused": m}.
  """
  images = {name: rope_plan.open_plan(path).images_per_record() for name, path in plans.items()}
  bounds = {name: shard_bounds(images[name], num_shards) for name in plans}
  state = {"fingerprint": build["fingerprint"], "plan_digest": build["plan_digest"],
           "bounds": {name: [list(b) for b in bounds[name]] for name in sorted(bounds)}}
  state_path = os.path.join(staging_dir, STATE_NAME)
  if read_json(state_path) != state:
    if os.path.isdir(staging_dir):
      log(f"starting over in {staging_dir} (inputs or rows changed)")
      shutil.rmtree(staging_dir)
    os.makedirs(staging_dir)
    _write_json_atomically(state_path, state)
  shards = [_Shard(staging_dir, name, index, len(bounds[name]), plans[name], start, stop,
                   images[name])
            for name in plans for index, (start, stop) in enumerate(bounds[name])]
  finished = {shard.path: shard.finished() for shard in shards}
  to_write = [shard for shard in shards if finished[shard.path] is None]
  reused = len(shards) - len(to_write)
  if reused:
    log(f"resuming: {reused} of {len(shards)} shards already written, "
        f"{len(to_write)} to write")

  features = builder.info.features
  bar = progress_display.bar(
      sum(shard.images for shard in shards), desc="prepare", unit="img",
      initial=sum(shard.images for shard in shards if finished[shard.path]),
      disable=not progress, unit_scale=True, smoothing=0.1)
  chunks = _encoded(to_write, builder.builder_config.max_side, workers)
  try:
    for shard in to_write:
      temporary = shard.path + ".tmp"
      writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
      records, record_bytes, problems = 0, 0, []
      for chunk_images in shard.chunk_images():
        for example, row_problems in next(chunks):
          problems += row_problems
          if example is not None:
            serialized = features.serialize_example(example)
            writer.write(serialized)
            records += 1
            record_bytes += len(serialized)
        bar.update(chunk_images)
      writer.close()
      os.replace(temporary, shard.path)
      done = {"records": records, "bytes": record_bytes,
              "file_bytes": os.path.getsize(shard.path), "problems": problems}
      _write_json_atomically(shard.done_path, done)
      finished[shard.path] = done
  finally:
    chunks.close()
    bar.close()

  decode_problems: dict[str, list[dict]] = {}
  split_infos = []
  for name in plans:
    name_shards = [shard for shard in shards if shard.name == name]
    done = [finished[shard.path] for shard in name_shards]
    decode_problems[name] = [p for entry in done for p in entry["problems"]]
    if not any(entry["records"] for entry in done):
      first = decode_problems[name][0]
      raise ValueError(f"every record of {name} failed to decode (first: {first['file']} "
                       f"line {first['line']}: {first['reason']})")
    split_infos.append(tfds.core.SplitInfo(
        name=name, shard_lengths=[entry["records"] for entry in done],
        num_bytes=sum(entry["bytes"] for entry in done),
        filename_template=tfds.core.naming.ShardedFileTemplate(
            data_dir=staging_dir, template=_TEMPLATE, dataset_name="rope", split=name,
            filetype_suffix="array_record")))
  info = builder.info
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(staging_dir)
  return {"decode_problems": decode_problems,
          "split_counts": {info_.name: (info_.num_examples, len(info_.shard_lengths))
                           for info_ in split_infos},
          "shards_written": len(to_write), "shards_reused": reused}


def remove_work_files(staging_dir: str) -> None:
  """Deletes the resumption files (state, done files), once the build is complete."""
  for name in os.listdir(staging_dir):
    if name == STATE_NAME or name.endswith(DONE_SUFFIX):
      os.remove(os.path.join(staging_dir, name))
