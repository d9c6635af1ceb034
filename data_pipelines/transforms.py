"""Host-side image and text transforms: JPEG decoding, frame sampling, augmentation.

Everything here is NumPy/PIL on the host and takes an explicit
`np.random.Generator`; nothing touches global random state. Images are uint8 RGB
arrays `[height, width, 3]`; ImageNet normalisation happens on device inside the model
(`normalize_images` is the NumPy twin, for tests and references).

Train: random resized crop (scale (0.64, 1), ratio (3/4, 4/3), torchvision's sampling)
plus a random horizontal flip, shared by every frame of a clip. Eval: resize to
`size x size` (the released centre crop of `size` after that is the identity).

The crop, resize and flip run either here (`train_transform_clip`: uint8 [T, size, size,
3] out) or on the device inside the jitted step (`canvas_clip` here: frames resized to a
fixed square canvas, the crop box in normalised coordinates and the flip; then
`cope_jax.augment`). Both draw the box and the flip with the same calls in the same
order, so one generator state gives the same box either way: a box drawn in the
decoded image's pixels is the same region of the canvas in normalised coordinates,
because resizing is an axis-wise linear map.

JPEG decoding uses libjpeg-turbo through `simplejpeg`, which decodes straight into a
NumPy array with the GIL released (so reader threads decode in parallel) and scales
the DCT (1/8 steps) when a smaller image is enough; other formats go through PIL.
"""

import io
import math
import re
from typing import NamedTuple, Sequence

import numpy as np
import PIL.Image
import simplejpeg

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_RESAMPLE = PIL.Image.Resampling.BILINEAR


class Crop(NamedTuple):
  """A crop box in pixels: rows [top, top + height), columns [left, left + width)."""
  top: int
  left: int
  height: int
  width: int


def decode_jpeg(data: bytes, name: str = "", min_side: int | None = None) -> np.ndarray:
  """Decodes JPEG (or any PIL-readable) bytes to uint8 RGB [height, width, 3].

  Args:
    data: encoded image bytes.
    name: where the bytes came from (record id or file), used in error messages.
    min_side: if given, a JPEG may be decoded at a reduced scale (libjpeg-turbo's DCT
      scaling, in 1/8 steps: much faster than a full decode followed by a resize) as
      long as both sides stay >= min_side. None: full resolution.
  """
  if data[:2] == b"\xff\xd8":  # JPEG start-of-image marker
    try:
      side = min_side or 0
      return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
    except ValueError:
      pass  # CMYK, lossless, damaged...: PIL decodes it or reports why not
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      if min_side is not None:
        image.draft("RGB", (min_side, min_side))
      return np.asarray(image.convert("RGB"))
  except (PIL.UnidentifiedImageError, OSError, ValueError) as error:
    where = f" {name}" if name else ""
    raise ValueError(
        f"cannot decode image{where}: {len(data)} bytes, {decode_error_text(error)}"
    ) from error


def decode_error_text(error: BaseException) -> str:
  """PIL's message without the in-memory buffer it names ('<_io.BytesIO object at 0x..>').

  PIL says `cannot identify image file <_io.BytesIO object at 0x7f...>` for bytes it
  cannot read; the caller names the image instead.
  """
  text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
  if isinstance(error, PIL.UnidentifiedImageError) or text == "cannot identify image file":
    return "not a readable image (PIL cannot identify its format)"
  return text or type(error).__name__


def sample_frame_indices(num_frames_available: int, num_frames: int) -> list[int]:
  """Middle frame of each of `num_frames` equal segments of a clip.

  index_i = floor((2i + 1) * n / (2 T)); with n < T frames are repeated.
  """
  if num_frames_available < 1:
    raise ValueError("a clip needs at least one frame, got 0")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  return [(2 * i + 1) * num_frames_available // (2 * num_frames)
          for i in range(num_frames)]


