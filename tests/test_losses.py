"""Tests for cope_jax.losses against independent NumPy / PyTorch references."""

import os
import re

# 8 fake CPU devices for the sharded test; must be set before JAX initialises.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
  os.environ["XLA_FLAGS"] = (
      _FLAGS + " --xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from cope_jax import losses


def _normalized(rng, shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_smoothed_ce(logits, targets, eps):
  """Mean over rows of torch-style label-smoothed cross-entropy, by hand."""
  num_classes = logits.shape[1]
  log_probs = _np_log_softmax(logits)
  rows = np.arange(len(targets))
  per_row = (-(1 - eps) * log_probs[rows, targets]
             - eps / num_classes * log_probs.sum(axis=1))
  return per_row.mean()


def _np_contrastive(a, b, temperature, eps):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  logits = a @ b.T / temperature
  diagonal = np.arange(len(a))
  return 0.5 * (_np_smoothed_ce(logits, diagonal, eps)
                + _np_smoothed_ce(logits.T, diagonal, eps))


def _np_margin_loss(embeddings, labels, centers, scale, margin, kept=None):
  e = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  w = centers / np.linalg.norm(centers, axis=-1, keepdims=True)
  logits = scale * (e @ w.T)
  rows = np.arange(len(labels))
  logits[rows, labels] -= scale * margin
  if kept is None:
    kept = np.ones(len(centers), bool)
  # Only the kept classes take part; remap labels into the kept columns.
  column_of = np.cumsum(kept) - 1
  return _np_smoothed_ce(logits[:, kept], column_of[labels], 0.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_contrastive_loss_matches_numpy(label_smoothing, temperature):
  rng = np.random.default_rng(0)
  # Asymmetric inputs: a->b and b->a differ.
  a = _normalized(rng, (6, 5)).astype(np.float32)
  b = _normalized(rng, (6, 5)).astype(np.float32)
  got = losses.contrastive_loss(a, b, temperature, label_smoothing)
  want = _np_contrastive(a, b, temperature, label_smoothing)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.dtype == jnp.float32


def test_contrastive_loss_matches_torch_cross_entropy():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  a = _normalized(rng, (7, 4)).astype(np.float32)
  b = _normalized(rng, (7, 4)).astype(np.float32)
  logits = torch.from_numpy(a) @ torch.from_numpy(b).T / 0.05
  targets = torch.arange(7)
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  want = 0.5 * (criterion(logits, targets) + criterion(logits.T, targets))
  got = losses.contrastive_loss(a, b, 0.05, 0.1)
  np.testing.assert_allclose(got, want.item(), rtol=1e-5)


def test_contrastive_loss_is_float32_for_bfloat16_inputs():
  rng = np.random.default_rng(2)
  a = _normalized(rng, (4, 8))
  b = _normalized(rng, (4, 8))
  got = losses.contrastive_loss(jnp.asarray(a, jnp.bfloat16),
                                jnp.asarray(b, jnp.bfloat16), 0.05, 0.1)
  assert got.dtype == jnp.float32
  # bf16 rounding of the inputs only (about 3 significant digits).
  np.testing.assert_allclose(got, _np_contrastive(a, b, 0.05, 0.1), rtol=2e-2)


def test_contrastive_loss_valid_mask_equals_dropping_rows():
  rng = np.random.default_rng(3)
  a = _normalized(rng, (6, 5)).astype(np.float32)
  b = _normalized(rng, (6, 5)).astype(np.float32)
  valid = np.array([True, False, True, True, False, True])
  got = losses.contrastive_loss(a, b, 0.1, 0.1, valid=valid)
  want = _np_contrastive(a[valid], b[valid], 0.1, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contrastive_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="contrastive_loss"):
    losses.contrastive_loss(np.zeros((4, 3)), np.zeros((5, 3)), 0.05)


def test_margin_classification_loss_matches_numpy():
  rng = np.random.default_rng(4)
  embeddings = rng.standard_normal((5, 6)).astype(np.float32)
  centers = rng.standard_normal((11, 6)).astype(np.float32)
  labels = np.array([0, 3, 3, 10, 7])
  got = losses.margin_classification_loss(embeddings, labels, centers,
                                          scale=16.0, margin=0.3)
  want = _np_margin_loss(embeddings.astype(np.float64), labels,
                         centers.astype(np.float64), 16.0, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_margin_loss_with_sampling_matches_numpy_on_kept_classes():
  rng = np.random.default_rng(5)
  embeddings = rng.standard_normal((4, 6)).astype(np.float32)
  centers = rng.standard_normal((40, 6)).astype(np.float32)
  labels = np.array([1, 5, 5, 30])
  key = jax.random.key(7)
  kept = np.asarray(losses.sample_class_mask(labels, 40, 0.5, key))
  got = losses.margin_classification_loss(embeddings, labels, centers,
                                          sample_rate=0.5, rng=key)
  want = _np_margin_loss(embeddings.astype(np.float64), labels,
                         centers.astype(np.float64), 64.0, 0.4, kept)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sample_class_mask_keeps_every_positive_and_samples_negatives():
  num_classes = 2000
  labels = np.array([3, 17, 17, 1999, 500, 42])
  masks = [np.asarray(losses.sample_class_mask(labels, num_classes, 0.25,
                                               jax.random.key(seed)))
           for seed in range(3)]
  negatives = np.setdiff1d(np.arange(num_classes), labels)
  for mask in masks:
    assert mask[labels].all()
    assert 0.2 < mask[negatives].mean() < 0.3
  assert not np.array_equal(masks[0], masks[1])


def test_sample_class_mask_ignores_labels_of_invalid_rows():
  labels = np.array([3, 9])
  valid = np.array([True, False])
  masks = np.stack([
      np.asarray(losses.sample_class_mask(labels, 64, 0.01,
                                          jax.random.key(seed), valid))
      for seed in range(20)])
  assert masks[:, 3].all()
  assert not masks[:, 9].all()


def test_sample_rate_below_one_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    losses.margin_classification_loss(np.ones((2, 3)), np.array([0, 1]),
                                      np.ones((4, 3)), sample_rate=0.5)


def _loss_config(**overrides):
  config = ml_collections.ConfigDict()
  config.temperature = 0.05
  config.label_smoothing = 0.1
  config.weights = ml_collections.ConfigDict(
      {name: 1.0 for name in losses.CONTRASTIVE_TERMS})
  config.classify_weight = 0.0
  config.classify_scale = 64.0
  config.classify_margin = 0.4
  config.classify_sample_rate = 1.0
  config.update(overrides)
  return config


def _embeddings(rng, batch_size, dim):
  names = sorted({name for pair in losses.CONTRASTIVE_TERMS.values() for name in pair}
                 | set(losses.CLASSIFIED_EMBEDDINGS))
  return {name: _normalized(rng, (batch_size, dim)).astype(np.float32)
          for name in names}


def test_cope_loss_is_weighted_sum_of_terms():
  rng = np.random.default_rng(6)
  embeddings = _embeddings(rng, 6, 8)
  weights = {name: 0.0 for name in losses.CONTRASTIVE_TERMS}
  weights.update(page_video=2.0, video_live=0.5, page_text_live=1.0)
  config = _loss_config(weights=weights, classify_weight=0.3,
                        classify_scale=10.0)
  labels = np.array([0, 1, 2, 3, 4, 0])
  centers = rng.standard_normal((9, 8)).astype(np.float32)
  total, metrics = losses.cope_loss(embeddings, labels, centers, config,
                                    jax.random.key(0))

  want_terms = {
      name: _np_contrastive(
          *(embeddings[key] for key in losses.CONTRASTIVE_TERMS[name]),
          0.05, 0.1)
      for name in ("page_video", "video_live", "page_text_live")}
  want_classification = sum(
      _np_margin_loss(embeddings[name].astype(np.float64), labels,
                      centers.astype(np.float64), 10.0, 0.4)
      for name in ("page_embedding", "video_embedding", "live_embedding"))
  want_total = (2.0 * want_terms["page_video"] + 0.5 * want_terms["video_live"]
                + want_terms["page_text_live"] + 0.3 * want_classification)
  assert set(metrics) == set(want_terms) | {"classification", "total"}
  for name, value in want_terms.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5)
  np.testing.assert_allclose(metrics["classification"], want_classification,
                             rtol=1e-5)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  np.testing.assert_allclose(metrics["total"], total)


def test_cope_loss_rejects_unknown_term():
  config = _loss_config()
  config.weights.page_audio = 1.0
  with pytest.raises(ValueError, match=r"config\.loss\.weights\.page_audio"):
    losses.cope_loss(_embeddings(np.random.default_rng(0), 2, 4),
                     np.zeros(2, np.int32), None, config, None)


def test_cope_loss_needs_centers_when_classifying():
  with pytest.raises(ValueError, match="classify_weight"):
    losses.cope_loss(_embeddings(np.random.default_rng(0), 2, 4),
                     np.zeros(2, np.int32), None,
                     _loss_config(classify_weight=1.0), None)


def _auto_mesh(shape):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: set XLA_FLAGS="
                "--xla_force_host_platform_device_count=8 before JAX starts")
  return jax.make_mesh(shape, ("data", "model"),
                       axis_types=(AxisType.Auto,) * len(shape))


def _loss_and_grads(embeddings, labels, centers, config):
  def loss_fn(embeddings, centers):
    return losses.cope_loss(embeddings, labels, centers, config,
                            jax.random.key(3))

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  (total, metrics), grads = jax.jit(grad_fn)(embeddings, centers)
  return total, metrics, grads


def test_cope_loss_sharded_equals_unsharded_including_gradients():
  mesh = _auto_mesh((4, 2))
  rng = np.random.default_rng(8)
  batch_size, dim, num_classes = 16, 8, 64
  embeddings = _embeddings(rng, batch_size, dim)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  centers = rng.standard_normal((num_classes, dim)).astype(np.float32)
  config = _loss_config(classify_weight=0.5, classify_sample_rate=0.5)

  local = _loss_and_grads(embeddings, labels, centers, config)

  batch = NamedSharding(mesh, PartitionSpec("data"))
  classes = NamedSharding(mesh, PartitionSpec(("data", "model")))
  sharded = _loss_and_grads(
      jax.device_put(embeddings, batch), jax.device_put(labels, batch),
      jax.device_put(centers, classes), config)

  assert sharded[2][1].sharding.spec == classes.spec
  # Relative tolerance 1e-6, measured against each array's largest entry.
  for want, got in zip(jax.tree.leaves(local), jax.tree.leaves(sharded)):
    want, got = np.asarray(want), np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())


def test_margin_loss_keeps_class_centers_sharded():
  mesh = _auto_mesh((4, 2))
  batch_size, dim, num_classes = 8, 4, 256
  batch = NamedSharding(mesh, PartitionSpec("data"))
  classes = NamedSharding(mesh, PartitionSpec(("data", "model")))
  embeddings = jax.device_put(np.ones((batch_size, dim), np.float32), batch)
  labels = jax.device_put(np.arange(batch_size, dtype=np.int32), batch)
  centers = jax.device_put(np.ones((num_classes, dim), np.float32), classes)

  def loss_fn(centers, embeddings):
    return losses.margin_classification_loss(
        embeddings, labels, centers, sample_rate=0.5, rng=jax.random.key(0))

  compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(
      centers, embeddings).compile()
  # Collectives may move embeddings or per-row sums, never a full class axis
  # (256 classes; each device holds a slice of 32).
  collective = re.compile(
      r"= \(?(\w+\[[\d,]*\].*?) (all-gather|all-reduce|all-to-all|"
      r"collective-permute|reduce-scatter)\(")
  moved_shapes = [match.group(1) for match in
                  map(collective.search, compiled.as_text().splitlines())
                  if match]
  assert moved_shapes, "expected some cross-device communication"
  dims = [int(d) for shape in moved_shapes
          for d in re.findall(r"\d+", re.sub(r"\{[^}]*\}", "", shape))]
  assert num_classes not in dims, moved_shapes


def test_in_domain_terms_align_each_domains_text_with_its_visual_embedding():
  rng = np.random.default_rng(8)
  embeddings = _embeddings(rng, 5, 8)
  weights = {name: 0.0 for name in losses.CONTRASTIVE_TERMS}
  weights.update(page_text_visual=1.0, video_text_visual=0.5, live_text_visual=2.0)
  config = _loss_config(weights=weights)
  total, metrics = losses.cope_loss(embeddings, np.zeros(5, np.int32), None, config, None)
  want = {domain: _np_contrastive(embeddings[f"{domain}_text_embedding"],
                                  embeddings[f"{domain}_visual_embedding"], 0.05, 0.1)
          for domain in ("page", "video", "live")}
  for domain, value in want.items():
    np.testing.assert_allclose(metrics[f"{domain}_text_visual"], value, rtol=1e-5)
  np.testing.assert_allclose(total, want["page"] + 0.5 * want["video"] + 2.0 * want["live"],
                             rtol=1e-5)


def test_needed_embeddings_are_those_the_weighted_terms_read():
  weights = {name: 0.0 for name in losses.CONTRASTIVE_TERMS}
  weights.update(video_text_visual=1.0, page_live=1.0)
  assert losses.needed_embeddings(_loss_config(weights=weights)) == (
      "live_embedding", "page_embedding", "video_text_embedding", "video_visual_embedding")
  with_classifier = losses.needed_embeddings(_loss_config(weights=weights, classify_weight=1.0))
  assert set(with_classifier) == set(losses.needed_embeddings(_loss_config(weights=weights))) | {
      "video_embedding"}
  # Today's default (the seven cross-domain terms) never reads a clip's text.
  cross_domain = {name: 0.0 if name.endswith("_text_visual") else 1.0
                  for name in losses.CONTRASTIVE_TERMS}
  needed = losses.needed_embeddings(_loss_config(weights=cross_domain))
  assert "video_text_embedding" not in needed and "live_text_embedding" not in needed
