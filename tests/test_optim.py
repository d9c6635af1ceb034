"""Tests for cope_jax.optim: parameter groups, the stepped schedule, AdamW per group, clipping.

The release's optimiser against PyTorch, step by step, is tests/test_release_recipe.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import synthetic_tiny
from cope_jax import optim


def _optim_config(**overrides):
  fields = dict(
      learning_rate=1e-2,
      lr_factors={"text": 1.0, "visual": 1.0, "fusion": 1.0, "classifier": 1.0},
      weight_decay=0.0, b1=0.9, b2=0.999, warmup_steps=0, decay_steps=0, lr_every=1,
      clamp_after_decay=True, grad_clip_norm=0.0,
      grad_clip_groups=("text", "visual", "fusion"), grad_accum_steps=1, frozen=())
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _params(rng):
  """One leaf per group, shaped like the trainer's params tree."""
  def leaf(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {
      "model": {
          "text_encoder": {"layer_0": {"kernel": leaf(3, 2)}},
          "visual_encoder": {"conv1": {"kernel": leaf(2, 2)}},
          "page_head": {"fc0": {"kernel": leaf(4)}},
          "video_head": {"fc1": {"bias": leaf(2)}},
          "logit_scale": leaf(1),
      },
      "classifier": {"centers": leaf(5, 2)},
  }


def _group_of_leaf():
  return {
      ("model", "text_encoder", "layer_0", "kernel"): "text",
      ("model", "visual_encoder", "conv1", "kernel"): "visual",
      ("model", "page_head", "fc0", "kernel"): "fusion",
      ("model", "video_head", "fc1", "bias"): "fusion",
      ("model", "logit_scale"): "fusion",  # as released: the rest of the model
      ("classifier", "centers"): "classifier",
  }


def _leaves_by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(key.key for key in path): np.asarray(value)
          for path, value in flat}


def test_param_group_by_path():
  for path, group in _group_of_leaf().items():
    assert optim.param_group(path) == group
  assert optim.param_group(("model", "live_head", "fc1", "kernel")) == "fusion"
  assert optim.param_group(("model", "anything_new", "kernel")) == "fusion"
  assert optim.param_group(()) == "fusion"


def test_param_groups_accepts_tree_key_paths():
  params = _params(np.random.default_rng(0))
  labels = _leaves_by_path(optim.param_groups(params))
  assert {path: str(label) for path, label in labels.items()} == (
      _group_of_leaf())


def test_schedule_warmup_then_cosine_to_zero():
  config = _optim_config(learning_rate=0.5, warmup_steps=10)
  schedule = optim.learning_rate_schedule(config, total_steps=110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(5), 0.25, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 0.5, rtol=1e-6)
  # Halfway through the cosine part: 0.5 * (1 + cos(pi / 2)) of the peak.
  np.testing.assert_allclose(schedule(60), 0.25, rtol=1e-6)
  np.testing.assert_allclose(
      schedule(35), 0.5 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), rtol=1e-6)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-9)


def test_schedule_counts_updates_under_accumulation():
  config = _optim_config(learning_rate=1.0, warmup_steps=5, grad_accum_steps=4)
  rates = optim.current_learning_rates(config, total_steps=40, step=23)
  # Train step 23 is update 5 of 10: end of warm-up.
  np.testing.assert_allclose(rates["text"], 1.0, rtol=1e-6)


def _release_lambda(step, warmup, end):
  """λ of the release's LambdaLR (train.py `warm_up_with_cosine_lr`), in double precision."""
  if warmup and step <= warmup:
    return step / warmup
  return 0.5 * (math.cos((step - warmup) / (end - warmup) * math.pi) + 1)


def _jitted_values(schedule, num_counts):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(num_counts)))


def test_stepped_schedule_holds_each_block_and_starts_at_zero():
  config = _optim_config(learning_rate=2.0, warmup_steps=2, decay_steps=6, lr_every=10)
  values = _jitted_values(optim.learning_rate_schedule(config, total_steps=80), 80)
  blocks = values.reshape(8, 10)
  # Constant within each block of lr_every updates, the first block at λ(0) = 0.
  np.testing.assert_array_equal(blocks, blocks[:, :1].repeat(10, axis=1))
  assert not blocks[0].any()
  want = [2.0 * _release_lambda(e, 2, 6) for e in range(7)] + [0.0]
  np.testing.assert_allclose(blocks[:, 0], want, rtol=1e-6, atol=1e-7)


