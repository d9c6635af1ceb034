"""The text encoder: a BERT-architecture Chinese RoBERTa (rbt3 / rbt6), HF semantics.

Word + position + token-type embeddings and LayerNorm, post-LN encoder layers with exact
(erf) GELU, attention restricted to the tokens of the mask, and the pooler
tanh(dense([CLS])). Submodule names mirror HF `BertModel` (`encoder.layer.0.attention.
self.query` -> `encoder/layer_0/attention/self/query`), see `cope_jax/weight_mapping.py`.

Dropout (`dropout_rate`) is applied, in training, where HF applies hidden dropout
(embeddings, attention output, FFN output); attention probabilities are not dropped
(`jax.nn.dot_product_attention` has no dropout).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cope_jax.models import layers
from cope_jax.models.config import TextConfig

Dtype = Any


class BertEmbeddings(nn.Module):
  """Token ids [B, L] -> embedded tokens [B, L, hidden]."""
  vocab_size: int
  hidden_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids, token_type_ids, deterministic: bool = True):
    length = token_ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f"{length} tokens exceed config.model.text.max_positions "
                       f"({self.max_positions})")

    def embed(num, name, axes):
      return nn.Embed(num, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=layers.partitioned(layers.NORMAL_002, axes), name=name)

    x = (embed(self.vocab_size, "word_embeddings", ("vocab", "embed"))(token_ids)
         + embed(self.max_positions, "position_embeddings", (None, "embed"))(
             jnp.arange(length)[None, :])
         + embed(self.type_vocab_size, "token_type_embeddings", (None, "embed"))(
             token_type_ids))
    x = layers.LayerNorm(epsilon=self.layer_norm_eps, output_dtype=self.dtype,
                         param_dtype=self.param_dtype, name="LayerNorm")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """`query`, `key`, `value` and masked attention. [B, L, hidden] -> [B, L, heads, head].

  `attention_mask` [B, L] bool: True for real tokens (padding at the end).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention implementation

  @nn.compact
  def __call__(self, x, attention_mask):
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(f"hidden size {hidden} is not divisible by {self.num_heads} heads")
    head_dim = hidden // self.num_heads
    project = lambda name: layers.dense(
        (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)(x)
    return layers.attention(project("query"), project("key"), project("value"),
                            self.attention, padding_mask=attention_mask)


class BertResidualOutput(nn.Module):
  """HF's `*Output`: LayerNorm(dropout(dense(x)) + residual). Output [B, L, hidden]."""
  hidden_size: int
  input_axes: tuple  # logical names of the dense layer's input axes
  layer_norm_eps: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, residual, deterministic: bool = True):
    axis = tuple(range(-len(self.input_axes), 0))
    x = layers.dense(self.hidden_size, self.input_axes + ("embed",), axis=axis,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return layers.LayerNorm(epsilon=self.layer_norm_eps, output_dtype=self.dtype,
                            param_dtype=self.param_dtype, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
  """`self` attention then its `output` projection + residual LayerNorm."""
  num_heads: int
  layer_norm_eps: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = BertSelfAttention(self.num_heads, name="self", attention=self.attention,
                                **kwargs)(x, attention_mask)
    return BertResidualOutput(x.shape[-1], ("heads", "kv"), self.layer_norm_eps,
                              self.dropout_rate, name="output", **kwargs)(
                                  context, x, deterministic)


class BertIntermediate(nn.Module):
  """`dense` to the intermediate size and exact GELU. [B, L, hidden] -> [B, L, inter]."""
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="dense")(x)
    return nn.gelu(x, approximate=False)


class BertLayer(nn.Module):
  """One post-LN encoder layer. [B, L, hidden] -> [B, L, hidden]."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dropout_rate: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(self.num_heads, self.layer_norm_eps, self.dropout_rate,
                      name="attention", attention=self.attention, **kwargs)(
                          x, attention_mask, deterministic)
    hidden = BertIntermediate(self.intermediate_size, name="intermediate", **kwargs)(x)
    return BertResidualOutput(x.shape[-1], ("mlp",), self.layer_norm_eps,
                              self.dropout_rate, name="output", **kwargs)(
                                  hidden, x, deterministic)


class BertEncoder(nn.Module):
  """`layer_{i}` stack. [B, L, hidden] -> [B, L, hidden]."""
  config: TextConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    config = self.config
    # Argument 0 is the module, 3 is `deterministic` (a Python bool).
    layer_class = layers.maybe_remat(BertLayer, config.remat, config.remat_policy,
                                     static_argnums=(3,))
    for i in range(config.layers):
      x = layer_class(num_heads=config.heads, intermediate_size=config.intermediate_size,
                      layer_norm_eps=config.layer_norm_eps, dropout_rate=config.dropout_rate,
                      dtype=config.dtype, param_dtype=config.param_dtype,
                      attention=config.attention, name=f"layer_{i}")(
                          x, attention_mask, deterministic)
    return x


class BertPooler(nn.Module):
  """tanh(`dense`(hidden state of [CLS])). [B, L, hidden] -> [B, hidden]."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cls_hidden = x[:, 0]
    return jnp.tanh(layers.dense(x.shape[-1], ("embed", "mlp"), dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="dense")(cls_hidden))


class BertModel(nn.Module):
  """HF `BertModel` (with pooler): token ids + mask [B, L] -> pooler output [B, hidden]."""
  config: TextConfig

  @nn.compact
  def __call__(self, token_ids, token_mask, deterministic: bool = True):
    config = self.config
    kwargs = dict(dtype=config.dtype, param_dtype=config.param_dtype)
    x = BertEmbeddings(config.vocab_size, config.hidden_size, config.max_positions,
                       config.type_vocab_size, config.layer_norm_eps, config.dropout_rate,
                       name="embeddings", **kwargs)(
                           token_ids, jnp.zeros_like(token_ids), deterministic)
    attention_mask = token_mask > 0  # [B, L]: True for real tokens
    x = BertEncoder(config, name="encoder")(x, attention_mask, deterministic)
    return BertPooler(name="pooler", **kwargs)(x)


class TextEncoder(nn.Module):
  """`bert_model`'s pooler output: ids, mask [B, L] int32 -> [B, hidden_size]."""
  config: TextConfig

  @nn.compact
  def __call__(self, token_ids, token_mask, train: bool = False):
    return BertModel(self.config, name="bert_model")(token_ids, token_mask, not train)
