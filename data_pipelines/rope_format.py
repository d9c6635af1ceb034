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
index behind `catalog.videos[id]` is built on the first lookup.

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
    `check_files=True` (the default) each image's existence is checked with one or two
    `stat` calls; missing files are reported on the txt row that names them. Whether a
    file actually decodes is checked later, by `data_pipelines.prepare`.
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
  are built on access. Columns: ids, product ids, texts [n]; the images of record i are
  rows `offsets[i]:offsets[i + 1]` of names, keys, lines and places [frames].
  """

  def __init__(self, is_clip: bool, directories: tuple[str, str], ids: pa.Array,
               product_ids: pa.Array, texts: pa.Array, offsets: np.ndarray,
               names: pa.Array, keys: np.ndarray, lines: np.ndarray, places: np.ndarray):
    self._is_clip = is_clip
    self._directories = directories  # (images dir, root): where places 0 / 1 point
    self._ids, self._product_ids, self._texts = ids, product_ids, texts
    self._offsets, self._names = offsets, names
    self._keys, self._lines, self._places = keys, lines, places

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

  def _records(self, start: int, stop: int) -> list[tuple[str, PageRecord | ClipRecord]]:
    ids = self._ids.slice(start, stop - start).to_pylist()
    products = self._product_ids.slice(start, stop - start).to_pylist()
    texts = self._texts.slice(start, stop - start).to_pylist()
    first, last = int(self._offsets[start]), int(self._offsets[stop])
    names = self._names.slice(first, last - first).to_pylist()
    keys = self._keys[first:last].tolist()
    lines = self._lines[first:last].tolist()
    places = self._places[first:last].tolist()
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
    """product_id -> {"page": [ids], "video": [ids], "live": [ids]}, sorted by id."""
    table: dict[str, dict[str, list[str]]] = {}
    for domain in domains.NAMES:
      records = self.domain(domain)
      # pylint: disable=protected-access
      for item_id, product_id in zip(records._ids.to_pylist(),
                                     records._product_ids.to_pylist()):
        entry = table.setdefault(product_id, {d: [] for d in domains.NAMES})
        entry[domain].append(item_id)
    return dict(sorted(table.items()))


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


class _ImageResolver:
  """Finds image files: `root/images/<name>` (place 0), else `root/<name>` (place 1)."""

  def __init__(self, root: str, check_files: bool):
    self._root = root
    self._image_dir = os.path.join(root, IMAGE_SUBDIR)
    self._has_image_dir = os.path.isdir(self._image_dir)
    self._check_files = check_files
    self.directories = (self._image_dir, root)
    self.checks_files = check_files
    self.unchecked_place = _IN_IMAGE_DIR if self._has_image_dir else _IN_ROOT

  def __call__(self, names: list[str]) -> np.ndarray:
    if not self._check_files:
      return np.full(len(names), _IN_IMAGE_DIR if self._has_image_dir else _IN_ROOT, np.int8)
    places = np.empty(len(names), np.int8)
    exists = os.path.exists
    for i, name in enumerate(names):
      if self._has_image_dir and exists(os.path.join(self._image_dir, name)):
        places[i] = _IN_IMAGE_DIR
      elif exists(os.path.join(self._root, name)):
        places[i] = _IN_ROOT
      else:
        places[i] = rope_txt.ABSENT
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

  pairs = rope_txt.read_pair_file(paths["pair"], domain, reports["pair"])
  texts, has_text = rope_txt.read_text_file(paths["text"], domain, pairs, reports["text"])
  # Without file checks the names are not needed until the end (read again then).
  media = rope_txt.read_media_file(paths["media"], domain, pairs, reports["media"],
                                   resolver if resolver.checks_files else None)
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
      pairs.product_ids.filter(included), texts.filter(included), offsets,
      media.sorted_names(), media.keys, media.lines, media.places)
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
  keys, names, lines = (media.keys.tolist(), media.sorted_names().to_pylist(),
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
