"""Whether a checkpoint fits the model of a config, and which config field differs if not.

Before any array of a training checkpoint is read, the shapes and dtypes of its
integrity record (`cope_jax.checkpoint_integrity`) are compared with the model's. A
mismatch is a config error, reported as a list of `path: checkpoint shape vs model
shape` with the config field most likely to differ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from cope_jax import checkpoint_integrity

_MAX_LISTED = 12  # leaves listed in an error message


class CheckpointMismatchError(ValueError):
  """A checkpoint holds parameters of other shapes or names than this config's model."""


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
              for path, leaf in checkpoint_integrity.leaf_paths(abstract_tree)}
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
