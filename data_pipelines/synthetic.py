"""A synthetic dataset in exactly ROPE's format, small enough for a CPU demo.

  python -m data_pipelines.synthetic --out demo_run/rope --seed 0

writes `OUT/training_*.txt` and `OUT/test_*.txt` (the nine ROPE files per split, see
`data_pipelines/rope_format.py`), the JPEG files they name in `OUT/images/` (the txt
files name only `<uuid>.jpg`), and `OUT/vocab.txt`, a BERT WordPiece vocabulary covering
every text. The output depends only on the arguments: the same seed gives the same bytes.

  python -m data_pipelines.synthetic --out demo_run/rope --url_form demo_run/served

writes the URL form, as ROPE is released: the same txt files in OUT, nothing in
OUT/images, and the JPEG files in IMAGES_DIR, for a local HTTP server to serve
(`python -m http.server --bind 127.0.0.1 --directory demo_run/served 8000`) and
`data_pipelines.download` to fetch.

The data is learnable but hard in the ways ROPE is:
  * every product has a visual identity (the category's shape, a colour, a pattern and a
    glyph letter) and a Chinese title naming those attributes;
  * products come in families of the same category and glyph that differ in one
    attribute (colour or pattern): hard negatives;
  * product pages show the product cleanly on a plain background; short videos show it
    at varying scale, position and rotation over clutter, some frames without it; live
    clips are blurred, heavily compressed, partly hidden by a presenter and carry an
    overlay banner;
  * ASR text is noisy: filler words and a few attributes, ASCII and full-width commas;
  * some products lack a domain and some texts are missing (written `空`).

`--inject_faults` then damages the data the ways real dumps are damaged (malformed,
duplicate and contradictory rows, blank lines, ids without images, missing and truncated
JPEGs) and lists every fault in `OUT/injected_faults.json` as {file, line, kind, ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import string
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_pipelines import domains
from data_pipelines import rope_format

# --- the product world -------------------------------------------------------------

CATEGORIES = ("水杯", "背包", "台灯", "手表", "帽子", "抱枕", "花瓶", "音箱", "雨伞", "鞋子")
COLOURS = {
    "红色": (214, 32, 40), "蓝色": (32, 72, 214), "绿色": (34, 156, 60),
    "黄色": (240, 206, 30), "紫色": (136, 52, 178), "橙色": (246, 128, 22),
    "黑色": (28, 28, 30), "白色": (244, 244, 240), "粉色": (246, 150, 190),
    "灰色": (128, 128, 132), "棕色": (128, 80, 40), "青色": (30, 186, 186),
}
PATTERNS = ("纯色", "条纹", "波点", "格子")
GLYPHS = string.ascii_uppercase

TITLE_WORDS = ("新款", "正品", "包邮", "时尚", "简约", "大容量", "耐用", "轻便", "家用",
               "ins风", "2024新款", "官方旗舰店", "限时特价", "加厚", "XL", "送礼")
ASR_FILLERS = ("家人们", "宝宝们", "来来来", "看一下", "这个", "真的", "非常好用",
               "点个关注", "今天给大家推荐", "价格很实惠", "质量没问题", "OK", "对吧",
               "我跟你们说", "喜欢的赶紧", "99元", "get", "走一波", "嗯", "然后呢")
LIVE_FILLERS = ("直播间的朋友们", "上车上车", "1号链接", "秒杀", "库存不多了", "link在下面",
                "主播亲测", "拍一发一", "扣1", "马上开价")

MISSING_TEXT = rope_format.MISSING_TEXT
# The ROPE files of each domain (fault injectors name the file they damage).
_PAGE = domains.get("page").files
_VIDEO = domains.get("video").files
_LIVE = domains.get("live").files
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class Product:
  product_id: str
  category: int
  colour: str
  pattern: str
  glyph: str


def _new_uuid(rng: np.random.Generator) -> str:
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _new_id(rng: np.random.Generator, digits: int, used: set[str]) -> str:
  while True:
    value = str(rng.integers(10 ** (digits - 1), 10 ** digits))
    if value not in used:
      used.add(value)
      return value


def plan_products(rng: np.random.Generator, count: int, used_ids: set[str],
                  used_looks: set[tuple]) -> list[Product]:
  """`count` products in families that share category and glyph, differing in one attribute."""
  products: list[Product] = []
  colours = list(COLOURS)
  while len(products) < count:
    category = int(rng.integers(len(CATEGORIES)))
    glyph = GLYPHS[rng.integers(len(GLYPHS))]
    colour = colours[rng.integers(len(colours))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    family_size = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    for member in range(family_size):
      if member > 0:  # a hard negative of the family's first member
        if rng.random() < 0.5:
          colour = colours[rng.integers(len(colours))]
        else:
          pattern = PATTERNS[rng.integers(len(PATTERNS))]
      look = (category, colour, pattern, glyph)
      if look in used_looks or len(products) == count:
        continue
      used_looks.add(look)
      products.append(Product(_new_id(rng, 12, used_ids), category, colour, pattern, glyph))
  return products


# --- pictures ----------------------------------------------------------------------

def _shape_mask(category: int, size: int) -> Image.Image:
  """The silhouette of a category, white on black, [size, size]."""
  mask = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(mask)
  s = size - 1
  m = size * 0.08
  shape = CATEGORIES[category]
  if shape == "水杯":
    draw.polygon([(m, m), (s * 0.72, m), (s * 0.64, s - m), (m * 2, s - m)], fill=255)
    draw.ellipse([s * 0.6, s * 0.3, s - m, s * 0.7], outline=255, width=max(2, size // 12))
  elif shape == "背包":
    draw.rounded_rectangle([m, s * 0.25, s - m, s - m], radius=size // 6, fill=255)
    draw.arc([s * 0.3, m, s * 0.7, s * 0.45], 180, 360, fill=255, width=max(2, size // 12))
  elif shape == "台灯":
    draw.polygon([(s * 0.3, m), (s * 0.7, m), (s - m, s * 0.5), (m, s * 0.5)], fill=255)
    draw.rectangle([s * 0.45, s * 0.5, s * 0.55, s * 0.85], fill=255)
    draw.rectangle([s * 0.2, s * 0.85, s * 0.8, s - m], fill=255)
  elif shape == "手表":
    draw.rectangle([s * 0.35, m, s * 0.65, s - m], fill=255)
    draw.ellipse([s * 0.15, s * 0.2, s * 0.85, s * 0.8], fill=255)
  elif shape == "帽子":
    draw.pieslice([s * 0.15, s * 0.2, s * 0.85, s * 0.9], 180, 360, fill=255)
    draw.rectangle([m, s * 0.55, s - m, s * 0.72], fill=255)
  elif shape == "抱枕":
    draw.polygon([(s / 2, m), (s - m, s / 2), (s / 2, s - m), (m, s / 2)], fill=255)
  elif shape == "花瓶":
    draw.ellipse([s * 0.15, s * 0.3, s * 0.85, s - m], fill=255)
    draw.rectangle([s * 0.38, m, s * 0.62, s * 0.4], fill=255)
  elif shape == "音箱":
    draw.rectangle([s * 0.2, m, s * 0.8, s - m], fill=255)
  elif shape == "雨伞":
    draw.chord([m, m, s - m, s * 0.9], 180, 360, fill=255)
    draw.rectangle([s * 0.47, s * 0.45, s * 0.53, s - m], fill=255)
    draw.rectangle([s * 0.35, s * 0.9, s * 0.53, s - m], fill=255)
  else:  # 鞋子
    draw.polygon([(m, s * 0.3), (s * 0.4, s * 0.3), (s * 0.5, s * 0.55), (s - m, s * 0.65),
                  (s - m, s * 0.85), (m, s * 0.85)], fill=255)
  return mask


def _pattern_texture(colour: tuple, pattern: str, size: int) -> np.ndarray:
  """[size, size, 3] uint8 fill: the colour, with a darker/lighter second tone."""
  main = np.array(colour, np.float32)
  second = main * 0.4 if main.mean() > 90 else main * 0.4 + 150
  y, x = np.mgrid[0:size, 0:size]
  period = max(4, size // 5)
  if pattern == "条纹":
    second_tone = ((x + y) // (period // 2)) % 2 == 1
  elif pattern == "波点":
    half = period / 2
    second_tone = ((x % period - half) ** 2 + (y % period - half) ** 2) < (period * 0.3) ** 2
  elif pattern == "格子":
    second_tone = ((x // (period // 2)) + (y // (period // 2))) % 2 == 1
  else:
    second_tone = np.zeros((size, size), bool)
  texture = np.where(second_tone[..., None], second, main)
  return texture.clip(0, 255).astype(np.uint8)


def render_product(product: Product, size: int) -> Image.Image:
  """The product as an RGBA sprite [size, size] (alpha: its silhouette)."""
  texture = _pattern_texture(COLOURS[product.colour], product.pattern, size)
  sprite = Image.fromarray(texture, "RGB").convert("RGBA")
  sprite.putalpha(_shape_mask(product.category, size))
  draw = ImageDraw.Draw(sprite)
  luminance = np.dot(COLOURS[product.colour], (0.3, 0.59, 0.11))
  ink = (20, 20, 20, 255) if luminance > 140 else (250, 250, 250, 255)
  font = ImageFont.load_default(size=max(8, int(size * 0.4)))
  draw.text((size / 2, size / 2), product.glyph, fill=ink, font=font, anchor="mm")
  return sprite


def _place(canvas: Image.Image, sprite: Image.Image, centre: tuple[float, float],
           scale: float, angle: float) -> None:
  """Pastes `sprite` resized to `scale`·canvas side and rotated by `angle` degrees."""
  side = max(4, int(canvas.width * scale))
  placed = sprite.resize((side, side), Image.Resampling.BILINEAR)
  if angle:
    placed = placed.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
  left = int(centre[0] - placed.width / 2)
  top = int(centre[1] - placed.height / 2)
  canvas.paste(placed, (left, top), placed)


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple:
  return tuple(int(c) for c in rng.integers(low, high, 3))


def _jpeg(image: Image.Image, quality: int) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def render_page(sprite: Image.Image, rng: np.random.Generator, size: int) -> bytes:
  """A clean product shot on a plain light background (JPEG)."""
  canvas = Image.new("RGB", (size, size), _random_colour(rng, 215, 256))
  jitter = rng.uniform(-0.05, 0.05, 2) * size
  _place(canvas, sprite, (size / 2 + jitter[0], size / 2 + jitter[1]),
         rng.uniform(0.7, 0.9), float(rng.choice([0.0, rng.uniform(-8, 8)])))
  return _jpeg(canvas, 90)


def _clutter(rng: np.random.Generator, side: int) -> Image.Image:
  background = Image.new("RGB", (side, side), _random_colour(rng, 60, 230))
  draw = ImageDraw.Draw(background)
  for _ in range(int(rng.integers(8, 16))):
    x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
    w, h = rng.uniform(0.1, 0.5, 2) * side
    box = [x0, y0, x0 + w, y0 + h]
    if rng.random() < 0.5:
      draw.rectangle(box, fill=_random_colour(rng))
    else:
      draw.ellipse(box, fill=_random_colour(rng))
  return background


def render_video(sprite: Image.Image, rng: np.random.Generator, size: int,
                 num_frames: int) -> list[bytes]:
  """A short video: the product moving over clutter; some frames without it."""
  margin = size // 4
  background = _clutter(rng, size + 2 * margin)
  pan = rng.uniform(-1, 1, 2) * margin / max(1, num_frames)
  start = rng.uniform(0.3, 0.7, 2) * size
  velocity = rng.uniform(-0.04, 0.04, 2) * size
  scale, angle = rng.uniform(0.35, 0.75), rng.uniform(-40, 40)
  frames = []
  for t in range(num_frames):
    offset = (margin + pan * t).astype(int)
    canvas = background.crop((offset[0], offset[1], offset[0] + size, offset[1] + size))
    if rng.random() >= 0.12:
      _place(canvas, sprite, tuple(start + velocity * t),
             scale * rng.uniform(0.9, 1.1), angle + rng.uniform(-10, 10))
    frames.append(_jpeg(canvas, 75))
  return frames


def render_live(sprite: Image.Image, rng: np.random.Generator, size: int,
                num_frames: int) -> list[bytes]:
  """A live clip: presenter occluding the product, banner, blur, strong compression."""
  wall = _random_colour(rng, 90, 200)
  banner_colour = _random_colour(rng, 150, 256)
  banner_top = bool(rng.random() < 0.5)
  skin = _random_colour(rng, 120, 230)
  product_centre = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65)]) * size
  presenter_x = product_centre[0] + rng.choice([-1, 1]) * size * rng.uniform(0.25, 0.4)
  scale = rng.uniform(0.35, 0.6)
  quality = int(rng.integers(20, 45))
  frames = []
  for _ in range(num_frames):
    canvas = Image.new("RGB", (size, size), wall)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, size * 0.75, size, size], fill=tuple(c // 2 for c in wall))
    centre = product_centre + rng.uniform(-0.03, 0.03, 2) * size
    _place(canvas, sprite, tuple(centre), scale, rng.uniform(-15, 15))
    x = presenter_x + rng.uniform(-0.03, 0.03) * size
    draw.ellipse([x - size * 0.12, size * 0.1, x + size * 0.12, size * 0.38], fill=skin)
    draw.rounded_rectangle([x - size * 0.22, size * 0.36, x + size * 0.22, size * 1.1],
                           radius=size // 8, fill=tuple(c // 3 for c in skin))
    top = 0 if banner_top else size * 0.84
    draw.rectangle([0, top, size, top + size * 0.16], fill=banner_colour)
    for k in range(4):
      left = size * (0.05 + 0.24 * k)
      draw.rectangle([left, top + size * 0.05, left + size * 0.15, top + size * 0.1],
                     fill=(255, 255, 255))
    small = canvas.resize((size // 2, size // 2), Image.Resampling.BILINEAR)
    canvas = small.resize((size, size), Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.7))
    frames.append(_jpeg(canvas, quality))
  return frames


# --- texts -------------------------------------------------------------------------

def _join(rng: np.random.Generator, parts: list[str]) -> str:
  """Joins with a mix of separators, commas (ASCII and full-width) among them."""
  separators = ("", " ", "，", ", ", ",", " ")
  text = parts[0]
  for part in parts[1:]:
    text += separators[rng.integers(len(separators))] + part
  return text.strip()


def make_title(product: Product, rng: np.random.Generator) -> str:
  """A seller's title naming the product's attributes, with selling words."""
  attributes = [product.colour + product.pattern + CATEGORIES[product.category],
                product.glyph + "款"]
  words = [TITLE_WORDS[i] for i in rng.choice(len(TITLE_WORDS), int(rng.integers(1, 4)),
                                               replace=False)]
  parts = words[:1] + attributes + words[1:]
  if rng.random() < 0.3:
    parts[0] = f"【{parts[0]}】"
  return _join(rng, parts)


def make_asr(product: Product, rng: np.random.Generator, live: bool) -> str:
  """Noisy speech: fillers and one to three of the product's attributes."""
  attributes = [f"这个{product.colour}的", f"{product.pattern}款", CATEGORIES[product.category],
                f"{product.glyph}款的"]
  mentioned = [attributes[i] for i in sorted(rng.choice(4, int(rng.integers(1, 4)),
                                                        replace=False))]
  fillers = ASR_FILLERS + LIVE_FILLERS if live else ASR_FILLERS
  chosen = [fillers[i] for i in rng.choice(len(fillers), int(rng.integers(2, 6)))]
  parts = chosen[:1] + mentioned + chosen[1:]
  return _join(rng, parts)


