"""PyTorch COPE state_dict -> Flax `COPE` params, as a table of key patterns.

A released checkpoint's keys (optionally prefixed `module.`) are renamed in three steps:

1. strip `module.`; rename the heads (`item_fusion_model` -> `page_head`,
   `photo_fusion_model` -> `video_head`, `live_fusion_model` -> `live_head`); turn list
   indices into Linen names (`resblocks.3` -> `resblocks_3`, `layer.3` -> `layer_3`);
2. the first rule of `RULES` whose pattern matches the whole key gives the Flax path and
   the layout change (PyTorch Linear [out, in] -> kernel [in, out]; packed q/k/v
   [3D, D] -> [D, 3, heads, D/heads]; conv [out, in, p, p] -> [p, p, in, out]; ...);
3. the tensor is checked against the shape the model built from `config.model` expects.

Released keys the Flax model does not create are dropped without complaint:
  - every head's `fc2.*` (never used in the released forward pass);
  - the `attention_pooling.*` of heads that fuse no text: the video and live heads unless
    `config.model.use_asr_text` (the released forward fuses no text for videos/lives);
  - `text_encoder.bert_model.embeddings.position_ids` (a buffer older HF versions save);
  - a clip head's `fc0.*` when the model has no clip text projection (`clip_text=False`).
The release's clip heads have no `fc0` (`input_dims=[None, visual_dim]`); only the page
head does. The model has clip `fc0`s only with `clip_text=True` (`ModelConfig.clip_text`:
the ASR fusion or an in-domain ASR<->frames term), an extension of this project.
"""

import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cope_jax.models import cope
from cope_jax.models import fusion
from cope_jax.models.config import ModelConfig
from cope_jax.base import domains

# (pattern on the renamed PyTorch key, Flax path template ('.'-separated), layout)
RULES = (
    (r"(.*)\.conv1\.weight", r"\1.conv1.kernel", "conv"),
    (r"(.*)\.(attn|message_attn)\.in_proj_weight", r"\1.\2.in_proj.kernel", "linear"),
    (r"(.*)\.(attn|message_attn)\.in_proj_bias", r"\1.\2.in_proj.bias", "flat"),
    (r"(.*)\.(attn|message_attn)\.out_proj\.weight", r"\1.\2.out_proj.kernel",
     "linear_from_heads"),
    (r"(.*)\.attention\.output\.dense\.weight", r"\1.attention.output.dense.kernel",
     "linear_from_heads"),
    (r"(.*)\.(word|position|token_type)_embeddings\.weight", r"\1.\2_embeddings.embedding",
     "same"),
    (r"(.*)\.(ln_pre|ln_post|ln_1|ln_2|message_ln|LayerNorm)\.weight", r"\1.\2.scale",
     "same"),
    (r"(.*)\.(class_embedding|positional_embedding|proj)", r"\1.\2", "same"),
    (r"(.*)\.weight", r"\1.kernel", "linear"),
    (r"(.*)\.bias", r"\1.bias", "flat"),
)

HEAD_NAMES = {domain.release_head: domain.head for domain in domains.DOMAINS}

ALWAYS_DROPPED = tuple(rf"{domain.head}\.fc2\..*" for domain in domains.DOMAINS) + (
    r"text_encoder\.bert_model\.embeddings\.position_ids",)


def dropped_patterns(model_config, *, clip_text: bool = False) -> tuple[str, ...]:
  """Renamed released keys the model of `config.model` has no parameter for."""
  typed = ModelConfig.from_config(model_config, clip_text=clip_text)
  return ALWAYS_DROPPED + tuple(
      rf"{domain.head}\.attention_pooling\..*" for domain in domains.DOMAINS
      if not domain.fuses_text(typed.use_asr_text)) + tuple(
      rf"{domain.head}\.fc0\..*" for domain in domains.DOMAINS
      if not cope.projects_text(typed, domain))


