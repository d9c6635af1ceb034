"""An independent PyTorch reference of the released COPE model, for parity tests.

Written from the model description (X-CLIP visual encoder with cross-frame messages and
a multi-frame integration transformer, HF `BertModel` text encoder, three fusion heads),
with the released parameter names so that its `state_dict()` looks like a checkpoint's.
Layouts are PyTorch's: images [batch, 3, size, size], sequence-first attention.

After the model: the release's optimiser set-up (margin classifier, parameter groups,
AdamW, clipping of the model's gradients, the LambdaLR stepped every `lr_freq` steps).
"""

import collections
import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import transformers

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_uint8_nhwc(images: np.ndarray) -> torch.Tensor:
  """uint8 [..., S, S, 3] -> ImageNet-normalised float [..., 3, S, S]."""
  normalised = (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return torch.from_numpy(np.moveaxis(normalised, -1, -3).copy())


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


def clip_mlp(width: int, hidden: int) -> nn.Sequential:
  return nn.Sequential(collections.OrderedDict([
      ("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()),
      ("c_proj", nn.Linear(hidden, width))]))


def self_attention(attention: nn.MultiheadAttention, x):
  return attention(x, x, x, need_weights=False)[0]


class ResidualAttentionBlock(nn.Module):
  """Pre-LN CLIP block on [length, batch, width]."""

  def __init__(self, width, heads, mlp_dim):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = clip_mlp(width, mlp_dim)
    self.ln_2 = nn.LayerNorm(width)

  def forward(self, x):
    x = x + self_attention(self.attn, self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class CrossFrameBlock(nn.Module):
  """CLIP block with a cross-frame message token, on [length, batch * frames, width]."""

  def __init__(self, width, heads, mlp_dim):
    super().__init__()
    self.message_fc = nn.Linear(width, width)
    self.message_ln = nn.LayerNorm(width)
    self.message_attn = nn.MultiheadAttention(width, heads)
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = clip_mlp(width, mlp_dim)
    self.ln_2 = nn.LayerNorm(width)

  def forward(self, x, frames):
    length, batch_frames, width = x.shape
    batch = batch_frames // frames
    # One message per frame; the frames of a clip are the attention sequence.
    messages = self.message_fc(x[0]).view(batch, frames, width).transpose(0, 1)
    messages = messages + self_attention(self.message_attn, self.message_ln(messages))
    messages = messages.transpose(0, 1).reshape(1, batch_frames, width)
    x = torch.cat([x, messages], dim=0)
    x = x + self_attention(self.attn, self.ln_1(x))
    x = x[:length]
    return x + self.mlp(self.ln_2(x))


class CrossFrameTransformer(nn.Module):

  def __init__(self, width, layers, heads, mlp_dim):
    super().__init__()
    self.resblocks = nn.ModuleList(
        [CrossFrameBlock(width, heads, mlp_dim) for _ in range(layers)])

  def forward(self, x, frames):
    for block in self.resblocks:
      x = block(x, frames)
    return x


class CrossFrameViT(nn.Module):
  """images [batch * frames, 3, S, S] -> projected [CLS] [batch * frames, output_dim]."""

  def __init__(self, image_size, patch_size, width, layers, heads, mlp_dim, output_dim):
    super().__init__()
    grid = image_size // patch_size
    self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
    self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * 0.1)
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = CrossFrameTransformer(width, layers, heads, mlp_dim)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, output_dim) * width ** -0.5)

  def forward(self, images, frames):
    x = self.conv1(images).flatten(2).transpose(1, 2)  # [BT, grid*grid, width]
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding
    x = self.ln_pre(x).transpose(0, 1)  # sequence first
    x = self.transformer(x, frames).transpose(0, 1)
    return self.ln_post(x[:, 0]) @ self.proj


class MultiFrameIntegration(nn.Module):
  """[batch, T, D] -> [batch, D]; T = 1 broadcasts against the positional embedding."""

  def __init__(self, num_frames, width, layers, heads):
    super().__init__()
    self.positional_embedding = nn.Parameter(torch.randn(1, num_frames, width) * 0.02)
    self.resblocks = nn.ModuleList(
        [ResidualAttentionBlock(width, heads, 4 * width) for _ in range(layers)])

  def forward(self, features):
    x = (features + self.positional_embedding).transpose(0, 1)
    for block in self.resblocks:
      x = block(x)
    return (x.transpose(0, 1) + features).mean(dim=1)


class VisualEncoder(nn.Module):

  def __init__(self, vision):
    super().__init__()
    self.visual = CrossFrameViT(vision.image_size, vision.patch_size, vision.width,
                                vision.layers, vision.heads, vision.mlp_dim,
                                vision.output_dim)
    self.mit = MultiFrameIntegration(vision.num_frames, vision.output_dim,
                                     vision.mit_layers, vision.mit_heads)

  def forward(self, frames):
    """frames [batch, T, 3, S, S] normalised -> [batch, output_dim]."""
    batch, num_frames = frames.shape[:2]
    features = self.visual(frames.flatten(0, 1), num_frames)
    return self.mit(features.view(batch, num_frames, -1))


