"""The per-domain fusion head: one class, instantiated once per domain as `<domain>_head`
(PyTorch `item_fusion_model`, `photo_fusion_model`, `live_fusion_model`).

`fc1` projects the visual feature to `emb_dim`; `fc0`, in a head that projects text
(`projects_text`: the page head always; the clip heads only when the run reads their ASR
text, see `ModelConfig.clip_text`), projects the text feature (title or ASR) to
`emb_dim`. As released, the clip heads have no `fc0`. A head that fuses (`fuse=True`: the page head as released, the clip
heads with `config.model.use_asr_text`) also has `attention_pooling/projection`, a linear
map of the concatenation [text projection, visual projection] (2 * emb_dim) to the fused
embedding. The released `fc2` layer, unused in the forward pass, is not created.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cope_jax.models import layers

Dtype = Any


class FusionHead(nn.Module):
  """Visual [B, visual_dim] (+ text [B, text_dim]) -> dict of [B, emb_dim] projections.

  Returns {'visual': fc1 out}; with text features also {'text': fc0 out}; when `fuse`
  also {'fused': projection of the concatenation}. Outputs are not normalised.
  """
  emb_dim: int
  fuse: bool
  projects_text: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visual_features, text_features=None):
    if self.fuse and not self.projects_text:
      raise ValueError(f"fusion head {self.name!r} fuses text, so it must project text")
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    outputs = {"visual": layers.dense(self.emb_dim, ("embed", None), name="fc1",
                                      **kwargs)(visual_features)}
    if text_features is None:
      if self.fuse:
        raise ValueError(f"fusion head {self.name!r} fuses text but got no text features")
      return outputs
    if not self.projects_text:
      raise ValueError(f"fusion head {self.name!r} has no text projection (fc0) but was "
                       "given text features")
    outputs["text"] = layers.dense(self.emb_dim, ("embed", None), name="fc0",
                                   **kwargs)(text_features)
    if self.fuse:
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
