r"""Trains COPE: `python -m cope_jax.train --config configs/synthetic_tiny.py --workdir DIR`.

Fields of the config can be overridden on the command line
(`--config.train.batch_size=64`). Rerunning the same command resumes from the last
complete checkpoint in `DIR/checkpoints` with the same data order.

The step is one pure function `train_step(state, batch) -> (state, metrics)`, compiled
once over the device mesh with explicit shardings; `train_and_evaluate` is the loop
around it (data, checkpoints, logging, evaluation hook).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from cope_jax import checkpoints
from cope_jax import cli
from cope_jax import config_checks
from cope_jax import flops
from cope_jax import losses
from cope_jax import metrics_writer
from cope_jax import optim
from cope_jax import result_files
from cope_jax import sharding
from cope_jax.models import cope as cope_model
from data_pipelines import pipelines
from data_pipelines import prepare


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any  # {"model": COPE params, "classifier": {"centers": [C, D]}}
  opt_state: Any
  rng: jax.Array  # [2] uint32, a raw PRNG key (checkpointable as a plain array)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving that state."""


def build_model(config: ml_collections.ConfigDict) -> cope_model.COPE:
  return cope_model.COPE(config.model)


def classifier_size(config: ml_collections.ConfigDict) -> int:
  """Rows of the product classifier: the training products (0 without that loss)."""
  if config.loss.classify_weight <= 0:
    return 0
  return len(prepare.load_products(config.data.prepared_dir, config.data.train_split))


def zero_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A training batch of zeros with the pipeline's shapes (for init and compilation)."""
  spec = pipelines.batch_spec(config)
  return {key: np.zeros((batch_size,) + tuple(shape[1:]), dtype)
          for key, (shape, dtype) in spec.items()}


def init_train_state(rng: jax.Array, *, model: nn.Module, optimizer: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, num_classes: int) -> TrainState:
  """Initial state, parameters boxed with their logical axis names."""
  init_rng, classifier_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": init_rng}, zero_batch(config, 2),
                         train=False)
  params = {"model": variables["params"]}
  if config.loss.classify_weight > 0:
    centers_init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), ("classes", "embed"))
    params["classifier"] = {
        "centers": centers_init(classifier_rng, (num_classes, config.model.emb_dim), jnp.float32)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=state_rng)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation,
               loss_config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch. Pure: same inputs, same outputs."""
  rng, dropout_rng, loss_rng = jax.random.split(state.rng, 3)

  def loss_fn(params):
    embeddings = model.apply({"params": params["model"]}, batch, train=True,
                             rngs={"dropout": dropout_rng})
    class_centers = params["classifier"]["centers"] if "classifier" in params else None
    return losses.cope_loss(embeddings, batch["product_index"], class_centers, loss_config,
                            loss_rng)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 finite=jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def _abstract_like(values: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of placed arrays."""
  return jax.tree.map(
      lambda value: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding),
      values)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       num_classes: int) -> tuple[TrainState, TrainState]:
  """A freshly initialised TrainState created directly sharded, and its shardings."""
  rules = sharding.logical_axis_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return sharding.create_sharded(_state_init_fn(config, num_classes), mesh, rules,
                                   jax.random.PRNGKey(config.seed))


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         num_classes: int) -> TrainState:
  """The TrainState's shapes, dtypes and shardings, computed without allocating it."""
  rules = sharding.logical_axis_rules(config.mesh)
  init_fn = _state_init_fn(config, num_classes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = sharding.param_shardings(
        jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed)), mesh, rules)
    boxed = jax.eval_shape(jax.jit(init_fn, out_shardings=shardings),
                           jax.random.PRNGKey(config.seed))
  return nn.meta.unbox(boxed)


def _state_init_fn(config: ml_collections.ConfigDict, num_classes: int):
  return functools.partial(
      init_train_state, model=build_model(config),
      optimizer=optim.make_optimizer(config.optim, config.train.num_steps), config=config,
      num_classes=num_classes)


