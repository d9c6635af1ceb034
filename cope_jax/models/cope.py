"""COPE: one visual encoder and one text encoder shared by three domain heads.

  model = COPE(config.model)
  variables = model.init(rngs, batch)
  embeddings = model.apply(variables, batch, train=False)   # all five embeddings
  page = model.apply(variables, eval_batch, method="embed_page")

Batch keys (docs/interfaces.md): `page_image` [B, S, S, 3], `page_title_ids/mask`
[B, L]; `video_frames` / `live_frames` [B, T, S, S, 3], `video_asr_ids/mask`,
`live_asr_ids/mask` [B, L]. Images are uint8 (normalised in the model) or float
already normalised. Every returned embedding is L2-normalised float32 [B, emb_dim].
"""


import flax.linen as nn
import ml_collections

from cope_jax.models import fusion
from cope_jax.models import layers
from cope_jax.models import text
from cope_jax.models import vision


class COPE(nn.Module):
  """The three-domain model; submodules `visual_encoder`, `text_encoder`, `*_head`."""
  config: ml_collections.ConfigDict  # config.model

  def setup(self):
    config = self.config
    dtype = layers.canonical_dtype(config.dtype)
    param_dtype = layers.canonical_dtype(config.param_dtype)
    kwargs = dict(remat=config.remat, dtype=dtype, param_dtype=param_dtype)
    self.visual_encoder = vision.VisualEncoder.from_config(config.vision, **kwargs)
    self.text_encoder = text.TextEncoder.from_config(config.text, **kwargs)
    head = lambda use_text: fusion.FusionHead(config.emb_dim, use_text, dtype, param_dtype)
    self.page_head = head(True)
    self.video_head = head(config.use_asr_text)
    self.live_head = head(config.use_asr_text)

  def __call__(self, batch, train: bool = False):
    """All five embeddings of a training batch: dict of [B, emb_dim] float32."""
    return {**self.embed_page(batch, train),
            **self.embed_video(batch, train),
            **self.embed_live(batch, train)}

  def embed_page(self, batch, train: bool = False):
    """{'page_embedding', 'page_text_embedding', 'page_visual_embedding'}: [B, emb_dim]."""
    image = _require(batch, "page_image", ndim=4)
    visual = self.visual_encoder(image[:, None], train)  # a page is a one-frame clip
    title = self.text_encoder(_require(batch, "page_title_ids", ndim=2),
                              _require(batch, "page_title_mask", ndim=2), train)
    outputs = self.page_head(visual, title)
    return {"page_embedding": layers.l2_normalize(outputs["fused"]),
            "page_text_embedding": layers.l2_normalize(outputs["text"]),
            "page_visual_embedding": layers.l2_normalize(outputs["visual"])}

  def embed_video(self, batch, train: bool = False):
    """{'video_embedding': [B, emb_dim]}."""
    return self._embed_clip(batch, "video", self.video_head, train)

  def embed_live(self, batch, train: bool = False):
    """{'live_embedding': [B, emb_dim]}."""
    return self._embed_clip(batch, "live", self.live_head, train)

  def _embed_clip(self, batch, domain, head, train):
    visual = self.visual_encoder(_require(batch, f"{domain}_frames", ndim=5), train)
    asr = None
    if self.config.use_asr_text:
      asr = self.text_encoder(_require(batch, f"{domain}_asr_ids", ndim=2),
                              _require(batch, f"{domain}_asr_mask", ndim=2), train)
    outputs = head(visual, asr)
    embedding = outputs["fused"] if self.config.use_asr_text else outputs["visual"]
    return {f"{domain}_embedding": layers.l2_normalize(embedding)}


def _require(batch, key: str, ndim: int):
  """batch[key], checked to exist and to have `ndim` dimensions."""
  if key not in batch:
    raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
  value = batch[key]
  if value.ndim != ndim:
    raise ValueError(f"batch[{key!r}] must have {ndim} dimensions, got shape {value.shape}")
  return value