def _maybe_missing(text: str, rng: np.random.Generator, probability: float) -> str:
  return MISSING_TEXT if rng.random() < probability else text


# --- writing a split ---------------------------------------------------------------

@dataclasses.dataclass
class _Line:
  text: str
  fault: dict | None = None


class _SplitFiles:
  """The nine files of one split as lists of lines, written out at the end."""

  def __init__(self, split: str):
    self.split = split
    self.lines: dict[str, list[_Line]] = {
        getattr(domain.files, role): [] for domain in domains.DOMAINS
        for role in ("pair", "text", "media")}

  def add(self, kind: str, *fields) -> None:
    self.lines[kind].append(_Line(", ".join(str(f) for f in fields)))

  def write(self, out_dir: str) -> list[dict]:
    """Writes the files; returns the injected faults with their final line numbers."""
    faults = []
    for kind, lines in self.lines.items():
      name = rope_format.file_name(self.split, kind)
      with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(lines, start=1):
          f.write(line.text + "\n")
          if line.fault is not None:
            faults.append({"file": name, "line": number, **line.fault})
    return faults


def _domain_count(rng: np.random.Generator, missing_probability: float) -> int:
  if rng.random() < missing_probability:
    return 0
  return int(min(7, 1 + rng.poisson(2.7)))


