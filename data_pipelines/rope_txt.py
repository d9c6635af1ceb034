"""ROPE's txt files read column-wise (pyarrow, NumPy): lines, fields, each bad row named.

  lines, fields = read_fields(path, ("video_id", "frame_number", "image"), problems)

`lines` is int32 [n], the 1-based physical line numbers of the rows that split into the
columns; `fields` holds one pyarrow string array [n] per column, stripped of
surrounding whitespace. Every other line is a problem `(line, reason)` appended to
`problems`. The rules are `rope_format`'s (its docstring): UTF-8 with or without a
byte-order mark, LF or CRLF line ends (only LF ends a line), blank lines and lines that
are not valid UTF-8 reported, a row split only on its first len(columns) - 1 commas,
every column but the last non-empty.

`read_pair_file`, `read_text_file` and `read_media_file` apply the rules of each kind of
file on top (first row wins, unpaired ids, frame keys), each bad row a `Report` line.

The file is read in blocks of `BLOCK_BYTES`; a block's lines are found with NumPy (the
LF positions) and become one Arrow array without a Python object per line, so a file of
tens of millions of rows costs a few seconds and the bytes of its fields.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cope_jax.base import domains
from data_pipelines import transforms

MISSING_TEXT = "空"  # the text of an id without one
IMAGE_SUBDIR = "images"
IMAGE_NOT_FOUND = "not found (looked in"  # in the reason of each image file not on disk
IN_IMAGE_DIR, IN_ROOT, ABSENT = 0, 1, 2  # where a media row's image was found
BLOCK_BYTES = 1 << 24  # 16 MiB of a txt file at a time: its transient copies stay small
_BOM = b"\xef\xbb\xbf"


def _line_blocks(path: str) -> Iterator[tuple[int, bytes]]:
  """(file offset of the block's first byte, bytes of whole lines ending in LF) per
  block; a byte-order mark is skipped, a last line without LF gets one."""
  carry, position, start = b"", 0, True
  with open(path, "rb") as f:
    while True:
      chunk = f.read(BLOCK_BYTES)
      data = carry + chunk
      if start:
        if data.startswith(_BOM):
          data, position = data[len(_BOM):], len(_BOM)
        start = False
      if not chunk:  # the end: a last line without LF
        if data:
          yield position, data + b"\n"
        return
      cut = data.rfind(b"\n")
      if cut < 0:
        carry = data
        continue
      block, carry = data[:cut + 1], data[cut + 1:]
      yield position, block
      position += len(block)


def _lines_of_block(block: bytes, position: int, first_line: int,
                    problems: list[tuple[int, str]]
                    ) -> tuple[np.ndarray, np.ndarray, pa.Array, int]:
  """(line numbers, file offsets of the lines, lines without their line end, number of
  lines in the block) of one block; non-UTF-8 lines are problems and left out."""
  ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
  offsets = np.concatenate([[0], ends + 1]).astype(np.int32)
  count = len(ends)
  raw = pa.Array.from_buffers(pa.binary(), count,
                              [None, pa.py_buffer(offsets), pa.py_buffer(block)])
  numbers = np.arange(first_line, first_line + count, dtype=np.int32)
  starts = position + offsets[:-1].astype(np.int64)
  try:
    text = raw.cast(pa.string())
  except pa.ArrowInvalid:  # some line is not UTF-8: find which, in Python (rare)
    keep, values = [], []
    for index, value in enumerate(raw.to_pylist()):
      try:
        values.append(value.decode("utf-8"))
        keep.append(index)
      except UnicodeDecodeError as e:
        problems.append((int(numbers[index]),
                         f"not valid UTF-8 ({e.reason} at byte {e.start})"))
    text, numbers, starts = pa.array(values, pa.string()), numbers[keep], starts[keep]
  return numbers, starts, pc.utf8_rtrim(text, characters="\r\n"), count


def _byte_lengths(values) -> np.ndarray:
  return pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)


def read_fields(path: str, columns: tuple[str, ...], problems: list[tuple[int, str]],
                per_block: Callable | None = None) -> tuple[np.ndarray, list]:
  """The rows of `path` that split into `columns` (see the module docstring).

  `per_block(lines, fields, last_starts) -> (lines, columns)`, when given, turns each
  block's rows into the columns to keep (NumPy or Arrow arrays; it may drop rows), so
  that a large file's fields need not all be held at once; `last_starts` is int64 [n],
  the byte offset in the file of each row's last field as stripped (its byte length is
  that of `fields[-1]`), so that the field can be read again later (`read_spans`)
  instead of being held. Returns the line numbers and, per column, a NumPy array or an
  Arrow ChunkedArray.

  Raises:
    OSError: the file cannot be read (the message names it).
  """
  count = len(columns)
  expected = ", ".join(columns)
  kept_numbers, kept_fields = [], None
  first_line = 1
  try:
    for position, block in _line_blocks(path):
      numbers, starts, lines, block_lines = _lines_of_block(block, position, first_line,
                                                            problems)
      first_line += block_lines
      blank = pc.equal(pc.utf8_trim_whitespace(lines), "").to_numpy(zero_copy_only=False)
      for number in numbers[blank]:
        problems.append((int(number), "blank line"))
      numbers, starts, lines = numbers[~blank], starts[~blank], lines.filter(pa.array(~blank))
      parts = pc.split_pattern(lines, pattern=",", max_splits=count - 1)
      lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
      short = lengths < count
      for number, length in zip(numbers[short], lengths[short]):
        problems.append((int(number), f"expected {count} columns '{expected}', "
                                      f"found {int(length)}"))
      keep = pa.array(~short)
      numbers, starts = numbers[~short], starts[~short]
      lines, parts = lines.filter(keep), parts.filter(keep)
      fields = [pc.utf8_trim_whitespace(pc.list_element(parts, j)) for j in range(count - 1)]
      last = pc.list_element(parts, count - 1)
      left_trimmed = pc.utf8_ltrim_whitespace(last)
      fields.append(pc.utf8_rtrim_whitespace(left_trimmed))
      if per_block is not None:  # where the stripped last field starts in the file
        starts = (starts + _byte_lengths(lines) - _byte_lengths(last)
                  + (_byte_lengths(last) - _byte_lengths(left_trimmed)))
      del parts, last, left_trimmed, lines
      bad = np.zeros(len(numbers), bool)
      for name, field in zip(columns[:-1], fields[:-1]):
        empty = pc.equal(field, "").to_numpy(zero_copy_only=False) & ~bad
        for number in numbers[empty]:
          problems.append((int(number), f"empty {name} (expected '{expected}')"))
        bad |= empty
      if bad.any():
        keep = pa.array(~bad)
        numbers, starts = numbers[~bad], starts[~bad]
        fields = [field.filter(keep) for field in fields]
      if per_block is not None:
        numbers, fields = per_block(numbers, fields, starts)
      kept_fields = kept_fields or [[] for _ in fields]
      kept_numbers.append(numbers)
      for j, field in enumerate(fields):
        kept_fields[j].append(field)
  except OSError as e:
    raise OSError(f"ROPE file {path} could not be read: {e}") from e
  if kept_fields is None:  # an empty file: the columns of no rows
    numbers = np.zeros(0, np.int32)
    fields = [pa.array([], pa.string()) for _ in columns]
    kept_numbers, kept_fields = [numbers], [[field] for field in (
        per_block(numbers, fields, np.zeros(0, np.int64))[1] if per_block is not None
        else fields)]
  numbers = np.concatenate(kept_numbers)
  del kept_numbers
  columns_out = []
  while kept_fields:  # one column at a time, its blocks let go as it is joined
    chunks = kept_fields.pop(0)
    if chunks and isinstance(chunks[0], np.ndarray):
      columns_out.append(np.concatenate(chunks))
    else:
      columns_out.append(pa.chunked_array(chunks, chunks[0].type if chunks else pa.string()))
    del chunks
  return numbers, columns_out


def release_free_memory() -> None:
  """Returns the memory freed so far to the system: Arrow's pool, and glibc's heap
  where the C library is glibc. Reading a file leaves much of its transient memory
  (blocks of a few MiB each) in the allocators' free lists, which would otherwise add
  to the peak of the next file read."""
  pa.default_memory_pool().release_unused()
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _glibc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


_LIBC = _glibc()


# --- strings read again from their byte spans ---------------------------------------

_PREAD_SPANS = 4096  # up to this many spans: one read each; beyond, read in long runs
_RUN_BYTES = 1 << 22  # the longest run of a file read at once for its spans
_RUN_DENSITY = 8  # spans covering less than 1/8 of a run are read one by one


def gather_spans(path: str, starts: np.ndarray, lengths: np.ndarray) -> pa.LargeStringArray:
  """The UTF-8 strings at the byte spans (starts int64 [n], ascending, not overlapping;
  lengths [n]) of a file, in that order. Spans close together are read in one run of
  at most `_RUN_BYTES`, so that tens of millions of spans cost one pass over the file.

  Raises:
    OSError: the file cannot be read.
    ValueError: a span is beyond the end of the file (it changed since it was read).
  """
  lengths = np.asarray(lengths, np.int64)
  out_offsets = np.zeros(len(starts) + 1, np.int64)
  np.cumsum(lengths, out=out_offsets[1:])
  data = np.empty(int(out_offsets[-1]), np.uint8)
  ends = starts + lengths
  with open(path, "rb") as f:
    fd = f.fileno()
    if len(starts) <= _PREAD_SPANS:
      for i, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        chunk = os.pread(fd, length, start)
        if len(chunk) != length:
          raise ValueError(f"{path} is shorter than when it was read (changed since?)")
        data[out_offsets[i]:out_offsets[i] + length] = np.frombuffer(chunk, np.uint8)
    else:
      i = 0
      while i < len(starts):
        run_start = int(starts[i])
        j = max(i + 1, int(np.searchsorted(ends, run_start + _RUN_BYTES, "right")))
        wanted = int(out_offsets[j] - out_offsets[i])
        if wanted * _RUN_DENSITY < int(ends[j - 1]) - run_start:  # scattered: one read each
          for k in range(i, j):
            length = int(lengths[k])
            chunk = os.pread(fd, length, int(starts[k]))
            if len(chunk) != length:
              raise ValueError(f"{path} is shorter than when it was read (changed since?)")
            data[out_offsets[k]:out_offsets[k] + length] = np.frombuffer(chunk, np.uint8)
          i = j
          continue
        run_length = int(ends[j - 1]) - run_start
        run = os.pread(fd, run_length, run_start)
        if len(run) != run_length:
          raise ValueError(f"{path} is shorter than when it was read (changed since?)")
        # The bytes inside the spans: +1 where a span starts, -1 where it ends.
        inside = np.zeros(run_length + 1, np.int8)
        inside[starts[i:j] - run_start] += 1
        inside[ends[i:j] - run_start] -= 1
        np.cumsum(inside, dtype=np.int8, out=inside)
        data[out_offsets[i]:out_offsets[j]] = np.frombuffer(run, np.uint8)[
            inside[:-1].view(bool)]
        i = j
  binary = pa.Array.from_buffers(pa.large_binary(), len(starts),
                                 [None, pa.py_buffer(out_offsets), pa.py_buffer(data)])
  return binary.cast(pa.large_string())


def read_spans(path: str, starts: np.ndarray, lengths: np.ndarray) -> pa.LargeStringArray:
  """`gather_spans` for spans in any order, a span possibly asked for more than once:
  the strings in the order given."""
  unique_starts, first, inverse = np.unique(starts, return_index=True, return_inverse=True)
  in_file_order = gather_spans(path, unique_starts, np.asarray(lengths)[first])
  return in_file_order.take(pa.array(inverse.reshape(-1)))


_HASH_BLOCK = 1 << 16  # strings hashed at a time
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer, element-wise (uint64 arithmetic wraps)."""
  x = x ^ (x >> np.uint64(30))
  x = x * _MIX[0]
  x = x ^ (x >> np.uint64(27))
  x = x * _MIX[1]
  return x ^ (x >> np.uint64(31))


