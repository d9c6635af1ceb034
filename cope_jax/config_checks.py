"""Checks a run configuration before any work starts.

Each error names the config field (`config.train.batch_size: ...`) so that a typo in a
`--config.x.y=v` override fails at start-up, not an hour into training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from cope_jax.search import faiss_index
from cope_jax.search import index as search_index
from cope_jax.base import domains
from data_pipelines import prepare

_DTYPES = ("float32", "bfloat16", "float16")


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


def _leaves(value: Any, prefix: str):
  """(dotted field, value) of every leaf of a nested dict (tuples and lists entered)."""
  if isinstance(value, Mapping):
    for key, item in value.items():
      yield from _leaves(item, f"{prefix}.{key}" if prefix else str(key))
  elif isinstance(value, (list, tuple)):
    for index, item in enumerate(value):
      yield from _leaves(item, f"{prefix}[{index}]")
  else:
    yield prefix, value


def compiler_options(text: str, field: str = "train.compiler_options") -> dict[str, Any]:
  """'name=value,name=value' -> {name: value} for `jax.jit(compiler_options=...)`.

  Values are Python literals where they parse as one (80, False, 1.5), strings
  otherwise. XLA options of one backend (`xla_tpu_*`) are unknown to the others, which
  refuse them when the step compiles."""
  options: dict[str, Any] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, equals, value = item.partition("=")
    name = name.strip()
    if not equals or not re.fullmatch(r"xla_\w+", name):
      raise ConfigError(f"config.{field}: {item!r} is not an XLA option 'xla_name=value' "
                        "(comma-separated)")
    try:
      options[name] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      options[name] = value.strip()
  return options


def check_finite_numbers(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for any field holding NaN or +-Inf (`--config.x=inf` parses)."""
  resolved = config.copy_and_resolve_references().to_dict()
  for field, value in _leaves(resolved, ""):
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{field}: must be a finite number, got {value!r}")