def test_unclamped_cosine_rises_again_past_its_end():
  kwargs = dict(learning_rate=1.0, warmup_steps=3, decay_steps=10)
  clamped = _jitted_values(optim.learning_rate_schedule(
      _optim_config(**kwargs), total_steps=40), 40)
  unclamped = _jitted_values(optim.learning_rate_schedule(
      _optim_config(clamp_after_decay=False, **kwargs), total_steps=40), 40)
  release = np.array([_release_lambda(e, 3, 10) for e in range(40)])
  np.testing.assert_allclose(unclamped, release, rtol=1e-6, atol=1e-6)
  # Up to the end both are one schedule; past it the clamp holds 0 while the release's
  # λ climbs back to 1 at 2D - W = 17 and falls again.
  np.testing.assert_array_equal(unclamped[:11], clamped[:11])
  assert not clamped[11:].any()
  assert unclamped[17] == pytest.approx(1.0) and unclamped[11] > 0


def test_group_peak_is_the_double_precision_product():
  # PyTorch's group lr is lr * factor in double precision; ours enters the schedule the
  # same way, so at λ = 1 the float32 rate is that product rounded once.
  config = _optim_config(learning_rate=5e-3, warmup_steps=1,
                         lr_factors={"text": 1e-3, "visual": 2e-3, "fusion": 1.0,
                                     "classifier": 1.0})
  rates = {group: float(schedule(1)) for group, schedule in
           optim.group_schedules(config, total_steps=10).items()}
  for group, factor in config.lr_factors.items():
    assert rates[group] == float(np.float32(5e-3 * factor)), group


def _demo_optim_config():
  return synthetic_tiny.get_config().optim


