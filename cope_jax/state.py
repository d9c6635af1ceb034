"""The model and its training state: construction, abstract shapes, weight loading.

Shared by `train`, `evaluate`, `export`, the benchmarks and the tests, so that none of
them imports another entry point:

  model = build_model(config)                                   # COPE(ModelConfig)
  state, shardings = create_train_state(config, mesh, num_classes)   # placed, sharded
  abstract = abstract_train_state(config, mesh, num_classes)    # shapes only
  params, step, source = load_model_params(config, workdir, mesh)   # for eval / export

Trainable parameters are `{"model": <COPE params>, "classifier": {"centers": [C, D]}}`
(`classifier` only with the classification loss). Evaluation and export restore only
`params["model"]` from a training checkpoint (an Orbax partial restore): neither the
optimiser moments nor the training split's product table are read.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cope_jax.base import batch as batch_contract
from cope_jax import checkpoints
from cope_jax import losses
from cope_jax import optim
from cope_jax import sharding
from cope_jax.models import cope as cope_model
from cope_jax.models.config import ModelConfig
from cope_jax.base import domains
from data_pipelines import prepare


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any  # {"model": COPE params, "classifier": {"centers": [C, D]}}
  opt_state: Any
  rng: jax.Array  # [2] uint32, a raw PRNG key (checkpointable as a plain array)


def needs_clip_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the run reads a clip's ASR text, so the clip heads need a text projection
  (fc0, which the release's clip heads lack): `config.model.use_asr_text`, or a weighted
  loss term on a clip's text embedding (`loss.weights.video_text_visual`, ...)."""
  clip_text = {domain.text_embedding_key for domain in domains.DOMAINS if domain.is_clip}
  return bool(config.model.use_asr_text) or bool(
      clip_text & set(losses.needed_embeddings(config.loss)))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The typed model hyper-parameters of the run `config`."""
  return ModelConfig.from_config(config.model, clip_text=needs_clip_text(config))


def build_model(config: ml_collections.ConfigDict) -> cope_model.COPE:
  """COPE with the typed hyper-parameters of `config.model` (vocab size resolved); the
  clip heads project text only when the run needs it (`needs_clip_text`)."""
  return cope_model.COPE(model_config(config))


def classifier_size(config: ml_collections.ConfigDict) -> int:
  """Rows of the product classifier: the training products (0 without that loss)."""
  if config.loss.classify_weight <= 0:
    return 0
  return len(prepare.load_products(config.data.prepared_dir, config.data.train_split,
                                   config_name=config.data.prepared_config))


def zero_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A training batch of zeros with the pipeline's shapes (for init and compilation)."""
  spec = batch_contract.batch_spec(config)
  return {key: np.zeros((batch_size,) + tuple(shape[1:]), dtype)
          for key, (shape, dtype) in spec.items()}


def init_train_state(rng: jax.Array, *, model: nn.Module, optimizer: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, num_classes: int) -> TrainState:
  """Initial state, parameters boxed with their logical axis names."""
  init_rng, classifier_rng, state_rng = jax.random.split(rng, 3)
  params = {"model": _init_model(model, config, init_rng)}
  if config.loss.classify_weight > 0:
    centers_init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), ("classes", "embed"))
    params["classifier"] = {
        "centers": centers_init(classifier_rng, (num_classes, config.model.emb_dim), jnp.float32)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=state_rng)


def _init_model(model: nn.Module, config: ml_collections.ConfigDict, init_rng: jax.Array):
  """The model's boxed parameters from the init key of `init_train_state`."""
  return model.init({"params": init_rng, "dropout": init_rng}, zero_batch(config, 2),
                    train=False)["params"]


def _model_params_init_fn(config: ml_collections.ConfigDict):
  """rng -> boxed model params, the same values `init_train_state(rng)` gives them."""
  model = build_model(config)
  return lambda rng: _init_model(model, config, jax.random.split(rng, 3)[0])


