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

import dataclasses
import functools
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
_RESOLVE_BLOCK = 1 << 16  # image names looked up on disk at a time
BLOCK_BYTES = 1 << 24  # 16 MiB of a txt file at a time: its transient copies stay small
_BOM = b"\xef\xbb\xbf"


def _line_blocks(path: str) -> Iterator[tuple[int, bytes]]:
  """(number of the block's first line, bytes of whole lines ending in LF) per block."""
  first_line, carry, start = 1, b"", True
  with open(path, "rb") as f:
    while True:
      chunk = f.read(BLOCK_BYTES)
      data = carry + chunk
      if start:
        data = data[len(_BOM):] if data.startswith(_BOM) else data
        start = False
      if not chunk:  # the end: a last line without LF
        if data:
          yield first_line, data + b"\n"
        return
      cut = data.rfind(b"\n")
      if cut < 0:
        carry = data
        continue
      block, carry = data[:cut + 1], data[cut + 1:]
      yield first_line, block
      first_line += block.count(b"\n")


def _lines_of_block(block: bytes, first_line: int, problems: list[tuple[int, str]]
                    ) -> tuple[np.ndarray, pa.Array]:
  """(line numbers, lines without their line end) of one block; non-UTF-8 lines are
  problems and left out."""
  ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
  offsets = np.concatenate([[0], ends + 1]).astype(np.int32)
  count = len(ends)
  raw = pa.Array.from_buffers(pa.binary(), count,
                              [None, pa.py_buffer(offsets), pa.py_buffer(block)])
  numbers = np.arange(first_line, first_line + count, dtype=np.int32)
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
    text, numbers = pa.array(values, pa.string()), numbers[keep]
  return numbers, pc.utf8_rtrim(text, characters="\r\n")


def read_fields(path: str, columns: tuple[str, ...], problems: list[tuple[int, str]],
                per_block: Callable | None = None) -> tuple[np.ndarray, list]:
  """The rows of `path` that split into `columns` (see the module docstring).

  `per_block(lines, fields) -> (lines, columns)`, when given, turns each block's rows
  into the columns to keep (NumPy or Arrow arrays; it may drop rows), so that a large
  file's fields need not all be held at once. Returns the line numbers and, per column,
  a NumPy array or an Arrow ChunkedArray.

  Raises:
    OSError: the file cannot be read (the message names it).
  """
  count = len(columns)
  expected = ", ".join(columns)
  kept_numbers, kept_fields = [], None
  try:
    for first_line, block in _line_blocks(path):
      numbers, lines = _lines_of_block(block, first_line, problems)
      blank = pc.equal(pc.utf8_trim_whitespace(lines), "").to_numpy(zero_copy_only=False)
      for number in numbers[blank]:
        problems.append((int(number), "blank line"))
      numbers, lines = numbers[~blank], lines.filter(pa.array(~blank))
      parts = pc.split_pattern(lines, pattern=",", max_splits=count - 1)
      lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
      short = lengths < count
      for number, length in zip(numbers[short], lengths[short]):
        problems.append((int(number), f"expected {count} columns '{expected}', "
                                      f"found {int(length)}"))
      numbers, parts = numbers[~short], parts.filter(pa.array(~short))
      fields = [pc.utf8_trim_whitespace(pc.list_element(parts, j)) for j in range(count)]
      bad = np.zeros(len(numbers), bool)
      for name, field in zip(columns[:-1], fields[:-1]):
        empty = pc.equal(field, "").to_numpy(zero_copy_only=False) & ~bad
        for number in numbers[empty]:
          problems.append((int(number), f"empty {name} (expected '{expected}')"))
        bad |= empty
      if bad.any():
        keep = pa.array(~bad)
        numbers, fields = numbers[~bad], [field.filter(keep) for field in fields]
      if per_block is not None:
        numbers, fields = per_block(numbers, fields)
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
        per_block(numbers, fields)[1] if per_block is not None else fields)]
  numbers = np.concatenate(kept_numbers)
  columns_out = []
  for chunks in kept_fields:
    if chunks and isinstance(chunks[0], np.ndarray):
      columns_out.append(np.concatenate(chunks))
    else:
      columns_out.append(pa.chunked_array(chunks, chunks[0].type if chunks else pa.string()))
  return numbers, columns_out


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


_NUMBER = "^[1-9][0-9]{0,17}$"  # a decimal id that an int64 holds and gives back


