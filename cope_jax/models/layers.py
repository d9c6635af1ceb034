"""Building blocks shared by the COPE encoders.

Every parameter is created through `nn.with_logical_partitioning`, with the logical
axis names of `config.mesh.rules`:

  'embed'  model width (the residual stream)     'mlp'   hidden width of an MLP
  'heads'  attention heads                       'kv'    per-head width
  'vocab'  token vocabulary

Axes that are never worth sharding (3 of packed q/k/v, positions, patch pixels) carry
`None`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Initialisers matching the PyTorch modules the weights come from (only used when a
# model is trained from scratch; converted checkpoints overwrite them).
TRUNC_NORMAL_002 = nn.initializers.truncated_normal(stddev=0.02)
NORMAL_002 = nn.initializers.normal(stddev=0.02)


def partitioned(init, names: Sequence[str | None]):
  """`init` wrapped so that the parameter carries logical axis `names`."""
  return nn.with_logical_partitioning(init, tuple(names))


class DenseGeneral(nn.Module):
  """A linear map contracting `axis` of the input into `features` output axes.

  Unlike `nn.DenseGeneral` the kernel is created at its full multi-axis shape (not
  flattened then reshaped), so its logical axis names apply to the array as created
  and a sharding constraint can be placed on it when a mesh is active.
  """
  features: Any  # int or tuple of ints
  kernel_axes: Sequence[str | None]
  axis: Any = -1  # int or tuple of ints
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = None  # None: LeCun normal over the contracted (input) axes

  @nn.compact
  def __call__(self, inputs):
    features = tuple(self.features) if isinstance(self.features, (tuple, list)) else (
        self.features,)
    axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
    axes = tuple(a % inputs.ndim for a in axes)
    kernel_shape = tuple(inputs.shape[a] for a in axes) + features
    kernel_init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(len(axes))),
        out_axis=tuple(range(len(axes), len(kernel_shape))))
    kernel = self.param("kernel", partitioned(kernel_init, self.kernel_axes),
                        kernel_shape, self.param_dtype)
    inputs, kernel = inputs.astype(self.dtype), kernel.astype(self.dtype)
    outputs = jax.lax.dot_general(
        inputs, kernel, ((axes, tuple(range(len(axes)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros_init(),
                                            tuple(self.kernel_axes)[-len(features):]),
                        features, self.param_dtype)
      outputs = outputs + bias.astype(self.dtype)
    return outputs


def dense(features, kernel_axes, *, dtype, param_dtype, name, axis=-1, use_bias=True,
          kernel_init=None):
  """A `DenseGeneral` with partitioned kernel and bias.

  `kernel_axes` names every kernel axis (input axes first, then output axes); the bias
  takes the output axes' names.
  """
  return DenseGeneral(features=features, kernel_axes=tuple(kernel_axes), axis=axis,
                      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, name=name)


class LayerNorm(nn.LayerNorm):
  """LayerNorm computed in float32 whatever the input; returns `output_dtype`.

  Parameters `scale` and `bias` (PyTorch `weight` and `bias`) carry the 'embed' axis.
  """
  epsilon: float = 1e-5  # PyTorch's default
  output_dtype: Dtype = jnp.float32
  use_fast_variance: bool = False  # two-pass variance, as PyTorch computes it
  scale_init: Any = partitioned(nn.initializers.ones_init(), ("embed",))
  bias_init: Any = partitioned(nn.initializers.zeros_init(), ("embed",))

  def __call__(self, x, *args, **kwargs):
    y = super().__call__(x.astype(jnp.float32), *args, **kwargs)
    return y.astype(self.output_dtype)


def quick_gelu(x):
  """CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a residual branch per example (leading axis) in training.

  Surviving examples are scaled by 1 / (1 - rate); draws from the 'dropout' RNG stream.
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, mask_shape)
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