def _video_frame_numbers(rng: np.random.Generator, count: int) -> np.ndarray:
  """Frame numbers that cross digit-count boundaries (9 -> 10 ...)."""
  return int(rng.integers(0, 10)) + int(rng.integers(3, 30)) * np.arange(count)


def _live_timestamps(rng: np.random.Generator, count: int) -> np.ndarray:
  """13-digit epoch milliseconds, a second or so apart."""
  start = 1_650_000_000_000 + int(rng.integers(0, 10 ** 10))
  return start + np.cumsum(rng.integers(800, 5000, count))


# How each clip domain looks: (frame renderer, frame keys, ASR spoken by a live host).
_CLIP_STYLES = {"video": (render_video, _video_frame_numbers, False),
                "live": (render_live, _live_timestamps, True)}


def _write_split(split: str, products: list[Product], image_dir: str,
                 rng: np.random.Generator, used_ids: set[str], frames_per_clip: int,
                 image_size: int) -> _SplitFiles:
  files = _SplitFiles(split)
  clip_domains = [domain for domain in domains.DOMAINS if domain.is_clip]
  frame_rows = {domain.files.media: [] for domain in clip_domains}

  def save(jpeg: bytes) -> str:
    name = _new_uuid(rng) + ".jpg"
    with open(os.path.join(image_dir, name), "wb") as f:
      f.write(jpeg)
    return name

  for product in products:
    sprite = render_product(product, image_size)
    for _ in range(_domain_count(rng, 0.04)):
      page_id = _new_id(rng, 14, used_ids)
      files.add(_PAGE.pair, product.product_id, page_id)
      files.add(_PAGE.text, page_id, _maybe_missing(make_title(product, rng), rng, 0.03))
      files.add(_PAGE.media, page_id, save(render_page(sprite, rng, image_size)))
    for domain in clip_domains:
      render, frame_keys, live = _CLIP_STYLES[domain.name]
      for _ in range(_domain_count(rng, 0.08)):
        clip_id = _new_id(rng, 16, used_ids)
        files.add(domain.files.pair, product.product_id, clip_id)
        asr = make_asr(product, rng, live=live)
        files.add(domain.files.text, clip_id, _maybe_missing(asr, rng, 0.1))
        keys = frame_keys(rng, frames_per_clip)
        for key, jpeg in zip(keys, render(sprite, rng, image_size, frames_per_clip)):
          frame_rows[domain.files.media].append(f"{clip_id}, {int(key)}, {save(jpeg)}")
  for kind, rows in frame_rows.items():  # ROPE's frame files are not in time order
    for i in rng.permutation(len(rows)):
      files.lines[kind].append(_Line(rows[i]))
  return files


