"""Orbax checkpoints: the training checkpoints and the parameter-only checkpoints.

Two kinds live on disk:

- training checkpoints, `WORKDIR/checkpoints/<step>/` (one Orbax CheckpointManager):
  item `state` (the `TrainState` pytree: step, params, optimiser state, RNG), item
  `data` (the Grain iterator state, one JSON file per process) and item `integrity`
  (JSON: per state leaf its path, shape, dtype, a 64-bit checksum of its bytes and its
  count of non-finite values). The three are committed together (Orbax writes the step
  into a temporary folder and renames it), so a step without a readable integrity
  record is damaged, not merely old;
- parameter checkpoints written by `cope_jax.convert`: a plain Orbax pytree of model
  parameters (`{"model": {...}}`), possibly holding only some towers.

Restoring verifies a step before using it: its integrity record is read, the stored
shapes are compared with the model's (a mismatch is a config error, reported as a list of
`path: checkpoint shape vs model shape` with the config field most likely to differ), the
arrays are read and their checksums and finiteness compared with the record. A damaged
step (missing, truncated or corrupt files, checksum or finiteness failure, any Orbax
error) is reported in one line and the next older step is tried. Training moves damaged
steps newer than the one it resumes from to `checkpoints/damaged/<step>-<reason>/`:
never deleted, out of the way of the next save of that step and of `max_to_keep`.

`load_params` reads the model parameters of either kind (a training run starts from a
converted release checkpoint, or from another run, e.g. stage 2 from stage 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as python_logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from cope_jax import result_files

STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"
DAMAGED_DIR = "damaged"  # under WORKDIR/checkpoints; not a step name, so Orbax ignores it
INTEGRITY_FORMAT = 1
_MAX_LISTED = 12  # leaves listed in an error message


class CheckpointMismatchError(ValueError):
  """A checkpoint holds parameters of other shapes or names than this config's model."""


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints exist but every one of them is damaged."""


class _Damaged(Exception):
  """One step cannot be used; `kind` names the reason in a folder name."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind
    self.reason = reason


# ----------------------------------------------------------------------------
# The manager.


def checkpoint_manager(workdir: str, keep: int = 2, async_save: bool = True,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `WORKDIR/checkpoints` (atomic step directories, keep-N)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save)
  with quiet_library_logs():  # Orbax warns about every read-only manager
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=(STATE_ITEM, DATA_ITEM, INTEGRITY_ITEM))


@contextlib.contextmanager
def quiet_library_logs(level: int = python_logging.CRITICAL + 1) -> Iterator[None]:
  """Raises the level of the absl (Orbax) and asyncio loggers for the duration.

  Orbax logs each failed read at ERROR with the full TensorStore spec; the caller turns
  the exception into one line instead.
  """
  loggers = [python_logging.getLogger(name) for name in ("absl", "asyncio")]
  previous = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(max(level, logger.level))
  try:
    yield
  finally:
    for logger, old in zip(loggers, previous):
      logger.setLevel(old)


# ----------------------------------------------------------------------------
# Integrity records.


def _leaf_words(value: jax.Array) -> jax.Array:
  """The leaf's bytes as uint32 words: same shape, or [..., 2] for 64-bit dtypes."""
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    value = jax.random.key_data(value)
  if value.dtype == jnp.bool_:
    value = value.astype(jnp.uint8)
  bits = value.dtype.itemsize * 8
  if bits == 64:
    return lax.bitcast_convert_type(value, jnp.uint32)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return lax.bitcast_convert_type(value, unsigned).astype(jnp.uint32)


def _row_major_positions(shape: tuple[int, ...]) -> jax.Array:
  """uint32 [shape]: each element's row-major index (mod 2**32), built without a reshape."""
  positions = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    positions = positions + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= shape[axis]
  return positions