# `config.model.attention`: how `jax.nn.dot_product_attention` computes attention.
#   "xla"    XLA's fused softmax(q k^T / sqrt(d)) v, any backend and dtype;
#   "cudnn"  cuDNN's flash-attention kernel (NVIDIA GPUs, bfloat16/float16 compute);
#   "auto"   "cudnn" on a GPU backend with bfloat16/float16 compute, else "xla".
# On TPU "auto" is "xla": at this model's lengths (197/198 tokens per frame, 8 frames,
# 32 text tokens) a Pallas flash kernel must pad to its 128-token blocks and, compiled
# for a v5e with the paper's shapes, needs 1.7x the temporaries of XLA's fused
# attention (benchmarks/tpu_compile.py --attention), while attention is about 4% of a
# block's FLOPs at 197 tokens: there is nothing for a kernel to win.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def resolve_attention(name: str, dtype: Dtype, backend: str | None = None) -> str:
  """A `config.model.attention` value -> "xla" or "cudnn" for this backend and dtype.

  Raises ValueError naming the field when "cudnn" cannot run here.
  """
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {name!r}")
  backend = backend or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == "auto":
    return "cudnn" if backend in ("gpu", "cuda") and half else "xla"
  if name == "cudnn" and backend not in ("gpu", "cuda"):
    raise ValueError(f"config.model.attention='cudnn' needs an NVIDIA GPU (cuDNN flash "
                     f"attention); this run's backend is {backend!r}: use 'xla' or 'auto'")
  if name == "cudnn" and not half:
    raise ValueError("config.model.attention='cudnn' computes in bfloat16 or float16; "
                     f"config.model.dtype is {jnp.dtype(dtype).name}: use 'xla' or 'auto'")
  return name


def cudnn_takes(query_length: int, key_length: int, head_dim: int) -> bool:
  """Whether `implementation="cudnn"` runs attention of these sizes on the cuDNN flash
  kernel: a head dim that is a multiple of 8 up to 128, and even query and key lengths
  of at least 2. The kernel refuses a length of 1 (message and integration attention
  over a page's single frame) and head dims off that grid; odd lengths are kept off it
  too, which keeps every setting on shapes that were checked against XLA."""
  return (head_dim % 8 == 0 and head_dim <= 128 and query_length >= 2
          and key_length >= 2 and query_length % 2 == 0 and key_length % 2 == 0)


def attention(query, key, value, implementation: str = "xla", padding_mask=None):
  """Softmax attention of [B, L, heads, head_dim] q, k, v -> [B, L, heads, head_dim].

  `padding_mask` [B, L] bool (True: a real token) hides padded keys; padding is at the
  end of each row (the tokenizer's layout), which the cuDNN kernel takes as per-row key
  lengths. The softmax is computed in float32 by both implementations. With "cudnn",
  sizes the kernel does not take (`cudnn_takes`) run through XLA.
  """
  if implementation == "cudnn" and not cudnn_takes(query.shape[1], key.shape[1],
                                                    query.shape[-1]):
    implementation = "xla"
  if padding_mask is None:
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  if implementation == "cudnn":
    lengths = jnp.sum(padding_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=lengths,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(query, key, value, mask=padding_mask[:, None, None, :],
                                      implementation=implementation)


# `config.model.remat_policy`: what a rematerialised block keeps from its forward pass
# (names of `jax.checkpoint_policies`); the rest is recomputed in the backward pass.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_policy(name: str):
  """A `config.model.remat_policy` name -> the `jax.checkpoint_policies` function."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy must be one of {REMAT_POLICIES}, got "
                     f"{name!r}")
  return getattr(jax.checkpoint_policies, name)


def maybe_remat(block_class, remat: bool, policy: str, static_argnums: tuple[int, ...]):
  """`block_class`, rematerialised with `policy` in the backward pass when `remat`."""
  if not remat:
    return block_class
  return nn.remat(block_class, static_argnums=static_argnums, policy=remat_policy(policy))


class MultiHeadAttention(nn.Module):
  """Self-attention laid out like PyTorch's `nn.MultiheadAttention`.

  q, k and v come from one packed projection `in_proj` (kernel [D, 3, heads, D/heads],
  PyTorch `in_proj_weight` [3D, D]); `out_proj` has kernel [heads, D/heads, D].
  Attention runs through `jax.nn.dot_product_attention` (softmax in float32) with the
  `implementation` of `attention` ("xla" or "cudnn").

  Input [batch, length, D] -> output [batch, length, D].
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                dtype=self.dtype, param_dtype=self.param_dtype, name="in_proj")(x)
    query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    context = attention(query, key, value, self.implementation)  # [B, L, heads, head_dim]
    return dense(width, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="out_proj")(context)


class QuickGeluMlp(nn.Module):
  """CLIP's MLP: `c_fc` -> QuickGELU -> `c_proj`. [..., D] -> [..., D]."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = dense(self.hidden_dim, ("embed", "mlp"), name="c_fc", **kwargs)(x)
    return dense(width, ("mlp", "embed"), name="c_proj", **kwargs)(quick_gelu(hidden))


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis, in float32 (as `F.normalize`)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)
