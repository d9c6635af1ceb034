"""COPE training losses: cross-domain contrastive and margin classification.

All functions are pure and jit-friendly. They compute in float32 whatever the
dtype of the embeddings. Under `jax.jit` over globally sharded arrays, the
contrastive loss sees the whole global batch (the all-gather of the PyTorch
release, written by XLA instead of by hand), and the classification loss keeps
the class-centre matrix sharded along its class axis.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cope_jax.models import layers
from cope_jax.base import domains

# The loss-term table: term name -> (embedding a, embedding b), keys of the model's
# output dict (`cope_jax.models.cope`). Each term is a symmetric InfoNCE between the two.
CONTRASTIVE_TERMS = {
    # The seven cross-domain terms of the released forward pass.
    "page_visual_video": ("page_visual_embedding", "video_embedding"),
    "page_visual_live": ("page_visual_embedding", "live_embedding"),
    "video_live": ("video_embedding", "live_embedding"),
    "page_video": ("page_embedding", "video_embedding"),
    "page_live": ("page_embedding", "live_embedding"),
    "page_text_video": ("page_text_embedding", "video_embedding"),
    "page_text_live": ("page_text_embedding", "live_embedding"),
    # In-domain text <-> visual alignment, one per domain (the release's training script's
    # `--use_item_text_item_visual_cross`, `--use_photo_text_photo_visual_cross`,
    # `--use_live_text_live_visual_cross`): title <-> image, ASR <-> frames.
    **{f"{domain.name}_text_visual": (domain.text_embedding_key, domain.visual_embedding_key)
       for domain in domains.DOMAINS},
}

# Embeddings the product classifier is applied to (losses summed): each domain's
# retrieval embedding.
CLASSIFIED_EMBEDDINGS = tuple(domain.embedding_key for domain in domains.DOMAINS)


def needed_embeddings(loss_config) -> tuple[str, ...]:
  """The model outputs the objective of `loss_config` reads (sorted)."""
  _check_loss_config(loss_config)
  needed = {name for term, weight in loss_config.weights.items() if weight
            for name in CONTRASTIVE_TERMS[term]}
  if loss_config.classify_weight:
    needed.update(CLASSIFIED_EMBEDDINGS)
  return tuple(sorted(needed))


# Logit given to excluded rows/columns/classes. Finite, so that 0 * logit = 0.
_MASKED_LOGIT = -1e9


def _smoothed_cross_entropy(logits, labels_onehot, label_smoothing, class_mask):
  """Per-row cross-entropy with label smoothing as in torch.nn.CrossEntropyLoss.

  Args:
    logits: [N, C] float32; excluded classes already set to `_MASKED_LOGIT`.
    labels_onehot: [N, C] float32 one-hot targets.
    label_smoothing: eps; target = (1 - eps) * onehot + eps / num_classes.
    class_mask: [C] bool, the classes that exist (num_classes = its sum).

  Returns:
    [N] float32 losses.
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  log_probs = jnp.where(class_mask[None, :], log_probs, 0.0)
  nll = -jnp.sum(labels_onehot * log_probs, axis=-1)
  if not label_smoothing:
    return nll
  num_classes = jnp.sum(class_mask.astype(jnp.float32))
  uniform = -jnp.sum(log_probs, axis=-1) / num_classes
  return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def _masked_mean(values, valid):
  """Mean of [N] `values` over rows where `valid` [N] bool is True."""
  weights = valid.astype(values.dtype)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def contrastive_loss(a, b, temperature, label_smoothing=0.0, valid=None):
  """Symmetric InfoNCE between matched rows of `a` and `b`.

  Row i of `a` and row i of `b` are the positive pair; every other row of the
  batch is a negative. Each direction is a cross-entropy over the batch with
  label smoothing exactly as `torch.nn.CrossEntropyLoss(label_smoothing=eps)`,
  averaged over rows; the result is the mean of the a->b and b->a directions.

  Args:
    a: [B, D] L2-normalised embeddings (any float dtype).
    b: [B, D] L2-normalised embeddings, row-aligned with `a`.
    temperature: logits are a @ b.T / temperature.
    label_smoothing: eps in [0, 1).
    valid: optional [B] bool; False rows (padding) are dropped from both the
      rows and the columns of the logits, as if absent from the batch.

  Returns:
    Scalar float32 loss.
  """
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(
        f"contrastive_loss expects two [B, D] arrays of one shape, got "
        f"{a.shape} and {b.shape}")
  batch_size = a.shape[0]
  if valid is None:
    valid = jnp.ones((batch_size,), bool)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  logits = jnp.einsum("id,jd->ij", a, b) / temperature  # [B, B]
  pair_mask = valid[:, None] & valid[None, :]
  logits = jnp.where(pair_mask, logits, _MASKED_LOGIT)
  targets = jnp.eye(batch_size, dtype=jnp.float32)
  a_to_b = _smoothed_cross_entropy(logits, targets, label_smoothing, valid)
  b_to_a = _smoothed_cross_entropy(logits.T, targets, label_smoothing, valid)
  return 0.5 * (_masked_mean(a_to_b, valid) + _masked_mean(b_to_a, valid))


