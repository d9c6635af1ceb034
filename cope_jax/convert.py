r"""Converts PyTorch weights into a parameter checkpoint that train/evaluate start from.

  python -m cope_jax.convert --torch_checkpoint FILE_OR_DIR --kind KIND --out DIR \
      [--config configs/rope_vitb16.py] [--config.model.x=value ...] \
      [--allow_missing] [--ignore_unused]

then `python -m cope_jax.train ... --config.train.init_from=DIR` (add
`--config.train.init_allow_missing=True` for the kinds that provide only some towers).

Kinds, each renamed onto the released COPE key names and then converted by the one
table of `cope_jax/weight_mapping.py`:

  cope      a released COPE training checkpoint: `{'state_dict': ..., 'optimizer': ...}`
            (everything but `state_dict` is ignored), keys possibly prefixed `module.`.
            -> the whole model. The release's video and live heads have no `fc0` (text
            projection); the stage-2 config (`configs/rope_vitb16.py`) has none either, so
            the release converts as it is. For a config that reads clip text
            (`model.use_asr_text`, or an in-domain ASR<->frames loss term such as the
            stage-1 config's), those two layers are initialised on purpose from
            `config.seed`, written into the checkpoint, and named in one line of the
            summary and in `conversion.json` ("initialised"). Any other missing key is
            refused by name.
  xclip     an X-CLIP checkpoint: `{'model': ...}` with `visual.*` (the cross-frame ViT)
            and `mit.*`; its text side (`transformer.*`, `token_embedding`,
            `prompts_*`, `logit_scale`, ...) is not part of COPE and is skipped.
            -> `visual_encoder` only.
  clip_vit  an OpenAI-CLIP state dict (or TorchScript archive) with `visual.*` keys; text
            keys are skipped. -> `visual_encoder/visual` except the cross-frame message
            parameters (`message_fc`, `message_ln`, `message_attn`), which CLIP lacks;
            they and the `mit` stay freshly initialised.
  bert      a Hugging Face BertModel / RobertaModel state dict (keys `embeddings.*`,
            `encoder.*`, `pooler.*`, possibly prefixed `bert.` or `roberta.`; MLM-head
            `cls.*` / `lm_head.*` keys skipped), or a model directory (config.json and
            model.safetensors or pytorch_model.bin). -> `text_encoder` only.

Files: `.safetensors` are read with the `safetensors` package, anything else with
`torch.load(..., weights_only=False)` (so only convert files you trust). PyTorch is
needed only here, and imported only when a file needs it.

The output directory holds `params/` (Orbax pytree `{"model": {...}}`, only the
converted towers) and `conversion.json` (kind, source, its sha256, counts, config hash).
"""

from __future__ import annotations

from absl import flags
import copy
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Mapping

from flax import traverse_util
import ml_collections
import numpy as np

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax import losses
from cope_jax import state
from cope_jax import weight_mapping
from cope_jax.base import domains
from cope_jax import cli

KINDS = ("cope", "xclip", "clip_vit", "bert")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "rope_vitb16.py")

# The Flax parameters each kind is expected to provide (regex on 'a/b/c' paths).
_KIND_SCOPE = {
    "cope": r".*",
    "xclip": r"visual_encoder/.*",
    "clip_vit": r"visual_encoder/visual/(?!transformer/resblocks_\d+/message_).*",
    "bert": r"text_encoder/.*",
}
# Where each kind keeps its state dict inside the loaded object, in order of preference.
_WRAPPER_KEYS = {
    "cope": ("state_dict", "model"),
    "xclip": ("model", "state_dict"),
    "clip_vit": ("state_dict", "model"),
    "bert": ("state_dict", "model"),
}
_BERT_PARTS = ("embeddings.", "encoder.", "pooler.")
_BERT_SKIPPED = re.compile(r"(cls|lm_head)\..*|embeddings\.(position_ids|token_type_ids)")
_TEXT_VOCAB_KEY = "text_encoder.bert_model.embeddings.word_embeddings.weight"


class ConversionError(ValueError):
  """The source cannot be converted (unreadable, wrong kind, wrong architecture)."""