def _previous_optimizer(optim_config, total_steps):
  """The optimiser as it was before the release's schedule options, for the demo check:
  one clip over every gradient, then AdamW per group at factor * schedule(update)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim_config.learning_rate, optim_config.warmup_steps, total_steps, 0.0)

  def adamw(factor):
    return optax.adamw(lambda count: factor * schedule(count), b1=optim_config.b1,
                       b2=optim_config.b2, weight_decay=optim_config.weight_decay)
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip_norm),
      optax.partition({group: adamw(factor) for group, factor
                       in optim_config.lr_factors.items()}, optim.param_groups))


def test_demo_config_keeps_its_learning_rates_exactly():
  optim_config = _demo_optim_config()
  total_steps = synthetic_tiny.get_config().train.num_steps
  previous = optax.warmup_cosine_decay_schedule(
      0.0, optim_config.learning_rate, optim_config.warmup_steps, total_steps, 0.0)
  want = _jitted_values(previous, total_steps + 1)
  for group, schedule in optim.group_schedules(optim_config, total_steps).items():
    np.testing.assert_array_equal(_jitted_values(schedule, total_steps + 1), want,
                                  err_msg=group)
  for step in (0, 1, 49, 50, 51, 333, 600, 1199, 1200):  # the logged values too
    logged = optim.current_learning_rates(optim_config, total_steps, step)
    assert set(logged.values()) == {float(previous(step))}, step


def test_demo_config_optimizer_updates_are_unchanged():
  optim_config = _demo_optim_config()
  rng = np.random.default_rng(7)
  params = _params(rng)
  del params["classifier"]  # the demo trains no classifier
  new = optim.make_optimizer(optim_config, total_steps=1200)
  old = _previous_optimizer(optim_config, total_steps=1200)
  new_update, old_update = jax.jit(new.update), jax.jit(old.update)
  new_state, old_state = new.init(params), old.init(params)
  new_params = old_params = params
  for _ in range(4):
    grads = jax.tree.map(lambda p: jnp.asarray(
        3.0 * rng.standard_normal(p.shape), jnp.float32), params)  # norm > 1: clipped
    updates, new_state = new_update(grads, new_state, new_params)
    new_params = optax.apply_updates(new_params, updates)
    updates, old_state = old_update(grads, old_state, old_params)
    old_params = optax.apply_updates(old_params, updates)
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(old_params)):
    np.testing.assert_array_equal(got, want)
  assert any((np.asarray(a) != np.asarray(b)).any()
             for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))


def test_each_group_steps_with_its_own_learning_rate():
  factors = {"text": 1e-3, "visual": 2e-3, "fusion": 1.0, "classifier": 0.5}
  config = _optim_config(learning_rate=0.1, weight_decay=0.01,
                         lr_factors=factors)
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads = jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), params)
  optimizer = optim.make_optimizer(config, total_steps=100)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)

  got = _leaves_by_path(updates)
  param_leaves, grad_leaves = _leaves_by_path(params), _leaves_by_path(grads)
  lrs = optim.current_learning_rates(config, 100, 0)
  for path, group in _group_of_leaf().items():
    lr = 0.1 * factors[group]
    assert lrs[group] == pytest.approx(lr)
    # First Adam step from zero state: the bias-corrected update is
    # g / (|g| + eps) ~ sign(g); AdamW adds weight_decay * param.
    want = -lr * (np.sign(grad_leaves[path]) + 0.01 * param_leaves[path])
    np.testing.assert_allclose(got[path], want, rtol=1e-5, err_msg=str(path))


def test_frozen_group_gets_no_update_and_no_adam_state():
  config = _optim_config(frozen=("text", "visual"))
  params = _params(np.random.default_rng(2))
  grads = jax.tree.map(jnp.ones_like, params)
  optimizer = optim.make_optimizer(config, total_steps=10)
  state = optimizer.init(params)
  updates, state = optimizer.update(grads, state, params)
  updates = _leaves_by_path(updates)
  for path, group in _group_of_leaf().items():
    if group in ("text", "visual"):
      assert not updates[path].any(), path
    else:
      assert np.abs(updates[path]).min() > 0, path
  # Adam moments exist only for the trainable leaves.
  state_sizes = sum(leaf.size for leaf in jax.tree.leaves(state)
                    if jnp.ndim(leaf) > 0)
  trainable_sizes = sum(value.size for path, value in
                        _leaves_by_path(params).items()
                        if _group_of_leaf()[path] not in ("text", "visual"))
  assert state_sizes == 2 * trainable_sizes
  rates = optim.current_learning_rates(config, 10, 0)
  assert rates["text"] == rates["visual"] == 0.0 and rates["fusion"] > 0


def test_accumulation_equals_one_step_on_the_mean_gradient():
  rng = np.random.default_rng(3)
  params = _params(rng)
  micro_grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), params) for _ in range(3)]
  mean_grad = jax.tree.map(lambda *g: sum(g) / 3, *micro_grads)

  accumulating = optim.make_optimizer(
      _optim_config(grad_accum_steps=3, weight_decay=0.1, grad_clip_norm=1.0),
      total_steps=30)
  state = accumulating.init(params)
  accumulated = params
  for step, grad in enumerate(micro_grads):
    updates, state = accumulating.update(grad, state, accumulated)
    if step < 2:
      assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates))
    accumulated = optax.apply_updates(accumulated, updates)

  single = optim.make_optimizer(
      _optim_config(weight_decay=0.1, grad_clip_norm=1.0), total_steps=10)
  updates, _ = single.update(mean_grad, single.init(params), params)
  expected = optax.apply_updates(params, updates)
  for got, want in zip(jax.tree.leaves(accumulated), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _page_head_second_moment(state):
  """Adam's nu for params["model"]["page_head"]["w"] (the fusion group)."""
  adam_states = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                 if isinstance(leaf, optax.ScaleByAdamState)]
  moments = [s.nu["model"]["page_head"]["w"] for s in adam_states]
  moments = [m for m in moments if not isinstance(m, optax.MaskedNode)]
  assert len(moments) == 1
  return np.asarray(moments[0])


def test_clipping_scales_gradients_to_the_global_norm():
  params = {"model": {"page_head": {"w": jnp.zeros((4,))}}}
  grads = {"model": {"page_head": {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}}}
  clip = optim.make_optimizer(_optim_config(grad_clip_norm=0.5),
                              total_steps=10)
  no_clip = optim.make_optimizer(_optim_config(), total_steps=10)
  # Adam's first step is scale-invariant, so read the gradient it saw from
  # the second moment it stores: nu = (1 - b2) * g ** 2.
  _, clip_state = clip.update(grads, clip.init(params), params)
  _, plain_state = no_clip.update(grads, no_clip.init(params), params)

  b2 = 0.999
  np.testing.assert_allclose(_page_head_second_moment(clip_state),
                             (1 - b2) * np.array([0.3, 0.4, 0, 0]) ** 2,
                             rtol=1e-5)
  np.testing.assert_allclose(_page_head_second_moment(plain_state),
                             (1 - b2) * np.array([3.0, 4.0, 0, 0]) ** 2,
                             rtol=1e-5)


