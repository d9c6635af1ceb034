"""The COPE optimiser: AdamW with per-group learning-rate factors.

Trainable parameters are `{"model": <COPE params>, "classifier": {...}}`; each
leaf belongs to one group chosen by its path (see `param_group`). Every group
runs AdamW with learning rate `schedule(step) * lr_factors[group]`, as the
release's per-parameter-group PyTorch AdamW; frozen groups get zero updates
and keep no optimiser state.

Steps: `total_steps` and `step` below count train steps (gradient
computations). With `grad_accum_steps = k` the optimiser updates once every k
train steps, the schedule advances once per update and spans `total_steps // k`
updates; `warmup_steps` counts updates.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from data_pipelines import domains

# Parameter groups, and the top-level submodule names that select them.
GROUPS = ("text", "visual", "fusion", "classifier", "other")
_GROUP_OF_MODULE = {
    "text_encoder": "text",
    "visual_encoder": "visual",
    **{domain.head: "fusion" for domain in domains.DOMAINS},
    "classifier": "classifier",
}


def _key_name(key: Any) -> str:
  """A path component as a string (plain strings or jax.tree_util keys)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def param_group(path: Sequence[Any]) -> str:
  """The group of a parameter, from its path in the params tree.

  Args:
    path: path components, e.g. ("model", "text_encoder", "layer_0", "kernel")
      or a `jax.tree_util` key path.

  Returns:
    "text" under `text_encoder`, "visual" under `visual_encoder`, "fusion"
    under a domain's head (`page_head`, ...), "classifier" under
    `classifier`, else "other". The outermost matching component decides.
  """
  for key in path:
    group = _GROUP_OF_MODULE.get(_key_name(key))
    if group is not None:
      return group
  return "other"


def param_groups(params: Any) -> Any:
  """A pytree like `params` with each leaf replaced by its group name."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(path), params)


def _check_optim_config(optim_config, total_steps: int) -> None:
  def fail(field, message):
    raise ValueError(f"config.optim.{field}: {message}")

  expected = f"expected one of {', '.join(GROUPS)}"
  for group, factor in optim_config.lr_factors.items():
    if group not in GROUPS:
      fail(f"lr_factors.{group}", f"unknown group; {expected}")
    if factor < 0:
      fail(f"lr_factors.{group}", f"must be >= 0, got {factor}")
  frozen = optim_config.frozen
  if isinstance(frozen, str):
    fail("frozen", f"must be a tuple of group names, got the string {frozen!r}")
  for group in frozen:
    if group not in GROUPS:
      fail("frozen", f"unknown group {group!r}; {expected}")
  for field in ("learning_rate", "weight_decay", "grad_clip_norm",
                "warmup_steps"):
    if optim_config[field] < 0:
      fail(field, f"must be >= 0, got {optim_config[field]}")
  for field in ("b1", "b2"):
    if not 0 <= optim_config[field] < 1:
      fail(field, f"must be in [0, 1), got {optim_config[field]}")
  if optim_config.grad_accum_steps < 1:
    fail("grad_accum_steps",
         f"must be >= 1, got {optim_config.grad_accum_steps}")
  num_updates = total_steps // optim_config.grad_accum_steps
  if num_updates < 1:
    raise ValueError(
        f"total_steps={total_steps} gives no optimiser update with "
        f"config.optim.grad_accum_steps={optim_config.grad_accum_steps}")
  if optim_config.warmup_steps > num_updates:
    fail("warmup_steps", f"{optim_config.warmup_steps} exceeds the "
         f"{num_updates} optimiser updates of the run")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Base learning rate per optimiser update.

  Linear warm-up from 0 to `optim_config.learning_rate` over `warmup_steps`
  updates, then cosine decay to 0 at `total_steps // grad_accum_steps`.
  """
  _check_optim_config(optim_config, total_steps)
  num_updates = total_steps // optim_config.grad_accum_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim_config.learning_rate,
      warmup_steps=optim_config.warmup_steps,
      decay_steps=num_updates,
      end_value=0.0)


def _lr_factor(optim_config, group: str) -> float:
  return float(optim_config.lr_factors.get(group, 1.0))


def _group_transform(optim_config, schedule, group):
  if group in optim_config.frozen:
    return optax.set_to_zero()
  factor = _lr_factor(optim_config, group)
  return optax.adamw(
      learning_rate=lambda count: factor * schedule(count),
      b1=optim_config.b1,
      b2=optim_config.b2,
      weight_decay=optim_config.weight_decay)


def make_optimizer(optim_config,
                   total_steps: int) -> optax.GradientTransformation:
  """The training optimiser.

  Frozen groups' gradients are zeroed first (so they do not count towards the
  clipping norm, as parameters without gradients in PyTorch), then the
  gradients are clipped to global norm `grad_clip_norm` (0: no clipping), then
  each group runs its own AdamW. With `grad_accum_steps` > 1 the whole chain
  runs on the mean gradient of every k consecutive calls (`optax.MultiSteps`);
  the calls in between return zero updates.

  Args:
    optim_config: `config.optim`.
    total_steps: number of train steps of the run.

  Returns:
    An optax GradientTransformation over the `{"model", "classifier"}` params.
  """
  schedule = learning_rate_schedule(optim_config, total_steps)
  steps = []
  if optim_config.frozen:
    steps.append(optax.partition(
        {group: (optax.set_to_zero() if group in optim_config.frozen
                 else optax.identity()) for group in GROUPS},
        param_groups))
  if optim_config.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  steps.append(optax.partition(
      {group: _group_transform(optim_config, schedule, group)
       for group in GROUPS},
      param_groups))
  optimizer = optax.chain(*steps)
  if optim_config.grad_accum_steps > 1:
    optimizer = optax.MultiSteps(
        optimizer, every_k_schedule=optim_config.grad_accum_steps
    ).gradient_transformation()
  return optimizer


def current_learning_rates(optim_config, total_steps: int,
                           step: int) -> Mapping[str, float]:
  """Learning rate of each group at train step `step`, for logging.

  Frozen groups report 0.
  """
  schedule = learning_rate_schedule(optim_config, total_steps)
  base = float(schedule(step // optim_config.grad_accum_steps))
  return {group: (0.0 if group in optim_config.frozen
                  else base * _lr_factor(optim_config, group))
          for group in GROUPS}
