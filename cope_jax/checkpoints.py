"""Orbax checkpoints: the training checkpoints and the parameter-only checkpoints.

Two kinds live on disk:

- training checkpoints, `WORKDIR/checkpoints/<step>/` (one Orbax CheckpointManager):
  item `state` (the `TrainState` pytree: step, params, optimiser state, RNG), item
  `data` (the Grain iterator state, one JSON file per process, `process_<i>-of-<n>.json`)
  and item `integrity`
  (JSON: per state leaf its path, shape, dtype, a 64-bit checksum of its bytes and its
  count of non-finite values; `cope_jax.checkpoint_integrity`). The three are committed together (Orbax writes the step
  into a temporary folder and renames it), so a step without a readable integrity
  record is damaged, not merely old;
- parameter checkpoints written by `cope_jax.convert`: a plain Orbax pytree of model
  parameters (`{"model": {...}}`), possibly holding only some towers.

Restoring verifies a step before using it: its integrity record is read, the stored
shapes are compared with the model's (`cope_jax.checkpoint_fit`: a mismatch is a config
error, reported as a list of `path: checkpoint shape vs model shape` with the config field
most likely to differ), the
arrays are read and their checksums and finiteness compared with the record. A damaged
step (missing, truncated or corrupt files, checksum or finiteness failure, an Orbax read
error about the stored bytes) is reported in one line and the next older step is tried.
Any other read error is a `CheckpointReadError`: nothing shows damage, so nothing is
moved and no older step is used. Training moves damaged
steps newer than the one it resumes from to `checkpoints/damaged/<step>-<reason>/`
(`checkpoint_integrity.set_aside`): never deleted, out of the way of the next save of that
step and of `max_to_keep`.

A step resumes on another number of processes or devices than wrote it (a smaller or
larger slice after a preemption): Orbax reshards the arrays, and the data-iterator
position is global, so every process of the new run takes the position the writing
processes agreed on (they hold the same one: each process reads its share of every
global batch). Checkpoints whose processes hold different positions are refused with a
`CheckpointLayoutError` naming the process count; they are not damaged.

A failed write (disk full, a file-size limit) is a `CheckpointWriteError` of one line
(`write_errors_explained`); the libraries' tracebacks of it are not printed.

`load_params` reads the model parameters of either kind (a training run starts from a
converted release checkpoint, or from another run, e.g. stage 2 from stage 1).
"""

from __future__ import annotations

import contextlib
import json
import logging as python_logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from cope_jax.base import workdir as workdir_layout
from cope_jax import checkpoint_fit
from cope_jax import checkpoint_integrity
from cope_jax.base import result_files

STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints exist but every one of them is damaged."""


class CheckpointLayoutError(RuntimeError):
  """An intact step that this run cannot resume as laid out (e.g. its processes' data
  positions differ and the process count changed)."""


class CheckpointWriteError(RuntimeError):
  """Writing a training checkpoint failed."""


class CheckpointReadError(RuntimeError):
  """A step could not be read, for a reason that does not show damage (nothing is moved
  aside, no older step is used instead)."""


# Orbax/TensorStore read errors that show damaged stored bytes (or missing files); any
# other read error does not make a step "damaged".
_DAMAGE_WORDS = re.compile(r"zstd|compress|truncat|corrupt|checksum|DATA_LOSS|NOT_FOUND|"
                           r"no such file|does not exist|unexpected end|frame",
                           re.IGNORECASE)


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
  directory = os.path.abspath(workdir_layout.checkpoints_dir(workdir))
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
# Saving.


def save_training_state(manager: ocp.CheckpointManager, step: int, state: Any,
                        data_iterator: Any | None) -> None:
  """Starts an (async) save of the train state, its integrity record and the iterator.

  The integrity record is computed first (a device reduction over the state; it waits
  for the state to be ready, which the save would do anyway).
  """
  items = {STATE_ITEM: ocp.args.StandardSave(state),
           INTEGRITY_ITEM: ocp.args.JsonSave(checkpoint_integrity.integrity_record(state))}
  if data_iterator is not None:
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _committed_steps(directory: str) -> list[int]:
  try:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  except OSError:
    return []


@contextlib.contextmanager
def write_errors_explained(manager: ocp.CheckpointManager,
                           step: int | None = None) -> Iterator[None]:
  """Turns an error of a checkpoint write (raised by `save` or `wait_until_finished`,
  possibly for an earlier asynchronous save) into one CheckpointWriteError line."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    directory = str(manager.directory)
    steps = _committed_steps(directory)
    last = (f"the last complete checkpoint is step {steps[-1]}" if steps
            else "there is no complete checkpoint yet")
    when = f" (saving step {step})" if step is not None else ""
    raise CheckpointWriteError(
        f"writing a checkpoint to {directory} failed{when}: {short_error(error)}; {last}. "
        "Free space (or raise the file-size limit) and rerun the same command to resume."
    ) from error