def test_classifier_gradients_are_neither_clipped_nor_counted():
  params = {"model": {"page_head": {"w": jnp.zeros((2,))}},
            "classifier": {"centers": jnp.zeros((2,))}}
  grads = {"model": {"page_head": {"w": jnp.array([3.0, 4.0])}},
           "classifier": {"centers": jnp.array([30.0, 40.0])}}
  optimizer = optim.make_optimizer(_optim_config(grad_clip_norm=1.0), total_steps=10)
  _, state = optimizer.update(grads, optimizer.init(params), params)
  adam_states = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                 if isinstance(leaf, optax.ScaleByAdamState)]
  seen = {}
  for adam in adam_states:
    for path, value in _leaves_by_path(adam.nu).items():
      if not isinstance(value, optax.MaskedNode) and np.ndim(value):
        seen[path] = np.asarray(value)
  # The model's gradient alone (norm 5) is scaled to norm 1; the classifier's is not.
  np.testing.assert_allclose(seen[("model", "page_head", "w")],
                             0.001 * np.array([0.6, 0.8]) ** 2, rtol=1e-5)
  np.testing.assert_allclose(seen[("classifier", "centers")],
                             0.001 * np.array([30.0, 40.0]) ** 2, rtol=1e-5)


def test_clipping_ignores_frozen_gradients():
  params = {"model": {"page_head": {"w": jnp.zeros((2,))},
                      "text_encoder": {"w": jnp.zeros((2,))}}}
  grads = {"model": {"page_head": {"w": jnp.array([0.3, 0.4])},
                     "text_encoder": {"w": jnp.array([100.0, 0.0])}}}
  optimizer = optim.make_optimizer(
      _optim_config(grad_clip_norm=1.0, frozen=("text",)), total_steps=10)
  _, state = optimizer.update(grads, optimizer.init(params), params)
  # The trainable gradient (norm 0.5) is below the limit: left as it is.
  np.testing.assert_allclose(_page_head_second_moment(state),
                             0.001 * np.array([0.09, 0.16]), rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"lr_factors": {"txt": 1.0}},
     r"config\.optim\.lr_factors\.txt: unknown group; expected one of text"),
    ({"lr_factors": {"text": -1.0}}, r"config\.optim\.lr_factors\.text"),
    ({"frozen": ("vision",)}, r"config\.optim\.frozen: unknown group 'vision'"),
    ({"frozen": "text"}, r"config\.optim\.frozen"),
    ({"weight_decay": -0.1}, r"config\.optim\.weight_decay"),
    ({"grad_accum_steps": 0}, r"config\.optim\.grad_accum_steps"),
    ({"warmup_steps": 50}, r"config\.optim\.warmup_steps"),
    ({"warmup_steps": 4, "decay_steps": 4}, r"config\.optim\.warmup_steps: 4 leaves no cosine"),
    ({"lr_every": 0}, r"config\.optim\.lr_every"),
    ({"decay_steps": -1}, r"config\.optim\.decay_steps"),
    ({"grad_clip_groups": ("model",)},
     r"config\.optim\.grad_clip_groups: unknown group 'model'"),
])
def test_bad_config_errors_name_the_field(overrides, message):
  config = _optim_config(**overrides)
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(config, total_steps=20)


def test_optimizer_accepts_logically_partitioned_params():
  # The trainer initialises the optimiser on boxed params (see
  # sharding.create_sharded); groups must still be found through the boxes.
  def boxed(value, names):
    return nn.LogicallyPartitioned(value, names)
  params = {"model": {
      "text_encoder": {"w": boxed(jnp.ones((2, 3)), ("embed", "mlp"))},
      "page_head": {"w": boxed(jnp.ones((3,)), ("mlp",))}}}
  optimizer = optim.make_optimizer(
      _optim_config(frozen=("text",), grad_accum_steps=2), total_steps=10)
  state = optimizer.init(params)
  moments = [leaf for leaf in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
             if isinstance(leaf, nn.LogicallyPartitioned)
             and not isinstance(leaf.value, optax.MaskedNode)]
  # acc_grads for both leaves, Adam mu and nu for the fusion leaf only.
  assert sorted(m.names for m in moments) == sorted(
      [("embed", "mlp"), ("mlp",), ("mlp",), ("mlp",)])
