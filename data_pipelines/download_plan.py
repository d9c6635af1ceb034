"""What `data_pipelines.download` fetches: one request per image a split names.

The image rows are read with the reader's own rules (`rope_format.media_names`), so a row
the reader would not use is not fetched. Of a clip, only the segment-middle frames of
`num_frames` segments unless `all_frames` (`transforms.sample_frame_indices`). Names that
are not plain file names are planned (and reported by the download), never fetched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse

from cope_jax.base import domains
from data_pipelines import rope_format
from data_pipelines import transforms

_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")

@dataclasses.dataclass(frozen=True)
class ImageRequest:
  """One image to fetch and the txt row that names it."""
  file: str  # txt file name, e.g. training_video_frames.txt
  line: int  # 1-based line in it
  id: str  # page / video / live id
  name: str  # image file name as written


def name_problem(name: str) -> str | None:
  """Why `name` is not a plain file name that can be written in OUT; None if it is."""
  if not name:
    return "empty"
  if name.startswith("."):
    return "starts with '.' (hidden, '.' or '..')"
  if "/" in name or "\\" in name:
    return "contains a path separator"
  if ":" in name:
    return "contains ':' (a URL scheme or a drive)"
  if _CONTROL_CHARACTER.search(name):
    return "contains a control character"
  if len(name.encode("utf-8")) > 255:
    return "longer than 255 bytes"
  return None


def image_url(url_prefix: str, name: str) -> str:
  """The URL of image `name`: the prefix, a `/` if needed, the URL-quoted name."""
  if not url_prefix.endswith("/") and "?" not in url_prefix:
    url_prefix += "/"
  return url_prefix + urllib.parse.quote(name, safe="")


@dataclasses.dataclass
class PlanCounts:
  """What planning found, for one (split, domain) or added up."""
  requests: int = 0  # distinct names, invalid ones included
  invalid_names: int = 0
  duplicate_names: int = 0  # rows naming a file already requested for the same domain
  frames_skipped_by_sampling: int = 0
  catalog_problems: int = 0

  def add(self, other: PlanCounts) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def domain_requests(rope_dir: str, split: str, domain: domains.Domain, num_frames: int,
                    all_frames: bool) -> tuple[list[ImageRequest], PlanCounts]:
  """The images one domain of one split needs, in media-file order, and the counts."""
  names, problems = rope_format.media_names(rope_dir, split, domain.name)
  media_file = rope_format.file_name(split, domain.files.media)
  counts = PlanCounts(catalog_problems=len(problems))
  requests: list[ImageRequest] = []
  seen: set[str] = set()
  for item_id, rows in names.items():
    if domain.is_clip and not all_frames:
      kept = sorted(set(transforms.sample_frame_indices(len(rows), num_frames)))
      counts.frames_skipped_by_sampling += len(rows) - len(kept)
      rows = [rows[index] for index in kept]
    for _, name, line in rows:
      if name in seen:
        counts.duplicate_names += 1
        continue
      seen.add(name)
      requests.append(ImageRequest(media_file, line, item_id, name))
      counts.invalid_names += name_problem(name) is not None
  counts.requests = len(requests)
  return requests, counts


def resolve_splits(rope_dir: str, split: str) -> list[str]:
  """`split` as a list ("all": every split present); checks that the files exist."""
  if split == "all":
    splits = [s for s in rope_format.SPLITS if rope_format.has_split(rope_dir, s)]
    if not splits:
      raise FileNotFoundError(f"ROPE directory {rope_dir!r} holds no split "
                              f"({' or '.join(rope_format.SPLITS)}): no "
                              f"{rope_format.file_name('training', domains.DOMAINS[0].files.pair)}")
  else:
    splits = [split]
  for name in splits:
    needed = [rope_format.file_name(name, getattr(d.files, role))
              for d in domains.DOMAINS for role in ("pair", "media")]
    missing = [f for f in needed if not os.path.isfile(os.path.join(rope_dir, f))]
    if missing:
      raise FileNotFoundError(f"ROPE directory {rope_dir!r} lacks {name!r} file(s) needed "
                              f"to know the images: {', '.join(missing)}")
  return splits