# --- faults ------------------------------------------------------------------------

def _insert(lines: list[_Line], line: _Line, rng: np.random.Generator, after: int = -1) -> None:
  """Inserts `line` at a random position after index `after`."""
  lines.insert(int(rng.integers(after + 1, len(lines) + 1)), line)


def _pick(lines: list[_Line], rng: np.random.Generator) -> tuple[int, list[str]]:
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
  lines: dict[str, list[_Line]]  # txt-file kind -> lines (damaged in place)
  image_dir: str
  rng: np.random.Generator
  used_ids: set[str]
  product_id: str  # a product, a video and a live that the injectors may refer to
  video_id: str
  live_id: str


def _missing_columns(damage: _Damage) -> None:
  """A pair row with one column; a frame row with two."""
  lines, rng = damage.lines, damage.rng
  _insert(lines[_PAGE.pair], _Line(damage.product_id, _fault("missing_columns")),
          rng)
  _insert(lines[_VIDEO.media], _Line(f"{damage.video_id}, 12", _fault("missing_columns")),
          rng)


def _non_numeric_frame_number(damage: _Damage) -> None:
  """A frame number with a letter O for a zero; a timestamp with an x."""
  lines, rng = damage.lines, damage.rng
  _insert(lines[_VIDEO.media], _Line(f"{damage.video_id}, 1O, {_new_uuid(rng)}.jpg",
                                       _fault("non_numeric_frame_number")), rng)
  _insert(lines[_LIVE.media], _Line(f"{damage.live_id}, 16500000x0000, {_new_uuid(rng)}.jpg",
                                     _fault("non_numeric_frame_number")), rng)