# ----------------------------------------------------------------------------
# Restoring.

_ITERATOR_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _iterator_state_to_adopt(step_dir: str, step: int) -> dict | None:
  """The data-iterator state this process takes from a step written by another number
  of processes, or None when the step has this process's own file (Grain reads it).

  Raises:
    _Damaged: the step's data/ folder lacks files its writers left.
    CheckpointLayoutError: the writers' positions differ (not resumable elsewhere).
  """
  data_dir = os.path.join(step_dir, DATA_ITEM)
  if not os.path.isdir(data_dir):
    return None  # Orbax reports the missing item
  me, count = jax.process_index(), jax.process_count()
  written = {}
  for name in os.listdir(data_dir):
    match = _ITERATOR_FILE.fullmatch(name)
    if match:
      written[(int(match.group(1)), int(match.group(2)))] = name
  if (me, count) in written:
    return None
  writers = {n for _, n in written}
  if len(writers) != 1 or len(written) != next(iter(writers)):
    raise _Damaged("missing-file", f"{DATA_ITEM}/ lacks data-iterator states "
                   f"(has {', '.join(sorted(written.values())) or 'none'})")
  writer_count = next(iter(writers))
  states = []
  for index in range(writer_count):
    path = os.path.join(data_dir, written[(index, writer_count)])
    try:
      with open(path, encoding="utf-8") as f:
        states.append(json.load(f))
    except (OSError, ValueError) as error:
      raise _Damaged("unreadable", f"{DATA_ITEM}/{os.path.basename(path)} is unreadable "
                     f"({short_error(error)})") from error
  if any(state != states[0] for state in states[1:]):
    raise CheckpointLayoutError(
        f"checkpoint step {step} ({step_dir}) was written by {writer_count} processes whose "
        f"data-iterator positions differ, so it resumes only on {writer_count} processes "
        f"(this run has {count}): start {writer_count} processes "
        f"(COPE_NUM_PROCESSES={writer_count}), or resume from another step")
  return states[0]


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


def _written_before_integrity_records(manager: ocp.CheckpointManager) -> bool:
  """Whether no step has an integrity record: checkpoints older than the records.

  Damage does not remove the record of every step at once, so such a directory is read
  unverified (finiteness is still checked) rather than refused.
  """
  steps = manager.all_steps()
  return bool(steps) and not any(
      os.path.isdir(os.path.join(checkpoint_integrity.step_dir(manager, step), INTEGRITY_ITEM))
      for step in steps)