def check_config(config: ml_collections.ConfigDict, *, need_data: bool = True) -> None:
  """Raises ConfigError naming the first field with an unusable value."""
  check_finite_numbers(config)
  for field in ("train.batch_size", "train.num_steps", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size",
                "data.image_size", "data.num_frames", "data.title_max_length",
                "data.asr_max_length", "model.emb_dim", "model.vision.patch_size",
                "model.vision.width", "model.vision.layers", "model.vision.heads",
                "model.text.hidden_size", "model.text.layers", "model.text.heads",
                "optim.grad_accum_steps"):
    _positive_int(config, field)
  for field in ("data.num_workers", "optim.warmup_steps",
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
  compiler_options(config.train.compiler_options)
  _require(config.train.keep_checkpoints >= 2, "train.keep_checkpoints",
           f"must be at least 2 (got {config.train.keep_checkpoints}), so that a damaged "
           "latest checkpoint can fall back to the one before it")
  _require(config.loss.temperature > 0, "loss.temperature", "must be positive")
  _require(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")
  search_kinds = ("auto", "exact", *search_index.INDEX_KINDS)  # the one index table
  _require(config.eval.search in search_kinds, "eval.search",
           f"must be one of {search_kinds}, got {config.eval.search!r}")
  _require(config.eval.index in search_index.INDEX_KINDS, "eval.index",
           f"must be one of {tuple(search_index.INDEX_KINDS)}, got {config.eval.index!r}")
  check_index_installed(config.eval.search, "eval.search")
  if config.eval.search == "auto":
    check_index_installed(config.eval.index, "eval.index")
  check_init_from(config)
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


def check_index_installed(kind: str, field: str) -> None:
  """ConfigError naming `field` when index kind `kind` needs a package that is not
  installed (faiss for faiss_hnsw), so that the job stops before it embeds anything."""
  if kind == faiss_index.KIND:
    try:
      faiss_index.import_faiss()
    except ImportError as error:
      raise ConfigError(f"config.{field}: {error}") from None


def _conversion_record(directory: str) -> dict | None:
  path = os.path.join(directory, "conversion.json")
  if not os.path.isfile(path):
    return None  # a training workdir, or a parameter checkpoint without its record
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise ConfigError(f"config.train.init_from: {path} is not readable ({error})") from None


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """ConfigError before any model is built when `config.train.init_from` names partial
  conversions (`cope_jax.convert`'s conversion.json) that together leave parameters
  uninitialised while `train.init_allow_missing` is off.

  The clip heads' text projections are left to the later check (`state`): whether a
  run has them depends on its loss terms."""
  parts = [part.strip() for part in config.train.init_from.split(",") if part.strip()]
  left_by_all = None
  for part in parts:
    if not os.path.isdir(part):
      return  # loading it says what is missing; a trained run no longer needs it
    record = _conversion_record(part)
    left = set(record.get("left_initialised", ())) if record else set()
    left_by_all = left if left_by_all is None else left_by_all & left
  clip_text_projections = tuple(f"{d.head}/fc0/" for d in domains.DOMAINS if d.is_clip)
  missing = sorted(path for path in (left_by_all or ())
                   if not path.startswith(clip_text_projections))
  if missing and not config.train.init_allow_missing:
    shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8
                                      else "")
    raise ConfigError(
        f"config.train.init_from: {config.train.init_from!r} leaves {len(missing)} model "
        f"parameter(s) uninitialised (its conversion.json says so): {shown}. Set "
        "config.train.init_allow_missing=True to start them from initialisation, or add the "
        "checkpoint that holds them (comma-separated).")


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
def check_split(prepared_dir: str, split: str, field: str, min_domains: int = 1,
                config_name: str = "") -> dict[str, int]:
  """Raises ConfigError unless `split` is prepared with records in >= `min_domains` domains.

  Args:
    prepared_dir: the prepared data folder.
    split: the split's name.
    field: what set the split, named in the error ("config.data.eval_split", "--split").
    min_domains: 2 for a retrieval evaluation (a direction needs two domains), 1 for an
      export.
    config_name: the prepared config (`config.data.prepared_config`; "": the default).

  Returns:
    The record count of each domain.
  """

  try:
    identity = prepare.dataset_identity(prepared_dir, config_name)
  except FileNotFoundError as error:
    raise ConfigError(f"{field}: {error}") from None
  records = {name: entry["records"] for name, entry in identity["splits"].items()}
  known = sorted(records)
  if split not in records:
    raise ConfigError(
        f"{field}: no split {split!r} in {prepared_dir} ({identity['config']}; known splits: "
        f"{', '.join(known) if known else 'none; run python -m data_pipelines.prepare'})")
  counts = {name: int(records[split].get(name, 0)) for name in domains.NAMES}
  present = [name for name, count in counts.items() if count > 0]
  if len(present) < min_domains:
    what = ("no retrieval direction can be evaluated" if min_domains > 1
            else "there is nothing to export")
    raise ConfigError(
        f"{field}: split {split!r} of {prepared_dir} ({identity['config']}) holds "
        + ", ".join(f"{count} {name}" for name, count in counts.items())
        + f" records; {what} (known splits: {', '.join(known)})")
  return counts


def _flat_fields(value: Any) -> dict[str, Any]:
  return dict(_leaves(value, ""))


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                       limit: int = 10) -> list[str]:
  """['model.emb_dim: 16 -> 32', ...]: fields whose values differ between two config dicts.

  Both are plain dicts (`json.loads(config.to_json())`); fields only in one are listed
  with `(absent)` on the other side.
  """
  before, after = _flat_fields(stored), _flat_fields(current)
  differences = []
  for field in sorted(set(before) | set(after)):
    old, new = before.get(field, "(absent)"), after.get(field, "(absent)")
    if old != new:
      differences.append(f"{field}: {old!r} -> {new!r}")
  if len(differences) > limit:
    differences = differences[:limit] + [f"... and {len(differences) - limit} more"]
  return differences