def random_resized_crop_params(
    rng: np.random.Generator, height: int, width: int,
    scale: Sequence[float] = (0.64, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Crop:
  """Samples a crop as torchvision's `RandomResizedCrop.get_params` does.

  Up to 10 draws of (area share in `scale`, log-uniform aspect ratio in `ratio`);
  the first box that fits the image wins, else a centre crop clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
    crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return Crop(top, left, crop_height, crop_width)
  image_ratio = width / height
  if image_ratio < min(ratio):
    crop_width, crop_height = width, int(round(width / min(ratio)))
  elif image_ratio > max(ratio):
    crop_width, crop_height = int(round(height * max(ratio))), height
  else:
    crop_width, crop_height = width, height
  return Crop((height - crop_height) // 2, (width - crop_width) // 2,
              crop_height, crop_width)


def min_decode_side(size: int, scale: Sequence[float] = (0.64, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> int:
  """Smallest image side that keeps every random resized crop >= `size` pixels.

  A crop of area share >= scale[0] and aspect ratio within `ratio` of an H x W image
  has both sides >= min(H, W) * sqrt(scale[0] * min(ratio[0], 1 / ratio[1])).
  """
  return math.ceil(size / math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1])))


def apply_crop_resize_flip(image: np.ndarray, crop: Crop, flip: bool,
                           size: int) -> np.ndarray:
  """Crops `image` [H, W, 3] to `crop`, resizes to [size, size, 3], mirrors if `flip`."""
  box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
  resized = PIL.Image.fromarray(image).resize((size, size), _RESAMPLE, box=box)
  if flip:
    resized = resized.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(resized)


def _rescale_crop(crop: Crop, from_shape: tuple[int, ...],
                  to_shape: tuple[int, ...]) -> Crop:
  """The same relative crop on an image of another size."""
  if from_shape[:2] == to_shape[:2]:
    return crop
  row_scale, col_scale = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
  top, left = int(crop.top * row_scale), int(crop.left * col_scale)
  return Crop(top, left,
              max(1, min(to_shape[0] - top, round(crop.height * row_scale))),
              max(1, min(to_shape[1] - left, round(crop.width * col_scale))))


def train_transform_clip(frames: Sequence[np.ndarray], rng: np.random.Generator,
                         size: int,
                         scale: Sequence[float] = (0.64, 1.0)) -> np.ndarray:
  """Training augmentation of a clip: one crop and one flip for all its frames.

  Args:
    frames: T uint8 arrays [H, W, 3] (a page image is a clip of one frame). Frames of
      another size than the first get the same crop relative to their size.
    rng: source of the crop and flip.
    size: output side.
    scale: area range of the random resized crop.

  Returns:
    uint8 [T, size, size, 3].
  """
  if not frames:
    raise ValueError("train_transform_clip needs at least one frame")
  first_shape = frames[0].shape
  crop = random_resized_crop_params(rng, first_shape[0], first_shape[1], scale)
  flip = bool(rng.random() < 0.5)
  return np.stack([
      apply_crop_resize_flip(
          frame, _rescale_crop(crop, first_shape, frame.shape), flip, size)
      for frame in frames])


class CanvasClip(NamedTuple):
  """A clip for device-side augmentation: fixed-size frames, a box and a flip.

  frames: uint8 [T, canvas, canvas, 3], every frame resized to the square canvas.
  crop_box: float32 [4], (top, left, height, width) of the crop as shares of the
    image's height and width (the same region of the original and of the canvas).
  flip: whether to mirror the crop left-right.
  """
  frames: np.ndarray
  crop_box: np.ndarray
  flip: bool


def normalized_box(crop: Crop, height: int, width: int) -> np.ndarray:
  """A pixel crop of an H x W image as float32 [top, left, height, width] shares."""
  return np.array([crop.top / height, crop.left / width, crop.height / height,
                   crop.width / width], np.float32)


def resize_to_canvas(image: np.ndarray, canvas_size: int) -> np.ndarray:
  """[H, W, 3] -> [canvas, canvas, 3] (bilinear, antialiased); a no-op at that size."""
  if image.shape[:2] == (canvas_size, canvas_size):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((canvas_size, canvas_size), _RESAMPLE))


def canvas_clip(frames: Sequence[np.ndarray], rng: np.random.Generator, canvas_size: int,
                scale: Sequence[float] = (0.64, 1.0)) -> CanvasClip:
  """The host's half of device-side training augmentation for one clip.

  Draws the crop and flip exactly as `train_transform_clip` does (same generator
  calls, so the same box for the same generator state), on the first frame's own
  pixel size, and resizes every frame to the square canvas; `cope_jax.augment` crops,
  resizes and flips on the device.
  """
  if not frames:
    raise ValueError("canvas_clip needs at least one frame")
  height, width = frames[0].shape[:2]
  crop = random_resized_crop_params(rng, height, width, scale)
  flip = bool(rng.random() < 0.5)
  return CanvasClip(np.stack([resize_to_canvas(frame, canvas_size) for frame in frames]),
                    normalized_box(crop, height, width), flip)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation transform: resize [H, W, 3] to [size, size, 3] (uint8)."""
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), _RESAMPLE))


def normalize_images(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3] with ImageNet mean/std (on [0, 1] values)."""
  return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def augment_title(text: str, rng: np.random.Generator, prob: float = 0.6,
                  char_rate: float = 0.2, min_length: int = 10) -> str:
  """Title noise of the release: character doubling, dropping and spacing.

  A title of at least `min_length` characters is perturbed with probability `prob`:
  then each character, with probability `char_rate`, is doubled, dropped or followed by
  a space (one of the three, uniformly). Shorter titles come back unchanged.
  """
  if len(text) < min_length or rng.random() >= prob:
    return text
  hit = rng.random(len(text)) < char_rate
  operation = rng.integers(0, 3, size=len(text))
  pieces = []
  for char, is_hit, op in zip(text, hit, operation):
    if not is_hit:
      pieces.append(char)
    elif op == 0:
      pieces.append(char + char)
    elif op == 2:
      pieces.append(char + " ")
    # op == 1: dropped
  return "".join(pieces)