@dataclasses.dataclass(frozen=True)
class Conversion:
  """The converted parameters and an account of where every tensor went."""
  params: dict  # nested {name: np.ndarray} in Flax naming; only the converted towers
  loaded: tuple[str, ...]  # Flax paths 'a/b/c' filled from the source
  skipped: tuple[str, ...]  # source keys that are not part of COPE (by the kind's design)
  left_initialised: tuple[str, ...]  # Flax paths the written checkpoint does not hold
  weights_file: str  # the file the tensors came from
  notes: tuple[str, ...] = ()
  # Flax paths given a fresh initialisation on purpose (written to the checkpoint): the
  # clip heads' text projections, which the release lacks, for a config that reads them.
  initialised: tuple[str, ...] = ()


# ---- reading ------------------------------------------------------------------------


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ConversionError(
        "reading PyTorch checkpoints needs PyTorch: `pip install torch` (the CPU build is "
        "enough), or convert the file to .safetensors elsewhere") from error
  return torch


def _to_numpy(value: Any) -> Any:
  """torch.Tensor -> np.ndarray (half/bfloat16 widened to float32); others unchanged."""
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    tensor = value.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:
      tensor = tensor.float()
    return tensor.numpy()
  return value


def _read_safetensors(path: str) -> dict[str, Any]:
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ConversionError(f"{path}: reading .safetensors needs `pip install safetensors`"
                          ) from error
  try:  # torch handles bfloat16, which NumPy cannot hold
    _import_torch()
    framework = "pt"
  except ConversionError:
    framework = "np"
  with safetensors.safe_open(path, framework=framework) as f:
    return {key: _to_numpy(f.get_tensor(key)) for key in f.keys()}


def _read_torch(path: str) -> Any:
  torch = _import_torch()
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as error:  # pylint: disable=broad-except
    try:  # an OpenAI CLIP TorchScript archive that torch.load does not dispatch itself
      loaded = torch.jit.load(path, map_location="cpu")
    except Exception:  # pylint: disable=broad-except
      raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({error})") from error
  if isinstance(loaded, torch.nn.Module):  # e.g. a TorchScript module
    loaded = loaded.state_dict()
  return loaded


def read_checkpoint(path: str) -> Any:
  """The object stored in `path`: a .safetensors file, a torch.save file or TorchScript.

  Raises:
    FileNotFoundError: `path` does not exist.
    ConversionError: the file cannot be read.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--torch_checkpoint {path!r}: no such file")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return _read_torch(path)


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def select_state_dict(loaded: Any, kind: str, source: str) -> dict[str, np.ndarray]:
  """The flat state dict inside a loaded checkpoint (unwrapping `state_dict`/`model`)."""
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"{source}: expected a dict, found a {type(loaded).__name__}")
  for key in _WRAPPER_KEYS[kind]:
    if isinstance(loaded.get(key), Mapping):
      loaded = loaded[key]
      break
  tensors = {key: _to_numpy(value) for key, value in loaded.items() if _is_array(value)}
  if not tensors:
    raise ConversionError(
        f"{source}: no tensors found; expected a state dict or a dict holding one under "
        f"{' or '.join(map(repr, _WRAPPER_KEYS[kind]))}; top-level keys: {sorted(loaded)[:20]}")
  return tensors


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _hf_weights_file(directory: str) -> str:
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise ConversionError(f"{directory}: a Hugging Face model directory needs "
                        "model.safetensors or pytorch_model.bin (sharded checkpoints are "
                        "not supported)")


def check_hf_config(directory: str, text_config) -> list[str]:
  """Compares a HF config.json with `config.model.text`; returns notes, raises on conflict."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
  with open(path, encoding="utf-8") as f:
    hf_config = json.load(f)
  fields = {"hidden_size": "hidden_size", "num_hidden_layers": "layers",
            "num_attention_heads": "heads", "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_positions", "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps"}
  conflicts = [f"{path}: {hf_name}={hf_config[hf_name]} but config.model.text.{field}="
               f"{text_config[field]}"
               for hf_name, field in fields.items()
               if hf_name in hf_config and hf_config[hf_name] != text_config[field]]
  if text_config.vocab_size and hf_config.get("vocab_size", text_config.vocab_size) != (
      text_config.vocab_size):
    conflicts.append(f"{path}: vocab_size={hf_config['vocab_size']} but "
                     f"config.model.text.vocab_size={text_config.vocab_size}")
  if hf_config.get("hidden_act", "gelu") != "gelu":
    conflicts.append(f"{path}: hidden_act={hf_config['hidden_act']!r}; the text encoder "
                     "uses exact GELU ('gelu')")
  if conflicts:
    raise ConversionError("the model directory does not match config.model.text:\n  "
                          + "\n  ".join(conflicts))
  notes = []
  if hf_config.get("model_type") == "roberta":
    notes.append("config.json says model_type 'roberta': RoBERTa numbers positions from "
                 "padding_idx + 1, the text encoder (BERT) from 0; Chinese RoBERTa models "
                 "such as hfl/rbt6 are BERT-architecture and unaffected")
  return notes