def abstract_like(values: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of placed arrays."""
  return jax.tree.map(
      lambda value: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding),
      values)


def _state_init_fn(config: ml_collections.ConfigDict, num_classes: int):
  return functools.partial(
      init_train_state, model=build_model(config),
      optimizer=optim.make_optimizer(config.optim, config.train.num_steps), config=config,
      num_classes=num_classes)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       num_classes: int) -> tuple[TrainState, TrainState]:
  """A freshly initialised TrainState created directly sharded, and its shardings."""
  rules = sharding.logical_axis_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return sharding.create_sharded(_state_init_fn(config, num_classes), mesh, rules,
                                   jax.random.PRNGKey(config.seed))


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         num_classes: int) -> TrainState:
  """The TrainState's shapes, dtypes and shardings, computed without allocating it.

  Runs nothing on any device (the PRNG key too is abstract), so `mesh` may hold
  compile-only devices, e.g. a TPU topology description's (ahead-of-time compilation).
  """
  rules = sharding.logical_axis_rules(config.mesh)
  init_fn = _state_init_fn(config, num_classes)
  key = abstract_key()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = sharding.param_shardings(jax.eval_shape(init_fn, key), mesh, rules)
    boxed = jax.eval_shape(jax.jit(init_fn, out_shardings=shardings), key)
  return nn.meta.unbox(boxed)


def abstract_key() -> jax.ShapeDtypeStruct:
  """The shape and dtype of a raw PRNG key (`jax.random.PRNGKey`), made without running
  anything."""
  return jax.eval_shape(jax.random.PRNGKey, 0)


def abstract_model_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
  """The model parameters' shapes, dtypes and shardings (no optimiser, no classifier)."""
  rules = sharding.logical_axis_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(_model_params_init_fn(config), abstract_key())
    shardings = sharding.param_shardings(boxed, mesh, rules)
  return jax.tree.map(
      lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                       sharding=leaf_sharding),
      nn.meta.unbox(boxed), shardings)


def init_model_params(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Freshly initialised model parameters placed with their shardings, and the shardings."""
  return sharding.create_sharded(_model_params_init_fn(config), mesh,
                                 sharding.logical_axis_rules(config.mesh),
                                 jax.random.PRNGKey(config.seed))


def load_converted_weights(params: Any, shardings: Any,
                           config: ml_collections.ConfigDict) -> Any:
  """Model params with the converted (e.g. PyTorch) weights of config.train.init_from.

  Args:
    params: the model parameters to start from (their leaves not in the checkpoint are
      kept when `config.train.init_allow_missing`).
    shardings: the parameters' shardings (a tree like `params`).
  """
  loaded = checkpoints.load_params(config.train.init_from)
  if "model" not in loaded:
    raise ValueError(f"config.train.init_from={config.train.init_from!r}: the checkpoint has no "
                     "'model' entry; write it with `python -m cope_jax.convert`")
  model_params = loaded["model"]
  if not needs_clip_text(config):
    model_params = _without_clip_text_projections(model_params, config.train.init_from)
  merged = checkpoints.merge_params(
      params, model_params, allow_missing=config.train.init_allow_missing,
      source=f"config.train.init_from={config.train.init_from!r}")
  return jax.device_put(merged, shardings)


def _without_clip_text_projections(model_params: dict, source: str) -> dict:
  """The loaded model params less the clip heads' text projections (fc0), which a run
  that reads no clip text does not have (as released), saying so in one line: a stage-2
  run started from a stage-1 run, whose in-domain ASR terms trained them."""
  clip_heads = [domain.head for domain in domains.DOMAINS if domain.is_clip]
  kept = {name: value for name, value in model_params.items() if name not in clip_heads}
  dropped = []
  for head in clip_heads:
    if head in model_params:
      kept[head] = {name: value for name, value in model_params[head].items()
                    if name != "fc0"}
      if "fc0" in model_params[head]:
        dropped.append(f"{head}/fc0")
  if dropped:
    print(f"init_from {source}: not loading {', '.join(dropped)}: this config reads no "
          "clip text, so its clip heads have no text projection (as released)")
  return kept


def load_model_params(config: ml_collections.ConfigDict, workdir: str,
                      mesh: jax.sharding.Mesh) -> tuple[Any, int, str]:
  """(model params, step, description of the source) for evaluation or export.

  The checkpoint `config.eval.checkpoint_step` (-1: the latest) of `workdir`; without
  one, the converted weights of `config.train.init_from`. Only the model parameters are
  read from a training checkpoint.
  """
  requested = None if config.eval.checkpoint_step < 0 else config.eval.checkpoint_step
  # The newest intact step (or the requested one), verified against its checksums.
  restored, step = checkpoints.restore_verified(
      workdir, {"params": {"model": abstract_model_params(config, mesh)}}, requested,
      partial=True, config=config)
  if step is not None:
    return restored["params"]["model"], int(step), f"{workdir}/checkpoints/{step}"
  if config.train.init_from:
    params, shardings = init_model_params(config, mesh)
    params = load_converted_weights(params, shardings, config)
    return params, 0, config.train.init_from
  raise FileNotFoundError(
      f"nothing to evaluate: {workdir}/checkpoints holds no checkpoint and "
      "config.train.init_from is empty. Train first (python -m cope_jax.train) or convert "
      "weights (python -m cope_jax.convert) and set --config.train.init_from.")
