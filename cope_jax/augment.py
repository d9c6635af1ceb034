"""Device-side training augmentation: per-example random resized crop, resize and flip.

With `config.data.augment_on = "device"` the input pipeline sends every frame resized
to a fixed square canvas, uint8 [B, (T,) canvas, canvas, 3], with each example's crop
box (float32 [B, 4]: top, left, height, width as shares of the image) and flip (bool
[B]), drawn on the host by the torchvision-style sampler of
`data_pipelines.transforms` (`cope_jax.base.batch.crop_box_key` / `flip_key` name the keys).
`augment_batch`, called at the top of the jitted train step, turns those into the
[B, (T,) size, size, 3] uint8 pixels the host path would have produced: the same box
and flip for every frame of a clip, bilinear resampling with PIL's antialiasing
(`jax.image.scale_and_translate`, whose kernel, support widening on downscale and
edge renormalisation are PIL's), then rounding to uint8 as PIL does. The result agrees
with the host path to about one grey level (PIL rounds between its two passes).

A batch without crop-box keys (host augmentation, evaluation) passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cope_jax.base import batch as batch_contract
from cope_jax.base import domains


def crop_resize_flip(images: jax.Array, crop_boxes: jax.Array, flips: jax.Array,
                     size: int) -> jax.Array:
  """Crops each example's box, resizes it to size x size and mirrors it if asked.

  Args:
    images: uint8 (or float) [B, T, H, W, 3] clips or [B, H, W, 3] images.
    crop_boxes: float32 [B, 4]: (top, left, height, width) as shares of H and W.
    flips: bool [B].
    size: output side.

  Returns:
    [B, T, size, size, 3] or [B, size, size, 3], of the dtype of `images` (uint8
    results are rounded and clipped).
  """
  is_clip = images.ndim == 5
  clips = images if is_clip else images[:, None]
  height, width = clips.shape[2:4]

  def one_example(clip, box, flip):  # clip [T, H, W, 3]
    top, left = box[0] * height, box[1] * width
    scale = jnp.stack([size / (box[2] * height), size / (box[3] * width)])
    # Output pixel centre u maps to input (u - translation) / scale: the box's top-left
    # corner goes to 0 and its far corner to `size`.
    translation = -jnp.stack([top, left]) * scale
    resized = jax.image.scale_and_translate(
        clip.astype(jnp.float32), (clip.shape[0], size, size, clip.shape[-1]),
        spatial_dims=(1, 2), scale=scale, translation=translation, method="linear",
        antialias=True)
    return jnp.where(flip, resized[:, :, ::-1, :], resized)

  out = jax.vmap(one_example)(clips, crop_boxes.astype(jnp.float32), flips)
  if images.dtype == jnp.uint8:
    out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
  else:
    out = out.astype(images.dtype)
  return out if is_clip else out[:, 0]


def augment_batch(batch: Mapping[str, jax.Array], size: int) -> dict[str, jax.Array]:
  """A training batch with every domain's crop boxes and flips applied to its pixels.

  Domains whose crop-box key is absent are left as they are; the crop-box and flip
  keys are removed from the result.
  """
  result = dict(batch)
  for domain in domains.DOMAINS:
    box_key, flip_key = batch_contract.crop_box_key(domain), batch_contract.flip_key(domain)
    if box_key not in result:
      continue
    result[domain.media_key] = crop_resize_flip(
        result[domain.media_key], result.pop(box_key), result.pop(flip_key), size)
  return result
