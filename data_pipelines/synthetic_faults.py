"""Damage for the synthetic ROPE data: the ways real dumps are broken, each one listed.

`python -m data_pipelines.synthetic --inject_faults` (and `synthetic.generate(...,
inject_faults=True)`, which the reader's, downloader's and preparation's tests use)
applies every injector of `FAULT_INJECTORS` to each split: malformed, duplicate and
contradictory rows, blank lines, ids without images, missing and truncated JPEGs. Each
damaged line carries its fault (`Line.fault`); `synthetic` writes them to
`OUT/injected_faults.json` as {file, line, kind, detected_by, ...}, where `detected_by`
names the stage that must report it (`load_rope` or `prepare`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cope_jax.base import domains
from data_pipelines import synthetic_world as world

# The ROPE files of each domain (fault injectors name the file they damage).
_PAGE = domains.get("page").files
_VIDEO = domains.get("video").files
_LIVE = domains.get("live").files


@dataclasses.dataclass
class Line:
  """One line of a txt file and, once damaged, the fault it carries."""
  text: str
  fault: dict | None = None


def _insert(lines: list[Line], line: Line, rng: np.random.Generator, after: int = -1) -> None:
  """Inserts `line` at a random position after index `after`."""
  lines.insert(int(rng.integers(after + 1, len(lines) + 1)), line)


def _pick(lines: list[Line], rng: np.random.Generator) -> tuple[int, list[str]]:
  """A random clean line: (index, fields)."""
  while True:
    index = int(rng.integers(len(lines)))
    if lines[index].fault is None:
      return index, [f.strip() for f in lines[index].text.split(",", 2)]


def _fault(kind: str, detected_by: str = "load_rope", **details) -> dict:
  """A fault description, as listed in `injected_faults.json` (plus file and line)."""
  return {"kind": kind, "detected_by": detected_by, **details}


@dataclasses.dataclass
class _Damage:
  """What every fault injector works on: one split's lines and images, and the stream."""
  lines: dict[str, list[Line]]  # txt-file kind -> lines (damaged in place)
  image_dir: str
  rng: np.random.Generator
  used_ids: set[str]
  product_id: str  # a product, a video and a live that the injectors may refer to
  video_id: str
  live_id: str


def _missing_columns(damage: _Damage) -> None:
  """A pair row with one column; a frame row with two."""
  lines, rng = damage.lines, damage.rng
  _insert(lines[_PAGE.pair], Line(damage.product_id, _fault("missing_columns")),
          rng)
  _insert(lines[_VIDEO.media], Line(f"{damage.video_id}, 12", _fault("missing_columns")),
          rng)


def _non_numeric_frame_number(damage: _Damage) -> None:
  """A frame number with a letter O for a zero; a timestamp with an x."""
  lines, rng = damage.lines, damage.rng
  _insert(lines[_VIDEO.media], Line(f"{damage.video_id}, 1O, {world.new_uuid(rng)}.jpg",
                                       _fault("non_numeric_frame_number")), rng)
  _insert(lines[_LIVE.media], Line(f"{damage.live_id}, 16500000x0000, {world.new_uuid(rng)}.jpg",
                                     _fault("non_numeric_frame_number")), rng)


def _blank_line(damage: _Damage) -> None:
  """An empty line and a line of spaces."""
  _insert(damage.lines[_PAGE.text], Line("", _fault("blank_line")), damage.rng)
  _insert(damage.lines[_VIDEO.text], Line("   ", _fault("blank_line")), damage.rng)


def _duplicate_row(damage: _Damage) -> None:
  """Exact duplicates, each placed after the row it repeats."""
  lines, rng = damage.lines, damage.rng
  for kind in (_PAGE.pair, _VIDEO.text, _LIVE.media):
    index, _ = _pick(lines[kind], rng)
    _insert(lines[kind], Line(lines[kind][index].text, _fault("duplicate_row")), rng, index)


def _conflicting_pair(damage: _Damage) -> None:
  """A page paired with a second product (the first pairing wins)."""
  lines, rng = damage.lines, damage.rng
  index, (first_product, page_id) = _pick(lines[_PAGE.pair], rng)
  other_product = next(l.text.split(",")[0] for l in lines[_VIDEO.pair]
                       if l.text.split(",")[0] != first_product)
  _insert(lines[_PAGE.pair], Line(f"{other_product}, {page_id}",
                                             _fault("conflicting_pair", id=page_id)), rng, index)


