"""The batch contract: the keys, shapes and dtypes of the batches the input pipelines
yield and the model and train step read (`docs/interfaces.md`, "Batches").

The pipelines (`data_pipelines/pipelines.py`) build batches of this layout; the model's
abstract state (`cope_jax/state.py`), the device-side augmentation (`cope_jax/augment.py`)
and the compile-only tools read it from here, without importing the pipelines (Grain).

Shapes: B batch, T frames (`data.num_frames`), S image side (`data.image_size`), L
tokens (`data.title_max_length` / `data.asr_max_length`).
"""

from __future__ import annotations

import numpy as np

from cope_jax.base import domains

# Where the training crop, resize and flip run (`config.data.augment_on`).
AUGMENT_ON = ("host", "device")

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def crop_box_key(domain: domains.Domain) -> str:
  """Batch key of a domain's crop boxes (device-side augmentation): float32 [B, 4]."""
  return f"{domain.media_key}_crop_box"


def flip_key(domain: domains.Domain) -> str:
  """Batch key of a domain's flips (device-side augmentation): bool [B]."""
  return f"{domain.media_key}_flip"


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
        f"train.batch_size={global_batch_size} is not divisible by the process "
        f"count {process_count}")
  return global_batch_size // process_count


def media_shape(data_config, domain: domains.Domain) -> tuple[int, ...]:
  """One example's pixels: [S, S, 3] for an image domain, [T, S, S, 3] for a clip."""
  size = data_config.image_size
  return (data_config.num_frames, size, size, 3) if domain.is_clip else (size, size, 3)


def domain_spec(data_config, domain: domains.Domain, batch_size: int) -> Spec:
  """A domain's pixels uint8 [B, (T,) S, S, 3], text ids and mask int32 [B, L]."""
  text_shape = (batch_size, data_config[domain.text_length_field])
  return {domain.media_key: ((batch_size,) + media_shape(data_config, domain),
                             np.dtype(np.uint8)),
          domain.text_ids_key: (text_shape, np.dtype(np.int32)),
          domain.text_mask_key: (text_shape, np.dtype(np.int32))}


def batch_spec(config, process_count: int = 1) -> Spec:
  """Shapes and dtypes of a per-process training batch as the model sees it (after
  augmentation): {key: (shape, dtype)}."""
  batch_size = per_process_batch_size(config.train.batch_size, process_count)
  spec = {"product_index": ((batch_size,), np.dtype(np.int32))}
  for domain in domains.DOMAINS:
    spec.update(domain_spec(config.data, domain, batch_size))
  return spec


def canvas_size(data_config) -> int:
  """Side of the frames sent to the device with `augment_on="device"` (ValueError naming
  the field when it is unusable)."""
  if data_config.augment_on not in AUGMENT_ON:
    raise ValueError(f"config.data.augment_on must be one of {AUGMENT_ON}, got "
                     f"{data_config.augment_on!r}")
  canvas = data_config.canvas_size or data_config.image_size
  if canvas < data_config.image_size:
    raise ValueError(f"config.data.canvas_size ({canvas}) must be at least "
                     f"data.image_size ({data_config.image_size}), or 0 for equal")
  return canvas


def pipeline_batch_spec(config, process_count: int = 1) -> Spec:
  """Shapes and dtypes of a per-process training batch as the pipeline yields it.

  `batch_spec` with host augmentation; with `data.augment_on="device"` the pixels are
  canvas-sized and each domain adds its crop boxes float32 [B, 4] and flips bool [B].
  """
  spec = batch_spec(config, process_count)
  side = canvas_size(config.data)
  if config.data.augment_on == "host":
    return spec
  for domain in domains.DOMAINS:
    shape, dtype = spec[domain.media_key]
    spec[domain.media_key] = (shape[:-3] + (side, side, 3), dtype)
    spec[crop_box_key(domain)] = ((shape[0], 4), np.dtype(np.float32))
    spec[flip_key(domain)] = ((shape[0],), np.dtype(np.bool_))
  return spec


def eval_batch_spec(config, domain: str) -> Spec:
  """Shapes and dtypes of the array entries of an eval batch (`id`, `product_id` aside):
  `valid` bool [B] and the domain's arrays."""
  batch_size = config.eval.batch_size
  spec = {"valid": ((batch_size,), np.dtype(np.bool_))}
  spec.update(domain_spec(config.data, domains.get(domain), batch_size))
  return spec
