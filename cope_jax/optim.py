"""The COPE optimiser: AdamW per parameter group, the release's stepped schedule, clipping.

Trainable parameters are `{"model": <COPE params>, "classifier": {...}}`; each leaf
belongs to one group chosen by its path (see `param_group`), as the release builds its
`torch.optim.AdamW` parameter groups. Every group runs AdamW at its own learning rate
`learning_rate * lr_factors[group] * λ(e)`; frozen groups get zero updates and keep no
optimiser state.

Counting. `total_steps` and `step` count train steps (gradient computations). With
`grad_accum_steps = k` the optimiser updates once every k train steps. The schedule is a
function of the scheduler step `e = update // lr_every`: the release calls its `LambdaLR`'s
`step()` once every `lr_freq` optimiser steps, so the learning rate is constant within
each block of `lr_every` updates and the first block runs at λ(0) = 0.

Schedule, with W = `warmup_steps` and D = `decay_steps` (both in scheduler steps; D = 0
means the end of the run):

  λ(e) = e / W                              for e <= W (linear warm-up from 0)
  λ(e) = (1 + cos(π (e - W) / (D - W))) / 2   for W <= e <= D
  λ(e) = 0                                   for e > D, or, with `clamp_after_decay`
                                             False, the same cosine continued: it rises
                                             again to 1 at e = 2D - W (the release's
                                             LambdaLR never clamps).

Clipping. The gradients of the groups in `grad_clip_groups` are clipped together to the
global norm `grad_clip_norm`; the other groups' gradients are left as they are. The
release clips the model's gradients (`clip_grad_norm_(model.parameters(), 5)`) and not
the margin classifier's, which is a separate module.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameter groups. As released: the text encoder, the visual encoder, everything else
# in the model (the release's test for its fusion group is always true, so its "other"
# group of model parameters is always empty), and the product classifier.
GROUPS = ("text", "visual", "fusion", "classifier")
# Path components that select a group; any other model parameter is "fusion".
_GROUP_OF_MODULE = {
    "classifier": "classifier",
    "text_encoder": "text",
    "visual_encoder": "visual",
}
_DEFAULT_GROUP = "fusion"


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
    "classifier" under `classifier`, "text" under `text_encoder`, "visual" under
    `visual_encoder` (the outermost matching component decides), else "fusion".
  """
  for key in path:
    group = _GROUP_OF_MODULE.get(_key_name(key))
    if group is not None:
      return group
  return _DEFAULT_GROUP


def param_groups(params: Any) -> Any:
  """A pytree like `params` with each leaf replaced by its group name."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(path), params)


def num_updates(optim_config, total_steps: int) -> int:
  """Optimiser updates in a run of `total_steps` train steps."""
  return total_steps // optim_config.grad_accum_steps


def num_scheduler_steps(optim_config, total_steps: int) -> int:
  """Scheduler steps the run's updates fall into (the last block may be partial)."""
  return -(-num_updates(optim_config, total_steps) // optim_config.lr_every)


def decay_end(optim_config, total_steps: int) -> int:
  """D: the scheduler step at which the cosine reaches 0."""
  return (optim_config.decay_steps
          or num_scheduler_steps(optim_config, total_steps))


def _check_group_names(field, names, expected):
  if isinstance(names, str):
    raise ValueError(f"config.optim.{field}: must be a tuple of group names, got the "
                     f"string {names!r}")
  for group in names:
    if group not in GROUPS:
      raise ValueError(f"config.optim.{field}: unknown group {group!r}; {expected}")


def _check_optim_config(optim_config, total_steps: int) -> None:
  def fail(field, message):
    raise ValueError(f"config.optim.{field}: {message}")

  expected = f"expected one of {', '.join(GROUPS)}"
  for group, factor in optim_config.lr_factors.items():
    if group not in GROUPS:
      fail(f"lr_factors.{group}", f"unknown group; {expected}")
    if factor < 0:
      fail(f"lr_factors.{group}", f"must be >= 0, got {factor}")
  _check_group_names("frozen", optim_config.frozen, expected)
  _check_group_names("grad_clip_groups", optim_config.grad_clip_groups, expected)
  for field in ("learning_rate", "weight_decay", "grad_clip_norm",
                "warmup_steps", "decay_steps"):
    if optim_config[field] < 0:
      fail(field, f"must be >= 0, got {optim_config[field]}")
  for field in ("b1", "b2"):
    if not 0 <= optim_config[field] < 1:
      fail(field, f"must be in [0, 1), got {optim_config[field]}")
  for field in ("grad_accum_steps", "lr_every"):
    if optim_config[field] < 1:
      fail(field, f"must be >= 1, got {optim_config[field]}")
  if num_updates(optim_config, total_steps) < 1:
    raise ValueError(
        f"total_steps={total_steps} gives no optimiser update with "
        f"config.optim.grad_accum_steps={optim_config.grad_accum_steps}")
  end = decay_end(optim_config, total_steps)
  if optim_config.warmup_steps >= end:
    where = (f"config.optim.decay_steps={optim_config.decay_steps}"
             if optim_config.decay_steps else
             f"the run's {end} scheduler steps (config.optim.decay_steps=0)")
    fail("warmup_steps", f"{optim_config.warmup_steps} leaves no cosine: it must be "
         f"below the decay end, {where}")


def _lambda_schedule(peak: float, warmup: int, end: int,
                     clamp: bool) -> optax.Schedule:
  """peak * λ(e), e in scheduler steps (see the module docstring)."""
  clamped = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=end,
      end_value=0.0)
  if clamp:
    return clamped

  def unclamped(step):
    past_end = peak * (0.5 * (1 + jnp.cos(jnp.pi * (step - warmup) / (end - warmup))))
    return jnp.where(step <= end, clamped(step), past_end)

  return unclamped