def load_converted_weights(state: TrainState, shardings: TrainState,
                           config: ml_collections.ConfigDict) -> TrainState:
  """Loads converted (e.g. PyTorch) weights named by config.train.init_from."""
  loaded = checkpoints.load_params(config.train.init_from)
  if "model" not in loaded:
    raise ValueError(f"config.train.init_from={config.train.init_from!r}: the checkpoint has no "
                     "'model' entry; write it with `python -m cope_jax.convert`")
  merged = checkpoints.merge_params(
      state.params["model"], loaded["model"], allow_missing=config.train.init_allow_missing,
      source=f"config.train.init_from={config.train.init_from!r}")
  model_params = jax.device_put(merged, shardings.params["model"])
  return state.replace(params=dict(state.params, model=model_params))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming if a checkpoint exists) and returns the last logged metrics."""
  config_checks.check_config(config)
  if config.train.eval_every:
    config_checks.check_split(config.data.prepared_dir, config.data.eval_split,
                              "config.data.eval_split", min_domains=2)
  config = config_checks.resolve_vocab_size(config)
  os.makedirs(workdir, exist_ok=True)
  process_index, process_count = jax.process_index(), jax.process_count()
  if config.train.batch_size % process_count:
    raise config_checks.ConfigError(
        f"config.train.batch_size: {config.train.batch_size} is not divisible by the "
        f"{process_count} processes")

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.mesh)
  if config.train.batch_size % mesh.shape["data"]:
    raise config_checks.ConfigError(
        f"config.train.batch_size: {config.train.batch_size} is not divisible by the "
        f"'data' mesh axis ({mesh.shape['data']} devices)")
  num_classes = classifier_size(config)
  model = build_model(config)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)

  state, state_shardings = create_train_state(config, mesh, num_classes)
  num_params = sum(x.size for x in jax.tree.leaves(state.params["model"]))
  if process_index == 0:
    print(f"COPE model: {num_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}; "
          f"{jax.device_count()} {jax.default_backend()} device(s), {process_count} process(es)")

  dataset = pipelines.make_train_dataset(config, process_index, process_count)
  data_iterator = iter(dataset)
  manager = checkpoints.checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
  restored, start_step = checkpoints.restore_latest_intact(
      manager, _abstract_like(state), data_iterator, config=config)
  if start_step is not None:
    state = restored
    if process_index == 0:
      print(f"resumed from {workdir}/checkpoints/{start_step}")
  elif config.train.init_from:
    state = load_converted_weights(state, state_shardings, config)
  start_step = int(state.step)

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, loss_config=config.loss),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=(0,))

  writer = metrics_writer.MetricsWriter(workdir, enabled=process_index == 0)
  flops_per_step = flops.train_flops_per_example(config) * config.train.batch_size
  peak_flops = flops.peak_flops_per_device()
  total_steps = config.train.num_steps
  progress = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                       disable=process_index != 0, dynamic_ncols=True)
  window_metrics: list[dict[str, jax.Array]] = []
  window_start = time.perf_counter()
  last_logged: dict[str, float] = {}
  last_good_step = start_step
  unchecked: list[dict[str, jax.Array]] = []  # step metrics not yet checked for NaN/Inf
  step = start_step
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    while step < total_steps:
      host_batch = next(data_iterator)
      batch = sharding.host_batch_to_global(host_batch, mesh)
      state, step_metrics = step_fn(state, batch)
      step += 1
      unchecked.append(step_metrics)
      log_now = step % config.train.log_every == 0 or step == total_steps
      save_now = step % config.train.checkpoint_every == 0 or step == total_steps
      if log_now or save_now:
        # Checked here rather than every step, so the host never waits on the device
        # between steps; a non-finite state is never saved.
        _stop_if_not_finite(unchecked, step, last_good_step, workdir, manager)
        unchecked = []
      window_metrics.append(step_metrics)
      progress.update(1)
      if log_now:
        elapsed = time.perf_counter() - window_start
        last_logged = _summarise(window_metrics)
        last_logged["examples_per_second"] = (
            len(window_metrics) * config.train.batch_size / max(elapsed, 1e-9))
        for group, lr in optim.current_learning_rates(config.optim, total_steps, step).items():
          last_logged[f"lr/{group}"] = lr
        if peak_flops:
          last_logged["mfu"] = (flops_per_step * len(window_metrics) / elapsed
                                / (peak_flops * jax.device_count()))
        writer.write(step, last_logged)
        progress.set_postfix(loss=f"{last_logged['loss']:.3f}",
                             ex_s=f"{last_logged['examples_per_second']:.1f}")
        window_metrics, window_start = [], time.perf_counter()
      if save_now:
        checkpoints.save_training_state(manager, step, state, data_iterator)
        last_good_step = step
      if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
        from cope_jax import evaluate  # the evaluator imports this module's helpers
        evaluate.evaluate_params(config, workdir, state.params["model"], step, mesh=mesh)
  progress.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return last_logged


def _stop_if_not_finite(unchecked: list[dict[str, jax.Array]], step: int, last_good_step: int,
                        workdir: str, manager) -> None:
  """Raises NonFiniteLossError if any of the last len(unchecked) steps was NaN/Inf."""
  finite = [bool(m["finite"]) for m in jax.device_get(unchecked)]
  if all(finite):
    return
  bad_step = step - len(unchecked) + finite.index(False) + 1
  bad = jax.device_get(unchecked[finite.index(False)])
  manager.wait_until_finished()
  raise NonFiniteLossError(
      f"non-finite loss at step {bad_step}: "
      + ", ".join(f"{k}={float(v):.4g}" for k, v in bad.items() if k != "finite")
      + f". Stopped without saving; {checkpoints.last_good_description(manager)}. "
      "Lower config.optim.learning_rate or check the data.")


def _summarise(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(window)
  return {key: float(np.mean([float(m[key]) for m in stacked]))
          for key in stacked[0] if key != "finite"}


def _main(config: ml_collections.ConfigDict, workdir: str) -> None:
  metrics = train_and_evaluate(config, workdir)
  print(result_files.dumps({"process_index": jax.process_index(), "final_metrics": metrics},
                     sort_keys=True))


if __name__ == "__main__":
  cli.run(_main, "Directory for checkpoints, logs and evaluation reports.")