class WeightMappingError(ValueError):
  """The state_dict does not fit the model: lists unknown, missing and misshapen keys."""


def _torch_shape(flax_shape: tuple, layout: str) -> tuple:
  """The PyTorch shape that converts to `flax_shape` under `layout`."""
  size = lambda dims: int(np.prod(dims, dtype=np.int64))
  if layout == "same":
    return tuple(flax_shape)
  if layout == "flat":
    return (size(flax_shape),)
  if layout == "linear":  # kernel [in, *out]
    return (size(flax_shape[1:]), flax_shape[0])
  if layout == "linear_from_heads":  # kernel [heads, head_dim, out]
    return (flax_shape[-1], size(flax_shape[:-1]))
  if layout == "conv":  # kernel [p, p, in, out]
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  raise ValueError(f"unknown layout {layout!r}")


def _to_flax_layout(tensor: np.ndarray, flax_shape: tuple, layout: str) -> np.ndarray:
  if layout in ("same", "flat"):
    return tensor.reshape(flax_shape)
  if layout in ("linear", "linear_from_heads"):
    return tensor.T.reshape(flax_shape)
  if layout == "conv":
    return tensor.transpose(2, 3, 1, 0)
  raise ValueError(f"unknown layout {layout!r}")


def rename_torch_key(key: str) -> str:
  """Released key -> the key in Flax naming, still '.'-separated (before `RULES`)."""
  key = key.removeprefix("module.")
  head, _, rest = key.partition(".")
  if head in HEAD_NAMES:
    key = f"{HEAD_NAMES[head]}.{rest}"
  return re.sub(r"\b(resblocks|layer)\.(\d+)\b", r"\1_\2", key)


def flax_path_and_layout(renamed_key: str) -> tuple[str, str] | None:
  """(Flax path 'a/b/c', layout) from the first matching rule, or None."""
  for pattern, template, layout in RULES:
    match = re.fullmatch(pattern, renamed_key)
    if match:
      return match.expand(template).replace(".", "/"), layout
  return None


def expected_param_shapes(model_config, *, clip_text: bool = False
                          ) -> dict[str, jax.ShapeDtypeStruct]:
  """'a/b/c' -> ShapeDtypeStruct of every parameter of `COPE(model_config)` (no compute).

  `clip_text`: the clip heads have a text projection (`cope_jax.state.needs_clip_text`).
  """
  side = model_config.vision.image_size
  frames = model_config.vision.num_frames
  batch = {}
  for domain in domains.DOMAINS:
    pixels = (1, frames, side, side, 3) if domain.is_clip else (1, side, side, 3)
    batch[domain.media_key] = jnp.zeros(pixels, jnp.uint8)
    batch[domain.text_ids_key] = jnp.zeros((1, 2), jnp.int32)
    batch[domain.text_mask_key] = jnp.ones((1, 2), jnp.int32)
  typed = ModelConfig.from_config(model_config, clip_text=clip_text)
  variables = jax.eval_shape(cope.COPE(typed).init,
                             jax.random.key(0), batch)
  params = nn.meta.unbox(variables["params"])
  return {"/".join(path): leaf
          for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], model_config, *,
                             allow_missing: bool = False,
                             ignore_unused: bool = False, clip_text: bool = False) -> dict:
  """Converts a released COPE state_dict to the `params` of `COPE(model_config)`.

  Args:
    state_dict: PyTorch key -> array (numpy, or anything `np.asarray` takes), keys
      optionally prefixed `module.`. Released-but-unused keys are dropped (see the
      module docstring).
    model_config: `config.model`; the converted tensors must have the shapes it implies.
    allow_missing: leave parameters the state_dict lacks out of the result (the caller
      fills them, e.g. from a fresh init) instead of raising.
    ignore_unused: skip keys no rule maps to a model parameter instead of raising.
    clip_text: the model's clip heads have a text projection (see the module docstring).

  Returns:
    Nested dict of numpy arrays (the content of `variables['params']`, unboxed), in
    the model's `param_dtype`.

  Raises:
    WeightMappingError: listing unknown keys, missing parameters and shape mismatches
      (each mismatch names the key, its shape, the Flax path and the shape expected).
  """
  expected = expected_param_shapes(model_config, clip_text=clip_text)
  dropped = dropped_patterns(model_config, clip_text=clip_text)
  converted, unknown, mismatched = {}, [], {}
  for key, value in state_dict.items():
    renamed = rename_torch_key(key)
    if any(re.fullmatch(pattern, renamed) for pattern in dropped):
      continue
    target = flax_path_and_layout(renamed)
    if target is None or target[0] not in expected:
      unknown.append(key)
      continue
    path, layout = target
    tensor = np.asarray(value)
    want = expected[path]
    want_torch = _torch_shape(want.shape, layout)
    if tuple(tensor.shape) != want_torch:
      mismatched[path] = (f"{key}: shape {tuple(tensor.shape)}, but Flax {path} "
                          f"{tuple(want.shape)} needs {want_torch}")
      continue
    converted[path] = _to_flax_layout(tensor, want.shape, layout).astype(want.dtype)

  missing = sorted(set(expected) - set(converted) - set(mismatched))
  problems = []
  if unknown and not ignore_unused:
    problems.append(f"{len(unknown)} unknown key(s): " + ", ".join(sorted(unknown)))
  if missing and not allow_missing:
    problems.append(f"{len(missing)} missing parameter(s): " + ", ".join(missing))
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es):\n  "
                    + "\n  ".join(mismatched.values()))
  if problems:
    raise WeightMappingError("state_dict does not fit COPE(config.model):\n"
                             + "\n".join(problems))
  return flax.traverse_util.unflatten_dict(converted, sep="/")