def _blank_line(damage: _Damage) -> None:
  """An empty line and a line of spaces."""
  _insert(damage.lines[_PAGE.text], _Line("", _fault("blank_line")), damage.rng)
  _insert(damage.lines[_VIDEO.text], _Line("   ", _fault("blank_line")), damage.rng)


def _duplicate_row(damage: _Damage) -> None:
  """Exact duplicates, each placed after the row it repeats."""
  lines, rng = damage.lines, damage.rng
  for kind in (_PAGE.pair, _VIDEO.text, _LIVE.media):
    index, _ = _pick(lines[kind], rng)
    _insert(lines[kind], _Line(lines[kind][index].text, _fault("duplicate_row")), rng, index)


def _conflicting_pair(damage: _Damage) -> None:
  """A page paired with a second product (the first pairing wins)."""
  lines, rng = damage.lines, damage.rng
  index, (first_product, page_id) = _pick(lines[_PAGE.pair], rng)
  other_product = next(l.text.split(",")[0] for l in lines[_VIDEO.pair]
                       if l.text.split(",")[0] != first_product)
  _insert(lines[_PAGE.pair], _Line(f"{other_product}, {page_id}",
                                             _fault("conflicting_pair", id=page_id)), rng, index)


def _page_without_image(damage: _Damage) -> None:
  """A paired page with a title and no image row."""
  new_page = _new_id(damage.rng, 14, damage.used_ids)
  _insert(damage.lines[_PAGE.pair],
          _Line(f"{damage.product_id}, {new_page}", _fault("page_without_image", id=new_page)),
          damage.rng)
  damage.lines[_PAGE.text].append(_Line(f"{new_page}, 无图商品，测试"))