def _leaf_digest(value: jax.Array) -> jax.Array:
  """uint32 [3]: two checksums of the leaf's bytes and its number of non-finite values.

  Integer sums wrap mod 2**32 and are independent of the reduction order, so the result
  does not depend on the sharding or the device count. Any single changed word changes
  both sums; the second weighs each word by its position, so moved words change it too.
  """
  words = _leaf_words(value)
  mixed = words * jnp.uint32(0x9E3779B1)
  mixed = mixed ^ (mixed >> 16)
  weights = _row_major_positions(words.shape) * jnp.uint32(2) + jnp.uint32(1)
  plain_sum = jnp.sum(mixed, dtype=jnp.uint32)
  weighted_sum = jnp.sum(mixed * weights, dtype=jnp.uint32)
  if jnp.issubdtype(value.dtype, jnp.floating):
    non_finite = jnp.sum(~jnp.isfinite(value), dtype=jnp.uint32)
  else:
    non_finite = jnp.zeros((), jnp.uint32)
  return jnp.stack([plain_sum, weighted_sum, non_finite])


# Compiled once per (shape, dtype, sharding): about 30 programs for the paper-size state,
# where one program over all ~1,200 leaves takes minutes to compile.
_leaf_digest_compiled = jax.jit(_leaf_digest)


def _host_value(array: jax.Array) -> np.ndarray:
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(array.addressable_data(0))  # replicated: every process holds it all
  return np.asarray(jax.device_get(array))


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """[(path "params/model/...", leaf)] in tree order; the same for a TrainState and a dict."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]


def integrity_record(tree: Any) -> dict[str, Any]:
  """The integrity record of a tree of arrays (computed on device; a few bytes come back).

  Returns:
    {"format": 1, "leaves": {path: {"shape": [...], "dtype": str, "checksum": 16 hex
    digits, "non_finite": int}}}.
  """
  named = leaf_paths(tree)
  computed = [_leaf_digest_compiled(jnp.asarray(leaf)) for _, leaf in named]  # all dispatched
  digests = [_host_value(digest) for digest in computed]  # then fetched
  leaves = {}
  for (path, leaf), digest in zip(named, digests):
    leaves[path] = {"shape": [int(d) for d in np.shape(leaf)], "dtype": str(leaf.dtype),
                    "checksum": f"{int(digest[0]):08x}{int(digest[1]):08x}",
                    "non_finite": int(digest[2])}
  return {"format": INTEGRITY_FORMAT, "leaves": leaves}


def verify_integrity(tree: Any, record: Mapping[str, Any]) -> str | None:
  """None if every leaf of `tree` matches `record`, else the reason (one line).

  `tree` may hold a subset of the recorded leaves (a partial restore).
  """
  actual = integrity_record(tree)["leaves"]
  expected = record["leaves"]
  unknown = [path for path in actual if path not in expected]
  if unknown:
    return f"the integrity record lacks {len(unknown)} leaves (first: {unknown[0]})"
  non_finite = [path for path, leaf in actual.items()
                if leaf["non_finite"] > expected[path]["non_finite"]]
  if non_finite:
    return (f"non-finite values in {len(non_finite)} arrays that were finite when saved "
            f"(first: {non_finite[0]})")
  changed = [path for path, leaf in actual.items()
             if leaf["checksum"] != expected[path]["checksum"]]
  if changed:
    return (f"checksum mismatch in {len(changed)} of {len(actual)} arrays "
            f"(first: {changed[0]})")
  return None


# ----------------------------------------------------------------------------
# Saving.


def save_training_state(manager: ocp.CheckpointManager, step: int, state: Any,
                        data_iterator: Any | None) -> None:
  """Starts an (async) save of the train state, its integrity record and the iterator.

  The integrity record is computed first (a device reduction over the state; it waits
  for the state to be ready, which the save would do anyway).
  """
  items = {STATE_ITEM: ocp.args.StandardSave(state),
           INTEGRITY_ITEM: ocp.args.JsonSave(integrity_record(state))}
  if data_iterator is not None:
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


# ----------------------------------------------------------------------------
# Restoring.


def _first_line(text: str, limit: int = 300) -> str:
  """The first non-empty line; a long one keeps its start and its end (the reason)."""
  line = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
  if len(line) <= limit:
    return line
  return line[:limit // 3].rstrip() + " ... " + line[-(2 * limit // 3):].lstrip()


def short_error(error: BaseException, limit: int = 300) -> str:
  """`Type: first line` of the error's innermost cause (where the useful line usually is)."""
  innermost = error
  seen = {id(error)}
  while True:
    cause = innermost.__cause__ or innermost.__context__
    if cause is None or id(cause) in seen:
      break
    seen.add(id(cause))
    innermost = cause
  text = _first_line(str(innermost), limit) or type(innermost).__name__
  return f"{type(innermost).__name__}: {text}"


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _written_before_integrity_records(manager: ocp.CheckpointManager) -> bool:
  """Whether no step has an integrity record: checkpoints older than the records.

  Damage does not remove the record of every step at once, so such a directory is read
  unverified (finiteness is still checked) rather than refused.
  """
  steps = manager.all_steps()
  return bool(steps) and not any(
      os.path.isdir(os.path.join(_step_dir(manager, step), INTEGRITY_ITEM)) for step in steps)


