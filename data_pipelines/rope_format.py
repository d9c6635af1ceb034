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

`load_rope(root, split)` streams these files line by line (the real ones hold millions of
rows) into a `RopeCatalog`. It never raises on a bad row: every row it cannot use is
listed in `catalog.problems` as `{"file", "line", "reason"}` (file: the txt file name,
line: 1-based physical line number). It raises only when one of the nine files is
missing or unreadable.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator

from data_pipelines import domains
from data_pipelines import transforms

SPLITS = ("training", "test")
MISSING_TEXT = "空"
IMAGE_SUBDIR = "images"
DOWNLOAD_REPORT = "download_report.json"  # written by data_pipelines.download

_BOM = b"\xef\xbb\xbf"


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


@dataclasses.dataclass
class RopeCatalog:
  """Everything usable in one split of a ROPE directory.

  `pages`, `videos`, `lives` map an id to its record, in the order of the pair files.
  """
  root: str
  split: str
  pages: dict[str, PageRecord]
  videos: dict[str, ClipRecord]
  lives: dict[str, ClipRecord]
  problems: list[dict]
  # Clip frames absent on purpose: the download fetched only the segment-middle frames.
  frames_skipped_by_download: int = 0

  def domain(self, domain: str) -> dict:
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
      for item_id, record in self.domain(domain).items():
        entry = table.setdefault(record.product_id, {d: [] for d in domains.NAMES})
        entry[domain].append(item_id)
    return dict(sorted(table.items()))


class _Problems:
  """Collects problems for one txt file."""

  def __init__(self, problems: list[dict], name: str):
    self._problems = problems
    self.name = name

  def add(self, line: int, reason: str) -> None:
    self._problems.append({"file": self.name, "line": line, "reason": reason})

  def sort(self) -> None:
    """Orders this file's problems by line (while the file is read they are the list's
    tail; the sort is stable, so problems of one line keep their order)."""
    start = len(self._problems)
    while start and self._problems[start - 1]["file"] == self.name:
      start -= 1
    self._problems[start:] = sorted(self._problems[start:], key=lambda p: p["line"])


def _rows(path: str, report: _Problems) -> Iterator[tuple[int, str]]:
  """Yields (line number, decoded line) for each non-blank line of `path`."""
  try:
    with open(path, "rb") as f:
      for line_number, raw in enumerate(f, start=1):
        if line_number == 1 and raw.startswith(_BOM):
          raw = raw[len(_BOM):]
        raw = raw.rstrip(b"\r\n")
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          report.add(line_number, f"not valid UTF-8 ({e.reason} at byte {e.start})")
          continue
        if not text.strip():
          report.add(line_number, "blank line")
          continue
        yield line_number, text
  except OSError as e:
    raise OSError(f"ROPE file {path} could not be read: {e}") from e


def _split_row(text: str, columns: tuple[str, ...], line: int,
               report: _Problems) -> list[str] | None:
  """Splits on the first len(columns)-1 commas; reports and returns None if malformed.

  Every column but the last must be non-empty and must not contain a comma; the last
  may (texts do). For two-column id files the caller checks the last column itself.
  """
  fields = [field.strip() for field in text.split(",", len(columns) - 1)]
  expected = ", ".join(columns)
  if len(fields) < len(columns):
    report.add(line, f"expected {len(columns)} columns '{expected}', found {len(fields)}")
    return None
  for name, value in zip(columns[:-1], fields[:-1]):
    if not value:
      report.add(line, f"empty {name} (expected '{expected}')")
      return None
  return fields


def _read_pairs(path: str, domain: str, report: _Problems) -> dict[str, tuple[str, int]]:
  """item id -> (product id, pair-file line)."""
  item_column = f"{domain}_id"
  paired: dict[str, tuple[str, int]] = {}
  for line, text in _rows(path, report):
    fields = _split_row(text, ("product_id", item_column), line, report)
    if fields is None:
      continue
    product_id, item_id = fields
    if not item_id or "," in item_id:
      report.add(line, f"expected 2 columns 'product_id, {item_column}'")
      continue
    if item_id in paired:
      first_product, first_line = paired[item_id]
      if first_product == product_id:
        report.add(line, f"duplicate row (first at line {first_line}); ignored")
      else:
        report.add(line, f"{domain} {item_id} already paired with product {first_product} "
                   f"at line {first_line}; kept the first")
      continue
    paired[item_id] = (product_id, line)
  return paired