def sample_class_mask(labels, num_classes, sample_rate, rng, valid=None):
  """Classes used by a PartialFC-style classifier step.

  Every class that is a label of a (valid) row in the batch is kept; each other
  class is kept independently with probability `sample_rate`, so about
  `sample_rate * num_classes` classes take part. Shapes stay fixed: the caller
  masks out the classes not kept.

  Args:
    labels: [B] int class indices.
    num_classes: C.
    sample_rate: share of negative classes kept, in (0, 1]; 1 keeps all.
    rng: a PRNG key; required when sample_rate < 1.
    valid: optional [B] bool; labels of invalid rows do not count as positives.

  Returns:
    [C] bool mask of the kept classes.
  """
  if sample_rate >= 1.0:
    return jnp.ones((num_classes,), bool)
  if not 0.0 < sample_rate:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
  if rng is None:
    raise ValueError("sample_rate < 1 needs an rng to draw negative classes")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)  # [B, C]
  if valid is not None:
    onehot = onehot & valid[:, None]
  positives = jnp.any(onehot, axis=0)
  sampled = jax.random.uniform(rng, (num_classes,)) < sample_rate
  return positives | sampled


def margin_classification_loss(embeddings, labels, class_centers, scale=64.0,
                               margin=0.4, sample_rate=1.0, rng=None,
                               valid=None):
  """Normalised-softmax classification with an additive cosine margin (CosFace).

  logit[i, c] = scale * (cos(e_i, w_c) - margin * [c == label_i]), with both
  embeddings and class centres L2-normalised here; mean cross-entropy over rows.

  Only elementwise ops and reductions touch the [B, C] logits, so when
  `class_centers` is sharded along C, jit keeps it (and the logits) sharded and
  reduces partial sums across devices instead of gathering the matrix.

  Args:
    embeddings: [B, D] (any float dtype).
    labels: [B] int product indices in [0, C).
    class_centers: [C, D] class-centre weights.
    scale: logit scale s.
    margin: additive cosine margin m.
    sample_rate: share of negative classes used (PartialFC); 1.0 uses all.
    rng: PRNG key for the negative sampling (only used when sample_rate < 1).
    valid: optional [B] bool; invalid rows are left out of the mean.

  Returns:
    Scalar float32 loss.
  """
  num_classes = class_centers.shape[0]
  embeddings = layers.l2_normalize(embeddings.astype(jnp.float32))
  centers = layers.l2_normalize(class_centers.astype(jnp.float32))
  cosine = jnp.einsum("bd,cd->bc", embeddings, centers)  # [B, C]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  logits = scale * (cosine - margin * onehot)
  class_mask = sample_class_mask(labels, num_classes, sample_rate, rng, valid)
  logits = jnp.where(class_mask[None, :], logits, _MASKED_LOGIT)
  per_row = (jax.nn.logsumexp(logits, axis=-1)
             - jnp.sum(onehot * logits, axis=-1))
  if valid is None:
    return jnp.mean(per_row)
  return _masked_mean(per_row, valid)


def _check_loss_config(loss_config):
  unknown = sorted(set(loss_config.weights.keys()) - set(CONTRASTIVE_TERMS))
  if unknown:
    raise ValueError(
        f"config.loss.weights.{unknown[0]}: unknown contrastive term; expected "
        f"one of {', '.join(CONTRASTIVE_TERMS)}")
  for name, weight in loss_config.weights.items():
    if weight < 0:
      raise ValueError(
          f"config.loss.weights.{name}: must be >= 0, got {weight}")
  if loss_config.classify_weight < 0:
    raise ValueError(
        f"config.loss.classify_weight: must be >= 0, got "
        f"{loss_config.classify_weight}")


def cope_loss(embeddings: Mapping[str, jax.Array], product_index, class_centers,
              loss_config, rng, valid=None) -> tuple[jax.Array, dict[str, Any]]:
  """The COPE training objective.

  total = sum_t weights[t] * contrastive_loss(*CONTRASTIVE_TERMS[t])
          + classify_weight * sum_{page, video, live} margin_classification_loss

  Terms with weight 0 are skipped when tracing; so is the classifier when
  `loss_config.classify_weight` is 0.

  Args:
    embeddings: the model's output, dict name -> [B, D] L2-normalised arrays
      (`page_embedding`, `page_text_embedding`, `page_visual_embedding`,
      `video_embedding`, `live_embedding`).
    product_index: [B] int class index of each row's product.
    class_centers: [C, D] classifier weights, or None when not classifying.
    loss_config: `config.loss` (temperature, label_smoothing, weights,
      classify_weight, classify_scale, classify_margin, classify_sample_rate).
    rng: PRNG key for the classifier's negative sampling (may be None when
      classify_sample_rate is 1).
    valid: optional [B] bool mask of real rows.

  Returns:
    (total, metrics): scalar float32 total loss; metrics maps each used term's
    name, "classification" (when used) and "total" to scalar float32 values.
  """
  _check_loss_config(loss_config)
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  for name, weight in loss_config.weights.items():
    if not weight:
      continue
    first, second = CONTRASTIVE_TERMS[name]
    term = contrastive_loss(embeddings[first], embeddings[second],
                            loss_config.temperature,
                            loss_config.label_smoothing, valid)
    metrics[name] = term
    total = total + weight * term
  if loss_config.classify_weight:
    if class_centers is None:
      raise ValueError(
          "config.loss.classify_weight > 0 needs class_centers "
          "(params['classifier']['centers'])")
    classification = sum(
        margin_classification_loss(
            embeddings[name], product_index, class_centers,
            scale=loss_config.classify_scale,
            margin=loss_config.classify_margin,
            sample_rate=loss_config.classify_sample_rate, rng=rng, valid=valid)
        for name in CLASSIFIED_EMBEDDINGS)
    metrics["classification"] = classification
    total = total + loss_config.classify_weight * classification
  metrics["total"] = total
  return total, metrics