def _read_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  step_dir = checkpoint_integrity.step_dir(manager, step)
  if not os.path.isdir(os.path.join(step_dir, INTEGRITY_ITEM)):
    raise _Damaged("no-integrity-record", f"its {INTEGRITY_ITEM}/ record is missing")
  try:
    with quiet_library_logs():
      record = manager.restore(
          step, args=ocp.args.Composite(**{INTEGRITY_ITEM: ocp.args.JsonRestore()})
      )[INTEGRITY_ITEM]
  except Exception as error:  # pylint: disable=broad-except
    raise _Damaged("unreadable-integrity-record",
                   f"its {INTEGRITY_ITEM}/ record is unreadable ({short_error(error)})") from error
  if (not isinstance(record, Mapping)
      or record.get("format") != checkpoint_integrity.INTEGRITY_FORMAT
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
  step_dir = checkpoint_integrity.step_dir(manager, step)
  _check_files(step_dir)
  if record is not None:
    checkpoint_fit.check_fits(record, abstract_state,
                              where=f"checkpoint step {step} ({step_dir})", partial=partial,
                              config=config)
  if partial:
    state_args = ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True)
  else:
    state_args = ocp.args.StandardRestore(abstract_state)
  items = {STATE_ITEM: state_args}
  adopted_position = None
  if data_iterator is not None:
    # Another process count wrote it: the global position, read here, not by Grain.
    adopted_position = _iterator_state_to_adopt(step_dir, step)
    if adopted_position is None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    with quiet_library_logs():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # pylint: disable=broad-except
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
      chain.append(f"{type(cause).__name__}: {cause}")
      cause = cause.__cause__ or cause.__context__
    if _DAMAGE_WORDS.search(" ".join(chain)):
      raise _Damaged("unreadable", f"Orbax cannot read it: {short_error(error)}") from error
    raise _Unreadable(f"checkpoint step {step} ({step_dir}) could not be read: "
                      f"{short_error(error)}") from error
  state = restored[STATE_ITEM]
  if record is None:  # unverified: at least refuse values a training run never saves
    record = checkpoint_integrity.integrity_record(state)
    record["leaves"] = {path: dict(leaf, non_finite=0) for path, leaf in record["leaves"].items()}
  problem = checkpoint_integrity.verify_integrity(state, record)
  if problem:
    raise _Damaged("non-finite" if problem.startswith("non-finite") else "checksum", problem)
  if adopted_position is not None:
    data_iterator.set_state(adopted_position)
    if hasattr(data_iterator, "start_prefetch"):
      data_iterator.start_prefetch()
  return state


class _Unreadable(Exception):
  """Orbax could not read a step, and nothing shows that it is damaged."""


_RESTORED, _DAMAGED, _UNREADABLE = 0, 1, 2


def _agree_across_processes(outcome: int) -> int:
  """The worst outcome of restoring a step on any process (all processes act on it)."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  outcomes = multihost_utils.process_allgather(np.array([outcome], np.int32))
  return int(np.max(outcomes))


def _print_on_first_process(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _restore_newest_intact(manager: ocp.CheckpointManager, steps: Sequence[int],
                           abstract_state: Any, data_iterator: Any | None, partial: bool,
                           config: Any, log: Callable[[str], None]
                           ) -> tuple[Any, int | None, list[checkpoint_integrity.DamagedStep]]:
  damaged: list[checkpoint_integrity.DamagedStep] = []
  for position, step in enumerate(steps):
    found: _Damaged | None = None
    unreadable: _Unreadable | None = None
    state = None
    try:
      state = _restore_step(manager, step, abstract_state, data_iterator, partial, config)
    except _Damaged as error:
      found = error
    except _Unreadable as error:
      unreadable = error
    outcome = _agree_across_processes(
        _UNREADABLE if unreadable else _DAMAGED if found else _RESTORED)
    if outcome == _UNREADABLE:
      reason = str(unreadable) if unreadable else (
          f"checkpoint step {step} in {manager.directory}: another process could not read it")
      raise CheckpointReadError(
          f"{reason}. Nothing shows that it is damaged, so nothing was moved and no older "
          "step was used: fix the cause and rerun (or move the step folder away to resume "
          "from an older one).") from unreadable
    if outcome == _DAMAGED:
      found = found or _Damaged("other-process", "another process could not restore it")
      damaged.append(checkpoint_integrity.DamagedStep(step, found.kind, found.reason))
      following = (f"; trying step {steps[position + 1]}" if position + 1 < len(steps)
                   else "")
      log(f"checkpoint step {step} in {manager.directory} is damaged: {found.reason}"
          f"{following}")
      continue
    return state, step, damaged
  return None, None, damaged


def _no_intact_error(manager: ocp.CheckpointManager,
                     damaged: Sequence[checkpoint_integrity.DamagedStep]
                     ) -> NoIntactCheckpointError:
  listing = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
  return NoIntactCheckpointError(
      f"no intact checkpoint in {manager.directory} ({listing}). Nothing was deleted. "
      "Move the damaged step folders elsewhere to start training from scratch, or use "
      "another --workdir.")


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
    checkpoint_integrity.set_aside(manager, damaged, log)
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
  if not os.path.isdir(workdir_layout.checkpoints_dir(workdir)):
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
  if os.path.isdir(workdir_layout.checkpoints_dir(directory)):
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
    path = os.path.abspath(os.path.join(workdir_layout.checkpoints_dir(workdir), str(step), STATE_ITEM))
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