def _stepped(schedule: optax.Schedule, every: int) -> optax.Schedule:
  """schedule(update // every): constant over each block of `every` updates."""
  if every == 1:
    return schedule
  return lambda update: schedule(update // every)


def group_schedules(optim_config, total_steps: int) -> dict[str, optax.Schedule]:
  """Each group's learning rate as a function of the optimiser update count.

  The group's peak `learning_rate * lr_factors[group]` is computed in double precision
  before it enters the schedule, as PyTorch's per-group `lr`. Frozen groups: 0.
  """
  _check_optim_config(optim_config, total_steps)
  warmup = optim_config.warmup_steps
  end = decay_end(optim_config, total_steps)
  schedules = {}
  for group in GROUPS:
    if group in optim_config.frozen:
      schedules[group] = optax.constant_schedule(0.0)
      continue
    peak = float(optim_config.learning_rate) * _lr_factor(optim_config, group)
    schedules[group] = _stepped(
        _lambda_schedule(peak, warmup, end, optim_config.clamp_after_decay),
        optim_config.lr_every)
  return schedules


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """The base learning rate (`learning_rate * λ`) per optimiser update."""
  _check_optim_config(optim_config, total_steps)
  return _stepped(
      _lambda_schedule(float(optim_config.learning_rate), optim_config.warmup_steps,
                       decay_end(optim_config, total_steps),
                       optim_config.clamp_after_decay),
      optim_config.lr_every)


def _lr_factor(optim_config, group: str) -> float:
  return float(optim_config.lr_factors.get(group, 1.0))


def _group_transform(optim_config, schedule, group):
  if group in optim_config.frozen:
    return optax.set_to_zero()
  return optax.adamw(
      learning_rate=schedule,
      b1=optim_config.b1,
      b2=optim_config.b2,
      weight_decay=optim_config.weight_decay)


def _clip_label(group: str, clipped: Sequence[str]) -> str:
  return "clipped" if group in clipped else "unclipped"


def make_optimizer(optim_config,
                   total_steps: int) -> optax.GradientTransformation:
  """The training optimiser.

  Frozen groups' gradients are zeroed first (so they do not count towards the
  clipping norm, as parameters without gradients in PyTorch), then the gradients of
  `grad_clip_groups` are clipped together to global norm `grad_clip_norm` (0: no
  clipping), then each group runs its own AdamW. With `grad_accum_steps` > 1 the whole
  chain runs on the mean gradient of every k consecutive calls (`optax.MultiSteps`);
  the calls in between return zero updates.

  Args:
    optim_config: `config.optim`.
    total_steps: number of train steps of the run.

  Returns:
    An optax GradientTransformation over the `{"model", "classifier"}` params.
  """
  schedules = group_schedules(optim_config, total_steps)
  steps = []
  if optim_config.frozen:
    steps.append(optax.partition(
        {group: (optax.set_to_zero() if group in optim_config.frozen
                 else optax.identity()) for group in GROUPS},
        param_groups))
  if optim_config.grad_clip_norm:
    clipped = tuple(optim_config.grad_clip_groups)
    steps.append(optax.partition(
        {"clipped": optax.clip_by_global_norm(optim_config.grad_clip_norm),
         "unclipped": optax.identity()},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: _clip_label(param_group(path), clipped), params)))
  steps.append(optax.partition(
      {group: _group_transform(optim_config, schedules[group], group)
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
  update = step // optim_config.grad_accum_steps
  return {group: float(schedule(update))
          for group, schedule in group_schedules(optim_config, total_steps).items()}