def _read_texts(path: str, domain: str, paired: dict, report: _Problems
                ) -> dict[str, str]:
  """item id -> text (`空` where the row's text is empty)."""
  columns = (f"{domain}_id", "text")
  texts: dict[str, tuple[str, int]] = {}
  for line, row in _rows(path, report):
    fields = _split_row(row, columns, line, report)
    if fields is None:
      continue
    item_id, text = fields
    text = text or MISSING_TEXT
    if item_id not in paired:
      report.add(line, f"{domain} {item_id} is not paired with any product; ignored")
      continue
    if item_id in texts:
      first_text, first_line = texts[item_id]
      if first_text == text:
        report.add(line, f"duplicate row (first at line {first_line}); ignored")
      else:
        report.add(line, f"second text for {domain} {item_id} (first at line "
                   f"{first_line}); kept the first")
      continue
    texts[item_id] = (text, line)
  return {item_id: text for item_id, (text, _) in texts.items()}


class _ImageResolver:
  """Maps an image file name to a path: `root/images/<name>`, else `root/<name>`."""

  def __init__(self, root: str, check_files: bool):
    self._root = root
    self._image_dir = os.path.join(root, IMAGE_SUBDIR)
    self._has_image_dir = os.path.isdir(self._image_dir)
    self._check_files = check_files

  def resolve(self, name: str) -> str | None:
    """The image's path, or None when it exists in neither place."""
    candidates = ([os.path.join(self._image_dir, name)] if self._has_image_dir else [])
    candidates.append(os.path.join(self._root, name))
    if not self._check_files:
      return candidates[0]
    for path in candidates:
      if os.path.exists(path):
        return path
    return None


class _NamesAsWritten:
  """A resolver that keeps each image file name as the txt file writes it."""

  def resolve(self, name: str) -> str:
    return name


def _read_media(path: str, domain: str, paired: dict, resolver: _ImageResolver,
                report: _Problems, sampled_frames: int | None = None
                ) -> tuple[dict[str, list[tuple[int, str, int]]], int]:
  """item id -> [(frame key, image path, line)] (one entry, key 0, for pages), and the
  number of absent clip frames that a sampled download left out on purpose.

  With `sampled_frames` T (the images were fetched by `data_pipelines.download` with
  `--num_frames T`), an absent frame of a clip is a problem only when it is one of the T
  segment-middle frames of the clip's full frame list; the others were never fetched.
  """
  spec = domains.get(domain)
  columns, is_clip = spec.files.media_columns, spec.is_clip
  media: dict[str, list[tuple[int, str, int]]] = {}
  absent: dict[str, list[tuple[int, str, int]]] = {}  # clip frames not on disk
  seen: dict[tuple[str, int], tuple[str, int]] = {}  # (id, key) -> (name, line)
  for line, row in _rows(path, report):
    fields = _split_row(row, columns, line, report)
    if fields is None:
      continue
    item_id, name = fields[0], fields[-1]
    if not name:
      report.add(line, f"empty {columns[-1]}")
      continue
    key = 0
    if is_clip:
      if not (fields[1].isascii() and fields[1].isdigit()):
        report.add(line, f"{columns[1]} {fields[1]!r} is not a non-negative integer")
        continue
      key = int(fields[1])
    if item_id not in paired:
      report.add(line, f"{domain} {item_id} is not paired with any product; ignored")
      continue
    if (item_id, key) in seen:
      first_name, first_line = seen[(item_id, key)]
      if first_name == name:
        report.add(line, f"duplicate row (first at line {first_line}); ignored")
      elif is_clip:
        report.add(line, f"second file for {columns[1]} {key} of {domain} {item_id} "
                   f"(first at line {first_line}); kept the first")
      else:
        report.add(line, f"second image for {domain} {item_id} (first at line "
                   f"{first_line}); kept the first")
      continue
    seen[(item_id, key)] = (name, line)
    image_path = resolver.resolve(name)
    if image_path is None:
      absent.setdefault(item_id, []).append((key, name, line))
      continue
    media.setdefault(item_id, []).append((key, image_path, line))

  skipped = 0
  for item_id, rows in absent.items():
    expected = {key for key, _, _ in rows}  # every absent frame, unless sampled
    if is_clip and sampled_frames:
      keys = sorted([key for key, _, _ in media.get(item_id, ())] + list(expected))
      expected = {keys[i] for i in transforms.sample_frame_indices(len(keys), sampled_frames)}
    for key, name, line in rows:
      if key not in expected:
        skipped += 1
        continue
      report.add(line, f"image file {name} not found (looked in {IMAGE_SUBDIR}/ and "
                 "the dataset root)")
  report.sort()  # absent frames were reported last: back into line order
  return media, skipped


