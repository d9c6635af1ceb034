"""The plan of a `rope` build: the records of one TFDS split as Arrow columns in a file.

  summary = write_plan(path, records, domain, media_file, product_index)  # the launcher
  rows = open_plan(path).rows(start, stop)                                # a worker
  examples = encode_plan_rows(path, start, stop, max_side)                # a worker

`rope_tfds.plan_build` writes one plan file per TFDS split (`training_video`, ...) from
the parsed catalog, a batch of records at a time, so that neither the launcher nor a
worker ever holds a Python object per record of the catalog. The shard writer's worker
processes and Beam's workers memory-map the file and turn only the rows they encode
into the row dicts of `rope_examples.encode_row`; what crosses a process boundary is
(plan path, first row, last row).

A plan file is an Arrow IPC file of record batches of `BATCH_RECORDS` records each, in
catalog order, with the columns

  key            int64          the catalog position (the example key)
  id             string         page / video / live id
  product_id     string
  product_index  int32          the product's row in the split's product table
  text           string         title or ASR text (`空` where there is none)
  names          list<string>   image file names, in time order (a page: its one image)
  frame_keys     list<int64>    frame number / timestamp of each (0 for a page)
  lines          list<int32>    the media-file line that named each image
  places         list<int8>     where each image is: 0 the images folder, 1 the ROPE
                                root (schema metadata `directories`), -1 the name is a
                                path as written

and, in the schema metadata, the domain, the media txt file's name (`media_file`, the
file of `lines`) and the two folders (`directories`, JSON).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pyarrow as pa

from data_pipelines import rope_examples

BATCH_RECORDS = 1 << 14
SCHEMA = pa.schema([
    ("key", pa.int64()), ("id", pa.string()), ("product_id", pa.string()),
    ("product_index", pa.int32()), ("text", pa.string()),
    ("names", pa.list_(pa.string())), ("frame_keys", pa.list_(pa.int64())),
    ("lines", pa.list_(pa.int32())), ("places", pa.list_(pa.int8()))])


def _list(offsets: np.ndarray, values) -> pa.ListArray:
  return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def write_plan(path: str, records, domain: str, media_file: str,
               product_index: np.ndarray) -> None:
  """Writes the plan of one domain's records (`rope_format.DomainRecords`, catalog
  order) to `path` (through a temporary file, renamed into place when complete).

  Args:
    product_index: int32 [n], each record's product_index.
  """
  metadata = {"domain": domain, "media_file": media_file,
              "directories": json.dumps(list(records.directories))}
  schema = SCHEMA.with_metadata(metadata)
  offsets = records.image_offsets
  temporary = path + ".tmp"
  with pa.OSFile(temporary, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
    for start in range(0, len(records), BATCH_RECORDS):
      stop = min(len(records), start + BATCH_RECORDS)
      first, last = int(offsets[start]), int(offsets[stop])
      names, keys, lines, places = records.images(first, last)
      relative = offsets[start:stop + 1] - first
      writer.write_batch(pa.RecordBatch.from_arrays([
          pa.array(np.arange(start, stop, dtype=np.int64)),
          records.ids.slice(start, stop - start).cast(pa.string()),
          records.product_ids.slice(start, stop - start).cast(pa.string()),
          pa.array(product_index[start:stop].astype(np.int32)),
          records.texts(start, stop).cast(pa.string()),
          _list(relative, names.cast(pa.string())), _list(relative, pa.array(keys)),
          _list(relative, pa.array(lines)), _list(relative, pa.array(places)),
      ], schema=schema))
  os.replace(temporary, path)


class Plan:
  """A plan file, memory-mapped: `len`, `images_per_record`, `rows(start, stop)`."""

  def __init__(self, path: str):
    self.path = path
    self._table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    metadata = {k.decode(): v.decode() for k, v in (self._table.schema.metadata or {}).items()}
    self.domain = metadata["domain"]
    self.media_file = metadata["media_file"]
    self.directories = tuple(json.loads(metadata["directories"]))

  def __len__(self) -> int:
    return self._table.num_rows

  def images_per_record(self) -> np.ndarray:
    """int64 [n]: the number of images of each record (frames of a clip, 1 a page)."""
    lengths = [np.diff(chunk.offsets.to_numpy()) for chunk in self._table["names"].chunks]
    return np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)

  def rows(self, start: int, stop: int) -> list[dict]:
    """The row dicts of `rope_examples.encode_row` of records start:stop."""
    columns = self._table.slice(start, stop - start).to_pydict()
    directories = self.directories
    rows = []
    for i, key in enumerate(columns["key"]):
      names, places = columns["names"][i], columns["places"][i]
      rows.append({
          "key": key, "domain": self.domain, "media_file": self.media_file,
          "id": columns["id"][i], "product_id": columns["product_id"][i],
          "product_index": columns["product_index"][i], "text": columns["text"][i],
          "paths": [name if place < 0 else os.path.join(directories[place], name)
                    for name, place in zip(names, places)],
          "frame_keys": columns["frame_keys"][i], "lines": columns["lines"][i]})
    return rows


@functools.lru_cache(maxsize=16)
def _cached_plan(path: str, identity: tuple[int, int, int]) -> Plan:
  del identity  # part of the cache key: a plan file written again is opened again
  return Plan(path)


def open_plan(path: str) -> Plan:
  """The plan file at `path`, opened once per process (and again if it was replaced)."""
  stats = os.stat(path)
  return _cached_plan(path, (stats.st_ino, stats.st_size, stats.st_mtime_ns))


def encode_plan_rows(path: str, start: int, stop: int, max_side: int
                     ) -> list[tuple[dict | None, list[dict]]]:
  """`rope_examples.encode_row` of the plan's records start:stop (what a worker runs)."""
  return rope_examples.encode_rows(open_plan(path).rows(start, stop), max_side)
