"""Integrity records of training checkpoints: checksums, their verification, set-aside.

Each training checkpoint step holds, beside the state, an integrity record (JSON): per
state leaf its path, shape, dtype, a 64-bit checksum of its bytes and its count of
non-finite values. It is computed on device when the step is saved and compared with the
arrays read when the step is restored (`cope_jax.checkpoints`). A damaged step is never
deleted: training moves the damaged steps newer than the one it resumes from to
`checkpoints/damaged/<step>-<reason>/`, out of the way of the next save of that step and
of `max_to_keep`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DAMAGED_DIR = "damaged"  # under WORKDIR/checkpoints; not a step name, so Orbax ignores it
INTEGRITY_FORMAT = 1


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
# Damaged steps.


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


@dataclasses.dataclass(frozen=True)
class DamagedStep:
  step: int
  kind: str  # short, for a folder name: "checksum", "unreadable", ...
  reason: str  # one line


def set_aside(manager: ocp.CheckpointManager, damaged: Sequence[DamagedStep],
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
      os.replace(step_dir(manager, entry.step), target)
      log(f"moved the damaged checkpoint step {entry.step} to {target} (kept for "
          "inspection; the next save of that step writes a new one)")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cope_jax.checkpoints: damaged steps moved")
  manager.reload()