def _page_without_image(damage: _Damage) -> None:
  """A paired page with a title and no image row."""
  new_page = world.new_id(damage.rng, 14, damage.used_ids)
  _insert(damage.lines[_PAGE.pair],
          Line(f"{damage.product_id}, {new_page}", _fault("page_without_image", id=new_page)),
          damage.rng)
  damage.lines[_PAGE.text].append(Line(f"{new_page}, 无图商品，测试"))


def _video_without_frames(damage: _Damage) -> None:
  """A paired video with ASR text and no frame rows."""
  new_video = world.new_id(damage.rng, 16, damage.used_ids)
  _insert(damage.lines[_VIDEO.pair],
          Line(f"{damage.product_id}, {new_video}",
                _fault("video_without_frames", id=new_video)), damage.rng)
  damage.lines[_VIDEO.text].append(Line(f"{new_video}, 没有画面的视频"))


def _unpaired_id(damage: _Damage) -> None:
  """A title and a live frame about ids that no pair file names."""
  lines, rng, used_ids = damage.lines, damage.rng, damage.used_ids
  _insert(lines[_PAGE.text], Line(f"{world.new_id(rng, 14, used_ids)}, 无主商品",
                                      _fault("unpaired_id")), rng)
  _insert(lines[_LIVE.media], Line(f"{world.new_id(rng, 16, used_ids)}, 1650000000000, "
                                     f"{world.new_uuid(rng)}.jpg", _fault("unpaired_id")), rng)


def _missing_image_file(damage: _Damage) -> None:
  """A page image and a video frame deleted (the reader finds them missing)."""
  for kind in (_PAGE.media, _VIDEO.media):
    index, fields = _pick(damage.lines[kind], damage.rng)
    os.remove(os.path.join(damage.image_dir, fields[-1]))
    damage.lines[kind][index].fault = _fault("missing_image_file", id=fields[0],
                                             image=fields[-1])


def _truncated_jpeg(damage: _Damage) -> None:
  """A page image and a video frame cut to half their bytes (decoding fails)."""
  for kind in (_PAGE.media, _VIDEO.media):
    index, fields = _pick(damage.lines[kind], damage.rng)
    path = os.path.join(damage.image_dir, fields[-1])
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    damage.lines[kind][index].fault = _fault("truncated_jpeg", detected_by="prepare",
                                             id=fields[0], image=fields[-1])


def _missing_text(damage: _Damage) -> None:
  """A usable page (a copy of another page's image) whose title row is missing: kept
  with the text 空."""
  lines, rng = damage.lines, damage.rng
  _, (_, template_image) = _pick(lines[_PAGE.media], rng)
  with open(os.path.join(damage.image_dir, template_image), "rb") as f:
    copy_name = world.new_uuid(rng) + ".jpg"
    with open(os.path.join(damage.image_dir, copy_name), "wb") as g:
      g.write(f.read())
  untitled_page = world.new_id(rng, 14, damage.used_ids)
  _insert(lines[_PAGE.pair], Line(f"{damage.product_id}, {untitled_page}",
                                             _fault("missing_text", id=untitled_page)), rng)
  lines[_PAGE.media].append(Line(f"{untitled_page}, {copy_name}"))


# Every kind of damage, applied in this order (the order fixes the random stream, so the
# same seed gives the same faults). Adding a kind: one function, one entry.
FAULT_INJECTORS = (
    _missing_columns, _non_numeric_frame_number, _blank_line, _duplicate_row,
    _conflicting_pair, _page_without_image, _video_without_frames, _unpaired_id,
    _missing_image_file, _truncated_jpeg, _missing_text,
)


def inject_faults(lines: dict[str, list[Line]], image_dir: str, rng: np.random.Generator,
                  used_ids: set[str]) -> None:
  """Damages one split in place (`lines`: txt-file kind -> its lines, the images in
  `image_dir`); each damaged line carries its fault description."""
  product_id = _pick(lines[_PAGE.pair], rng)[1][0]
  _, (video_id, _, _) = _pick(lines[_VIDEO.media], rng)
  _, (live_id, _, _) = _pick(lines[_LIVE.media], rng)
  damage = _Damage(lines, image_dir, rng, used_ids, product_id, video_id, live_id)
  for inject in FAULT_INJECTORS:
    inject(damage)
