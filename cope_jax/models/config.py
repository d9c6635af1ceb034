"""Typed model hyper-parameters, built once from `config.model`.

The Linen modules take one of these frozen dataclasses as a single field instead of a
dozen positional numbers, so a field cannot be passed in the wrong slot:

  model_config = ModelConfig.from_config(config.model)   # once, in `cope_jax.state`
  COPE(model_config); VisualEncoder(model_config.vision); TextEncoder(model_config.text)

The ml_collections config stays the one place where values are set (and overridden on
the command line); these classes only carry them, with dtypes resolved.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from cope_jax.models import layers

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' | 'float16' (config strings) -> the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r} in config.model; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderCompute:
  """How an encoder computes (the same for both, from `config.model`): keyword-only, so
  the encoders' own fields come first."""
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a name of jax.checkpoint_policies
  attention: str = "xla"  # "xla" | "cudnn" (resolved from config.model.attention)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


@dataclasses.dataclass(frozen=True)
class VisionConfig(EncoderCompute):
  """The X-CLIP visual encoder (`config.model.vision`)."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  output_dim: int  # CLIP `proj` output, the per-frame feature fed to the MIT
  num_frames: int  # length of the MIT positional embedding
  mit_layers: int
  mit_heads: int
  drop_path_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class TextConfig(EncoderCompute):
  """The BERT-architecture text encoder (`config.model.text`)."""
  vocab_size: int
  hidden_size: int
  layers: int
  heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole COPE model (`config.model`).

  `clip_text`: the clip heads project their ASR text (`fc0`). The release's clip heads
  have no `fc0` (`input_dims=[None, visual_dim]`), so this is off unless the run reads a
  clip's text: `use_asr_text` (ASR fused into the clip embedding) or a loss term on a
  clip's text embedding (`cope_jax.state.needs_clip_text` decides from the whole config).
  """
  emb_dim: int
  use_asr_text: bool
  vision: VisionConfig
  text: TextConfig
  clip_text: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config, *, clip_text: bool = False) -> ModelConfig:
    """Reads `config.model` (an ml_collections ConfigDict); `text.vocab_size` must be set.

    `clip_text`: the clip heads get a text projection even without `use_asr_text` (for
    loss terms that read a clip's text embedding); `use_asr_text` implies it.
    """
    if model_config.text.vocab_size <= 0:
      raise ValueError(
          "config.model.text.vocab_size is 0: set it to the size of the vocabulary "
          "(data.vocab_path) before building the model")
    dtype = canonical_dtype(model_config.dtype)
    param_dtype = canonical_dtype(model_config.param_dtype)
    remat_policy = model_config.remat_policy
    layers.remat_policy(remat_policy)  # ValueError naming the field for an unknown name
    attention = layers.resolve_attention(model_config.attention, dtype)
    shared = dict(remat=bool(model_config.remat), remat_policy=remat_policy,
                  attention=attention, dtype=dtype, param_dtype=param_dtype)
    vision, text = model_config.vision, model_config.text
    return cls(
        emb_dim=int(model_config.emb_dim),
        use_asr_text=bool(model_config.use_asr_text),
        clip_text=bool(clip_text or model_config.use_asr_text),
        vision=VisionConfig(
            image_size=vision.image_size, patch_size=vision.patch_size, width=vision.width,
            layers=vision.layers, heads=vision.heads, mlp_dim=vision.mlp_dim,
            output_dim=vision.output_dim, num_frames=vision.num_frames,
            mit_layers=vision.mit_layers, mit_heads=vision.mit_heads,
            drop_path_rate=float(vision.drop_path_rate), **shared),
        text=TextConfig(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, layers=text.layers,
            heads=text.heads, intermediate_size=text.intermediate_size,
            max_positions=text.max_positions, type_vocab_size=text.type_vocab_size,
            layer_norm_eps=float(text.layer_norm_eps),
            dropout_rate=float(text.dropout_rate), **shared),
        dtype=dtype, param_dtype=param_dtype)