def initialise_clip_text_projections(params: dict, missing, expected, typed_config,
                                     seed: int) -> tuple[dict, tuple[str, ...]]:
  """Fills the clip heads' text projections (`fc0`) with the model's own initialisation
  of that layer (from `seed`), for a release checkpoint (whose clip heads have none)
  converted for a model that has them (`typed_config.clip_text`).

  Only when the source holds no clip `fc0` at all (`missing` holds every one of them): a
  checkpoint with some of them is treated like any other (its gaps are missing keys).

  Args:
    params: the converted params (nested); `missing`: the 'a/b/c' paths the source
      lacked; `expected`: `expected_param_shapes` of the model; `typed_config`: its
      `ModelConfig`.

  Returns:
    (params with the initialised layers, their paths); (params, ()) when nothing applies.
  """
  heads = "|".join(domain.head for domain in domains.DOMAINS if domain.is_clip)
  wanted = sorted(path for path in expected if re.fullmatch(rf"({heads})/fc0/.*", path))
  if not wanted or not set(wanted) <= set(missing):
    return params, ()
  head = fusion.FusionHead(typed_config.emb_dim, fuse=False,
                           param_dtype=typed_config.param_dtype)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  rng = jax.random.PRNGKey(seed)
  for index, domain in enumerate(d for d in domains.DOMAINS if d.is_clip):
    fresh = head.init(jax.random.fold_in(rng, index),
                      jnp.zeros((1, typed_config.vision.output_dim), typed_config.param_dtype),
                      jnp.zeros((1, typed_config.text.hidden_size), typed_config.param_dtype))
    for leaf, value in flax.traverse_util.flatten_dict(
        nn.meta.unbox(fresh["params"])["fc0"], sep="/").items():
      path = f"{domain.head}/fc0/{leaf}"
      if tuple(value.shape) != tuple(expected[path].shape):
        raise WeightMappingError(f"{path}: initialised shape {value.shape}, model expects "
                                 f"{expected[path].shape}")
      flat[path] = np.asarray(value)
  return flax.traverse_util.unflatten_dict(flat, sep="/"), tuple(wanted)
