"""Image files: decoding and checking them, re-encoding them for storage.

The one place where the data pipelines decide whether bytes are an image and how an
image is shrunk and stored. `data_pipelines.download` checks every body it fetches and
every file a rerun finds here; the `rope` TFDS builder (`rope_tfds`) checks and
re-encodes every image it stores.

  check(data)                    the strict check (libjpeg-turbo refuses corrupt data),
                                 or ValueError saying why
  stored_bytes(data, max_side)   the bytes to store: the input itself when it may stay
                                 as it is, else an RGB JPEG at most `max_side` px
  quick_check(path, size)        a cheap check (size, JPEG header and trailer) that a
                                 file written whole is still complete

Re-encoding: an image whose longer side exceeds `max_side` is resized with BICUBIC
resampling so that its longer side is `max_side` (the other side rounded, at least 1
px), converted to RGB and saved as JPEG at quality `JPEG_QUALITY`; a JPEG is first
decoded at the smallest DCT scale (1/1 to 1/8) still at least that size. Decoding errors
become ValueError naming the reason and the byte count (never an in-memory file object).
"""

from __future__ import annotations

import io
import os

from PIL import Image
import simplejpeg

JPEG_QUALITY = 90
JPEG_START = b"\xff\xd8"  # SOI marker: the first two bytes of every JPEG file
JPEG_END = b"\xff\xd9"  # EOI marker: the last two bytes of a complete JPEG file
# Bytes after EOI that some encoders add (padding, a trailing newline); a complete file
# ends with EOI within this many bytes of its end.
_TRAILER_SLACK = 32


def _wrapped(error: Exception, data: bytes) -> ValueError:
  if isinstance(error, Image.UnidentifiedImageError):  # its message shows a BytesIO
    return ValueError(f"not an image file ({len(data)} bytes)")
  return ValueError(f"not a decodable image ({len(data)} bytes): "
                    f"{type(error).__name__}: {error}")


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check(data: bytes) -> Image.Image:
  """The image in `data` (opened, not decoded), once a strict check passed.

  Strict: a JPEG is decoded whole by libjpeg-turbo (`simplejpeg`, `strict=True`), which
  also refuses recoverable damage that PIL decodes silently (bytes flipped inside the
  entropy-coded data: "Corrupt JPEG data"); another format gets PIL's `verify()` and a
  full decode.

  Raises:
    ValueError: `data` is not a complete, undamaged image.
  """
  try:
    if data.startswith(JPEG_START):
      simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
      return Image.open(io.BytesIO(data))
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
  except _DECODE_ERRORS as error:
    raise _wrapped(error, data) from None


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
  """(width, height) an image of `size` is resized to, so that its longer side is
  `max_side`; None when it is within `max_side` already (or `max_side` is 0)."""
  if max_side <= 0 or max(size) <= max_side:
    return None
  scale = max_side / max(size)
  return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def to_jpeg(image: Image.Image) -> bytes:
  """`image` as RGB JPEG bytes at `JPEG_QUALITY`."""
  buffer = io.BytesIO()
  image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def stored_bytes(data: bytes, max_side: int, rgb_jpeg_only: bool = False,
                 strict: bool = False) -> bytes:
  """The bytes to store for the image `data`, checked to decode fully (`check` when
  `strict`, else a full PIL decode).

  `data` itself when the image is within `max_side` (0: no limit) and, with
  `rgb_jpeg_only`, an RGB JPEG; otherwise the image re-encoded as RGB JPEG (resized to
  `max_side` when larger; see the module docstring). A JPEG that is resized is decoded
  with libjpeg's DCT scaling (`Image.draft`) to the smallest of 1/1, 1/2, 1/4, 1/8 of
  its size that is still at least the target size, then resized: the whole entropy-
  coded stream is still read (a file cut short still fails), at a fraction of the cost.

  Raises:
    ValueError: `data` is not a decodable image.
  """
  try:
    image = check(data) if strict else Image.open(io.BytesIO(data))
    target = target_size(image.size, max_side)
    if target is not None:
      if image.format == "JPEG":
        image.draft("RGB", target)
      image.load()
      return to_jpeg(image.convert("RGB").resize(target, Image.Resampling.BICUBIC))
    image.load()
  except _DECODE_ERRORS as error:
    raise _wrapped(error, data) from None
  if rgb_jpeg_only and (image.format, image.mode) != ("JPEG", "RGB"):
    return to_jpeg(image)
  return data


def read_stored_bytes(path: str, max_side: int) -> bytes:
  """`stored_bytes` of the file at `path`, as RGB JPEG (the TFDS builder's records).

  Raises:
    OSError: the file cannot be read; ValueError: it is not a decodable image.
  """
  with open(path, "rb") as f:
    data = f.read()
  return stored_bytes(data, max_side, rgb_jpeg_only=True)


def quick_check(path: str, size: int | None = None) -> bool:
  """Whether the file at `path` looks complete: it has `size` bytes (when given) and,
  if it starts like a JPEG, it ends with the JPEG end marker. A few bytes read.

  Catches a file cut short (a power loss, a partial copy) or replaced, not one damaged
  in its middle: that takes `check`.
  """
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    return quick_check_open(fd, os.fstat(fd).st_size if size is None else size)
  finally:
    os.close(fd)


def quick_check_open(fd: int, size: int) -> bool:
  """`quick_check` of an open file (`fd`) that should hold `size` bytes."""
  try:
    if size < 4:
      return False
    head = os.pread(fd, 2, 0)
    if head != JPEG_START:  # another format: its size only
      return len(head) == 2 and os.fstat(fd).st_size == size
    tail_start = max(2, size - _TRAILER_SLACK)
    tail = os.pread(fd, size - tail_start + 1, tail_start)
    # Exactly `size` bytes (the one byte more must be missing), ending in EOI.
    return len(tail) == size - tail_start and JPEG_END in tail
  except OSError:
    return False


def file_passes_check(path: str) -> bool:
  """Whether `path` exists and holds an image that passes the strict `check`."""
  try:
    with open(path, "rb") as f:
      check(f.read())
    return True
  except (OSError, ValueError):
    return False