# ---- renaming -----------------------------------------------------------------------


def to_cope_names(state_dict: Mapping[str, Any], kind: str) -> tuple[dict, list[str]]:
  """Renames a kind's keys onto the released COPE names: (renamed dict, skipped keys).

  Skipped keys are those the kind holds that are not part of COPE (X-CLIP/CLIP text
  towers, BERT MLM heads and buffers); anything else is passed on, so the weight
  mapping reports it as unknown.
  """
  if kind not in KINDS:
    raise ConversionError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
  renamed, skipped = {}, []
  for key, value in state_dict.items():
    name = key.removeprefix("module.")
    if kind == "cope":
      renamed[name] = value
    elif kind in ("xclip", "clip_vit"):
      towers = ("visual.", "mit.") if kind == "xclip" else ("visual.",)
      if name.startswith(towers):
        renamed[f"visual_encoder.{name}"] = value
      else:
        skipped.append(key)
    else:  # bert
      name = re.sub(r"^(bert|roberta)\.", "", name)
      if _BERT_SKIPPED.fullmatch(name):
        skipped.append(key)
      else:
        renamed[f"text_encoder.bert_model.{name}"] = value
  return renamed, skipped


def _resolve_vocab_size(config: ml_collections.ConfigDict, renamed: Mapping[str, Any]
                        ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """config with model.text.vocab_size set: from the config, the source, or the vocab file."""
  if config.model.text.vocab_size:
    return config, []
  config = copy.deepcopy(config)
  if _TEXT_VOCAB_KEY in renamed:
    config.model.text.vocab_size = int(np.shape(renamed[_TEXT_VOCAB_KEY])[0])
    return config, [f"config.model.text.vocab_size=0: set to "
                    f"{config.model.text.vocab_size} from the checkpoint's word embeddings"]
  vocab_path = config.data.vocab_path
  if vocab_path and os.path.isfile(vocab_path):
    config.model.text.vocab_size = config_checks.read_vocab_size(vocab_path)
    return config, [f"config.model.text.vocab_size=0: set to {config.model.text.vocab_size} "
                    f"from {vocab_path}"]
  return config, ["config.model.text.vocab_size=0 and no vocabulary file: the text encoder "
                  "is not in this checkpoint anyway"]


# ---- conversion ---------------------------------------------------------------------


def convert(torch_checkpoint: str, kind: str, config: ml_collections.ConfigDict, *,
            allow_missing: bool = False, ignore_unused: bool = False
            ) -> tuple[Conversion, ml_collections.ConfigDict]:
  """Reads and converts `torch_checkpoint` for `COPE(config.model)`.

  Args:
    torch_checkpoint: a file, or for kind `bert` also a Hugging Face model directory.
    kind: one of KINDS (see the module docstring).
    config: the run config; `config.model` fixes every shape.
    allow_missing: accept a source lacking some of the parameters its kind provides.
    ignore_unused: skip source keys that map to no model parameter instead of failing.

  Returns:
    (the conversion, the config with `model.text.vocab_size` resolved if it was 0).

  Raises:
    FileNotFoundError, ConversionError, weight_mapping.WeightMappingError (unknown keys,
    missing parameters, shape mismatches naming the key and both shapes).
  """
  if kind not in KINDS:
    raise ConversionError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
  notes = []
  if os.path.isdir(torch_checkpoint):
    if kind != "bert":
      raise ConversionError(f"--torch_checkpoint {torch_checkpoint!r} is a directory; only "
                            "--kind bert reads a (Hugging Face) model directory")
    notes += check_hf_config(torch_checkpoint, config.model.text)
    weights_file = _hf_weights_file(torch_checkpoint)
  else:
    weights_file = torch_checkpoint
  state_dict = select_state_dict(read_checkpoint(weights_file), kind, weights_file)
  renamed, skipped = to_cope_names(state_dict, kind)
  config, vocab_notes = _resolve_vocab_size(config, renamed)
  notes += vocab_notes

  clip_text = state.needs_clip_text(config)
  expected = weight_mapping.expected_param_shapes(config.model, clip_text=clip_text)
  params = weight_mapping.torch_state_dict_to_flax(
      renamed, config.model, allow_missing=True, ignore_unused=ignore_unused,
      clip_text=clip_text)
  loaded = sorted(traverse_util.flatten_dict(params, sep="/"))
  if not loaded:
    raise ConversionError(
        f"{weights_file}: nothing in it is a {kind!r} parameter (first keys: "
        f"{list(state_dict)[:5]}); is --kind right?")
  in_scope = [path for path in expected if re.fullmatch(_KIND_SCOPE[kind], path)]
  missing = sorted(set(in_scope) - set(loaded))
  initialised: tuple[str, ...] = ()
  if kind == "cope" and clip_text:
    params, initialised, note = _initialise_clip_text_projections(
        params, missing, expected, config)
    missing = sorted(set(missing) - set(initialised))
    notes += [note] if note else []
  if missing and not allow_missing:
    raise weight_mapping.WeightMappingError(
        f"{weights_file}: {len(missing)} parameter(s) a {kind!r} checkpoint should hold are "
        f"missing (pass --allow_missing to leave them initialised): " + ", ".join(missing))
  if kind == "clip_vit":
    notes.append("CLIP has no cross-frame message parameters nor MIT: they stay initialised")
  left = tuple(sorted(set(expected) - set(loaded) - set(initialised)))
  conversion = Conversion(params=params, loaded=tuple(loaded), skipped=tuple(skipped),
                          left_initialised=left, weights_file=weights_file,
                          notes=tuple(notes), initialised=initialised)
  return conversion, config


def _initialise_clip_text_projections(params: dict, missing: list[str], expected,
                                      config: ml_collections.ConfigDict
                                      ) -> tuple[dict, tuple[str, ...], str]:
  """(params, paths, one-line note): the clip heads' `fc0`s freshly initialised when the
  source is in the release's layout (no clip `fc0` at all) and the config reads clip text
  (`weight_mapping.initialise_clip_text_projections`); unchanged, (), "" otherwise."""
  params, paths = weight_mapping.initialise_clip_text_projections(
      params, missing, expected, state.model_config(config), config.seed)
  if not paths:
    return params, (), ""
  clip_text = {d.text_embedding_key for d in domains.DOMAINS if d.is_clip}
  reasons = (["model.use_asr_text=True"] if config.model.use_asr_text else []) + [
      f"loss.weights.{term}={weight}" for term, weight in sorted(config.loss.weights.items())
      if weight and clip_text & set(losses.CONTRASTIVE_TERMS[term])]
  heads = sorted({path.rsplit("/", 1)[0] for path in paths})
  return params, paths, (f"initialised {', '.join(heads)} from config.seed={config.seed}: "
                         "the release's clip heads have no text projection, and this "
                         f"config reads clip text ({', '.join(reasons)})")


def _group_counts(names, separator: str) -> dict[str, int]:
  """{first component: count}, e.g. {'transformer': 144, 'logit_scale': 1}."""
  counts: dict[str, int] = {}
  for name in names:
    group = name.removeprefix("module.").split(separator)[0]
    counts[group] = counts.get(group, 0) + 1
  return dict(sorted(counts.items()))


def conversion_metadata(conversion: Conversion, kind: str, source: str,
                        config: ml_collections.ConfigDict) -> dict:
  """The content of `conversion.json`."""
  count = lambda tree: int(sum(np.size(leaf) for leaf in traverse_util.flatten_dict(
      tree).values()))
  return {
      "kind": kind,
      "source": os.path.abspath(source),
      "weights_file": os.path.abspath(conversion.weights_file),
      "source_sha256": _sha256(conversion.weights_file),
      "loaded_params": len(conversion.loaded),
      "loaded_values": count(conversion.params),
      "skipped_source_keys": len(conversion.skipped),
      "skipped_by_group": _group_counts(conversion.skipped, "."),
      "missing_params": len(conversion.left_initialised),
      "missing_by_group": _group_counts(conversion.left_initialised, "/"),
      "left_initialised": list(conversion.left_initialised),
      "initialised": list(conversion.initialised),
      "partial": bool(conversion.left_initialised),
      "config_hash": config_checks.config_hash(config),
      "model_config_hash": config_checks.config_hash(config.model),
      "notes": list(conversion.notes),
  }


def summary_lines(metadata: Mapping[str, Any], out: str) -> list[str]:
  lines = [f"converted {metadata['kind']} checkpoint {metadata['weights_file']}",
           f"  sha256 {metadata['source_sha256']}",
           f"  loaded {metadata['loaded_params']} parameters "
           f"({metadata['loaded_values']:,} values)",
           f"  skipped {metadata['skipped_source_keys']} source keys not part of COPE"
           + (f": {metadata['skipped_by_group']}" if metadata["skipped_source_keys"] else "")]
  if metadata["partial"]:
    lines.append(f"  {metadata['missing_params']} parameters not in this checkpoint, left to "
                 f"initialisation: {metadata['missing_by_group']}")
  lines += [f"  note: {note}" for note in metadata["notes"]]
  lines.append(f"wrote {os.path.join(out, 'params')} and conversion.json")
  start = f"  start from it with --config.train.init_from={out}"
  if metadata["partial"]:
    start += " --config.train.init_allow_missing=True"
  lines.append(start)
  return lines


def run(torch_checkpoint: str, kind: str, config: ml_collections.ConfigDict, out: str, *,
        allow_missing: bool = False, ignore_unused: bool = False) -> dict:
  """Converts and writes `out/params` + `out/conversion.json`; returns the metadata."""
  conversion, config = convert(torch_checkpoint, kind, config, allow_missing=allow_missing,
                               ignore_unused=ignore_unused)
  metadata = conversion_metadata(conversion, kind, torch_checkpoint, config)
  checkpoints.save_params(out, {"model": conversion.params}, metadata=metadata)
  print("\n".join(summary_lines(metadata, out)))
  return metadata


def _define_flags(flag_values) -> None:

  flags.DEFINE_string("torch_checkpoint", None, "PyTorch/.safetensors file, or a HF model "
                      "dir for --kind bert", flag_values=flag_values)
  flags.DEFINE_enum("kind", None, KINDS, "what the checkpoint holds", flag_values=flag_values)
  flags.DEFINE_string("out", None, "output directory (params/ + conversion.json)",
                      flag_values=flag_values)
  flags.DEFINE_bool("allow_missing", False, "leave parameters the source lacks initialised",
                    flag_values=flag_values)
  flags.DEFINE_bool("ignore_unused", False, "skip source keys that map to no model parameter",
                    flag_values=flag_values)


def main(argv=None) -> None:

  command = cli.command("python -m cope_jax.convert", __doc__, config=DEFAULT_CONFIG,
                        config_help="config file fixing the model's shapes (config.model)",
                        define_flags=_define_flags,
                        required=("torch_checkpoint", "kind", "out"))
  cli.run_job(command, lambda args: run(
      args.torch_checkpoint, args.kind, args.config, args.out,
      allow_missing=args.allow_missing, ignore_unused=args.ignore_unused), argv)


if __name__ == "__main__":
  main()