class TextEncoder(nn.Module):

  def __init__(self, text):
    super().__init__()
    bert_config = transformers.BertConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        num_hidden_layers=text.layers, num_attention_heads=text.heads,
        intermediate_size=text.intermediate_size, hidden_act="gelu",
        max_position_embeddings=text.max_positions,
        type_vocab_size=text.type_vocab_size, layer_norm_eps=text.layer_norm_eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert_config._attn_implementation = "eager"  # pylint: disable=protected-access
    self.bert_model = transformers.BertModel(bert_config, add_pooling_layer=True)

  def forward(self, token_ids, token_mask):
    return self.bert_model(input_ids=token_ids, attention_mask=token_mask).pooler_output


class AttentionPooling(nn.Module):

  def __init__(self, emb_dim):
    super().__init__()
    self.projection = nn.Linear(2 * emb_dim, emb_dim)


class FusionHead(nn.Module):
  """Released head layout: fc0 (only with a text input, `input_dims[0]` not None), fc1,
  fc2, attention_pooling.projection."""

  def __init__(self, text_dim, visual_dim, emb_dim):
    super().__init__()
    if text_dim is not None:
      self.fc0 = nn.Linear(text_dim, emb_dim)
    self.fc1 = nn.Linear(visual_dim, emb_dim)
    self.fc2 = nn.Linear(2 * emb_dim, emb_dim)  # present in checkpoints, never used
    self.attention_pooling = AttentionPooling(emb_dim)

  def forward(self, text, visual):
    """-> (fused or None, text projection or None, visual projection)."""
    visual = self.fc1(visual)
    if text is None or not hasattr(self, "fc0"):
      return None, None, visual
    text = self.fc0(text)
    fused = self.attention_pooling.projection(torch.cat([text, visual], dim=-1))
    return fused, text, visual


class ReferenceCOPE(nn.Module):
  """The released model: `item_fusion_model` with `fc0`, `photo_fusion_model` and
  `live_fusion_model` built with `input_dims=[None, visual_dim]` (no `fc0`).

  Project extensions, off by default (the release's structure):
    `model_config.use_asr_text` fuses the ASR text into the video/live embedding (the
      clip heads then project and fuse it: `fc0`, `attention_pooling.projection`);
    `clip_text=True` gives the clip heads an ASR text projection (`fc0`) without fusing,
      for the in-domain ASR<->frames alignment terms.
  Returns every embedding the structure defines: the page's fused/text/visual embeddings
  as released, each clip's retrieval embedding (visual, or fused with `use_asr_text`)
  and visual projection, and, where the clip head projects text, its ASR projection.
  """

  def __init__(self, model_config, clip_text: bool = False):
    super().__init__()
    self.use_asr_text = model_config.use_asr_text
    hidden = model_config.text.hidden_size
    clip_text_dim = hidden if (clip_text or self.use_asr_text) else None
    output_dim, emb_dim = model_config.vision.output_dim, model_config.emb_dim
    self.visual_encoder = VisualEncoder(model_config.vision)
    self.text_encoder = TextEncoder(model_config.text)
    self.item_fusion_model = FusionHead(hidden, output_dim, emb_dim)
    self.photo_fusion_model = FusionHead(clip_text_dim, output_dim, emb_dim)
    self.live_fusion_model = FusionHead(clip_text_dim, output_dim, emb_dim)

  # The clip domains' heads, by the release's names.
  CLIP_HEADS = {"video": "photo_fusion_model", "live": "live_fusion_model"}

  def forward(self, batch):
    """batch: the model's batch dict as torch tensors, images normalised NCHW."""
    outputs = self._page_outputs(batch)
    for domain in self.CLIP_HEADS:
      outputs.update(self._clip_outputs(batch, domain))
    return {name: F.normalize(value, dim=-1) for name, value in outputs.items()}

  def embed(self, batch, domain):
    """One domain's retrieval embeddings [batch, emb_dim], L2-normalised, from that
    domain's entries of `batch` alone, as the release's inference embeds each domain on
    its own (`{rank}_item`, `{rank}_photo`, `{rank}_live`): the page's fused embedding, a
    clip's visual one (fused with `use_asr_text`)."""
    outputs = (self._clip_outputs(batch, domain) if domain in self.CLIP_HEADS
               else self._page_outputs(batch))
    return F.normalize(outputs[f"{domain}_embedding"], dim=-1)

  def _page_outputs(self, batch):
    title = self.text_encoder(batch["page_title_ids"], batch["page_title_mask"])
    page_visual = self.visual_encoder(batch["page_image"][:, None])
    page, page_text, page_visual = self.item_fusion_model(title, page_visual)
    return {"page_embedding": page, "page_text_embedding": page_text,
            "page_visual_embedding": page_visual}

  def _clip_outputs(self, batch, domain):
    head = getattr(self, self.CLIP_HEADS[domain])
    visual = self.visual_encoder(batch[f"{domain}_frames"])
    asr = None
    if hasattr(head, "fc0"):
      asr = self.text_encoder(batch[f"{domain}_asr_ids"], batch[f"{domain}_asr_mask"])
    fused, asr_projection, visual = head(asr, visual)
    outputs = {f"{domain}_embedding": fused if self.use_asr_text else visual,
               f"{domain}_visual_embedding": visual}
    if asr_projection is not None:
      outputs[f"{domain}_text_embedding"] = asr_projection
    return outputs


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Fills every parameter with seeded non-trivial values (LayerNorm scales near 1)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      is_norm_scale = name.endswith(("LayerNorm.weight", "ln_pre.weight", "ln_post.weight",
                                     "ln_1.weight", "ln_2.weight", "message_ln.weight"))
      if is_norm_scale:
        param.copy_(1.0 + 0.2 * noise)
      elif name.endswith("embedding") or name.endswith("embeddings.weight"):
        param.copy_(0.5 * noise)
      else:
        fan_in = param[0].numel() if param.ndim > 1 else 25
        param.copy_(noise * fan_in ** -0.5 * (1.0 if param.ndim > 1 else 0.5))
  return model


