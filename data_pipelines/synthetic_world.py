"""What the synthetic ROPE data shows: products, their pictures and their texts.

`data_pipelines.synthetic` writes these in ROPE's format (its docstring says how the
data is hard in the ways ROPE is). Everything is drawn from a NumPy `Generator`, so the
same stream gives the same products, pictures (JPEG bytes) and texts.
"""

from __future__ import annotations

import dataclasses
import io
import string
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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


@dataclasses.dataclass(frozen=True)
class Product:
  product_id: str
  category: int
  colour: str
  pattern: str
  glyph: str


def new_uuid(rng: np.random.Generator) -> str:
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def new_id(rng: np.random.Generator, digits: int, used: set[str]) -> str:
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
      products.append(Product(new_id(rng, 12, used_ids), category, colour, pattern, glyph))
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


def maybe_missing(text: str, rng: np.random.Generator, probability: float) -> str:
  return MISSING_TEXT if rng.random() < probability else text