def _load_domain(root: str, split: str, domain: str, resolver: _ImageResolver,
                 problems: list[dict], sampled_frames: int | None) -> tuple[dict, int]:
  """Reads one domain's three files into id -> PageRecord / ClipRecord; also returns
  the number of clip frames a sampled download left out."""
  spec = domains.get(domain)
  kinds = spec.files
  names = {role: file_name(split, getattr(kinds, role)) for role in ("pair", "text", "media")}
  reports = {role: _Problems(problems, name) for role, name in names.items()}
  paths = {role: os.path.join(root, name) for role, name in names.items()}

  paired = _read_pairs(paths["pair"], domain, reports["pair"])
  texts = _read_texts(paths["text"], domain, paired, reports["text"])
  media, skipped = _read_media(paths["media"], domain, paired, resolver, reports["media"],
                               sampled_frames)

  text_kind = spec.text_description
  records = {}
  for item_id, (product_id, pair_line) in paired.items():
    text = texts.get(item_id)
    if text is None:
      reports["pair"].add(pair_line, f"{domain} {item_id} has no {text_kind} row in "
                          f"{names['text']}; using {MISSING_TEXT}")
      text = MISSING_TEXT
    frames = sorted(media.get(item_id, ()))
    if not frames:
      what = "frames" if spec.is_clip else "image"
      reports["pair"].add(pair_line, f"{domain} {item_id} has no usable {what} in "
                          f"{names['media']}; excluded")
      continue
    if not spec.is_clip:
      _, image, image_line = frames[0]
      records[item_id] = PageRecord(item_id, product_id, text, image, image_line)
    else:
      keys, frame_paths, lines = zip(*frames)
      records[item_id] = ClipRecord(item_id, product_id, text, frame_paths, keys, lines)
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
  problems: list[dict] = []
  paired = _read_pairs(path, domain, _Problems(problems, name))
  return {item_id: product_id for item_id, (product_id, _) in paired.items()}, problems


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
  problems: list[dict] = []
  pair_name, media_name = file_name(split, files.pair), file_name(split, files.media)
  paired = _read_pairs(os.path.join(root, pair_name), domain, _Problems(problems, pair_name))
  media, _ = _read_media(os.path.join(root, media_name), domain, paired, _NamesAsWritten(),
                         _Problems(problems, media_name))
  return {item_id: sorted(rows) for item_id, rows in media.items()}, problems


def load_rope(root: str, split: str = "training", check_files: bool = True
              ) -> RopeCatalog:
  """Parses one split of a ROPE directory.

  Args:
    root: directory holding the nine `<split>_*.txt` files and the images (in
      `root/images/` or `root/` itself).
    split: file-name prefix, "training" or "test".
    check_files: check that every named image exists (one or two `stat` calls each).

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
        root, split, domain.name, resolver, problems, sampled_frames)
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
