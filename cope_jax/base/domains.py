"""The domain registry: every media domain COPE embeds, described once, as data.

A product is shown in three domains. Each `Domain` records what the rest of the project
needs to know about one of them, so that modules iterate over `DOMAINS` instead of
branching on names:

  name           this project's name ("page", "video", "live"); `plural` ("pages", ...)
                 names its records (`RopeCatalog.pages`, `num_pages`, ...)
  kind           IMAGE (one image + a title) or CLIP (frames in time order + ASR text)
  release_name   the PyTorch release's name ("item", "photo", "live"): its head
                 (`<release_name>_fusion_model`) and its embedding files (`{rank}_item`)
  release_times  whether the release's embedding lines carry the clip's start and end
                 times before the embedding (live: `id<TAB>start<TAB>end<TAB>v1,...`)
  files          its three ROPE txt files (pair, text, media) and the media file's
                 columns
  text           what its text is ("title" or "asr"); batch keys are
                 `<name>_<text>_ids` / `<name>_<text>_mask`
  text_length_field   the `config.data` field that caps its token count
  head           the model's fusion-head submodule (`<name>_head`)

Retrieval directions are every ordered pair of distinct domains (`DIRECTIONS`).
This module imports nothing from the project: it is the lowest layer.
"""

from __future__ import annotations

import dataclasses
import itertools

IMAGE = "image"  # one image per record (`<name>_image` [B, S, S, 3])
CLIP = "clip"  # frames in time order (`<name>_frames` [B, T, S, S, 3])


@dataclasses.dataclass(frozen=True)
class RopeFiles:
  """A domain's three ROPE txt-file kinds (`<split>_<kind>.txt`) and the media columns."""
  pair: str
  text: str
  media: str
  media_columns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Domain:
  """One media domain (see the module docstring for each field)."""
  name: str
  plural: str
  kind: str
  release_name: str
  files: RopeFiles
  text: str
  text_length_field: str
  release_times: bool = False

  @property
  def head(self) -> str:
    """The model's fusion-head submodule name."""
    return f"{self.name}_head"

  @property
  def release_head(self) -> str:
    """The release's fusion-head module name (`item_fusion_model`, ...)."""
    return f"{self.release_name}_fusion_model"

  @property
  def is_clip(self) -> bool:
    return self.kind == CLIP

  @property
  def media_key(self) -> str:
    """Batch key of the pixels: `page_image` [B, S, S, 3] or `video_frames` [B, T, S, S, 3]."""
    return f"{self.name}_frames" if self.is_clip else f"{self.name}_image"

  @property
  def text_ids_key(self) -> str:
    return f"{self.name}_{self.text}_ids"

  @property
  def text_mask_key(self) -> str:
    return f"{self.name}_{self.text}_mask"

  @property
  def text_description(self) -> str:
    return "title" if self.text == "title" else "ASR text"

  @property
  def embedding_key(self) -> str:
    """The domain's retrieval embedding in the model's output."""
    return f"{self.name}_embedding"

  @property
  def text_embedding_key(self) -> str:
    return f"{self.name}_text_embedding"

  @property
  def visual_embedding_key(self) -> str:
    return f"{self.name}_visual_embedding"

  def fuses_text(self, use_asr_text: bool) -> bool:
    """Whether the retrieval embedding fuses text: pages always (as released); clips
    only with `config.model.use_asr_text` (the release embeds clips from frames only)."""
    return not self.is_clip or use_asr_text


DOMAINS = (
    Domain("page", "pages", IMAGE, "item",
           RopeFiles("product_pages_pair", "page_titles", "page_images",
                     ("page_id", "image file name")),
           text="title", text_length_field="title_max_length"),
    Domain("video", "videos", CLIP, "photo",
           RopeFiles("product_videos_pair", "video_asrs", "video_frames",
                     ("video_id", "frame_number", "image file name")),
           text="asr", text_length_field="asr_max_length"),
    Domain("live", "lives", CLIP, "live",
           RopeFiles("product_lives_pair", "live_asrs", "live_clips",
                     ("live_id", "timestamp_ms", "image file name")),
           text="asr", text_length_field="asr_max_length", release_times=True),
)

NAMES = tuple(domain.name for domain in DOMAINS)
BY_NAME = {domain.name: domain for domain in DOMAINS}
BY_RELEASE_NAME = {domain.release_name: domain for domain in DOMAINS}

# Every ordered pair of distinct domains, each pair followed by its reverse:
# page->video, video->page, page->live, live->page, video->live, live->video.
DIRECTIONS = tuple(
    direction for first, second in itertools.combinations(NAMES, 2)
    for direction in ((first, second), (second, first)))


def get(name: str) -> Domain:
  """The domain called `name`; ValueError listing the known ones otherwise."""
  try:
    return BY_NAME[name]
  except KeyError:
    raise ValueError(f"unknown domain {name!r}; expected one of {', '.join(NAMES)}") from None


def direction_name(query_domain: str, gallery_domain: str) -> str:
  """`page_to_video` for the direction page -> video."""
  return f"{query_domain}_to_{gallery_domain}"


def direction_label(query_domain: str, gallery_domain: str) -> str:
  """`page → video`: the direction page -> video as reports show it."""
  return f"{query_domain} → {gallery_domain}"


DIRECTION_NAMES = tuple(direction_name(*direction) for direction in DIRECTIONS)
