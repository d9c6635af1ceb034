r"""Trains COPE: `python -m cope_jax.train --config configs/synthetic_tiny.py --workdir DIR`.

Fields of the config can be overridden on the command line
(`--config.train.batch_size=64`). Rerunning the same command resumes from the last
complete checkpoint in `DIR/checkpoints` with the same data order.

The step is one pure function `train_step(state, batch) -> (state, metrics)`, compiled
once over the device mesh with explicit shardings. Around it:

  setup(config, workdir) -> TrainingRun     mesh, state (fresh, resumed or converted),
                                            data iterator, checkpoint manager, step_fn
  run_steps(run, hooks)                     the step loop; after every step each hook
                                            sees (step, state, metrics); a SIGINT or
                                            SIGTERM ends it at a step boundary, agreed
                                            by every process, with that step saved
  hooks                                     FiniteCheck (NaN/Inf at log and checkpoint
                                            boundaries), Logger (metrics.jsonl,
                                            TensorBoard, progress bar), Checkpointer,
                                            PeriodicEvaluation (an evaluation callback)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cope_jax import augment
from cope_jax.base import progress
from cope_jax import checkpoints
from cope_jax import cli
from cope_jax import config_checks
from cope_jax import distributed
from cope_jax import evaluate
from cope_jax import evaluators
from cope_jax import flops
from cope_jax import losses
from cope_jax import metrics_writer
from cope_jax import optim
from cope_jax.base import result_files
from cope_jax import run_record
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import workdir_lock
from data_pipelines import pipelines
from cope_jax.base import stop_signals

TrainState = state_lib.TrainState
# (config, workdir, model params, step, mesh, names=[evaluators due]) -> metrics: the
# periodic evaluation (`cope_jax.evaluate.evaluate_params`).
EvaluateFn = Callable[..., Any]


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving that state."""


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation,
               loss_config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch. Pure: same inputs, same outputs."""
  rng, dropout_rng, loss_rng = jax.random.split(state.rng, 3)
  needed = losses.needed_embeddings(loss_config)
  # Crop, resize and flip here when the pipeline left them to the device
  # (config.data.augment_on="device"); a no-op for host-augmented batches.
  batch = augment.augment_batch(batch, model.config.vision.image_size)

  def loss_fn(params):
    embeddings = model.apply({"params": params["model"]}, batch, train=True, outputs=needed,
                             rngs={"dropout": dropout_rng})
    class_centers = params["classifier"]["centers"] if "classifier" in params else None
    return losses.cope_loss(embeddings, batch["product_index"], class_centers, loss_config,
                            loss_rng)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Each term with a non-zero weight, before weighting, as `loss/<term>`; `loss` is the
  # weighted total.
  metrics = {f"loss/{name}": value for name, value in terms.items() if name != "total"}
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 finite=jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


# ---- set-up -------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingRun:
  """Everything the step loop and its hooks share, made once by `setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  state: TrainState
  state_shardings: TrainState
  data_iterator: Any  # checkpointable Grain iterator
  manager: Any  # orbax CheckpointManager of workdir/checkpoints
  step_fn: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]
  start_step: int
  # The step a stop request ends the run at (set by `run_steps` before that step's hooks
  # run), or None: the run ends at config.train.num_steps.
  stop_step: int | None = None

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  @property
  def final_step(self) -> int:
    """The run's last step: the hooks log, check and save there."""
    return self.config.train.num_steps if self.stop_step is None else self.stop_step


def jit_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                   optimizer: optax.GradientTransformation, state_shardings: TrainState,
                   mesh: jax.sharding.Mesh):
  """`train_step` jitted as training runs it: state in and out with `state_shardings`
  (donated), the batch split over 'data', XLA options from config.train.compiler_options.
  (state, batch) -> (state, metrics)."""
  options = config_checks.compiler_options(config.train.compiler_options)
  return jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, loss_config=config.loss),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, None), donate_argnums=(0,),
      compiler_options=options or None)


def _check_batch_divisibility(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  for count, what in ((jax.process_count(), "processes"),
                      (mesh.shape["data"], "devices of the 'data' mesh axis")):
    if config.train.batch_size % count:
      raise config_checks.ConfigError(
          f"config.train.batch_size: {config.train.batch_size} is not divisible by the "
          f"{count} {what}")


def setup(config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False,
          config_source: str = "", overrides: Sequence[str] = ()) -> TrainingRun:
  """Checks the config, records the run (or checks a resumed one against its record,
  `run_record.check_training`; written by `record_training` once ready), builds mesh, state and data, resumes from the last
  checkpoint."""
  config_checks.check_config(config)
  config, resumed_run = run_record.check_training(config, workdir, allow_change=allow_change)
  config_checks.check_split(config.data.prepared_dir, config.data.train_split,
                            "config.data.train_split", config_name=config.data.prepared_config)
  if any(int(entry.get("every", 0)) for entry in config.evals.values()):
    config_checks.check_split(config.data.prepared_dir, config.data.eval_split,
                              "config.data.eval_split", min_domains=2,
                              config_name=config.data.prepared_config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  _check_batch_divisibility(config, mesh)
  model = state_lib.build_model(config)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  state, state_shardings = state_lib.create_train_state(
      config, mesh, state_lib.classifier_size(config))
  if jax.process_index() == 0:
    num_params = sum(x.size for x in jax.tree.leaves(state.params["model"]))
    print(f"COPE model: {num_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}; "
          f"{jax.device_count()} {jax.default_backend()} device(s), "
          f"{jax.process_count()} process(es)")

  data_iterator = iter(pipelines.make_train_dataset(config, jax.process_index(),
                                                    jax.process_count()))
  manager = checkpoints.checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
  # The newest intact step (a damaged newer one is reported, set aside, never deleted).
  restored, latest = checkpoints.restore_latest_intact(
      manager, state_lib.abstract_like(state), data_iterator, config=config)
  if latest is not None:
    state = restored
    if jax.process_index() == 0:
      print(f"resumed from {workdir}/checkpoints/{latest}")
  elif config.train.init_from:
    model_params = state_lib.load_converted_weights(
        state.params["model"], state_shardings.params["model"], config)
    state = state.replace(params=dict(state.params, model=model_params))

  step_fn = jit_train_step(config, model, optimizer, state_shardings, mesh)
  if jax.process_index() == 0:
    run_record.record_training(config, workdir, resumed_run, allow_change=allow_change,
                               config_source=config_source, overrides=overrides)
  return TrainingRun(config=config, workdir=workdir, mesh=mesh, state=state,
                     state_shardings=state_shardings, data_iterator=data_iterator,
                     manager=manager, step_fn=step_fn, start_step=int(state.step))


# ---- hooks --------------------------------------------------------------------------


class Hook(Protocol):
  """Runs after every step; `close` once when the loop ends."""

  def __call__(self, step: int, state: TrainState, metrics: dict[str, jax.Array]) -> None:
    ...

  def close(self) -> None:
    ...


def _is_boundary(step: int, every: int, total: int) -> bool:
  return step % every == 0 or step == total


class FiniteCheck:
  """Raises NonFiniteLossError when a step since the last log/checkpoint was NaN/Inf.

  Checked at log and checkpoint boundaries rather than every step, so the host never
  waits on the device between steps; it runs before the Checkpointer, so a non-finite
  state is never saved.
  """

  def __init__(self, run: TrainingRun):
    self._run = run
    self._unchecked: list[dict[str, jax.Array]] = []

  def __call__(self, step, state, metrics):
    train = self._run.config.train
    self._unchecked.append(metrics)
    if not (_is_boundary(step, train.log_every, self._run.final_step)
            or _is_boundary(step, train.checkpoint_every, self._run.final_step)):
      return
    finite = [bool(m["finite"]) for m in jax.device_get(self._unchecked)]
    unchecked, self._unchecked = self._unchecked, []
    if all(finite):
      return
    bad_step = step - len(unchecked) + finite.index(False) + 1
    bad = jax.device_get(unchecked[finite.index(False)])
    self._run.manager.wait_until_finished()
    raise NonFiniteLossError(
        f"non-finite loss at step {bad_step}: "
        + ", ".join(f"{k}={float(v):.4g}" for k, v in bad.items() if k != "finite")
        + f". Stopped without saving; {checkpoints.last_good_description(self._run.manager)}. "
        "Lower config.optim.learning_rate or check the data.")

  def close(self):
    pass


class Logger:
  """Window means of the step metrics, lr, throughput and MFU every `train.log_every`
  steps to metrics.jsonl / TensorBoard (process 0), and the progress bar.

  `data_stall` is the share of the window's wall time the loop spent getting its
  batches (`next` on the data iterator and the transfer to the devices, as `run_steps`
  reports in each step's `data_wait_seconds`). So that this is time the devices could
  have been computing, the logger lets at most one step run ahead: after step k is
  dispatched it waits for step k - 1 (the devices still have step k queued).
  """

  def __init__(self, run: TrainingRun):
    config = run.config
    self._run = run
    self._writer = metrics_writer.MetricsWriter(run.workdir, enabled=run.is_chief,
                                                start_step=run.start_step)
    self._flops_per_step = flops.train_flops_per_example(config) * config.train.batch_size
    self._peak_flops = flops.peak_flops_per_device()
    # The bar starts once the first step has run: its rate and time left would
    # otherwise count the compilation.
    self._progress = None
    self._created = time.perf_counter()
    if run.is_chief and run.start_step < config.train.num_steps:
      print("compiling the training step (the first step waits for it)", flush=True)
    self._window: list[dict[str, jax.Array]] = []
    self._window_start = time.perf_counter()
    self._previous_loss = None  # the step before this one, waited for (see above)
    self.last_logged: dict[str, float] = {}

  def __call__(self, step, state, metrics):
    config = self._run.config
    if self._previous_loss is not None:
      jax.block_until_ready(self._previous_loss)
    self._previous_loss = metrics["loss"]
    self._window.append(metrics)
    if self._progress is None:
      if self._run.is_chief:
        print(f"step {step} done {time.perf_counter() - self._created:.1f} s after start-up "
              "(compilation included)", flush=True)
      self._progress = progress.bar(config.train.num_steps, desc="train", unit="step",
                                    initial=step, disable=not self._run.is_chief)
    else:
      self._progress.update(1)
    if not _is_boundary(step, config.train.log_every, self._run.final_step):
      return
    elapsed = time.perf_counter() - self._window_start
    data_wait = sum(m.get("data_wait_seconds", 0.0) for m in self._window)
    logged = _summarise([{k: v for k, v in m.items() if k != "data_wait_seconds"}
                         for m in self._window])
    logged["data_stall"] = data_wait / max(elapsed, 1e-9)
    logged["examples_per_second"] = (
        len(self._window) * config.train.batch_size / max(elapsed, 1e-9))
    for group, lr in optim.current_learning_rates(config.optim, config.train.num_steps,
                                                  step).items():
      logged[f"lr/{group}"] = lr
    if self._peak_flops:
      logged["mfu"] = (self._flops_per_step * len(self._window) / elapsed
                       / (self._peak_flops * jax.device_count()))
    self._writer.write(step, logged)
    self._progress.set_postfix(loss=f"{logged['loss']:.3f}",
                               ex_s=f"{logged['examples_per_second']:.1f}")
    self.last_logged = logged
    self._window, self._window_start = [], time.perf_counter()

  def close(self):
    if self._progress is not None:
      self._progress.close()
    self._writer.close()


class Checkpointer:
  """Saves state and data-iterator position every `train.checkpoint_every` steps and at
  the run's last step (asynchronously; `close` waits for the last save). A failed write
  is a `CheckpointWriteError`, one paragraph."""

  def __init__(self, run: TrainingRun):
    self._run = run

  def __call__(self, step, state, metrics):
    train = self._run.config.train
    if _is_boundary(step, train.checkpoint_every, self._run.final_step):
      with checkpoints.write_errors_explained(self._run.manager, step):
        checkpoints.save_training_state(self._run.manager, step, state,
                                        self._run.data_iterator)

  def close(self):
    try:
      with checkpoints.write_errors_explained(self._run.manager):
        self._run.manager.wait_until_finished()
    finally:
      self._run.manager.close()


class PeriodicEvaluation:
  """Calls `evaluate_fn` with the model parameters at the steps where some evaluator of
  `config.evals` is due (its `every`), naming those evaluators; not at the last step
  (the evaluate entry point does that). The schedule is read from the config: no
  evaluator is imported here."""

  def __init__(self, run: TrainingRun, evaluate_fn: EvaluateFn):
    self._run = run
    self._evaluate_fn = evaluate_fn

  def __call__(self, step, state, metrics):
    if step >= self._run.final_step:
      return
    names = evaluators.due(self._run.config, step)
    if names:
      self._evaluate_fn(self._run.config, self._run.workdir, state.params["model"], step,
                        self._run.mesh, names=names)

  def close(self):
    pass


def default_hooks(run: TrainingRun, evaluate_fn: EvaluateFn | None = None) -> list[Hook]:
  """FiniteCheck, Logger, Checkpointer and (with a callback) PeriodicEvaluation, in the
  order they run after a step."""
  hooks: list[Hook] = [FiniteCheck(run), Logger(run), Checkpointer(run)]
  if evaluate_fn is not None:
    hooks.append(PeriodicEvaluation(run, evaluate_fn))
  return hooks


# ---- the loop -----------------------------------------------------------------------


def run_steps(run: TrainingRun, hooks: Sequence[Hook],
              stop: distributed.StepStop | None = None) -> TrainState:
  """Steps from `run.start_step` to `config.train.num_steps`; returns the final state.

  `stop` (default: from the entry point's SIGINT/SIGTERM handler) ends the loop earlier:
  the step where every process agrees to stop becomes the run's last step, which the
  hooks log, check and save as they do the final one; once the save is written,
  `stop_signals.Stopped` is raised (exit status 130 or 143).
  """
  state = run.state
  run.state = None  # donated to the first step: never read it again
  rules = sharding.logical_axis_rules(run.config.mesh)
  step = run.start_step
  if step >= run.config.train.num_steps and run.is_chief:
    print(f"already at step {step} of {run.config.train.num_steps}: nothing to train "
          "(a larger --config.train.num_steps trains on)", flush=True)
  stop = stop or distributed.StepStop(stop_signals.active())
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(rules):
      if stop.begin(step):
        raise stop.stopped(step, before_first_step=True)
      step_fn = run.step_fn
      while step < run.config.train.num_steps and run.stop_step is None:
        fetch_start = time.perf_counter()
        batch = sharding.host_batch_to_global(next(run.data_iterator), run.mesh)
        data_wait_seconds = time.perf_counter() - fetch_start
        if step_fn is run.step_fn and distributed.is_multi_process():
          step_fn = distributed.compile_together(
              run.step_fn, state, batch, name=f"train step {step + 1}",
              timeout_seconds=run.config.get("distributed", {}).get(
                  "initialization_timeout", distributed.DEFAULT_TIMEOUTS[
                      "initialization_timeout"]))
        state, step_metrics = step_fn(state, batch)
        step_metrics = dict(step_metrics, data_wait_seconds=data_wait_seconds)
        step += 1
        if stop.after(step):
          run.stop_step = step
        for hook in hooks:
          hook(step, state, step_metrics)
  finally:
    for hook in hooks:
      hook.close()
  if run.stop_step is not None:
    raise stop.stopped(step, finished=step >= run.config.train.num_steps)
  if stop.requested_here:  # the signal came during the last step (or, under
    raise stop.stopped(step, finished=True)  # jax.distributed, agreement came too late)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_fn: EvaluateFn | None = None, **run_options) -> dict[str, float]:
  """Trains (resuming if a checkpoint exists) and returns the last logged metrics.

  `evaluate_fn`, when given, runs where an evaluator of `config.evals` is due (`every`).
  `run_options`: `setup`'s (allow_change, config_source, overrides).
  """
  # One writer per workdir (process 0 writes its outputs): a second run stops here. A
  # signal from here on stops the run at a step boundary (`run_steps`).
  signals = stop_signals.active()
  with workdir_lock.hold(workdir, "train", enabled=jax.process_index() == 0), \
      (signals.deferred() if signals is not None else contextlib.nullcontext()):
    run = setup(config, workdir, **run_options)
    hooks = default_hooks(run, evaluate_fn)
    run_steps(run, hooks)
  logged = next(hook.last_logged for hook in hooks if isinstance(hook, Logger))
  if not logged:  # nothing trained now: the last metrics the run logged
    records = metrics_writer.read_metrics(workdir)
    logged = {key: value for key, value in records[-1].items() if key != "step"} if records else {}
  return logged


def _summarise(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(window)
  return {key: float(np.mean([float(m[key]) for m in stacked]))
          for key in stacked[0] if key != "finite"}


def _main(config: ml_collections.ConfigDict, workdir: str, **run_options) -> None:
  metrics = train_and_evaluate(config, workdir, evaluate_fn=evaluate.evaluate_params,
                               **run_options)
  print(result_files.dumps({"process_index": jax.process_index(), "final_metrics": metrics},
                           sort_keys=True))


def main(argv=None) -> None:
  cli.run(_main, "directory for checkpoints, logs and evaluation reports",
          prog="python -m cope_jax.train", doc=__doc__, argv=argv)


if __name__ == "__main__":
  main()