def string_hashes(values: pa.Array) -> np.ndarray:
  """uint64 [n]: a 64-bit hash of each string's UTF-8 bytes (string or binary array),
  computed column-wise: the bytes, zero-padded to whole 8-byte words, mixed word by
  word (SplitMix64's finalizer) with the length. Equal strings hash equal; two of a
  hundred million distinct names collide with probability about 3e-4."""
  values = values.cast(pa.large_binary())
  count = len(values)
  hashes = np.empty(count, np.uint64)
  if not count:
    return hashes
  all_offsets = np.frombuffer(values.buffers()[1], np.int64, count + 1, values.offset)
  data = np.frombuffer(values.buffers()[2], np.uint8)
  for first in range(0, count, _HASH_BLOCK):
    offsets = all_offsets[first:first + _HASH_BLOCK + 1]
    starts, lengths = offsets[:-1], np.diff(offsets)
    longest = int(lengths.max())
    width = max(8, -(-longest // 8) * 8)
    padded = np.zeros((len(lengths), width), np.uint8)
    if (lengths == longest).all():  # one length (uuid names): the bytes are a matrix
      padded[:, :longest] = data[offsets[0]:offsets[-1]].reshape(len(lengths), longest)
    else:
      index = starts[:, None] + np.arange(width)[None, :]
      inside = np.arange(width)[None, :] < lengths[:, None]
      padded[inside] = data[index[inside]]
    words = padded.view(np.uint64)
    block = _mix64(lengths.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    word_counts = -(-lengths // 8)
    for word_count in np.unique(word_counts).tolist():  # each string's own words only
      rows = np.flatnonzero(word_counts == word_count)
      mixed = block[rows]
      for column in range(word_count):
        mixed = _mix64(mixed ^ words[rows, column])
      block[rows] = mixed
    hashes[first:first + len(block)] = block
  return hashes


def first_occurrences(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For int codes [n]: (is the first row of its code, index of that first row), [n]."""
  order = np.argsort(codes, kind="stable")
  sorted_codes = codes[order]
  starts = np.ones(len(codes), bool)
  starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
  group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(codes)), 0))]
  first_index = np.empty(len(codes), np.int64)
  first_index[order] = group_first
  return first_index == np.arange(len(codes)), first_index


def codes_of(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
  """(int64 [n] code of each value, numbered in order of first appearance; the values)."""
  encoded = pc.dictionary_encode(values.cast(pa.large_string()).combine_chunks())
  return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
          encoded.dictionary)


# --- the rules of each kind of file (`rope_format`'s docstring) ---------------------

class Report:
  """The problems of one txt file: (line, reason), listed in line order at the end."""

  def __init__(self, name: str):
    self.name = name
    self.found: list[tuple[int, str]] = []

  def add(self, line: int, reason: str) -> None:
    self.found.append((int(line), reason))

  def into(self, problems: list[dict]) -> None:
    problems.extend({"file": self.name, "line": line, "reason": reason}
                    for line, reason in sorted(self.found, key=lambda p: p[0]))


def _first_rows(codes: np.ndarray, values: pa.Array, lines: np.ndarray, report: Report,
                what: Callable) -> np.ndarray:
  """bool [n]: the first row of each code. A later row is reported: as an exact
  duplicate when its value equals the first row's, else with `what(row, first_row)`."""
  is_first, first_index = first_occurrences(codes)
  later = np.flatnonzero(~is_first)
  if len(later):
    firsts = first_index[later]
    same = pc.equal(values.take(pa.array(later)),
                    values.take(pa.array(firsts))).to_numpy(zero_copy_only=False)
    for row, first, is_same in zip(later.tolist(), firsts.tolist(), same.tolist()):
      if is_same:
        report.add(lines[row], f"duplicate row (first at line {lines[first]}); ignored")
      else:
        report.add(lines[row], what(row, first))
  return is_first


@dataclasses.dataclass
class Pairs:
  """A pair file's usable rows: item ids (unique, file order), products, lines."""
  ids: pa.Array
  product_ids: pa.Array
  lines: np.ndarray

  @functools.cached_property
  def lookup(self) -> _PairLookup:
    return _PairLookup(self.ids)


def read_pair_file(path: str, domain: str, report: Report) -> Pairs:
  item_column = f"{domain}_id"
  lines, (products, items) = read_fields(path, ("product_id", item_column),
                                                  report.found)
  items, products = items.combine_chunks(), products.combine_chunks()
  bad = pc.or_(pc.equal(items, ""), pc.match_substring(items, ",")).to_numpy(
      zero_copy_only=False)
  for line in lines[bad]:
    report.add(line, f"expected 2 columns 'product_id, {item_column}'")
  keep = pa.array(~bad)
  lines, items, products = lines[~bad], items.filter(keep), products.filter(keep)
  codes, _ = codes_of(pa.chunked_array([items]))

  def contradiction(row, first):
    first_product = products[first].as_py()
    return (f"{domain} {items[row].as_py()} already paired with product {first_product} "
            f"at line {lines[first]}; kept the first")

  is_first = _first_rows(codes, products, lines, report, contradiction)
  keep = pa.array(is_first)
  return Pairs(items.filter(keep), products.filter(keep), lines[is_first])


def _digits(values, leading_zero: bool = True) -> pa.Array:
  """bool [n]: 1-18 ASCII digits (what an int64 holds), optionally no leading 0: the
  regular expression ^[0-9]{1,18}$ (^[1-9][0-9]{0,17}$), a few times faster."""
  found = pc.and_(pc.ascii_is_decimal(values), pc.less_equal(pc.binary_length(values), 18))
  return found if leading_zero else pc.and_(found, pc.invert(pc.starts_with(values, "0")))


def _number(values) -> pa.Array:
  """bool [n]: a decimal id that an int64 holds and gives back (no leading 0)."""
  return _digits(values, leading_zero=False)


class _PairLookup:
  """Finds ids among a pair file's ids, block after block, without rebuilding a hash
  table each time: ROPE's ids are decimal numbers, looked up as int64 by binary search
  in the sorted pair ids; any other ids through a dict built once."""

  def __init__(self, pair_ids: pa.Array):
    self._numeric = bool(pc.all(_number(pair_ids)).as_py()
                         if len(pair_ids) else True)
    if self._numeric:
      numbers = pc.cast(pair_ids, pa.int64()).to_numpy()
      self._order = np.argsort(numbers, kind="stable").astype(np.int32)
      self._sorted = numbers[self._order]
    else:
      self._index = {item_id: i for i, item_id in enumerate(pair_ids.to_pylist())}

  def positions(self, ids) -> np.ndarray:
    """int32 [n]: each id's position among the pair ids; -1 where it is not one."""
    if not self._numeric:
      index = self._index
      return np.fromiter((index.get(item_id, -1) for item_id in ids.to_pylist()),
                         np.int32, len(ids))
    numeric = _number(ids).to_numpy(zero_copy_only=False)
    positions = np.full(len(ids), -1, np.int32)
    if numeric.any() and len(self._sorted):
      numbers = pc.cast(_kept(ids, numeric), pa.int64()).to_numpy()
      where = np.minimum(np.searchsorted(self._sorted, numbers), len(self._sorted) - 1)
      found = self._sorted[where] == numbers
      positions[np.flatnonzero(numeric)[found]] = self._order[where[found]]
    return positions


def _paired_positions(ids, pairs: Pairs, lines: np.ndarray, domain: str,
                      report: Report) -> np.ndarray:
  """int32 [n]: each row's position in the pair file's ids; -1 (reported) if unpaired."""
  positions = pairs.lookup.positions(ids)
  unpaired = np.flatnonzero(positions < 0)
  if len(unpaired):
    for row, item_id in zip(unpaired.tolist(), ids.take(pa.array(unpaired)).to_pylist()):
      report.add(lines[row], f"{domain} {item_id} is not paired with any product; ignored")
  return positions


@dataclasses.dataclass
class Spans:
  """Strings of a txt file kept as their byte spans in it, read when they are needed,
  so that gigabytes of texts and image names are not held: `starts` int64 [n] (-1:
  none, read as ""), `lengths` int32 [n]. `stat`: the file's (size, mtime_ns) when it
  was parsed; reading a file that changed since is an error."""
  path: str
  starts: np.ndarray
  lengths: np.ndarray
  stat: tuple[int, int]

  def __len__(self) -> int:
    return len(self.starts)

  def subset(self, mask: np.ndarray) -> Spans:
    return Spans(self.path, self.starts[mask], self.lengths[mask], self.stat)

  def _check(self) -> None:
    if _file_stat(self.path) != self.stat:
      raise ValueError(f"{self.path} changed since the catalog was read: read it again")

  def read(self, start: int = 0, stop: int | None = None) -> pa.Array:
    """The strings start:stop (large_string), read from the file.

    Raises:
      ValueError: the file changed since it was parsed (the message names it).
    """
    self._check()
    starts, lengths = self.starts[start:stop], self.lengths[start:stop]
    return read_spans(self.path, np.maximum(starts, 0), np.where(starts < 0, 0, lengths))

  def read_all(self) -> tuple[pa.LargeStringArray, np.ndarray]:
    """(every string, in the order of the file; the position there of each string
    here): one pass over the file, each string held once (every span present)."""
    self._check()
    if (self.starts < 0).any():
      raise ValueError(f"read_all of spans of {self.path} with some absent")
    order = np.argsort(self.starts, kind="stable")
    strings = gather_spans(self.path, self.starts[order], self.lengths[order])
    index = np.empty(len(order), np.int32 if len(order) < 2 ** 31 else np.int64)
    index[order] = np.arange(len(order), dtype=index.dtype)
    return strings, index


def _file_stat(path: str) -> tuple[int, int]:
  stats = os.stat(path)
  return stats.st_size, stats.st_mtime_ns


def read_text_file(path: str, domain: str, pairs: Pairs, report: Report
                   ) -> tuple[Spans, np.ndarray]:
  """(the text of each paired id, as its span (-1 where it has none; an empty one reads
  as ""); whether it has a text row)."""
  stat = _file_stat(path)

  def per_block(lines, fields, text_starts):
    """A block's rows -> (lines, [pair positions, text spans]) of the paired ones."""
    positions = _paired_positions(fields[0], pairs, lines, domain, report)
    paired = positions >= 0
    lengths = _byte_lengths(fields[1]).astype(np.int32)
    return lines[paired], [positions[paired], text_starts[paired], lengths[paired]]

  lines, (positions, starts, lengths) = read_fields(path, (f"{domain}_id", "text"),
                                                    report.found, per_block)
  is_first, first_index = first_occurrences(positions)
  later = np.flatnonzero(~is_first)
  if len(later):  # an exact duplicate, or a second text for the id
    firsts = first_index[later]
    both = read_spans(path, np.concatenate([starts[later], starts[firsts]]),
                      np.concatenate([lengths[later], lengths[firsts]]))
    both = pc.if_else(pc.equal(both, ""), MISSING_TEXT, both)
    same = pc.equal(both.slice(0, len(later)), both.slice(len(later))).to_numpy(
        zero_copy_only=False)
    ids = pairs.ids.take(pa.array(positions[later])).to_pylist()
    for row, first, is_same, item_id in zip(later.tolist(), firsts.tolist(),
                                            same.tolist(), ids):
      if is_same:
        report.add(lines[row], f"duplicate row (first at line {lines[first]}); ignored")
      else:
        report.add(lines[row], f"second text for {domain} {item_id} (first at line "
                               f"{lines[first]}); kept the first")
  text_starts = np.full(len(pairs.ids), -1, np.int64)
  text_lengths = np.zeros(len(pairs.ids), np.int32)
  text_starts[positions[is_first]] = starts[is_first]
  text_lengths[positions[is_first]] = lengths[is_first]
  return Spans(path, text_starts, text_lengths, stat), text_starts >= 0


@dataclasses.dataclass
class Media:
  """A media file's usable rows sorted by (pair position, frame key): the first row of
  each (id, key). Image names are not held: each row keeps the byte span of its name
  in the file (`name_starts`, `name_lengths`), read again for the rows kept in the end
  (`names`, `name_spans`), so that a file of a hundred million names is never held
  whole.
  `places` says where each image was found."""
  positions: np.ndarray  # int32: position of the id in the pair file's ids
  keys: np.ndarray  # int64: frame number / timestamp (0 for a page)
  lines: np.ndarray  # int32
  places: np.ndarray  # int8: IN_IMAGE_DIR, IN_ROOT, ABSENT, or -1 (not looked for)
  name_starts: np.ndarray  # int64: byte offset of the image name in the file
  name_lengths: np.ndarray  # int32: its length in bytes
  path: str = ""  # the media file
  stat: tuple[int, int] = (0, 0)  # its (size, mtime_ns) when it was parsed

  def subset(self, mask: np.ndarray) -> Media:
    if mask.all():
      return self
    return Media(self.positions[mask], self.keys[mask], self.lines[mask],
                 self.places[mask], self.name_starts[mask], self.name_lengths[mask],
                 self.path, self.stat)

  def names(self, mask: np.ndarray | None = None) -> pa.Array:
    """The names of the rows here (or of those `mask` selects), in this order."""
    starts, lengths = self.name_starts, self.name_lengths
    if mask is not None:
      starts, lengths = starts[mask], lengths[mask]
    return read_spans(self.path, starts, lengths)

  def name_spans(self) -> Spans:
    """The image names of the rows here, as spans in the media file (read later)."""
    return Spans(self.path, self.name_starts, self.name_lengths, self.stat)

  def group_starts(self) -> np.ndarray:
    """Index of the first row of each id's run (rows are sorted by position)."""
    positions = self.positions
    return np.flatnonzero(np.r_[True, positions[1:] != positions[:-1]]) if len(
        positions) else np.zeros(0, np.int64)


def _kept(array, mask: np.ndarray):
  return array if mask.all() else (array.filter(pa.array(mask)) if isinstance(
      array, (pa.Array, pa.ChunkedArray)) else array[mask])


def read_media_file(path: str, domain: str, pairs: Pairs, report: Report,
                    resolve: Callable[[pa.Array], np.ndarray] | None) -> Media:
  """The media rows that name an image of a paired id, first row of each (id, key),
  sorted by (pair position, key); `resolve(names) -> places` finds them on disk, a
  block of rows at a time (None: not looked for, place -1)."""
  spec = domains.get(domain)
  columns, is_clip = spec.files.media_columns, spec.is_clip
  stat = _file_stat(path)

  def per_block(lines, fields, name_starts):
    """A block's rows -> (lines, [pair positions, keys, name spans, places]) of the
    usable ones."""
    ids, names = fields[0], fields[-1]
    valid = ~pc.equal(names, "").to_numpy(zero_copy_only=False)
    for line in lines[~valid]:
      report.add(line, f"empty {columns[-1]}")
    keys = np.zeros(len(lines), np.int64)
    if is_clip:
      # ASCII digits (at most 18: an int64; real keys have 13)
      digits = _digits(fields[1]).to_numpy(
          zero_copy_only=False)
      bad_key = np.flatnonzero(valid & ~digits)
      if len(bad_key):
        for row, value in zip(bad_key.tolist(),
                              fields[1].take(pa.array(bad_key)).to_pylist()):
          report.add(lines[row], f"{columns[1]} {value!r} is not a non-negative integer")
      valid &= digits
      keys[valid] = pc.cast(_kept(fields[1], valid), pa.int64()).to_numpy()
    ids, names, lines, keys, name_starts = (_kept(ids, valid), _kept(names, valid),
                                            lines[valid], keys[valid], name_starts[valid])
    positions = _paired_positions(ids, pairs, lines, domain, report)
    paired = positions >= 0  # a paired row's id is pairs.ids[position]
    names = _kept(names, paired)
    places = (resolve(names) if resolve is not None
              else np.full(len(names), -1, np.int8))
    return lines[paired], [positions[paired], keys[paired], name_starts[paired],
                           _byte_lengths(names).astype(np.int32), places]

  lines, (positions, keys, name_starts, name_lengths, places) = read_fields(
      path, columns, report.found, per_block)
  # One stable sort by id, then key: the first row of each (id, key) in file order wins.
  order = np.lexsort((keys, positions))
  sorted_positions, sorted_keys = positions[order], keys[order]
  starts = np.ones(len(order), bool)
  starts[1:] = ((sorted_positions[1:] != sorted_positions[:-1])
                | (sorted_keys[1:] != sorted_keys[:-1]))
  del sorted_positions, sorted_keys
  later = np.flatnonzero(~starts)
  if len(later):
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    rows, firsts = order[later], group_first[later]
    both = read_spans(path, np.concatenate([name_starts[rows], name_starts[firsts]]),
                      np.concatenate([name_lengths[rows], name_lengths[firsts]]))
    row_names = both.slice(0, len(rows)).to_pylist()
    first_names = both.slice(len(rows)).to_pylist()
    row_ids = pairs.ids.take(pa.array(positions[rows])).to_pylist()
    for row, first, name, first_name, item_id in zip(rows.tolist(), firsts.tolist(),
                                                     row_names, first_names, row_ids):
      if name == first_name:
        report.add(lines[row], f"duplicate row (first at line {lines[first]}); ignored")
      elif is_clip:
        report.add(lines[row], f"second file for {columns[1]} {int(keys[row])} of "
                               f"{domain} {item_id} (first at line {lines[first]}); kept "
                               "the first")
      else:
        report.add(lines[row], f"second image for {domain} {item_id} (first at line "
                               f"{lines[first]}); kept the first")
  order = order[starts]
  del starts
  # Each column in the sorted order, one at a time (a hundred million rows each).
  positions, keys, lines = positions[order], keys[order], lines[order]
  places, name_starts, name_lengths = places[order], name_starts[order], name_lengths[order]
  return Media(positions, keys, lines, places, name_starts, name_lengths, path, stat)


def drop_absent(media: Media, is_clip: bool, sampled_frames: int | None,
                report: Report) -> tuple[Media, int]:
  """Media rows whose image is on disk; the absent ones are reported, except clip
  frames a sampled download left out on purpose (counted; see `load_rope`)."""
  absent = media.places == ABSENT
  if not absent.any():
    return media, 0
  expected = absent.copy()
  if is_clip and sampled_frames:
    expected[:] = False
    starts = media.group_starts()
    ends = np.r_[starts[1:], len(absent)]
    for start, end in zip(starts.tolist(), ends.tolist()):
      if absent[start:end].any():
        chosen = transforms.sample_frame_indices(end - start, sampled_frames)
        expected[start + np.asarray(chosen)] = True
    expected &= absent
  skipped = int((absent & ~expected).sum())
  names = media.names(expected).to_pylist()
  for line, name in zip(media.lines[expected].tolist(), names):
    report.add(line, f"image file {name} {IMAGE_NOT_FOUND} {IMAGE_SUBDIR}/ and the "
                     "dataset root)")
  return media.subset(~absent), skipped
