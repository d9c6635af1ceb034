"""COPE: one visual encoder and one text encoder shared by one fusion head per domain.

  model = COPE(ModelConfig.from_config(config.model))   # or cope_jax.state.build_model
  variables = model.init(rngs, batch)                     # creates every parameter
  embeddings = model.apply(variables, batch, train=True, outputs=("page_embedding", ...))
  video = model.apply(variables, eval_batch, "video", method=COPE.embed)

The domains come from `cope_jax.base.domains`. Batch keys per domain (docs/interfaces.md):
the pixels `<domain>.media_key` (`page_image` [B, S, S, 3] for an image domain,
`video_frames` [B, T, S, S, 3] for a clip domain; uint8, normalised in the model, or float
already normalised) and the text `<domain>.text_ids_key` / `text_mask_key` [B, L] int32.

Each domain defines three embeddings, every one L2-normalised float32 [B, emb_dim]:
  `<domain>_visual_embedding`  fc1 of the visual feature
  `<domain>_text_embedding`    fc0 of the text feature (title or ASR); a clip domain has
                               it only with `ModelConfig.clip_text` (the release's clip
                               heads have no fc0)
  `<domain>_embedding`         the retrieval embedding: the fused one where the domain
                               fuses text (pages; clips with `use_asr_text`), else the
                               visual one
Only the embeddings asked for are computed, so a clip's ASR text runs through the text
encoder only when a loss term or the fusion needs it.
"""

from collections.abc import Collection, Mapping

import flax.linen as nn
import jax

from cope_jax.models import fusion
from cope_jax.models import layers
from cope_jax.models import text
from cope_jax.models import vision
from cope_jax.models.config import ModelConfig
from cope_jax.base import domains


def embedding_names(domain: domains.Domain) -> tuple[str, str, str]:
  """The three embeddings a domain defines: (retrieval, text, visual)."""
  return (domain.embedding_key, domain.text_embedding_key, domain.visual_embedding_key)


ALL_EMBEDDINGS = tuple(name for domain in domains.DOMAINS for name in embedding_names(domain))


class COPE(nn.Module):
  """The multi-domain model; submodules `visual_encoder`, `text_encoder`, `<domain>_head`."""
  config: ModelConfig

  def setup(self):
    config = self.config
    self.visual_encoder = vision.VisualEncoder(config.vision)
    self.text_encoder = text.TextEncoder(config.text)
    for domain in domains.DOMAINS:
      # Attribute name = parameter scope name (`page_head`, ...), as the release's heads.
      setattr(self, domain.head, fusion.FusionHead(
          config.emb_dim, fuse=domain.fuses_text(config.use_asr_text),
          projects_text=projects_text(config, domain), dtype=config.dtype,
          param_dtype=config.param_dtype))

  def __call__(self, batch: Mapping[str, jax.Array], train: bool = False,
               outputs: Collection[str] | None = None) -> dict[str, jax.Array]:
    """The embeddings named in `outputs` (default: every embedding this model defines,
    `defined_embeddings(config)`).

    Returns a dict name -> [B, emb_dim] float32. Domains none of whose embeddings are
    asked for are not computed (their batch keys may be absent).
    """
    unknown = sorted(set(outputs or ()) - set(ALL_EMBEDDINGS))
    if unknown:
      raise ValueError(f"unknown embeddings {unknown}; the model defines {ALL_EMBEDDINGS}")
    asked = defined_embeddings(self.config) if outputs is None else outputs
    result = {}
    for domain in domains.DOMAINS:
      wanted = [name for name in embedding_names(domain) if name in asked]
      if wanted:
        result.update(self.embed(batch, domain.name, train, wanted))
    return result

  def embed(self, batch: Mapping[str, jax.Array], domain: str, train: bool = False,
            outputs: Collection[str] | None = None) -> dict[str, jax.Array]:
    """One domain's embeddings from a (training or eval) batch.

    Args:
      batch: holds the domain's media and text keys.
      domain: a domain name (`domains.NAMES`).
      train: dropout / stochastic depth on.
      outputs: which of the domain's embeddings (default: the retrieval embedding).

    Returns:
      dict name -> [B, emb_dim] float32, L2-normalised.
    """
    spec = domains.get(domain)
    retrieval, text_name, visual_name = embedding_names(spec)
    wanted = set(outputs or (retrieval,))
    if not wanted <= {retrieval, text_name, visual_name}:
      raise ValueError(f"{domain} defines the embeddings {embedding_names(spec)}, "
                       f"not {sorted(wanted - {retrieval, text_name, visual_name})}")
    fuses = spec.fuses_text(self.config.use_asr_text)
    if text_name in wanted and not projects_text(self.config, spec):
      raise ValueError(
          f"{text_name}: the {domain} head has no text projection (fc0), as released; it "
          "has one when config.model.use_asr_text is set or a loss term reads it "
          f"(config.loss.weights.{domain}_text_visual > 0)")
    media = _require(batch, spec.media_key, ndim=5 if spec.is_clip else 4)
    # An image is a clip of one frame: [B, S, S, 3] -> [B, 1, S, S, 3].
    visual = self.visual_encoder(media if spec.is_clip else media[:, None], train)
    text_features = None
    if text_name in wanted or (retrieval in wanted and fuses):
      text_features = self.text_encoder(_require(batch, spec.text_ids_key, ndim=2),
                                        _require(batch, spec.text_mask_key, ndim=2), train)
    projections = getattr(self, spec.head)(visual, text_features)
    available = {visual_name: projections["visual"],
                 text_name: projections.get("text"),
                 retrieval: projections["fused"] if fuses else projections["visual"]}
    return {name: layers.l2_normalize(available[name]) for name in sorted(wanted)}


def projects_text(config: ModelConfig, domain: domains.Domain) -> bool:
  """Whether `domain`'s head has a text projection (fc0): pages always; clips with
  `config.clip_text`."""
  return not domain.is_clip or config.clip_text


def defined_embeddings(config: ModelConfig) -> tuple[str, ...]:
  """The embeddings `COPE(config)` can compute (a clip's text embedding needs fc0)."""
  return tuple(name for domain in domains.DOMAINS for name in embedding_names(domain)
               if name != domain.text_embedding_key or projects_text(config, domain))


def _require(batch, key: str, ndim: int):
  """batch[key], checked to exist and to have `ndim` dimensions."""
  if key not in batch:
    raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
  value = batch[key]
  if value.ndim != ndim:
    raise ValueError(f"batch[{key!r}] must have {ndim} dimensions, got shape {value.shape}")
  return value
