"""Helpers that run the PyTorch reference (`torch_reference`) beside the Flax model.

Shared by the parity tests and the training-parity benchmark:

  random_batch        a seeded random batch in the model's layout (NumPy)
  torch_batch         a NumPy batch as the reference takes it
  build_reference     the reference with seeded non-trivial weights (`randomize_`)
  numpy_state_dict    a module's state dict as NumPy arrays
  flat, max_abs_diff  flattened parameter trees; the largest elementwise difference
  RELEASE_TERMS       the contrastive terms the release computes, by this project's names
  release_loss        the release's objective in PyTorch, with a config's term weights
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax
import numpy as np
import torch
import torch.nn.functional as F

from cope_jax.testing import torch_reference
from cope_jax.base import domains

# The contrastive terms as the release computes them: embedding pairs, under the names of
# this project's `config.loss.weights`. Its forward pass computes the seven cross-domain
# terms; its training script's flags `--use_item_text_item_visual_cross`,
# `--use_photo_text_photo_visual_cross` and `--use_live_text_live_visual_cross` the three
# in-domain text <-> visual ones (cope_reference.md, "Losses" and "Training recipe").
CROSS_DOMAIN_TERMS = {
    "page_visual_video": ("page_visual_embedding", "video_embedding"),
    "page_visual_live": ("page_visual_embedding", "live_embedding"),
    "video_live": ("video_embedding", "live_embedding"),
    "page_video": ("page_embedding", "video_embedding"),
    "page_live": ("page_embedding", "live_embedding"),
    "page_text_video": ("page_text_embedding", "video_embedding"),
    "page_text_live": ("page_text_embedding", "live_embedding"),
}
IN_DOMAIN_TERMS = {
    "page_text_visual": ("page_text_embedding", "page_visual_embedding"),
    "video_text_visual": ("video_text_embedding", "video_visual_embedding"),
    "live_text_visual": ("live_text_embedding", "live_visual_embedding"),
}
RELEASE_TERMS = {**CROSS_DOMAIN_TERMS, **IN_DOMAIN_TERMS}
# The margin classifier's inputs (losses summed): the three retrieval embeddings.
CLASSIFIED = ("page_embedding", "video_embedding", "live_embedding")
CLASSIFICATION = "classification"  # the classifier's entry in `release_loss`'s terms


def random_batch(seed: int, *, batch_size: int, image_size: int, num_frames: int,
                 text_length: int, vocab_size: int, text_lengths: Sequence[int] | None = None,
                 asr: bool = True, num_classes: int = 0) -> dict[str, np.ndarray]:
  """A seeded random batch in the model's layout.

  Images uint8 (page [B, S, S, 3], clips [B, T, S, S, 3]); token ids and masks int32
  [B, L] for the titles and, with `asr`, the clips' ASR texts, each row holding
  `text_lengths[row]` tokens (default: drawn from 2..L) with ids in [1, vocab_size);
  with `num_classes`, product indices [B] int32, distinct, in [0, num_classes).
  Values are drawn in this order: lengths, page image, title ids, product indices, then
  per clip domain its frames and ASR ids.
  """
  rng = np.random.default_rng(seed)
  lengths = (np.asarray(text_lengths) if text_lengths is not None
             else rng.integers(2, text_length + 1, batch_size))
  mask = (np.arange(text_length)[None] < lengths[:, None]).astype(np.int32)

  def tokens():
    ids = rng.integers(1, vocab_size, (batch_size, text_length)).astype(np.int32)
    return ids * mask, mask.copy()

  batch = {}
  for domain in domains.DOMAINS:
    if domain.is_clip:
      continue
    batch[domain.media_key] = rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                           dtype=np.uint8)
    batch[domain.text_ids_key], batch[domain.text_mask_key] = tokens()
  if num_classes:
    batch["product_index"] = rng.permutation(num_classes)[:batch_size].astype(np.int32)
  for domain in domains.DOMAINS:
    if not domain.is_clip:
      continue
    batch[domain.media_key] = rng.integers(
        0, 256, (batch_size, num_frames, image_size, image_size, 3), dtype=np.uint8)
    if asr:
      batch[domain.text_ids_key], batch[domain.text_mask_key] = tokens()
  return batch


def torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """The numpy batch as the reference takes it: uint8 images ImageNet-normalised NCHW
  floats, integer arrays int64, boolean arrays as they are; string columns (an eval
  batch's ids) left out."""
  converted = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype == np.uint8:
      converted[key] = torch_reference.normalize_uint8_nhwc(value)
    elif value.dtype == np.bool_:
      converted[key] = torch.from_numpy(value.copy())
    elif value.dtype != object:
      converted[key] = torch.from_numpy(value.astype(np.int64))
  return converted


def build_reference(model_config, seed: int = 0, clip_text: bool = False
                    ) -> torch_reference.ReferenceCOPE:
  """The reference with seeded non-trivial weights (`randomize_`), in eval mode."""
  torch.manual_seed(seed)
  model = torch_reference.ReferenceCOPE(model_config, clip_text=clip_text)
  return torch_reference.randomize_(model, seed).eval()


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def flat(tree) -> dict:
  """A nested parameter tree as {"a/b/c": leaf}."""
  return flax.traverse_util.flatten_dict(tree, sep="/")


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def release_loss(embeddings: Mapping[str, torch.Tensor], labels: torch.Tensor,
                 classifier: torch_reference.MarginClassifier | None, loss_config
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """The release's objective on the reference's (L2-normalised) embeddings [B, D].

  Each term of `RELEASE_TERMS` with a non-zero weight in `loss_config.weights`: a
  symmetric InfoNCE (logits a·bᵀ / temperature, cross-entropy with label smoothing
  against the diagonal, mean of both directions); with `loss_config.classify_weight`,
  the margin classifier on the page, video and live embeddings, summed.

  Returns:
    (weighted total, {term: unweighted value}), the classifier's sum under
    CLASSIFICATION.
  """
  unknown = sorted(term for term, weight in loss_config.weights.items()
                   if weight and term not in RELEASE_TERMS)
  if unknown:
    raise ValueError(f"config.loss.weights: the release computes no term {unknown}")
  targets = torch.arange(labels.shape[0])
  smoothing = loss_config.label_smoothing
  total, terms = 0.0, {}
  for term, (a, b) in RELEASE_TERMS.items():
    weight = loss_config.weights.get(term, 0.0)
    if not weight:
      continue
    logits = embeddings[a] @ embeddings[b].T / loss_config.temperature
    terms[term] = 0.5 * (F.cross_entropy(logits, targets, label_smoothing=smoothing)
                         + F.cross_entropy(logits.T, targets, label_smoothing=smoothing))
    total = total + weight * terms[term]
  if loss_config.classify_weight:
    terms[CLASSIFICATION] = sum(classifier(embeddings[name], labels) for name in CLASSIFIED)
    total = total + loss_config.classify_weight * terms[CLASSIFICATION]
  return total, terms