# ---- the release's optimiser set-up (its train.py: build_model, build_optimizer, --------
# ---- train_one_epoch), written from cope_reference.md "Training recipe" ----------------


class MarginClassifier(nn.Module):
  """The product classifier at sample rate 1: cosine logits with an additive margin.

  A module of its own beside the model, as the release's `PartialFC_V2` (whose parameter
  is not among the model's, so the model's gradient clipping does not touch it).
  """

  def __init__(self, num_classes, emb_dim, scale=64.0, margin=0.4):
    super().__init__()
    self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, emb_dim)))
    self.scale, self.margin = scale, margin

  def forward(self, embeddings, labels):
    """embeddings [batch, emb_dim], labels [batch] -> mean cross-entropy."""
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
    margin = self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return F.cross_entropy(self.scale * (cosine - margin), labels)


def release_lr_lambda(warm_up_iters, max_iters):
  """The release's λ(e): linear warm-up, then a cosine that is never clamped."""

  def lr_lambda(epoch):
    if warm_up_iters and epoch <= warm_up_iters:
      return epoch / warm_up_iters
    return 0.5 * (math.cos((epoch - warm_up_iters) / (max_iters - warm_up_iters) * math.pi)
                  + 1)

  return lr_lambda


def release_param_groups(model, classifier, lr, text_factor, visual_factor, fusion_factor,
                         other_factor):
  """AdamW groups as the release builds them, in its order: text, visual, fusion, other,
  classifier. Its fusion test holds a bare string inside the `or` chain (kept below), so
  it is always true: every parameter outside the two encoders lands in the fusion group
  and the "other" group stays empty."""
  text, visual, fusion, other = [], [], [], []
  for name, param in model.named_parameters():
    if "text_encoder" in name:
      text.append(param)
    elif "visual_encoder" in name:
      visual.append(param)
    # pylint: disable-next=using-constant-test
    elif ("fusion_model" in name or "visual_proj_layer" in name or "fusion_proj_layer"
          or "text_proj_layer" in name or "query_tokens" in name):
      fusion.append(param)
    else:
      other.append(param)
  return [{"params": text, "lr": lr * text_factor},
          {"params": visual, "lr": lr * visual_factor},
          {"params": fusion, "lr": lr * fusion_factor},
          {"params": other, "lr": lr * other_factor},
          {"params": list(classifier.parameters()), "lr": lr * other_factor}]


class ReleaseOptimizer:
  """The release's float32 optimiser step: backward, clip the model's gradients only,
  AdamW step (PyTorch's default weight decay, 0.01: the release passes none), and its
  LambdaLR stepped once every `lr_freq` optimiser steps."""

  GROUP_NAMES = ("text", "visual", "fusion", "other", "classifier")

  def __init__(self, model, classifier, *, lr, text_factor, visual_factor, fusion_factor,
               other_factor, warm_up_iters, max_iters, lr_freq, max_norm=5.0):
    self.model, self.max_norm, self.lr_freq = model, max_norm, lr_freq
    self.optimizer = torch.optim.AdamW(
        release_param_groups(model, classifier, lr, text_factor, visual_factor,
                             fusion_factor, other_factor), lr=lr)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lr_lambda=release_lr_lambda(warm_up_iters, max_iters))
    self.global_step = 0

  def group_lrs(self):
    """{group name: the lr the next step runs at} (Python floats, double precision)."""
    return {name: group["lr"]
            for name, group in zip(self.GROUP_NAMES, self.optimizer.param_groups)}

  def step(self, loss, inspect_gradients=None):
    """One training step on `loss`; returns the model's gradient norm before clipping.

    `inspect_gradients()`, if given, runs after the backward pass, before clipping.
    """
    self.global_step += 1
    loss.backward()
    if inspect_gradients is not None:
      inspect_gradients()
    model_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                max_norm=self.max_norm, norm_type=2)
    self.optimizer.step()
    self.optimizer.zero_grad()
    if self.global_step % self.lr_freq == 0:
      self.scheduler.step()
    return float(model_norm)
