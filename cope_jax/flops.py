"""Analytic FLOP count of COPE, for model FLOPs utilisation (MFU).

XLA's compiled cost analysis does not count the matrix products it hands to library
kernels (cuBLAS/cuDNN custom calls) on GPU, so it undercounts there by an order of
magnitude; MFU is computed from this count instead. Only matrix products and attention
are counted (2 FLOPs per multiply-add); a training step is 3x the forward pass.
"""

from __future__ import annotations

import jax
import ml_collections

from cope_jax import losses
from cope_jax.base import domains


def _transformer_layer_flops(tokens: int, width: int, mlp_dim: int) -> int:
  projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
  attention = 2 * 2 * tokens * tokens * width  # scores and weighted sum
  return projections + attention


def visual_forward_flops(vision: ml_collections.ConfigDict, frames: int) -> int:
  """One clip of `frames` frames (a page is one frame) through the visual encoder."""
  patches = (vision.image_size // vision.patch_size) ** 2
  width = vision.width
  per_frame = 2 * patches * 3 * vision.patch_size ** 2 * width  # patch embedding
  # Each block attends over tokens + 1 message token; the message path is per frame.
  per_frame += vision.layers * (_transformer_layer_flops(patches + 2, width, vision.mlp_dim)
                                + 2 * width * width + 2 * 4 * width * width)
  per_frame += 2 * width * vision.output_dim
  mit_positions = max(frames, vision.num_frames) if frames == 1 else frames
  mit = vision.mit_layers * _transformer_layer_flops(
      mit_positions, vision.output_dim, 4 * vision.output_dim)
  return frames * per_frame + mit


def text_forward_flops(text: ml_collections.ConfigDict, length: int) -> int:
  hidden = text.hidden_size
  return (text.layers * _transformer_layer_flops(length, hidden, text.intermediate_size)
          + 2 * hidden * hidden)  # pooler


def train_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """FLOPs of one training example (one record of every domain) in a train step.

  Counts what the train step computes: the visual encoder for every domain whose
  embeddings the loss reads, and the text encoder where the domain fuses its text or a
  loss term reads its text embedding.
  """
  model, data = config.model, config.data
  needed = set(losses.needed_embeddings(config.loss))
  forward = 0
  for domain in domains.DOMAINS:
    if not needed & {domain.embedding_key, domain.text_embedding_key,
                     domain.visual_embedding_key}:
      continue
    forward += visual_forward_flops(model.vision, data.num_frames if domain.is_clip else 1)
    if domain.fuses_text(model.use_asr_text) or domain.text_embedding_key in needed:
      forward += text_forward_flops(model.text, data[domain.text_length_field])
  return 3 * forward


def embed_flops_per_example(config: ml_collections.ConfigDict, domain_name: str) -> int:
  """FLOPs of embedding one record of `domain_name` (the evaluation embed step): the
  visual encoder, plus the text encoder where the domain fuses its text."""
  model, data = config.model, config.data
  domain = domains.get(domain_name)
  forward = visual_forward_flops(model.vision, data.num_frames if domain.is_clip else 1)
  if domain.fuses_text(model.use_asr_text):
    forward += text_forward_flops(model.text, data[domain.text_length_field])
  return forward


# Dense bf16 peak per chip, by device kind (lower case substring; first match wins).
# TPU figures: the Cloud TPU system-architecture pages (v4, v5e, v5p, v6e).
_PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12,
                    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5": 459e12,
                    "tpu v6 lite": 918e12}


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """Dense bf16 peak of the accelerator; None where unknown (e.g. CPU)."""
  kind = (device_kind or jax.devices()[0].device_kind).lower()
  for name, peak in _PEAK_BF16_FLOPS.items():
    if name in kind:
      return peak
  return None
