"""Checks a run configuration before any work starts.

Each error names the config field (`config.train.batch_size: ...`) so that a typo in a
`--config.x.y=v` override fails at start-up, not an hour into training.
"""

from __future__ import annotations

import hashlib
import os

import ml_collections

_DTYPES = ("float32", "bfloat16", "float16")
_SEARCH_KINDS = ("auto", "exact", "scann")


class ConfigError(ValueError):
  """A config field holds a value this run cannot use."""


def _require(condition: bool, field: str, message: str):
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def _positive_int(config, field: str, allow_zero: bool = False):
  value = config
  for part in field.split("."):
    value = value[part]
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  _require(ok, field, f"must be a {'non-negative' if allow_zero else 'positive'} integer, "
           f"got {value!r}")


def read_vocab_size(vocab_path: str) -> int:
  """Number of entries of a WordPiece vocab.txt (one token a line)."""
  if not vocab_path or not os.path.isfile(vocab_path):
    raise ConfigError(f"config.data.vocab_path: vocabulary file {vocab_path!r} not found")
  with open(vocab_path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def check_config(config: ml_collections.ConfigDict, *, need_data: bool = True) -> None:
  """Raises ConfigError naming the first field with an unusable value."""
  for field in ("train.batch_size", "train.num_steps", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size",
                "data.image_size", "data.num_frames", "data.title_max_length",
                "data.asr_max_length", "model.emb_dim", "model.vision.patch_size",
                "model.vision.width", "model.vision.layers", "model.vision.heads",
                "model.text.hidden_size", "model.text.layers", "model.text.heads",
                "optim.grad_accum_steps"):
    _positive_int(config, field)
  for field in ("data.num_workers", "train.eval_every", "optim.warmup_steps",
                "eval.one_shot_draws", "model.text.vocab_size"):
    _positive_int(config, field, allow_zero=True)
  _require(config.model.dtype in _DTYPES, "model.dtype",
           f"must be one of {_DTYPES}, got {config.model.dtype!r}")
  _require(config.model.param_dtype in _DTYPES, "model.param_dtype",
           f"must be one of {_DTYPES}, got {config.model.param_dtype!r}")
  _require(config.data.image_size % config.model.vision.patch_size == 0, "data.image_size",
           f"{config.data.image_size} is not a multiple of model.vision.patch_size "
           f"({config.model.vision.patch_size})")
  _require(config.model.vision.width % config.model.vision.heads == 0, "model.vision.heads",
           "must divide model.vision.width")
  _require(config.model.text.hidden_size % config.model.text.heads == 0, "model.text.heads",
           "must divide model.text.hidden_size")
  _require(max(config.data.title_max_length, config.data.asr_max_length)
           <= config.model.text.max_positions, "model.text.max_positions",
           "must be at least data.title_max_length and data.asr_max_length")
  _require(config.data.num_frames <= config.model.vision.num_frames, "data.num_frames",
           "more frames than the MIT positional embedding holds (model.vision.num_frames)")
  _require(config.optim.learning_rate > 0, "optim.learning_rate", "must be positive")
  _require(config.loss.temperature > 0, "loss.temperature", "must be positive")
  _require(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")
  _require(config.eval.search in _SEARCH_KINDS, "eval.search",
           f"must be one of {_SEARCH_KINDS}, got {config.eval.search!r}")
  if need_data:
    for field in ("rope_dir", "prepared_dir", "vocab_path"):
      _require(bool(config.data[field]), f"data.{field}", "is empty: set it to a path")
    _require(os.path.isdir(config.data.prepared_dir), "data.prepared_dir",
             f"{config.data.prepared_dir!r} does not exist; run `python -m "
             "data_pipelines.prepare --rope_dir ROPE_DIR --out PREPARED_DIR` first")
    vocab_size = read_vocab_size(config.data.vocab_path)
    if config.model.text.vocab_size:
      _require(config.model.text.vocab_size == vocab_size, "model.text.vocab_size",
               f"{config.model.text.vocab_size} differs from the {vocab_size} entries of "
               f"{config.data.vocab_path}")


def resolve_vocab_size(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of config whose model.text.vocab_size is set (read from the vocab if 0)."""
  config = config.copy_and_resolve_references()
  if not config.model.text.vocab_size:
    config.model.text.vocab_size = read_vocab_size(config.data.vocab_path)
  return config


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 (hex) of the config's JSON with sorted keys: identifies the model run."""
  text = config.to_json(sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()