def _read_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  if not os.path.isdir(os.path.join(_step_dir(manager, step), INTEGRITY_ITEM)):
    raise _Damaged("no-integrity-record", f"its {INTEGRITY_ITEM}/ record is missing")
  try:
    with quiet_library_logs():
      record = manager.restore(
          step, args=ocp.args.Composite(**{INTEGRITY_ITEM: ocp.args.JsonRestore()})
      )[INTEGRITY_ITEM]
  except Exception as error:  # pylint: disable=broad-except
    raise _Damaged("unreadable-integrity-record",
                   f"its {INTEGRITY_ITEM}/ record is unreadable ({short_error(error)})") from error
  if (not isinstance(record, Mapping) or record.get("format") != INTEGRITY_FORMAT
      or not isinstance(record.get("leaves"), Mapping)):
    raise _Damaged("unreadable-integrity-record", f"its {INTEGRITY_ITEM}/ record is malformed")
  return dict(record)


# Files every state item written by this module has (Orbax PyTree format with OCDBT).
_STATE_FILES = ("_METADATA", "manifest.ocdbt")


def _check_files(step_dir: str) -> None:
  """_Damaged if a file every saved state has is missing (even one a partial read skips)."""
  for name in _STATE_FILES:
    if not os.path.exists(os.path.join(step_dir, STATE_ITEM, name)):
      raise _Damaged("missing-file", f"{STATE_ITEM}/{name} is missing")


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  data_iterator: Any | None, partial: bool, config: Any) -> Any:
  """The verified state of one step; _Damaged or CheckpointMismatchError otherwise."""
  legacy = _written_before_integrity_records(manager)
  record = None if legacy else _read_record(manager, step)
  _check_files(_step_dir(manager, step))
  if record is not None:
    check_fits(record, abstract_state,
               where=f"checkpoint step {step} ({_step_dir(manager, step)})", partial=partial,
               config=config)
  if partial:
    state_args = ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True)
  else:
    state_args = ocp.args.StandardRestore(abstract_state)
  items = {STATE_ITEM: state_args}
  if data_iterator is not None:
    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    with quiet_library_logs():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # pylint: disable=broad-except
    raise _Damaged("unreadable", f"Orbax cannot read it: {short_error(error)}") from error
  state = restored[STATE_ITEM]
  if record is None:  # unverified: at least refuse values a training run never saves
    record = integrity_record(state)
    record["leaves"] = {path: dict(leaf, non_finite=0) for path, leaf in record["leaves"].items()}
  problem = verify_integrity(state, record)
  if problem:
    raise _Damaged("non-finite" if problem.startswith("non-finite") else "checksum", problem)
  return state


def _agree_across_processes(damaged: bool) -> bool:
  """Whether any process found the step damaged (all processes then skip it)."""
  if jax.process_count() == 1:
    return damaged
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array([int(damaged)], np.int32))
  return bool(np.any(flags))


