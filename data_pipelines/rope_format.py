"""Reader for the ROPE dataset format: nine txt files per split plus JPEG files.

A split (`training` or `test`) is described by nine comma-separated files, all named
`<split>_<kind>.txt`:

  product_pages_pair   product_id, page_id
  product_videos_pair  product_id, video_id
  product_lives_pair   product_id, live_id
  page_titles          page_id, title
  video_asrs           video_id, asr text
  live_asrs            live_id, asr text
  page_images          page_id, image file name
  video_frames         video_id, frame_number, image file name
  live_clips           live_id, timestamp_ms, image file name

`load_rope(root, split)` reads these files column-wise with pyarrow and NumPy
(`rope_txt`: the real ones hold tens of millions of rows; no Python object per row
while parsing) into a `RopeCatalog`. It never raises on a bad row: every row it cannot
use is listed in `catalog.problems` as `{"file", "line", "reason"}` (file: the txt file
name, line: 1-based physical line number). It raises only when one of the nine files is
missing or unreadable. `load_rope(..., num_frames=T)` keeps only the T segment-middle
frames of each clip's usable frames (what training and the `rope` dataset read); the
others are never turned into paths.

Memory: the catalog keeps its records as columns (Arrow strings, NumPy integers); a
`PageRecord` / `ClipRecord` is built when it is looked up or iterated over, and the id
index behind `catalog.videos[id]` is built on the first lookup. Texts and image names
are not held: each record keeps the byte span of its text and of its image names in
the txt files, read when records are built (the txt files must not change meanwhile: a
changed one is an error); a large range of records reads every name of its domain in
one pass over the media file, kept from then on. The memory each file's parse freed
is given back before the next file is read.

Parsing rules:
  * UTF-8 with or without a byte-order mark; LF or CRLF line ends. Blank lines and lines
    that are not valid UTF-8 are reported and skipped.
  * The separator is an ASCII comma followed by optional spaces. Texts contain commas
    (ASCII and full-width) themselves, so a row is split only on its first comma (its
    first two for the frame files); fields are stripped of surrounding spaces.
  * Frames are ordered numerically by frame number / timestamp, whatever the row order.
  * An exact duplicate row is reported and ignored; a row that contradicts an earlier
    one (an id paired with a second product, a second title, another file for the same
    frame number) is reported and the first one is kept.
  * A paired id without a text row gets the text `空` ("empty"; reported). A page
    without a usable image or a clip without usable frames is reported (on its pair
    row) and left out of the catalog. Rows about ids that no pair file names are
    reported.
  * Image names are resolved as `root/images/<name>` first, then `root/<name>`. With
    `check_files=True` (the default) each image's existence is checked against a
    listing of the two folders (`os.scandir`, once each; a name that is not a plain file
    name, with a `/`, is looked up with `os.path.exists`); missing files are reported on
    the txt row that names them. Whether a file actually decodes is checked later, by
    `data_pipelines.prepare`.
  * Problems are listed file by file (pair, text, media file of each domain), in line
    order, then the pair-file rows of records without a text row or without images.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cope_jax.base import domains
from data_pipelines import rope_txt
from data_pipelines import transforms

SPLITS = ("training", "test")
MISSING_TEXT = "空"
IMAGE_SUBDIR = "images"
DOWNLOAD_REPORT = "download_report.json"  # written by data_pipelines.download
IMAGE_NOT_FOUND = rope_txt.IMAGE_NOT_FOUND  # in the reason of each image file not on disk

_IN_IMAGE_DIR, _IN_ROOT, rope_txt.ABSENT = 0, 1, 2  # where a media row's image was found
_ITERATION_BLOCK = 4096  # records converted to Python objects at a time
_LISTING_BATCH = 1 << 16  # directory entries hashed at a time
_DIRECT_NAMES = 1 << 16  # image names read one by one for a range up to this many


def file_name(split: str, kind: str) -> str:
  """ROPE's name for one of a split's txt files, e.g. `training_page_titles.txt`."""
  return f"{split}_{kind}.txt"


def split_file_names(split: str) -> list[str]:
  """The nine txt file names of `split`, pair files first."""
  kinds = [getattr(domain.files, role) for role in ("pair", "text", "media")
           for domain in domains.DOMAINS]
  return [file_name(split, kind) for kind in kinds]


def has_split(root: str, split: str) -> bool:
  """Whether `root` holds (at least the first domain's pair file of) `split`."""
  return os.path.exists(os.path.join(root, file_name(split, domains.DOMAINS[0].files.pair)))


@dataclasses.dataclass(frozen=True)
class PageRecord:
  """A product page: one image and a title."""
  id: str
  product_id: str
  text: str
  image: str  # path of the JPEG
  image_line: int  # line of `<split>_page_images.txt` that named the image


@dataclasses.dataclass(frozen=True)
class ClipRecord:
  """A short video or live clip: frames in time order and its ASR text."""
  id: str
  product_id: str
  text: str
  frames: tuple[str, ...]  # JPEG paths, in time order
  frame_keys: tuple[int, ...]  # frame numbers (videos) or epoch-ms timestamps (lives)
  frame_lines: tuple[int, ...]  # lines of the frame file that named each frame


class DomainRecords(collections.abc.Mapping):
  """id -> PageRecord / ClipRecord of one domain, in pair-file order, kept as columns.

  A read-only mapping (`[id]`, `in`, `len`, iteration, `.items()`, `.values()`); records
  are built on access. Columns: ids, product ids [n]; the images of record i are rows
  `offsets[i]:offsets[i + 1]` of keys, lines and places [frames]. Texts [n] and image
  names [frames] are kept as their byte spans in the txt files (`rope_txt.Spans`) and
  read when records are built: a few at a time directly, a large range (more than
  `_DIRECT_NAMES` images) by reading every name of the domain in one pass over its
  media file, kept from then on.
  """

  def __init__(self, is_clip: bool, directories: tuple[str, str], ids: pa.Array,
               product_ids: pa.Array, texts: rope_txt.Spans, offsets: np.ndarray,
               names: rope_txt.Spans, keys: np.ndarray, lines: np.ndarray,
               places: np.ndarray):
    self._is_clip = is_clip
    self._directories = directories  # (images dir, root): where places 0 / 1 point
    self._ids, self._product_ids, self._texts = ids, product_ids, texts
    self._offsets, self._names = offsets, names
    self._keys, self._lines, self._places = keys, lines, places

  @functools.cached_property
  def _all_names(self) -> tuple[pa.LargeStringArray, np.ndarray]:
    return self._names.read_all()

  def __len__(self) -> int:
    return len(self._ids)

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {item_id: i for i, item_id in enumerate(self._ids.to_pylist())}

  def __getitem__(self, item_id: str):
    return self._records(self._index[item_id], self._index[item_id] + 1)[0][1]

  def __contains__(self, item_id) -> bool:
    return item_id in self._index

  def __iter__(self) -> Iterator[str]:
    for start in range(0, len(self), _ITERATION_BLOCK):
      yield from self._ids.slice(start, _ITERATION_BLOCK).to_pylist()

  # Column access, for the readers that need no Python object per record.

  @property
  def ids(self) -> pa.Array:
    """[n] the ids, in pair-file order."""
    return self._ids

  @property
  def product_ids(self) -> pa.Array:
    """[n] each record's product id."""
    return self._product_ids

  @property
  def image_offsets(self) -> np.ndarray:
    """int64 [n + 1]: record i's images are images offsets[i]:offsets[i + 1]."""
    return self._offsets

  def texts(self, start: int, stop: int) -> pa.Array:
    """[stop - start] the texts of records start:stop (read from the txt file;
    `MISSING_TEXT` where a record has none)."""
    texts = self._texts.read(start, stop)
    return pc.if_else(pc.equal(texts, ""), MISSING_TEXT, texts)

  def images(self, first: int, last: int) -> tuple[pa.Array, np.ndarray, np.ndarray,
                                                   np.ndarray]:
    """(names, keys int64, lines int32, places int8) of images first:last; a place
    indexes `directories` (-1: the name is a path as written)."""
    if last - first > _DIRECT_NAMES or "_all_names" in self.__dict__:
      all_names, index = self._all_names
      names = all_names.take(pa.array(index[first:last]))
    else:
      names = self._names.read(first, last)
    return (names, self._keys[first:last], self._lines[first:last],
            self._places[first:last])

  @property
  def places(self) -> np.ndarray:
    """int8 [frames]: where each image was found (an index of `directories`)."""
    return self._places

  @property
  def directories(self) -> tuple[str, str]:
    """(images folder, ROPE root): where an image of place 0 / 1 is."""
    return self._directories

  def _records(self, start: int, stop: int) -> list[tuple[str, PageRecord | ClipRecord]]:
    ids = self._ids.slice(start, stop - start).to_pylist()
    products = self._product_ids.slice(start, stop - start).to_pylist()
    texts = self.texts(start, stop).to_pylist()
    first, last = int(self._offsets[start]), int(self._offsets[stop])
    names, keys, lines, places = self.images(first, last)
    names, keys, lines, places = (names.to_pylist(), keys.tolist(), lines.tolist(),
                                  places.tolist())
    paths = [name if place < 0 else os.path.join(self._directories[place], name)
             for name, place in zip(names, places)]
    records = []
    for i, (item_id, product_id, text) in enumerate(zip(ids, products, texts)):
      a, b = int(self._offsets[start + i]) - first, int(self._offsets[start + i + 1]) - first
      if self._is_clip:
        record = ClipRecord(item_id, product_id, text, tuple(paths[a:b]), tuple(keys[a:b]),
                            tuple(lines[a:b]))
      else:
        record = PageRecord(item_id, product_id, text, paths[a], lines[a])
      records.append((item_id, record))
    return records

  def _iter_items(self) -> Iterator[tuple[str, PageRecord | ClipRecord]]:
    for start in range(0, len(self), _ITERATION_BLOCK):
      yield from self._records(start, min(len(self), start + _ITERATION_BLOCK))

  def items(self):
    return _ItemsView(self)

  def values(self):
    return _ValuesView(self)


class _ItemsView(collections.abc.ItemsView):
  def __iter__(self):
    return self._mapping._iter_items()  # pylint: disable=protected-access


class _ValuesView(collections.abc.ValuesView):
  def __iter__(self):
    return (record for _, record in self._mapping._iter_items())  # pylint: disable=protected-access


@dataclasses.dataclass
class RopeCatalog:
  """Everything usable in one split of a ROPE directory.

  `pages`, `videos`, `lives` map an id to its record, in the order of the pair files
  (read-only mappings, `DomainRecords`).
  """
  root: str
  split: str
  pages: DomainRecords
  videos: DomainRecords
  lives: DomainRecords
  problems: list[dict]
  # Clip frames absent on purpose: the download fetched only the segment-middle frames.
  frames_skipped_by_download: int = 0

  def domain(self, domain: str) -> DomainRecords:
    """The records of the domain called `domain` (a name of `domains.NAMES`)."""
    return getattr(self, domains.get(domain).plural)

  def media_file(self, domain: str) -> str:
    """Name of the txt file whose lines `image_line` / `frame_lines` refer to."""
    return file_name(self.split, domains.get(domain).files.media)

  @functools.cached_property
  def products(self) -> dict[str, dict[str, list[str]]]:
    """product_id -> {"page": [ids], "video": [ids], "live": [ids]}, sorted by id (a
    Python object per record: for small catalogs and tests; `product_columns` is the
    same as columns)."""
    table: dict[str, dict[str, list[str]]] = {}
    for domain in domains.NAMES:
      records = self.domain(domain)
      for item_id, product_id in zip(records.ids.to_pylist(),
                                     records.product_ids.to_pylist()):
        entry = table.setdefault(product_id, {d: [] for d in domains.NAMES})
        entry[domain].append(item_id)
    return dict(sorted(table.items()))

  def product_columns(self) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """The `products` table as columns, with no Python object per record: (the product
    ids sorted, each one's position being its product_index; per domain, int32 [n] the
    product_index of each record in record order)."""
    every = pa.chunked_array([self.domain(d).product_ids.cast(pa.string())
                              for d in domains.NAMES], pa.string())
    unique = pc.unique(every)
    product_ids = unique.take(pc.sort_indices(unique))
    return product_ids, {
        d: pc.index_in(self.domain(d).product_ids, value_set=product_ids).to_numpy(
            zero_copy_only=False).astype(np.int32) for d in domains.NAMES}


def _kept_frames(counts: np.ndarray, ranks: np.ndarray, num_frames: int) -> np.ndarray:
  """bool [frames]: the frames `num_frames` keeps (the distinct segment-middle ones of
  each clip's `counts` frames), from each frame's rank in its clip."""
  keep = np.zeros(len(ranks), bool)
  for count in np.unique(counts).tolist():
    chosen = np.zeros(count, bool)
    chosen[transforms.sample_frame_indices(count, num_frames)] = True
    rows = counts == count
    keep[rows] = chosen[ranks[rows]]
  return keep


class _DirectoryListing:
  """The file names of one directory, as a sorted array of their 64-bit hashes
  (`rope_txt.string_hashes`): listed once with `os.scandir` (one system call answers
  for thousands of names), 8 bytes a name, no name held."""

  def __init__(self, directory: str):
    self._directory = directory

  @functools.cached_property
  def _hashes(self) -> np.ndarray:
    chunks, batch = [], []
    with os.scandir(self._directory) as entries:
      for entry in entries:
        batch.append(entry.name)
        if len(batch) == _LISTING_BATCH:
          chunks.append(rope_txt.string_hashes(_name_array(batch)))
          batch = []
    chunks.append(rope_txt.string_hashes(_name_array(batch)))
    hashes = np.concatenate(chunks)
    hashes.sort()
    return hashes

  def contains(self, hashes: np.ndarray) -> np.ndarray:
    """bool [n]: which of the names with these hashes the directory holds."""
    listed = self._hashes
    if not len(listed):
      return np.zeros(len(hashes), bool)
    where = np.minimum(np.searchsorted(listed, hashes), len(listed) - 1)
    return listed[where] == hashes


def _name_array(names: list[str]) -> pa.Array:
  try:
    return pa.array(names, pa.string())
  except (UnicodeEncodeError, pa.ArrowException):  # names that are not UTF-8
    return pa.array([os.fsencode(name) for name in names], pa.binary())


class _ImageResolver:
  """Finds image files: `root/images/<name>` (place 0), else `root/<name>` (place 1).

  Each directory is listed once (`_DirectoryListing`) and a block of names is looked up
  in the listing column-wise, instead of one `stat` per name. Names that are not plain
  file names (with a `/`, or `.` / `..`) are looked up with `os.path.exists`. A name
  counts as present when the directory lists it (a broken symbolic link too: its
  decode fails later and is reported then), or, with a chance of about 1e-11 for a
  catalog of a hundred million names, when its hash equals a listed name's.
  """

  def __init__(self, root: str, check_files: bool):
    self._root = root
    self._image_dir = os.path.join(root, IMAGE_SUBDIR)
    self._has_image_dir = os.path.isdir(self._image_dir)
    self._listings = (_DirectoryListing(self._image_dir), _DirectoryListing(root))
    self.directories = (self._image_dir, root)
    self.checks_files = check_files
    self.unchecked_place = _IN_IMAGE_DIR if self._has_image_dir else _IN_ROOT

  def __call__(self, names: pa.Array) -> np.ndarray:
    """int8 [n]: the place of each name (IN_IMAGE_DIR, IN_ROOT or ABSENT)."""
    places = np.full(len(names), rope_txt.ABSENT, np.int8)
    if not len(names):
      return places
    hashes = rope_txt.string_hashes(names)
    unresolved = np.ones(len(names), bool)
    for place, listing in ((_IN_IMAGE_DIR, self._listings[0]), (_IN_ROOT, self._listings[1])):
      if place == _IN_IMAGE_DIR and not self._has_image_dir:
        continue
      rows = np.flatnonzero(unresolved)
      if not len(rows):
        break
      found = rows[listing.contains(hashes[rows])]
      places[found] = place
      unresolved[found] = False
    special = (pc.match_substring(names, "/").to_numpy(zero_copy_only=False)
               | pc.is_in(names, value_set=pa.array([".", ".."], names.type)).to_numpy(
                   zero_copy_only=False))
    for row in np.flatnonzero(special).tolist():
      name = names[row].as_py()
      if self._has_image_dir and os.path.exists(os.path.join(self._image_dir, name)):
        places[row] = _IN_IMAGE_DIR
      elif os.path.exists(os.path.join(self._root, name)):
        places[row] = _IN_ROOT
      else:
        places[row] = rope_txt.ABSENT
    return places


def _load_domain(root: str, split: str, domain: str, resolver: _ImageResolver,
                 problems: list[dict], sampled_frames: int | None,
                 num_frames: int | None) -> tuple[DomainRecords, int]:
  """Reads one domain's three files into its records; also returns the number of clip
  frames a sampled download left out."""
  spec = domains.get(domain)
  names = {role: file_name(split, getattr(spec.files, role))
           for role in ("pair", "text", "media")}
  reports = {role: rope_txt.Report(name) for role, name in names.items()}
  paths = {role: os.path.join(root, name) for role, name in names.items()}

  # The memory each file's read freed goes back before the next one (see
  # `rope_txt.release_free_memory`): the peak is one file's read, not their sum.
  pairs = rope_txt.read_pair_file(paths["pair"], domain, reports["pair"])
  rope_txt.release_free_memory()
  texts, has_text = rope_txt.read_text_file(paths["text"], domain, pairs, reports["text"])
  rope_txt.release_free_memory()
  media = rope_txt.read_media_file(paths["media"], domain, pairs, reports["media"],
                                   resolver if resolver.checks_files else None)
  rope_txt.release_free_memory()
  if not resolver.checks_files:
    media.places[:] = resolver.unchecked_place
  media, skipped = rope_txt.drop_absent(media, spec.is_clip, sampled_frames, reports["media"])
  for role in ("pair", "text", "media"):
    reports[role].into(problems)

  positions = media.positions  # sorted: rows of one id together, by key
  counts = np.bincount(positions, minlength=len(pairs.ids))
  if not spec.is_clip:  # one image a page (its only key is 0)
    media = media.subset(np.isin(np.arange(len(positions)), media.group_starts()))
  elif num_frames:
    starts = np.concatenate([[0], np.cumsum(counts)])
    ranks = np.arange(len(positions)) - starts[positions]
    media = media.subset(_kept_frames(counts[positions], ranks, num_frames))
    del starts, ranks
  positions = media.positions
  counts = np.bincount(positions, minlength=len(pairs.ids))
  with_media = counts > 0
  record_level = rope_txt.Report(names["pair"])
  text_kind = spec.text_description
  what = "frames" if spec.is_clip else "image"
  for position in np.flatnonzero(~has_text | ~with_media).tolist():
    item_id, line = pairs.ids[position].as_py(), int(pairs.lines[position])
    if not has_text[position]:
      record_level.add(line, f"{domain} {item_id} has no {text_kind} row in "
                             f"{names['text']}; using {MISSING_TEXT}")
    if not with_media[position]:
      record_level.add(line, f"{domain} {item_id} has no usable {what} in "
                             f"{names['media']}; excluded")
  problems.extend({"file": record_level.name, "line": line, "reason": reason}
                  for line, reason in record_level.found)
  included = pa.array(with_media)
  offsets = np.concatenate([[0], np.cumsum(counts[with_media])]).astype(np.int64)
  records = DomainRecords(
      spec.is_clip, resolver.directories, pairs.ids.filter(included),
      pairs.product_ids.filter(included), texts.subset(with_media), offsets,
      media.name_spans(), media.keys, media.lines, media.places)
  del media, pairs, texts
  rope_txt.release_free_memory()
  return records, skipped


def read_pairs(root: str, split: str, domain: str) -> tuple[dict[str, str], list[dict]]:
  """One domain's pair file alone: item id -> product id, with `load_rope`'s rules.

  Reads no other file and no image (for mapping embedding ids to products).

  Returns:
    (item id -> product id in pair-file order, the problems found in the file).

  Raises:
    FileNotFoundError: the pair file is missing (the message names it).
  """
  name = file_name(split, domains.get(domain).files.pair)
  path = os.path.join(root, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ROPE directory {root!r} lacks the {split!r} pair file {name} "
                            f"of the {domain} domain")
  report = rope_txt.Report(name)
  pairs = rope_txt.read_pair_file(path, domain, report)
  problems: list[dict] = []
  report.into(problems)
  return dict(zip(pairs.ids.to_pylist(), pairs.product_ids.to_pylist())), problems


def media_names(root: str, split: str, domain: str
                ) -> tuple[dict[str, list[tuple[int, str, int]]], list[dict]]:
  """The image file names that `load_rope` would use for one domain, without the files.

  Reads the domain's pair file and media file with the same rules as `load_rope`, but
  neither resolves nor checks the names: for fetching the images a release names.

  Returns:
    (item id -> [(frame key, image file name as written, media-file line)] in time
    order (one entry, key 0, for a page), for every paired id with at least one
    usable row, in media-file order; the problems found in the two files).
  """
  files = domains.get(domain).files
  pair_name, media_name = file_name(split, files.pair), file_name(split, files.media)
  reports = (rope_txt.Report(pair_name), rope_txt.Report(media_name))
  pairs = rope_txt.read_pair_file(os.path.join(root, pair_name), domain, reports[0])
  media = rope_txt.read_media_file(os.path.join(root, media_name), domain, pairs, reports[1], None)
  problems: list[dict] = []
  for report in reports:
    report.into(problems)
  ids = pairs.ids.to_pylist()
  starts = media.group_starts()
  ends = np.r_[starts[1:], len(media.lines)].astype(np.int64)
  first_lines = np.minimum.reduceat(media.lines, starts) if len(starts) else starts
  keys, names, lines = (media.keys.tolist(), media.names().to_pylist(),
                        media.lines.tolist())
  result = {}
  for group in np.argsort(first_lines, kind="stable").tolist():  # media-file order
    start, end = int(starts[group]), int(ends[group])
    result[ids[media.positions[start]]] = list(zip(keys[start:end], names[start:end],
                                                   lines[start:end]))
  return result, problems


def load_rope(root: str, split: str = "training", check_files: bool = True,
              num_frames: int | None = None) -> RopeCatalog:
  """Parses one split of a ROPE directory.

  Args:
    root: directory holding the nine `<split>_*.txt` files and the images (in
      `root/images/` or `root/` itself).
    split: file-name prefix, "training" or "test".
    check_files: check that every named image exists (one or two `stat` calls each).
    num_frames: keep only the T segment-middle frames of each clip's usable frames
      (`transforms.sample_frame_indices`; a clip with fewer keeps all); None: all.

  Returns:
    A `RopeCatalog` with the usable pages, videos and lives and the problems found.

  Raises:
    FileNotFoundError: one of the nine files is missing (the message names them all).
    OSError: a file exists but cannot be read.
  """
  missing = [name for name in split_file_names(split)
             if not os.path.isfile(os.path.join(root, name))]
  if missing:
    raise FileNotFoundError(
        f"ROPE directory {root!r} lacks required {split!r} file(s): {', '.join(missing)}")
  resolver = _ImageResolver(root, check_files)
  sampled_frames = downloaded_frames_per_clip(root) if check_files else None
  problems: list[dict] = []
  records, skipped = {}, 0
  for domain in domains.DOMAINS:
    records[domain.plural], domain_skipped = _load_domain(
        root, split, domain.name, resolver, problems, sampled_frames, num_frames)
    skipped += domain_skipped
  return RopeCatalog(root=root, split=split, problems=problems,
                     frames_skipped_by_download=skipped, **records)


def downloaded_frames_per_clip(root: str) -> int | None:
  """T when `root`'s images were fetched by `data_pipelines.download --num_frames T`
  (its `download_report.json` says so), else None (every frame is expected)."""
  path = os.path.join(root, DOWNLOAD_REPORT)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      options = json.load(f).get("options", {})
  except (OSError, ValueError, AttributeError) as error:
    raise ValueError(f"{path}: not a readable download report ({error})") from error
  if options.get("all_frames", True):
    return None
  return int(options["num_frames"])
