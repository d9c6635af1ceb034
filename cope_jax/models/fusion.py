"""The per-domain fusion head, one class instantiated as `page_head`, `video_head`,
`live_head` (PyTorch `item_fusion_model`, `photo_fusion_model`, `live_fusion_model`).

`fc1` projects the visual feature to `emb_dim`. A head that uses text also has `fc0`
(text feature -> `emb_dim`) and `attention_pooling/projection`, a linear map of the
concatenation [text projection, visual projection] (2 * emb_dim) to the fused embedding.
The released `fc2` layer, unused in the forward pass, is not created.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cope_jax.models import layers

Dtype = Any


class FusionHead(nn.Module):
  """Visual [B, visual_dim] (+ text [B, text_dim]) -> dict of [B, emb_dim] projections.

  Returns {'visual': fc1 out} and, when `use_text`, also {'text': fc0 out, 'fused':
  projection of the concatenation}. Outputs are not normalised.
  """
  emb_dim: int
  use_text: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visual_features, text_features=None):
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    outputs = {"visual": layers.dense(self.emb_dim, ("embed", None), name="fc1",
                                      **kwargs)(visual_features)}
    if not self.use_text:
      return outputs
    if text_features is None:
      raise ValueError(f"fusion head {self.name!r} uses text but got no text features")
    outputs["text"] = layers.dense(self.emb_dim, ("embed", None), name="fc0",
                                   **kwargs)(text_features)
    both = jnp.concatenate([outputs["text"], outputs["visual"]], axis=-1)
    outputs["fused"] = AttentionPooling(self.emb_dim, name="attention_pooling",
                                        **kwargs)(both)
    return outputs


class AttentionPooling(nn.Module):
  """The released `attention_pooling`: a single `projection` Linear. [B, 2E] -> [B, E]."""
  emb_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, concatenated):
    return layers.dense(self.emb_dim, (None, None), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="projection")(concatenated)