def _print_on_first_process(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class DamagedStep:
  step: int
  kind: str  # short, for a folder name: "checksum", "unreadable", ...
  reason: str  # one line


def _restore_newest_intact(manager: ocp.CheckpointManager, steps: Sequence[int],
                           abstract_state: Any, data_iterator: Any | None, partial: bool,
                           config: Any, log: Callable[[str], None]
                           ) -> tuple[Any, int | None, list[DamagedStep]]:
  damaged: list[DamagedStep] = []
  for position, step in enumerate(steps):
    found: _Damaged | None = None
    state = None
    try:
      state = _restore_step(manager, step, abstract_state, data_iterator, partial, config)
    except _Damaged as error:
      found = error
    if _agree_across_processes(found is not None):
      found = found or _Damaged("other-process", "another process could not restore it")
      damaged.append(DamagedStep(step, found.kind, found.reason))
      following = (f"; trying step {steps[position + 1]}" if position + 1 < len(steps)
                   else "")
      log(f"checkpoint step {step} in {manager.directory} is damaged: {found.reason}"
          f"{following}")
      continue
    return state, step, damaged
  return None, None, damaged


def _no_intact_error(manager: ocp.CheckpointManager, damaged: Sequence[DamagedStep]
                     ) -> NoIntactCheckpointError:
  listing = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
  return NoIntactCheckpointError(
      f"no intact checkpoint in {manager.directory} ({listing}). Nothing was deleted. "
      "Move the damaged step folders elsewhere to start training from scratch, or use "
      "another --workdir.")


def _set_aside(manager: ocp.CheckpointManager, damaged: Sequence[DamagedStep],
               log: Callable[[str], None]) -> None:
  """Moves damaged step folders to checkpoints/damaged/<step>-<kind>[-n]/ (process 0)."""
  if jax.process_index() == 0:
    root = os.path.join(str(manager.directory), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    for entry in damaged:
      target = os.path.join(root, f"{entry.step}-{entry.kind}")
      suffix = 1
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(root, f"{entry.step}-{entry.kind}-{suffix}")
      os.replace(_step_dir(manager, entry.step), target)
      log(f"moved the damaged checkpoint step {entry.step} to {target} (kept for "
          "inspection; the next save of that step writes a new one)")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cope_jax.checkpoints: damaged steps moved")
  manager.reload()


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state: Any,
                          data_iterator: Any | None, *, config: Any = None,
                          log: Callable[[str], None] = _print_on_first_process
                          ) -> tuple[Any, int | None]:
  """(state, step) of the newest intact step, or (None, None) when there is no step.

  For resuming training: damaged steps newer than the restored one are moved to
  `checkpoints/damaged/` (so the next save of that step does not collide with them, and
  `max_to_keep` does not count them and delete the intact step instead). The iterator is
  reset in place to the restored step's position.

  Raises:
    CheckpointMismatchError: the checkpoint's shapes differ from `abstract_state`'s.
    NoIntactCheckpointError: steps exist but all are damaged (nothing is moved).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None, None
  state, step, damaged = _restore_newest_intact(manager, steps, abstract_state, data_iterator,
                                                False, config, log)
  if step is None:
    raise _no_intact_error(manager, damaged)
  if damaged:
    _set_aside(manager, damaged, log)
  return state, step


def restore_verified(workdir: str, abstract_tree: Any, step: int | None = None, *,
                     partial: bool = False, config: Any = None,
                     log: Callable[[str], None] = _print_on_first_process
                     ) -> tuple[Any, int | None]:
  """Reads (verified) a tree from `WORKDIR/checkpoints` without changing anything there.

  Args:
    workdir: the training directory.
    abstract_tree: ShapeDtypeStructs (with shardings) of what to restore: a TrainState,
      or with `partial` a subtree such as `{"params": {"model": ...}}`.
    step: a step to read (no fallback: a damaged one is an error), or None for the
      newest intact step (a damaged newer one is reported in one line and skipped).
    partial: `abstract_tree` holds only some of the saved leaves.
    config: the run config, for naming the field that differs on a shape mismatch.
    log: where the one-line damage reports go.

  Returns:
    (tree, step), or (None, None) when the directory holds no checkpoint.

  Raises:
    FileNotFoundError: `step` is not in the directory.
    CheckpointMismatchError, NoIntactCheckpointError: see `restore_latest_intact`.
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    if step is not None:
      raise FileNotFoundError(f"no checkpoint {step}: {workdir}/checkpoints does not exist")
    return None, None
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in available:
      raise FileNotFoundError(f"no checkpoint {step} in {manager.directory} (have "
                              f"{sorted(available)})")
    steps = [step] if step is not None else available
    if not steps:
      return None, None
    tree, found, damaged = _restore_newest_intact(manager, steps, abstract_tree, None, partial,
                                                  config, log)
    if found is None:
      raise _no_intact_error(manager, damaged)
    if damaged:
      log(f"using checkpoint step {found} (newest intact; skipped damaged "
          f"{', '.join(str(d.step) for d in damaged)})")
    return tree, found
  finally:
    manager.close()


def last_good_description(manager: ocp.CheckpointManager) -> str:
  """'the last good checkpoint is step N in DIR' or 'no checkpoint yet in DIR'.

  Waits for saves in flight, so the answer counts them.
  """
  manager.wait_until_finished()
  manager.reload()
  latest = manager.latest_step()
  if latest is None:
    return f"there is no checkpoint yet in {manager.directory}"
  return f"the last good checkpoint is step {latest} in {manager.directory}"


# ----------------------------------------------------------------------------
# Shape checks: the checkpoint against the model of this config.

# Parameter paths whose sizes come from a config field no single model value equals.
_PATH_FIELDS = (
    (r"word_embeddings", ("data.vocab_path", "model.text.vocab_size")),
    (r"text_encoder/.*position_embeddings", ("model.text.max_positions",)),
    (r"visual/positional_embedding", ("data.image_size", "model.vision.patch_size")),
    (r"visual/conv1/", ("model.vision.patch_size",)),
    (r"mit/positional_embedding", ("data.num_frames",)),
    (r"^params/classifier/centers", ("data.prepared_dir", "data.train_split")),
)
# Repeated blocks: (path pattern with the block index, config field of the count).
_LAYER_FIELDS = (
    (r"text_encoder/.*/layer_(\d+)/", "model.text.layers"),
    (r"visual/transformer/resblocks_(\d+)/", "model.vision.layers"),
    (r"mit/resblocks_(\d+)/", "model.vision.mit_layers"),
)
# Sub-trees and the config section whose sizes shape them (model.emb_dim: everywhere).
_TOWER_SECTIONS = (("text_encoder", "model.text."), ("visual_encoder", "model.vision."))


def _numeric_fields(config: Any) -> dict[str, int]:
  """'model.x.y' -> int value, for every integer field under config.model."""
  if config is None or "model" not in config:
    return {}
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  flat = traverse_util.flatten_dict(model, sep=".")
  return {f"model.{key}": value for key, value in flat.items()
          if isinstance(value, int) and not isinstance(value, bool)}


def _is_optimizer_leaf(path: str) -> bool:
  return not path.startswith("params/")


def _field_votes(mismatched: Sequence[tuple[str, tuple, tuple]], missing: Sequence[str],
                 unexpected: Sequence[str], config: Any) -> dict[str, tuple[int, str]]:
  """config field -> (weight, detail) of the evidence that it differs."""
  numeric = _numeric_fields(config)
  votes: dict[str, list] = {}

  def vote(field: str, weight: int, detail: str = ""):
    entry = votes.setdefault(field, [0, ""])
    entry[0] += weight
    entry[1] = entry[1] or detail

  for path, stored_shape, model_shape in mismatched:
    for pattern, fields in _PATH_FIELDS:
      if re.search(pattern, path):
        for field in fields:
          vote(field, 2)
    if len(stored_shape) != len(model_shape):
      continue
    section = next((s for key, s in _TOWER_SECTIONS if key in path), None)
    for stored_dim, model_dim in zip(stored_shape, model_shape):
      if stored_dim == model_dim:
        continue
      for field, value in numeric.items():
        in_scope = field == "model.emb_dim" or (section and field.startswith(section))
        if in_scope and value == model_dim:
          vote(field, 1, f"checkpoint {stored_dim}, this config {model_dim}")
  for pattern, field in _LAYER_FIELDS:
    stored_blocks = {m.group(1) for p in unexpected if (m := re.search(pattern, p))}
    model_blocks = {m.group(1) for p in missing if (m := re.search(pattern, p))}
    if stored_blocks or model_blocks:
      vote(field, 3, "the checkpoint and this config have different block counts")
  if any(p.startswith("params/classifier/") for p in list(missing) + list(unexpected)):
    vote("loss.classify_weight", 3, "the product classifier exists in only one of them")
  return {field: (weight, detail) for field, (weight, detail) in votes.items()}


def check_fits(record: Mapping[str, Any], abstract_tree: Any, *, where: str,
               partial: bool = False, config: Any = None) -> None:
  """Raises CheckpointMismatchError unless the recorded leaves fit `abstract_tree`.

  Compares paths, shapes and dtypes of the integrity record with the model's before any
  array is read. With `partial`, recorded leaves outside the restored sub-tree are
  ignored.
  """
  stored = {path: (tuple(leaf["shape"]), leaf["dtype"]) for path, leaf in record["leaves"].items()}
  expected = {path: (tuple(int(d) for d in np.shape(leaf)), str(leaf.dtype))
              for path, leaf in leaf_paths(abstract_tree)}
  if partial and expected:
    prefix = os.path.commonprefix(list(expected))
    prefix = prefix[:prefix.rfind("/") + 1]
    stored = {path: value for path, value in stored.items() if path.startswith(prefix)}
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  mismatched = [(path, stored[path][0], expected[path][0]) for path in sorted(stored)
                if path in expected and stored[path][0] != expected[path][0]]
  dtypes = [(path, stored[path][1], expected[path][1]) for path in sorted(stored)
            if path in expected and stored[path][1] != expected[path][1]]
  if not (missing or unexpected or mismatched or dtypes):
    return

  lines = []
  shown = [m for m in mismatched if not _is_optimizer_leaf(m[0])] or mismatched
  for path, stored_shape, model_shape in shown[:_MAX_LISTED]:
    lines.append(f"  {path}: checkpoint {stored_shape} vs model {model_shape}")
  hidden = len(mismatched) - min(len(shown), _MAX_LISTED)
  if hidden:
    lines.append(f"  (and {hidden} more, optimiser-state copies included)")
  for path, stored_dtype, model_dtype in dtypes[:_MAX_LISTED]:
    lines.append(f"  {path}: checkpoint {stored_dtype} vs model {model_dtype}")
  for title, paths in (("only in the model", missing), ("only in the checkpoint", unexpected)):
    if paths:
      params_first = [p for p in paths if not _is_optimizer_leaf(p)] or list(paths)
      listed = ", ".join(params_first[:4]) + (", ..." if len(paths) > 4 else "")
      lines.append(f"  {len(paths)} entries {title}: {listed}")

  votes = _field_votes(mismatched, missing, unexpected, config)
  if dtypes:
    votes.setdefault("model.param_dtype", (3, ""))
  ranked = sorted(votes.items(), key=lambda item: -item[1][0])
  if ranked:
    best = ranked[0][1][0]
    likely = [f"{field} ({detail})" if detail else field
              for field, (weight, detail) in ranked if weight == best]
    others = [field for field, (weight, _) in ranked if weight < best][:3]
    advice = "The config field that most likely differs: " + " or ".join(likely) + (
        f" (else: {', '.join(others)})" if others else "") + "."
  else:
    advice = "The model of this config differs from the one that wrote the checkpoint."
  raise CheckpointMismatchError(
      f"{where} does not fit the model of this config:\n" + "\n".join(lines) + "\n"
      f"{advice} Use the config the checkpoint was trained with, or another --workdir.")


# ----------------------------------------------------------------------------
# Parameter-only checkpoints (converted weights).


def save_params(directory: str, params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
  """Writes a parameter-only checkpoint (used by the PyTorch converter)."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params, force=True)
  checkpointer.wait_until_finished()
  if metadata is not None and jax.process_index() == 0:
    result_files.write_json(os.path.join(directory, "conversion.json"), metadata)


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
  """The model parameters of the newest intact checkpoint in `WORKDIR/checkpoints`, as
  NumPy.

  Only `params["model"]` is read from disk (a verified partial restore, see
  `restore_verified`): the classifier, the optimiser state and the data-iterator state
  stay where they are. The shapes come from the checkpoint's own metadata.
  """
  manager = checkpoint_manager(workdir, read_only=True)
  steps = sorted(manager.all_steps(), reverse=True)
  manager.close()
  if not steps:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
  saved = None
  for step in steps:  # the shapes of one run's steps agree: the newest readable metadata
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), STATE_ITEM))
    try:
      saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    except Exception:  # pylint: disable=broad-except  # damage: restore_verified says which
      saved = None
    if saved is not None:
      break
  if saved is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint's metadata can be read "
                            f"(steps {', '.join(map(str, steps))})")
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"params": {"model": jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_one_device),
      saved["params"]["model"])}}
  restored, _ = restore_verified(workdir, abstract, partial=True)
  return jax.tree.map(np.asarray, restored["params"]["model"])


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