def _video_without_frames(damage: _Damage) -> None:
  """A paired video with ASR text and no frame rows."""
  new_video = _new_id(damage.rng, 16, damage.used_ids)
  _insert(damage.lines[_VIDEO.pair],
          _Line(f"{damage.product_id}, {new_video}",
                _fault("video_without_frames", id=new_video)), damage.rng)
  damage.lines[_VIDEO.text].append(_Line(f"{new_video}, 没有画面的视频"))


def _unpaired_id(damage: _Damage) -> None:
  """A title and a live frame about ids that no pair file names."""
  lines, rng, used_ids = damage.lines, damage.rng, damage.used_ids
  _insert(lines[_PAGE.text], _Line(f"{_new_id(rng, 14, used_ids)}, 无主商品",
                                      _fault("unpaired_id")), rng)
  _insert(lines[_LIVE.media], _Line(f"{_new_id(rng, 16, used_ids)}, 1650000000000, "
                                     f"{_new_uuid(rng)}.jpg", _fault("unpaired_id")), rng)


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
    copy_name = _new_uuid(rng) + ".jpg"
    with open(os.path.join(damage.image_dir, copy_name), "wb") as g:
      g.write(f.read())
  untitled_page = _new_id(rng, 14, damage.used_ids)
  _insert(lines[_PAGE.pair], _Line(f"{damage.product_id}, {untitled_page}",
                                             _fault("missing_text", id=untitled_page)), rng)
  lines[_PAGE.media].append(_Line(f"{untitled_page}, {copy_name}"))


# Every kind of damage, applied in this order (the order fixes the random stream, so the
# same seed gives the same faults). Adding a kind: one function, one entry.
FAULT_INJECTORS = (
    _missing_columns, _non_numeric_frame_number, _blank_line, _duplicate_row,
    _conflicting_pair, _page_without_image, _video_without_frames, _unpaired_id,
    _missing_image_file, _truncated_jpeg, _missing_text,
)


def _inject_faults(files: _SplitFiles, image_dir: str, rng: np.random.Generator,
                   used_ids: set[str]) -> None:
  """Damages one split in place; each damaged line carries its fault description."""
  lines = files.lines
  product_id = _pick(lines[_PAGE.pair], rng)[1][0]
  _, (video_id, _, _) = _pick(lines[_VIDEO.media], rng)
  _, (live_id, _, _) = _pick(lines[_LIVE.media], rng)
  damage = _Damage(lines, image_dir, rng, used_ids, product_id, video_id, live_id)
  for inject in FAULT_INJECTORS:
    inject(damage)


# --- vocabulary --------------------------------------------------------------------

def make_vocab(texts: list[str]) -> list[str]:
  """A WordPiece vocabulary covering `texts`: specials, every character, ASCII words.

  Chinese is tokenised per character; ASCII words come whole (as written and
  lower-cased), and single letters/digits plus their `##` forms cover any other word.
  """
  tokens = set(string.ascii_letters + string.digits)
  tokens |= {"##" + c for c in string.ascii_letters + string.digits}
  for text in texts:
    tokens |= {c for c in text  # Chinese characters and punctuation, one token each
               if not c.isspace() and not (c.isascii() and c.isalnum())}
    for word in re.findall(r"[A-Za-z0-9]+", text):
      tokens |= {word, word.lower()}
  return list(SPECIAL_TOKENS) + sorted(tokens - set(SPECIAL_TOKENS))


