"""The PyTorch release's embedding files: reading and writing them.

The release's `infer.py` writes one text file per domain and process into its output
folder, named `{rank}_{release name}` (`0_item`, `0_photo`, `0_live`, `1_item`, ...;
release names from the domain registry). One line per embedded item:

  id<TAB>v1,v2,...,vD                      pages (item) and short videos (photo)
  id<TAB>start<TAB>end<TAB>v1,v2,...,vD    live clips (`Domain.release_times`)

Each value is Python's `str` of a float32 embedding value (the shortest decimal that
reads back as the same double, so it reads back as the same float32 bit for bit).
The release's `DistributedSampler` pads each rank to the same length by repeating
items, so an id can occur in several files, or twice in one, with the same embedding;
this module reads every line as it is and leaves duplicates to its callers.

Writing (`write_embeddings`) produces the same layout from this project's embeddings:
`rank` is the JAX process index. A live line's start and end are the first and last
frame keys (epoch-ms timestamps) of the clip's prepared record (`clip_times`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from cope_jax.base import domains

_FILE_PATTERN = re.compile(
    r"^(?P<rank>\d+)_(?P<release_name>%s)$"
    % "|".join(re.escape(domain.release_name) for domain in domains.DOMAINS))
TEMPORARY_SUFFIX = ".tmp"
_TIMES_READ_CHUNK = 256  # prepared records read at once by `clip_times`


class ReleaseFormatError(ValueError):
  """A release-format file that cannot be read (the message names file and line)."""


def file_name(rank: int, domain: str) -> str:
  """The release's file name of `domain`'s embeddings from process `rank`: `0_item`."""
  return f"{int(rank)}_{domains.get(domain).release_name}"


def release_files(folder: str) -> dict[str, list[str]]:
  """domain -> paths of its `{rank}_{release name}` files in `folder`, by rank.

  Other names (logs, temporary files) are ignored; a folder without any gives {}.
  """
  found: dict[str, list[tuple[int, str]]] = {}
  for name in os.listdir(folder):
    match = _FILE_PATTERN.match(name)
    path = os.path.join(folder, name)
    if match and os.path.isfile(path):
      domain = domains.BY_RELEASE_NAME[match.group("release_name")].name
      found.setdefault(domain, []).append((int(match.group("rank")), path))
  return {domain: [path for _, path in sorted(paths)]
          for domain, paths in sorted(found.items(), key=lambda kv: domains.NAMES.index(kv[0]))}


@dataclasses.dataclass(frozen=True)
class ReleaseRows:
  """The lines of one domain's release files, in file and line order (duplicates kept).

  ids [N] str; embeddings [N, D] float64 (the written decimals, exactly);
  times [N, 2] str (start, end) for `release_times` domains, else None;
  files [N] str and lines [N] int: where each row was read (1-based line).
  """
  domain: str
  ids: np.ndarray
  embeddings: np.ndarray
  times: np.ndarray | None
  files: np.ndarray
  lines: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def _parse_values(text: str, where: str) -> np.ndarray:
  """'v1,v2,...' -> [D] float64; ReleaseFormatError naming the first bad value."""
  values = text.split(",")
  try:
    vector = np.array(values, dtype=np.float64)
  except ValueError:
    vector = None
  if vector is None or not np.isfinite(vector).all():
    for position, value in enumerate(values, start=1):
      try:
        number = float(value)
      except ValueError:
        raise ReleaseFormatError(
            f"{where}: embedding value {position} {value!r} is not a number") from None
      if not np.isfinite(number):
        raise ReleaseFormatError(
            f"{where}: embedding value {position} {value!r} is not a finite number")
  return vector


def read_file(path: str, domain: str, dim: int | None = None,
              dim_source: str = "") -> ReleaseRows:
  """Reads one `{rank}_{release name}` file.

  Args:
    path: the file.
    domain: its domain (`domains.NAMES`); decides whether lines carry start and end.
    dim: the embedding dimension every line must have (None: the first line's).
    dim_source: where `dim` was seen, for the error message.

  Raises:
    FileNotFoundError: no such file.
    ReleaseFormatError: naming the file and line, for a line that is blank or not
      UTF-8, has the wrong number of TAB-separated fields, an empty id, a value that
      is not a finite number, or another dimension than `dim`.
  """
  spec = domains.get(domain)
  layout = "id, start, end, embedding" if spec.release_times else "id, embedding"
  num_fields = 4 if spec.release_times else 2
  ids, vectors, times, lines = [], [], [], []
  try:
    handle = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such release embedding file") from None
  with handle:
    for line_number, raw in enumerate(handle, start=1):
      where = f"{path}, line {line_number}"
      try:
        text = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as error:
        raise ReleaseFormatError(f"{where}: not valid UTF-8 ({error.reason})") from None
      if not text.strip():
        raise ReleaseFormatError(f"{where}: blank line")
      fields = text.split("\t")
      if len(fields) != num_fields:
        raise ReleaseFormatError(
            f"{where}: {len(fields)} TAB-separated fields, expected {num_fields} "
            f"({layout}) for the release's {spec.release_name} file")
      if not fields[0]:
        raise ReleaseFormatError(f"{where}: empty id")
      vector = _parse_values(fields[-1], where)
      if dim is None:
        dim, dim_source = vector.size, where
      elif vector.size != dim:
        raise ReleaseFormatError(
            f"{where}: {vector.size} embedding values, expected {dim} (as on {dim_source})")
      ids.append(fields[0])
      vectors.append(vector)
      if spec.release_times:
        times.append(fields[1:3])
      lines.append(line_number)
  count = len(ids)
  return ReleaseRows(
      domain=domain, ids=np.asarray(ids, object).reshape(count),
      embeddings=(np.stack(vectors) if vectors else np.zeros((0, dim or 0), np.float64)),
      times=np.asarray(times, object).reshape(count, 2) if spec.release_times else None,
      files=np.full(count, path, object), lines=np.asarray(lines, np.int64))


def read_folder(folder: str) -> dict[str, ReleaseRows]:
  """Every release file of `folder`, concatenated per domain in rank order.

  All files share one embedding dimension (that of the first line read).

  Raises:
    FileNotFoundError: `folder` holds no release file.
    ReleaseFormatError: see `read_file`.
  """
  files = release_files(folder)
  if not files:
    raise FileNotFoundError(f"{folder}: no release embedding files ({{rank}}_item, "
                            f"{{rank}}_photo, {{rank}}_live)")
  dim, dim_source = None, ""
  result = {}
  for domain, paths in files.items():
    parts = []
    for path in paths:
      part = read_file(path, domain, dim, dim_source)
      if dim is None and len(part):
        dim, dim_source = part.embeddings.shape[1], f"{path}, line 1"
      parts.append(part)
    result[domain] = _concatenate(domain, parts, dim or 0)
  return result


def _concatenate(domain: str, parts: list[ReleaseRows], dim: int) -> ReleaseRows:
  parts = [part for part in parts if len(part)]
  if not parts:
    has_times = domains.get(domain).release_times
    return ReleaseRows(domain, np.zeros(0, object), np.zeros((0, dim), np.float64),
                       np.zeros((0, 2), object) if has_times else None,
                       np.zeros(0, object), np.zeros(0, np.int64))
  return ReleaseRows(
      domain=domain, ids=np.concatenate([p.ids for p in parts]),
      embeddings=np.concatenate([p.embeddings for p in parts]),
      times=(np.concatenate([p.times for p in parts]) if parts[0].times is not None
             else None),
      files=np.concatenate([p.files for p in parts]),
      lines=np.concatenate([p.lines for p in parts]))


# ----------------------------------------------------------------------------
# Writing.


def format_line(item_id: str, embedding: np.ndarray,
                times: tuple[object, object] | None = None) -> str:
  """One line as the release writes it (with its newline).

  embedding: [D], written as Python's str of each float32 value.
  """
  item_id = str(item_id)
  if not item_id or any(c in item_id for c in "\t\r\n"):
    raise ValueError(f"id {item_id!r} cannot be written in the release's format "
                     "(empty, or holds a TAB or line break)")
  values = ",".join(str(value) for value in np.asarray(embedding, np.float32).tolist())
  fields = [item_id] + ([str(times[0]), str(times[1])] if times is not None else [])
  return "\t".join(fields + [values]) + "\n"


def write_embeddings(out_dir: str, domain: str, rank: int,
                     batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     times: Mapping[str, tuple[int, int]] | None = None) -> int:
  """Streams (ids [b], product_ids [b], embeddings [b, D]) into `out_dir/{rank}_{name}`.

  Written as `<file>.tmp` and renamed once complete. For a `release_times` domain,
  `times` maps every id to its (start, end).

  Returns:
    The number of lines written.
  """
  needs_times = domains.get(domain).release_times
  if needs_times and times is None:
    raise ValueError(f"{domain}: the release's lines carry start and end times; none given")
  path = os.path.join(out_dir, file_name(rank, domain))
  count = 0
  with open(path + TEMPORARY_SUFFIX, "w", encoding="utf-8", newline="\n") as f:
    for ids, _, embeddings in batches:
      for item_id, embedding in zip(ids, np.asarray(embeddings, np.float32)):
        item_times = None
        if needs_times:
          try:
            item_times = times[item_id]
          except KeyError:
            raise ValueError(f"{domain} {item_id}: no start and end time") from None
        f.write(format_line(item_id, embedding, item_times))
        count += 1
  os.replace(path + TEMPORARY_SUFFIX, path)
  return count


def remove_other_ranks(out_dir: str, process_count: int) -> list[str]:
  """Removes release files of ranks >= `process_count` (left by an earlier run with more
  processes, they would be read as part of this export). Returns their names."""
  removed = []
  for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
    match = _FILE_PATTERN.match(name.removesuffix(TEMPORARY_SUFFIX))
    if match and int(match.group("rank")) >= process_count:
      os.remove(os.path.join(out_dir, name))
      removed.append(name)
  return removed


def clip_times(source, record_range: tuple[int, int]) -> dict[str, tuple[int, int]]:
  """id -> (first, last frame key) of the prepared records `record_range` of a clip domain.

  For live clips the keys are the frames' epoch-ms timestamps, so this is the span the
  clip's frames cover (with `prepare --num_frames T`, the span of the T kept frames).
  A record without frame keys gets (0, 0).

  Args:
    source: the domain's prepared records (`data_pipelines.prepare.open_domain`).
    record_range: (start, stop) record indices.
  """
  start, stop = record_range
  times = {}
  for chunk_start in range(start, stop, _TIMES_READ_CHUNK):
    indices = range(chunk_start, min(stop, chunk_start + _TIMES_READ_CHUNK))
    for record in source.__getitems__(indices):
      keys = record.get("frame_keys") or [0]
      times[record["id"]] = (int(keys[0]), int(keys[-1]))
  return times