class _PairLookup:
  """Finds ids among a pair file's ids, block after block, without rebuilding a hash
  table each time: ROPE's ids are decimal numbers, looked up as int64 by binary search
  in the sorted pair ids; any other ids through a dict built once."""

  def __init__(self, pair_ids: pa.Array):
    self._numeric = bool(pc.all(pc.match_substring_regex(pair_ids, _NUMBER)).as_py()
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
    numeric = pc.match_substring_regex(ids, _NUMBER).to_numpy(zero_copy_only=False)
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


def read_text_file(path: str, domain: str, pairs: Pairs, report: Report
                ) -> tuple[pa.Array, np.ndarray]:
  """(text of each paired id, `空` where the row's text is empty; has a text row)."""
  lines, (ids, texts) = read_fields(path, (f"{domain}_id", "text"), report.found)
  ids, texts = ids.combine_chunks(), texts.cast(pa.large_string()).combine_chunks()
  texts = pc.if_else(pc.equal(texts, ""), MISSING_TEXT, texts)
  positions = _paired_positions(ids, pairs, lines, domain, report)
  paired = positions >= 0
  keep = pa.array(paired)
  ids, texts, lines, positions = (ids.filter(keep), texts.filter(keep), lines[paired],
                                  positions[paired])
  is_first = _first_rows(
      positions, texts, lines, report,
      lambda row, first: (f"second text for {domain} {ids[row].as_py()} (first at line "
                          f"{lines[first]}); kept the first"))
  order = np.full(len(pairs.ids), -1, np.int64)
  order[positions[is_first]] = np.flatnonzero(is_first)
  has_text = order >= 0
  text_rows = pa.array(np.where(has_text, order, 0))
  all_texts = texts.take(text_rows) if len(texts) else pa.array(
      [MISSING_TEXT] * len(order), pa.string())
  return pc.if_else(pa.array(has_text), all_texts, MISSING_TEXT), has_text


@dataclasses.dataclass
class Media:
  """A media file's usable rows sorted by (pair position, frame key): the first row of
  each (id, key). The names stay in file order (`names`, every row read) and are taken
  in this order only once, for the rows kept (`sorted_names`), so that a file of tens of
  millions of names is never held twice. `places` says where each image was found."""
  positions: np.ndarray  # int32: position of the id in the pair file's ids
  keys: np.ndarray  # int64: frame number / timestamp (0 for a page)
  names: pa.ChunkedArray | None  # file order; None: read again when asked for
  order: np.ndarray  # int64: row of `names` of each row here
  lines: np.ndarray  # int32
  places: np.ndarray  # int8: IN_IMAGE_DIR, IN_ROOT, ABSENT, or -1 (not looked for)
  source: tuple[str, tuple[str, ...]] = ("", ())  # (path, columns) to read names again

  def subset(self, mask: np.ndarray) -> Media:
    if mask.all():
      return self
    return Media(self.positions[mask], self.keys[mask], self.names, self.order[mask],
                 self.lines[mask], self.places[mask], self.source)

  def sorted_names(self, mask: np.ndarray | None = None) -> pa.Array:
    """The names of the rows here (or of those `mask` selects), in this order."""
    if self.names is None:
      return read_names(*self.source, self.lines if mask is None else self.lines[mask])
    taken = self.names.take(pa.array(self.order if mask is None else self.order[mask]))
    return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken  # large

  def group_starts(self) -> np.ndarray:
    """Index of the first row of each id's run (rows are sorted by position)."""
    positions = self.positions
    return np.flatnonzero(np.r_[True, positions[1:] != positions[:-1]]) if len(
        positions) else np.zeros(0, np.int64)


def _kept(array, mask: np.ndarray):
  return array if mask.all() else (array.filter(pa.array(mask)) if isinstance(
      array, (pa.Array, pa.ChunkedArray)) else array[mask])


def _members(numbers: np.ndarray, wanted_sorted: np.ndarray) -> np.ndarray:
  """bool [n]: which of `numbers` are in `wanted_sorted`."""
  if not len(wanted_sorted):
    return np.zeros(len(numbers), bool)
  where = np.minimum(np.searchsorted(wanted_sorted, numbers), len(wanted_sorted) - 1)
  return wanted_sorted[where] == numbers


def read_names(path: str, columns: tuple[str, ...], wanted_lines: np.ndarray) -> pa.Array:
  """The last field (the image name) of the rows at `wanted_lines` of a media file, in
  that order: a second pass over the file that keeps only those names."""
  wanted = np.sort(wanted_lines)

  def per_block(numbers, fields):
    mask = _members(numbers, wanted)
    return numbers[mask], [_kept(fields[-1], mask).cast(pa.large_string())]

  lines, (names,) = read_fields(path, columns, [], per_block)
  names = names.combine_chunks()
  return names.take(pa.array(np.searchsorted(lines, wanted_lines)))


def read_media_file(path: str, domain: str, pairs: Pairs, report: Report,
                    resolve: Callable[[list[str]], np.ndarray] | None) -> Media:
  """The media rows that name an image of a paired id, first row of each (id, key),
  sorted by (pair position, key); `resolve(names) -> places` finds them on disk (None:
  names as written, place -1, and the names are not held while the file is read: the
  rows kept in the end have theirs read by a second pass, `Media.sorted_names`)."""
  spec = domains.get(domain)
  columns, is_clip = spec.files.media_columns, spec.is_clip

  def per_block(lines, fields):
    """A block's rows -> (lines, [pair positions, keys, names]) of the usable ones."""
    ids, names = fields[0], fields[-1]
    valid = ~pc.equal(names, "").to_numpy(zero_copy_only=False)
    for line in lines[~valid]:
      report.add(line, f"empty {columns[-1]}")
    keys = np.zeros(len(lines), np.int64)
    if is_clip:
      # ASCII digits (at most 18: an int64; real keys have 13)
      digits = pc.match_substring_regex(fields[1], "^[0-9]{1,18}$").to_numpy(
          zero_copy_only=False)
      bad_key = np.flatnonzero(valid & ~digits)
      if len(bad_key):
        for row, value in zip(bad_key.tolist(),
                              fields[1].take(pa.array(bad_key)).to_pylist()):
          report.add(lines[row], f"{columns[1]} {value!r} is not a non-negative integer")
      valid &= digits
      keys[valid] = pc.cast(_kept(fields[1], valid), pa.int64()).to_numpy()
    ids, names, lines, keys = (_kept(ids, valid), _kept(names, valid), lines[valid],
                               keys[valid])
    positions = _paired_positions(ids, pairs, lines, domain, report)
    paired = positions >= 0  # a paired row's id is pairs.ids[position]
    if resolve is None:  # names read again for the rows kept
      return lines[paired], [positions[paired], keys[paired]]
    # 64-bit offsets: tens of millions of names exceed the 2 GiB of a plain string array
    return lines[paired], [positions[paired], keys[paired],
                           _kept(names, paired).cast(pa.large_string())]

  lines, (positions, keys, *held) = read_fields(path, columns, report.found, per_block)
  names = held[0] if held else None
  # One stable sort by id, then key: the first row of each (id, key) in file order wins.
  order = np.lexsort((keys, positions))
  sorted_positions, sorted_keys = positions[order], keys[order]
  starts = np.ones(len(order), bool)
  starts[1:] = ((sorted_positions[1:] != sorted_positions[:-1])
                | (sorted_keys[1:] != sorted_keys[:-1]))
  later = np.flatnonzero(~starts)
  if len(later):
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    rows, firsts = order[later], group_first[later]
    if names is None:
      both = read_names(path, columns, np.concatenate([lines[rows], lines[firsts]]))
      row_names = both.slice(0, len(rows)).to_pylist()
      first_names = both.slice(len(rows)).to_pylist()
    else:
      row_names = names.take(pa.array(rows)).to_pylist()
      first_names = names.take(pa.array(firsts)).to_pylist()
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
  places = np.full(len(order), -1, np.int8)
  if resolve is not None:  # in blocks: a Python string per name only for a block
    for start in range(0, len(order), _RESOLVE_BLOCK):
      block = order[start:start + _RESOLVE_BLOCK]
      places[start:start + len(block)] = resolve(names.take(pa.array(block)).to_pylist())
  if names is not None and not isinstance(names, pa.ChunkedArray):
    names = pa.chunked_array([names])
  return Media(positions[order], keys[order], names, order, lines[order], places,
               (path, columns))


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
  names = media.sorted_names(expected).to_pylist()
  for line, name in zip(media.lines[expected].tolist(), names):
    report.add(line, f"image file {name} {IMAGE_NOT_FOUND} {IMAGE_SUBDIR}/ and the "
                     "dataset root)")
  return media.subset(~absent), skipped
