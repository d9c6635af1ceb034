"""Orbax checkpoints: the training checkpoints and the parameter-only checkpoints.

Two kinds live on disk:

- training checkpoints, `WORKDIR/checkpoints/<step>/` (one Orbax CheckpointManager):
  item `state` (the `TrainState` pytree: step, params, optimiser state, RNG) and item
  `data` (the Grain iterator state, one JSON file per process);
- parameter checkpoints written by `cope_jax.convert`: a plain Orbax pytree of model
  parameters (`{"model": {...}}`), possibly holding only some towers.

`load_params` reads the model parameters of either kind (a training run starts from a
converted release checkpoint, or from another run, e.g. stage 2 from stage 1).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


def checkpoint_manager(workdir: str, keep: int = 2, async_save: bool = True,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `WORKDIR/checkpoints` (atomic step directories, keep-N)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save_training_state(manager: ocp.CheckpointManager, step: int, state: Any,
                        data_iterator: Any | None) -> None:
  """Starts an (async) save of the train state and, if given, the data iterator."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_training_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                           data_iterator: Any | None) -> Any:
  """Restores `state` into the shardings of `abstract_state`; resets the iterator in place."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def restore_model_params(manager: ocp.CheckpointManager, step: int,
                         abstract_params: Any) -> Any:
  """Only `state.params["model"]` of a training checkpoint, into `abstract_params`'s
  shapes and shardings (an Orbax partial restore: the optimiser moments, the classifier
  and the RNG are not read)."""
  item = {"params": {"model": abstract_params}}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]["model"]


def save_params(directory: str, params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
  """Writes a parameter-only checkpoint (used by the PyTorch converter)."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params, force=True)
  checkpointer.wait_until_finished()
  if metadata is not None and jax.process_index() == 0:
    with open(os.path.join(directory, "conversion.json"), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)


def load_params(directory: str) -> dict:
  """Reads `{"model": ...}` parameters as host NumPy arrays, for `config.train.init_from`.

  `directory` is a parameter checkpoint written by `cope_jax.convert` (it holds `params/`),
  a training workdir (it holds `checkpoints/`: the model parameters of its latest step,
  without classifier or optimiser state, as the release's `--pretrained` loads only the
  model's `state_dict`), or several of these separated by commas, whose parameters must
  not overlap (e.g. a converted X-CLIP visual encoder and a converted rbt6 text encoder).
  """
  if "," in directory:
    return _merge_disjoint([load_params(part.strip()) for part in directory.split(",")],
                           directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    return {"model": load_training_model_params(directory)}
  path = os.path.abspath(os.path.join(directory, "params"))
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"{directory}: not a parameter checkpoint (expected a 'params' folder written by "
        "`python -m cope_jax.convert`) nor a training workdir (a 'checkpoints' folder)")
  restored = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, restored)


def load_training_model_params(workdir: str) -> dict:
  """The model parameters of the latest checkpoint in `WORKDIR/checkpoints`, as NumPy.

  Only `params["model"]` is read from disk (an Orbax partial restore): the classifier,
  the optimiser state and the data-iterator state stay where they are.
  """
  manager = checkpoint_manager(workdir, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  item = {"params": {"model": jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), saved["params"]["model"])}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return restored["params"]["model"]


def _merge_disjoint(trees: list[Mapping[str, Any]], source: str) -> dict:
  merged = {}
  for tree in trees:
    for key, value in traverse_util.flatten_dict(dict(tree), sep="/").items():
      if key in merged:
        raise ValueError(f"{source}: parameter {key} is in more than one of the checkpoints")
      merged[key] = value
  return traverse_util.unflatten_dict(merged, sep="/")


def merge_params(initial: Mapping[str, Any], loaded: Mapping[str, Any], *,
                 allow_missing: bool, source: str) -> dict:
  """Overwrites leaves of `initial` with those of `loaded` (same paths and shapes).

  Leaves that `loaded` lacks keep their initial values when `allow_missing`, else it is
  an error listing them; leaves that `initial` lacks, and shape mismatches, are errors.
  """
  flat_initial = traverse_util.flatten_dict(dict(initial), sep="/")
  flat_loaded = traverse_util.flatten_dict(dict(loaded), sep="/")
  unknown = sorted(set(flat_loaded) - set(flat_initial))
  missing = sorted(set(flat_initial) - set(flat_loaded))
  mismatched = [
      f"{key}: checkpoint {tuple(np.shape(flat_loaded[key]))} vs model "
      f"{tuple(np.shape(flat_initial[key]))}"
      for key in sorted(set(flat_loaded) & set(flat_initial))
      if tuple(np.shape(flat_loaded[key])) != tuple(np.shape(flat_initial[key]))
  ]
  problems = []
  if unknown:
    problems.append(f"{len(unknown)} parameters the model does not have: {unknown[:20]}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:20]}")
  if missing and not allow_missing:
    problems.append(
        f"{len(missing)} model parameters missing from the checkpoint (set "
        f"config.train.init_allow_missing=True for a partial load): {missing[:20]}")
  if problems:
    raise ValueError(f"cannot initialise from {source}:\n  " + "\n  ".join(problems))
  merged = dict(flat_initial)
  for key, value in flat_loaded.items():
    merged[key] = np.asarray(value, dtype=flat_initial[key].dtype)
  return traverse_util.unflatten_dict(merged, sep="/")
