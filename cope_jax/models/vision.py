"""The X-CLIP visual encoder shared by pages, videos and live clips.

`VisualEncoder` = `visual` (a CLIP ViT whose blocks exchange one message token per frame
across the frames of a clip) + `mit` (the multi-frame integration transformer over the
projected per-frame [CLS] features). A product-page image is a clip of one frame.

Parameter paths mirror the PyTorch names (`visual.transformer.resblocks.0.attn.*` ->
`visual/transformer/resblocks_0/attn/*`), see `cope_jax/weight_mapping.py`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cope_jax.models import layers
from cope_jax.models.config import VisionConfig

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images, dtype: Dtype = jnp.float32):
  """uint8 RGB in [0, 255] -> ImageNet-normalised `dtype`; float input passes through.

  Float input is taken to be normalised already (e.g. by a reference implementation).
  """
  if images.dtype == jnp.uint8:
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    images = (images.astype(jnp.float32) / 255.0 - mean) / std
  return images.astype(dtype)


class CrossFrameBlock(nn.Module):
  """A pre-LN CLIP residual block with X-CLIP's cross-frame message token.

  [CLS] of each frame -> `message_fc` -> the clip's T message tokens attend to each
  other (`message_ln`, `message_attn`, residual) -> each frame's message token joins its
  frame's sequence for the self-attention (`ln_1`, `attn`, residual) and leaves again ->
  MLP (`ln_2`, `mlp`, residual).

  Input and output: [batch, frames, tokens, width].
  """
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention implementation

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    batch, frames, tokens, width = x.shape
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention_kwargs = dict(kwargs, implementation=self.attention)
    ln = lambda name: layers.LayerNorm(output_dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    drop_path = layers.DropPath(self.drop_path_rate)

    messages = layers.dense(width, ("embed", "mlp"), name="message_fc",
                            **kwargs)(x[:, :, 0, :])  # [B, T, width]
    messages = messages + drop_path(
        layers.MultiHeadAttention(self.num_heads, name="message_attn", **attention_kwargs)(
            ln("message_ln")(messages)), deterministic)

    sequences = jnp.concatenate([x, messages[:, :, None, :]], axis=2)
    sequences = sequences.reshape(batch * frames, tokens + 1, width)
    sequences = sequences + drop_path(
        layers.MultiHeadAttention(self.num_heads, name="attn", **attention_kwargs)(
            ln("ln_1")(sequences)), deterministic)
    x = sequences[:, :tokens].reshape(batch, frames, tokens, width)

    mlp = layers.QuickGeluMlp(self.mlp_dim, name="mlp", **kwargs)
    return x + drop_path(mlp(ln("ln_2")(x)), deterministic)


class ResidualAttentionBlock(nn.Module):
  """CLIP's pre-LN residual block (`ln_1`, `attn`, `ln_2`, `mlp`). [B, L, D] -> [B, L, D]."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention implementation

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic  # no dropout here; kept for a uniform block signature
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: layers.LayerNorm(output_dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    x = x + layers.MultiHeadAttention(self.num_heads, name="attn", implementation=self.attention,
                                      **kwargs)(ln("ln_1")(x))
    return x + layers.QuickGeluMlp(self.mlp_dim, name="mlp", **kwargs)(ln("ln_2")(x))


def _maybe_remat(block_class, config: VisionConfig):
  """`block_class`, rematerialised in the backward pass when `config.remat`."""
  # Argument 0 is the module itself, 2 is `deterministic` (a Python bool).
  return layers.maybe_remat(block_class, config.remat, config.remat_policy,
                            static_argnums=(2,))


class CrossFrameTransformer(nn.Module):
  """`resblocks_{i}`: the stack of `CrossFrameBlock`s. [B, T, L, D] -> [B, T, L, D]."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    config = self.config
    block_class = _maybe_remat(CrossFrameBlock, config)
    # Stochastic depth grows linearly from 0 in the first block to the rate in the last.
    rates = np.linspace(0.0, config.drop_path_rate, config.layers) if config.layers else []
    for i in range(config.layers):
      x = block_class(num_heads=config.heads, mlp_dim=config.mlp_dim,
                      drop_path_rate=float(rates[i]), dtype=config.dtype,
                      param_dtype=config.param_dtype, attention=config.attention,
                      name=f"resblocks_{i}")(x, deterministic)
    return x


class CrossFrameViT(nn.Module):
  """The `visual` tower: patch conv, [CLS], positions, cross-frame blocks, `proj`.

  Input: normalised frames [batch, frames, size, size, 3]. Output: the projected [CLS]
  feature of every frame, [batch, frames, output_dim].
  """
  config: VisionConfig

  @nn.compact
  def __call__(self, frames, deterministic: bool = True):
    config = self.config
    dtype, param_dtype, width = config.dtype, config.param_dtype, config.width
    batch, num_frames, height, width_px, channels = frames.shape
    if (height, width_px, channels) != (config.image_size, config.image_size, 3):
      raise ValueError(
          f"visual encoder expects frames [batch, frames, {config.image_size}, "
          f"{config.image_size}, 3] (config.model.vision.image_size), got {frames.shape}")
    grid = config.image_size // config.patch_size
    scale = width ** -0.5
    images = frames.reshape(batch * num_frames, height, width_px, channels)
    patches = nn.Conv(
        width, (config.patch_size, config.patch_size), strides=config.patch_size,
        padding="VALID", use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                       (None, None, None, "embed")),
        name="conv1")(images)
    patches = patches.reshape(batch * num_frames, grid * grid, width)

    class_embedding = self.param(
        "class_embedding",
        layers.partitioned(nn.initializers.normal(scale), ("embed",)),
        (width,), param_dtype)
    positional_embedding = self.param(
        "positional_embedding",
        layers.partitioned(nn.initializers.normal(scale), (None, "embed")),
        (grid * grid + 1, width), param_dtype)
    cls_tokens = jnp.broadcast_to(class_embedding.astype(dtype),
                                  (batch * num_frames, 1, width))
    tokens = jnp.concatenate([cls_tokens, patches.astype(dtype)], axis=1)
    tokens = tokens + positional_embedding.astype(dtype)
    tokens = layers.LayerNorm(output_dtype=dtype, param_dtype=param_dtype,
                              name="ln_pre")(tokens)

    tokens = tokens.reshape(batch, num_frames, grid * grid + 1, width)
    tokens = CrossFrameTransformer(config, name="transformer")(tokens, deterministic)

    cls_features = layers.LayerNorm(output_dtype=dtype, param_dtype=param_dtype,
                                    name="ln_post")(tokens[:, :, 0, :])
    proj = self.param("proj", layers.partitioned(nn.initializers.normal(scale),
                                                 ("embed", None)),
                      (width, config.output_dim), param_dtype)
    return cls_features @ proj.astype(dtype)  # [B, T, output_dim]


class MultiFrameIntegration(nn.Module):
  """`mit`: learned frame positions, CLIP blocks, residual, mean over positions.

  Input [batch, T, D] with T = `num_frames` or T = 1. With T = 1 (a page) the feature
  broadcasts against the [1, num_frames, D] positional embedding as in the released
  PyTorch code: the blocks run over `num_frames` positions and the mean is over them.
  Output [batch, D].
  """
  config: VisionConfig

  @nn.compact
  def __call__(self, frame_features, deterministic: bool = True):
    config = self.config
    frames, dim = frame_features.shape[1:]
    if frames not in (1, config.num_frames):
      raise ValueError(
          f"the multi-frame integration transformer takes 1 or {config.num_frames} frames "
          f"(config.model.vision.num_frames), got {frames}")
    positional_embedding = self.param(
        "positional_embedding", layers.partitioned(layers.TRUNC_NORMAL_002,
                                                   (None, None, "embed")),
        (1, config.num_frames, dim), config.param_dtype)
    x = frame_features + positional_embedding.astype(config.dtype)
    block_class = _maybe_remat(ResidualAttentionBlock, config)
    for i in range(config.mit_layers):
      x = block_class(num_heads=config.mit_heads, mlp_dim=4 * dim, dtype=config.dtype,
                      param_dtype=config.param_dtype, attention=config.attention,
                      name=f"resblocks_{i}")(x, deterministic)
    x = x + frame_features
    return jnp.mean(x.astype(jnp.float32), axis=1).astype(config.dtype)


class VisualEncoder(nn.Module):
  """The shared visual encoder: `visual` then `mit`.

  Input: frames [batch, T, size, size, 3], uint8 RGB (normalised here with ImageNet
  statistics) or float already normalised. Output: [batch, output_dim].
  """
  config: VisionConfig

  @nn.compact
  def __call__(self, frames, train: bool = False):
    if frames.ndim != 5:
      raise ValueError(f"frames must be [batch, frames, height, width, 3], got {frames.shape}")
    frames = normalize_images(frames, self.config.dtype)
    frame_features = CrossFrameViT(self.config, name="visual")(frames, not train)
    return MultiFrameIntegration(self.config, name="mit")(frame_features, not train)