# --- entry point -------------------------------------------------------------------

def generate(out_dir: str, *, products: int = 240, test_products: int = 60,
             frames_per_clip: int = 8, image_size: int = 64, seed: int = 0,
             inject_faults: bool = False, url_form_images: str | None = None) -> dict:
  """Writes a synthetic ROPE directory to `out_dir`; returns a summary dict.

  Args:
    out_dir: output directory (created). Files of an earlier run are overwritten, but
      images it named and this run does not are left in place: use a fresh directory.
    products, test_products: number of products in the training / test split.
    frames_per_clip: frames of every short video and live clip.
    image_size: side of the square JPEGs, in pixels.
    seed: everything (ids, file names, pictures, texts) follows from it.
    inject_faults: damage the data and write `injected_faults.json`.
    url_form_images: None: the images go to `out_dir/images/`. A directory: the URL
      form, as ROPE is released: `out_dir` gets the txt files only, and the images go
      to this directory (serve it over HTTP and fetch them with
      `data_pipelines.download`). Same seed, same bytes either way.
  """
  if products < 2 or test_products < 2 or frames_per_clip < 2 or image_size < 16:
    raise ValueError("need products >= 2, test_products >= 2, frames_per_clip >= 2 and "
                     f"image_size >= 16; got {products}, {test_products}, "
                     f"{frames_per_clip}, {image_size}")
  image_dir = url_form_images or os.path.join(out_dir, rope_format.IMAGE_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  os.makedirs(image_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  used_ids: set[str] = set()
  used_looks: set[tuple] = set()
  summary = {"seed": seed, "splits": {}}
  texts: list[str] = []
  faults: list[dict] = []
  for split_index, (split, count) in enumerate((("training", products),
                                                ("test", test_products))):
    split_products = plan_products(rng, count, used_ids, used_looks)
    files = _write_split(split, split_products, image_dir, rng, used_ids, frames_per_clip,
                         image_size)
    summary["splits"][split] = {
        "products": count,
        **{domain.plural: len(files.lines[domain.files.pair]) for domain in domains.DOMAINS}}
    if inject_faults:  # a separate stream, so the clean content matches a clean run
      _inject_faults(files, image_dir, np.random.default_rng([seed, split_index]), used_ids)
    faults += files.write(out_dir)
    for kind in (_PAGE.text, _VIDEO.text, _LIVE.text):
      texts += [line.text.split(",", 1)[-1] for line in files.lines[kind]]
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
    f.write("\n".join(make_vocab(texts)) + "\n")
  fault_path = os.path.join(out_dir, "injected_faults.json")
  if inject_faults:
    with open(fault_path, "w", encoding="utf-8") as f:
      json.dump({"faults": faults}, f, ensure_ascii=False, indent=1)
  elif os.path.exists(fault_path):
    os.remove(fault_path)
  summary["faults"] = len(faults)
  return summary


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--products", type=int, default=240, help="training products")
  parser.add_argument("--test_products", type=int, default=60, help="test products")
  parser.add_argument("--frames_per_clip", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=64, help="JPEG side in pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--inject_faults", action="store_true",
                      help="damage the data; list the faults in OUT/injected_faults.json")
  parser.add_argument("--url_form", metavar="IMAGES_DIR", default=None,
                      help="write the URL form: the txt files in OUT, the images in "
                      "IMAGES_DIR (to serve over HTTP), nothing in OUT/images")
  args = parser.parse_args(argv)
  summary = generate(args.out, products=args.products, test_products=args.test_products,
                     frames_per_clip=args.frames_per_clip, image_size=args.image_size,
                     seed=args.seed, inject_faults=args.inject_faults,
                     url_form_images=args.url_form)
  for split, counts in summary["splits"].items():
    print(f"{split}: {counts['products']} products, {counts['pages']} pages, "
          f"{counts['videos']} videos, {counts['lives']} lives")
  if args.inject_faults:
    print(f"{summary['faults']} injected faults listed in "
          f"{os.path.join(args.out, 'injected_faults.json')}")
  if args.url_form:
    print(f"images in {args.url_form} (URL form: fetch them with data_pipelines.download)")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
