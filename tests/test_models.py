"""COPE encoders in Flax against an independent PyTorch reference
(cope_jax/testing/torch_reference.py).

Tolerances (float32 on CPU): per-module features max abs diff <= 1e-4 (features of
order 1); L2-normalised embeddings <= 1e-4; gradients rtol 1e-3 with atol 1e-5 times
the largest gradient entry of that parameter.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import synthetic_tiny
from cope_jax import weight_mapping
from cope_jax.models import cope
from cope_jax.models import fusion
from cope_jax.models import text
from cope_jax.models import vision
from cope_jax.models.config import ModelConfig
from cope_jax.testing import parity
from cope_jax.testing import torch_reference
from cope_jax.base import domains

BATCH, FRAMES, IMAGE, TITLE_LENGTH = 3, 3, 32, 7
ATOL = 1e-4


def build(model_config):
  """COPE from `config.model` (a ConfigDict), through its typed config."""
  return cope.COPE(ModelConfig.from_config(model_config))


def tiny_model_config(use_asr_text=False):
  config = synthetic_tiny.get_config()
  config.data.image_size = IMAGE
  config.data.num_frames = FRAMES
  model = config.model
  model.emb_dim = 16
  model.use_asr_text = use_asr_text
  model.vision.update(dict(patch_size=16, width=32, layers=2, heads=4, mlp_dim=64,
                           output_dim=24, mit_layers=1, mit_heads=2))
  model.text.update(dict(vocab_size=50, hidden_size=32, layers=2, heads=4,
                         intermediate_size=64, max_positions=16))
  return model


def paper_model_config():
  config = synthetic_tiny.get_config()
  config.data.image_size = 224
  config.data.num_frames = 8
  model = config.model
  model.emb_dim = 128
  model.vision.update(dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072,
                           output_dim=512, mit_layers=4, mit_heads=8))
  model.text.update(dict(vocab_size=21128, hidden_size=768, layers=6, heads=12,
                         intermediate_size=3072, max_positions=512))
  return model


def make_batch(seed=0):
  """A numpy batch in the model's format (uint8 images, int32 ids and masks): padded
  title and ASR rows, one with [CLS] only."""
  return parity.random_batch(seed, batch_size=BATCH, image_size=IMAGE, num_frames=FRAMES,
                             text_length=TITLE_LENGTH, vocab_size=50,
                             text_lengths=[TITLE_LENGTH, 4, 1])


def nhwc(images: torch.Tensor) -> np.ndarray:
  return np.moveaxis(images.numpy(), -3, -1)


@pytest.fixture(scope="module")
def model_config():
  return tiny_model_config()


@pytest.fixture(scope="module")
def reference(model_config):
  return parity.build_reference(model_config)


@pytest.fixture(scope="module")
def params(reference, model_config):
  return weight_mapping.torch_state_dict_to_flax(parity.numpy_state_dict(reference),
                                                 model_config)


# ---- per-module parity --------------------------------------------------------------


def test_text_encoder_pooler_matches_hf_bert(reference, params, model_config):
  batch = make_batch()
  encoder = text.TextEncoder(ModelConfig.from_config(model_config).text)
  got = encoder.apply({"params": params["text_encoder"]}, batch["page_title_ids"],
                      batch["page_title_mask"])
  with torch.no_grad():
    want = reference.text_encoder(*[torch.from_numpy(batch[k].astype(np.int64))
                                    for k in ("page_title_ids", "page_title_mask")])
  assert got.shape == (BATCH, model_config.text.hidden_size)
  assert parity.max_abs_diff(got, want) <= ATOL


@pytest.mark.parametrize("num_frames", [FRAMES, 1], ids=["clip", "page"])
def test_visual_encoder_matches_reference(reference, params, model_config, num_frames):
  frames = parity.torch_batch(make_batch())["video_frames"][:, :num_frames]
  encoder = vision.VisualEncoder(ModelConfig.from_config(model_config).vision)
  got = jax.jit(encoder.apply)({"params": params["visual_encoder"]}, nhwc(frames))
  with torch.no_grad():
    want = reference.visual_encoder(frames)
  assert got.shape == (BATCH, model_config.vision.output_dim)
  assert parity.max_abs_diff(got, want) <= ATOL


def test_fusion_heads_match_reference(reference, params, model_config):
  rng = np.random.default_rng(1)
  visual = rng.normal(size=(BATCH, model_config.vision.output_dim)).astype(np.float32)
  title = rng.normal(size=(BATCH, model_config.text.hidden_size)).astype(np.float32)
  page_head = fusion.FusionHead(model_config.emb_dim, fuse=True)
  got = page_head.apply({"params": params["page_head"]}, visual, title)
  with torch.no_grad():
    fused, text_proj, visual_proj = reference.item_fusion_model(
        torch.from_numpy(title), torch.from_numpy(visual))
  for key, want in (("fused", fused), ("text", text_proj), ("visual", visual_proj)):
    assert parity.max_abs_diff(got[key], want) <= ATOL, key

  # As released, a clip head has fc1 only: no text projection.
  assert not hasattr(reference.photo_fusion_model, "fc0")
  assert set(params["video_head"]) == set(params["live_head"]) == {"fc1"}
  video_head = fusion.FusionHead(model_config.emb_dim, fuse=False, projects_text=False)
  got = video_head.apply({"params": params["video_head"]}, visual)
  with torch.no_grad():
    _, _, want = reference.photo_fusion_model(None, torch.from_numpy(visual))
  assert set(got) == {"visual"}
  assert parity.max_abs_diff(got["visual"], want) <= ATOL
  with pytest.raises(ValueError, match="no text projection"):
    video_head.apply({"params": params["video_head"]}, visual, title)


@pytest.mark.slow
def test_clip_text_projection_extension_matches_reference(model_config):
  """`clip_text` (for the in-domain ASR<->frames terms): the clip heads project their ASR
  text with fc0, without fusing it; checked against the reference's opt-in extension."""
  reference = torch_reference.randomize_(
      torch_reference.ReferenceCOPE(model_config, clip_text=True), 4).eval()
  params = weight_mapping.torch_state_dict_to_flax(parity.numpy_state_dict(reference),
                                                   model_config, clip_text=True)
  assert set(params["video_head"]) == set(params["live_head"]) == {"fc0", "fc1"}
  model = cope.COPE(ModelConfig.from_config(model_config, clip_text=True))
  batch = make_batch(seed=5)
  got = model.apply({"params": params}, batch)
  with torch.no_grad():
    want = reference(parity.torch_batch(batch))
  assert set(got) == set(want) == set(cope.ALL_EMBEDDINGS)
  for name in want:
    assert parity.max_abs_diff(got[name], want[name]) <= ATOL, name


# ---- end to end ---------------------------------------------------------------------


def test_all_embeddings_match_reference_end_to_end(reference, params, model_config):
  batch = make_batch()
  got = jax.jit(build(model_config).apply)({"params": params}, batch)  # uint8 images
  with torch.no_grad():
    want = reference(parity.torch_batch(batch))
  # As released: every page embedding, and each clip's retrieval and visual embedding;
  # a clip's text embedding exists only with its text projection (the extension).
  released = {"page_embedding", "page_text_embedding", "page_visual_embedding",
              "video_embedding", "video_visual_embedding", "live_embedding",
              "live_visual_embedding"}
  assert set(got) == set(want) == released
  assert set(cope.defined_embeddings(ModelConfig.from_config(model_config))) == released
  assert len(cope.ALL_EMBEDDINGS) == 9  # three per domain
  for name in want:
    assert got[name].shape == (BATCH, model_config.emb_dim)
    np.testing.assert_allclose(np.linalg.norm(got[name], axis=-1), 1.0, atol=1e-5)
    assert parity.max_abs_diff(got[name], want[name]) <= ATOL, name


def test_embed_returns_what_is_asked_from_the_domains_keys_only(params, model_config):
  batch = make_batch()
  model = build(model_config)
  everything = model.apply({"params": params}, batch)
  for domain in ("page", "video", "live"):
    eval_batch = {k: v for k, v in batch.items() if k.startswith(domain)}
    got = model.apply({"params": params}, eval_batch, domain, method=cope.COPE.embed)
    assert set(got) == {f"{domain}_embedding"}  # the retrieval embedding by default
    names = (f"{domain}_embedding", f"{domain}_visual_embedding")
    if domain == "page":
      names += ("page_text_embedding",)
    else:  # the release's clip heads have no text projection
      with pytest.raises(ValueError, match="no text projection"):
        model.apply({"params": params}, eval_batch, domain,
                    outputs=(f"{domain}_text_embedding",), method=cope.COPE.embed)
    got = model.apply({"params": params}, eval_batch, domain, outputs=names,
                      method=cope.COPE.embed)
    assert set(got) == set(names)
    for name in names:
      np.testing.assert_allclose(got[name], everything[name], atol=1e-6)
  # A clip's ASR text is read only when asked for: frames alone give its embedding.
  frames_only = {"video_frames": batch["video_frames"]}
  got = model.apply({"params": params}, frames_only, "video", method=cope.COPE.embed)
  np.testing.assert_allclose(got["video_embedding"], everything["video_embedding"], atol=1e-6)
  with pytest.raises(KeyError, match="page_title_ids"):
    model.apply({"params": params}, {"page_image": batch["page_image"]}, "page",
                method=cope.COPE.embed)
  with pytest.raises(ValueError, match="unknown embeddings"):
    model.apply({"params": params}, batch, outputs=("video_title_embedding",))


@pytest.mark.parametrize("use_asr_text", [False, True], ids=["released", "asr_fused"])
def test_reference_embeds_each_domain_from_its_keys_as_the_model_does(use_asr_text):
  """`ReferenceCOPE.embed` (one domain's batch, as the release's inference embeds): the
  retrieval embedding its forward pass gives, and the Flax model's `embed`."""
  model_config = tiny_model_config(use_asr_text=use_asr_text)
  reference = parity.build_reference(model_config, seed=6)
  params = weight_mapping.torch_state_dict_to_flax(parity.numpy_state_dict(reference),
                                                   model_config)
  batch = make_batch(seed=7)
  with torch.no_grad():
    everything = reference(parity.torch_batch(batch))
  for domain in domains.DOMAINS:
    own = {k: v for k, v in batch.items() if k.startswith(domain.name + "_")}
    with torch.no_grad():
      got = reference.embed(parity.torch_batch(own), domain.name)
    np.testing.assert_allclose(got.numpy(), everything[domain.embedding_key].numpy(),
                               atol=1e-6, err_msg=domain.name)
    flax_embedding = build(model_config).apply({"params": params}, own, domain.name,
                                               method=cope.COPE.embed)
    assert parity.max_abs_diff(flax_embedding[domain.embedding_key], got) <= ATOL


def test_asr_text_extension_matches_reference():
  model_config = tiny_model_config(use_asr_text=True)
  reference = parity.build_reference(model_config, seed=3)
  params = weight_mapping.torch_state_dict_to_flax(parity.numpy_state_dict(reference),
                                                   model_config)
  assert "fc0" in params["video_head"] and "attention_pooling" in params["live_head"]
  batch = make_batch(seed=2)
  got = build(model_config).apply({"params": params}, batch)
  with torch.no_grad():
    want = reference(parity.torch_batch(batch))
  for name in want:
    assert parity.max_abs_diff(got[name], want[name]) <= ATOL, name


def contrastive_loss(a, b, xp_log_softmax, temperature=0.05):
  """Symmetric InfoNCE against the diagonal (no smoothing), written for either framework."""
  logits = a @ b.T / temperature
  return -(xp_log_softmax(logits, 1).diagonal().mean()
           + xp_log_softmax(logits.T, 1).diagonal().mean()) / 2


@pytest.mark.slow
def test_gradients_match_reference(reference, params, model_config):
  batch = make_batch()
  pairs = (("page_embedding", "video_embedding"), ("page_text_embedding", "live_embedding"),
           ("page_visual_embedding", "live_embedding"), ("video_embedding", "live_embedding"))
  model = build(model_config)

  def jax_loss(p):
    e = model.apply({"params": p}, batch)
    return sum(contrastive_loss(e[a], e[b], jax.nn.log_softmax) for a, b in pairs)

  jax_value, jax_grads = jax.jit(jax.value_and_grad(jax_loss))(params)

  reference.zero_grad()
  e = reference(parity.torch_batch(batch))
  torch_value = sum(contrastive_loss(e[a], e[b], torch.log_softmax) for a, b in pairs)
  torch_value.backward()
  torch_grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                 for name, p in reference.named_parameters()}
  # Gradients have the parameters' shapes: the weight mapping puts them in Flax layout.
  torch_grads = weight_mapping.torch_state_dict_to_flax(torch_grads, model_config)

  assert abs(float(jax_value) - torch_value.item()) <= 1e-4
  flat_jax = flax.traverse_util.flatten_dict(jax_grads, sep="/")
  flat_torch = flax.traverse_util.flatten_dict(torch_grads, sep="/")
  assert set(flat_jax) == set(flat_torch)
  for path in ("visual_encoder/visual/transformer/resblocks_0/message_fc/kernel",
               "text_encoder/bert_model/encoder/layer_0/attention/self/query/kernel",
               "page_head/fc1/kernel"):
    assert np.abs(flat_torch[path]).max() > 0, path  # the check is not vacuous
  for path, want in flat_torch.items():
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(flat_jax[path], want, rtol=1e-3, atol=1e-5 * max(scale, 1.0),
                               err_msg=path)


# ---- weight mapping -----------------------------------------------------------------


def test_mapping_accepts_module_prefix_and_drops_released_unused_keys(reference,
                                                                      params, model_config):
  state_dict = {f"module.{k}": v for k, v in parity.numpy_state_dict(reference).items()}
  # A key some releases carry that the Flax model does not create.
  state_dict["module.text_encoder.bert_model.embeddings.position_ids"] = np.arange(16)[None]
  converted = weight_mapping.torch_state_dict_to_flax(state_dict, model_config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
  for domain in ("page", "video", "live"):
    assert "fc2" not in converted[f"{domain}_head"]
  # Without ASR fusion a clip head has neither a text projection nor attention pooling.
  assert set(converted["video_head"]) == {"fc1"}


def test_mapping_reports_wrong_shape_with_key_and_both_shapes(reference, model_config):
  state_dict = parity.numpy_state_dict(reference)
  key = "visual_encoder.visual.transformer.resblocks.1.attn.in_proj_weight"
  state_dict[key] = np.zeros((96, 31), np.float32)
  with pytest.raises(weight_mapping.WeightMappingError) as error:
    weight_mapping.torch_state_dict_to_flax(state_dict, model_config)
  message = str(error.value)
  assert key in message and "(96, 31)" in message and "(96, 32)" in message
  assert "missing" not in message  # a misshapen tensor is not also reported missing


def test_mapping_reports_unknown_and_missing_keys(reference, model_config):
  state_dict = parity.numpy_state_dict(reference)
  state_dict["visual_encoder.visual.extra_token"] = np.zeros((32,), np.float32)
  del state_dict["item_fusion_model.fc1.bias"]
  with pytest.raises(weight_mapping.WeightMappingError) as error:
    weight_mapping.torch_state_dict_to_flax(state_dict, model_config)
  message = str(error.value)
  assert "1 unknown key(s): visual_encoder.visual.extra_token" in message
  assert "1 missing parameter(s): page_head/fc1/bias" in message

  converted = weight_mapping.torch_state_dict_to_flax(
      state_dict, model_config, allow_missing=True, ignore_unused=True)
  assert "bias" not in converted["page_head"]["fc1"]
  assert "kernel" in converted["page_head"]["fc1"]


# ---- sizes, dtypes, training behaviour --------------------------------------------


def test_paper_size_parameter_count_matches_release_minus_unused():
  model_config = paper_model_config()
  variables = jax.eval_shape(
      build(model_config).init, jax.random.key(0),
      {"page_image": jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8),
       "page_title_ids": jax.ShapeDtypeStruct((1, 4), jnp.int32),
       "page_title_mask": jax.ShapeDtypeStruct((1, 4), jnp.int32),
       **{f"{domain}_{key}": jax.ShapeDtypeStruct(shape, dtype)
          for domain in ("video", "live")
          for key, shape, dtype in (("frames", (1, 8, 224, 224, 3), jnp.uint8),
                                    ("asr_ids", (1, 4), jnp.int32),
                                    ("asr_mask", (1, 4), jnp.int32))}})
  flax_count = sum(int(np.prod(x.shape))
                   for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables["params"])))
  with torch.device("meta"):
    reference = torch_reference.ReferenceCOPE(model_config)
  torch_count = sum(p.numel() for p in reference.parameters())
  emb = model_config.emb_dim
  linear_2e_to_e = 2 * emb * emb + emb
  # fc2 in three heads, attention_pooling.projection in the video and live heads.
  unused = 3 * linear_2e_to_e + 2 * linear_2e_to_e
  print(f"Flax params: {flax_count:,}; PyTorch reference: {torch_count:,}; "
        f"released-but-unused: {unused:,}")
  assert flax_count == torch_count - unused
  # Released ViT-B/16 + MIT + rbt6 sizes, for orientation (not a hard-coded output).
  assert 150e6 < flax_count < 250e6


@pytest.mark.slow
def test_bfloat16_forward_is_finite_and_close_to_float32(params, model_config):
  batch = make_batch()
  want = jax.jit(build(model_config).apply)({"params": params}, batch)
  bf16_config = tiny_model_config()
  bf16_config.dtype = "bfloat16"
  got = jax.jit(build(bf16_config).apply)({"params": params}, batch)
  for name in want:
    assert got[name].dtype == jnp.float32
    assert np.all(np.isfinite(got[name]))
    # Cosine similarity with the float32 embedding (both unit vectors).
    cosine = np.sum(np.asarray(got[name]) * np.asarray(want[name]), axis=-1)
    assert np.all(cosine > 0.97), (name, cosine)


@pytest.mark.slow
def test_remat_gives_same_gradients(params, model_config):
  batch = make_batch()
  frames, ids, mask = (batch[k] for k in ("video_frames", "page_title_ids", "page_title_mask"))
  for remat in (False, True):
    typed = ModelConfig.from_config(model_config)
    visual = vision.VisualEncoder(dataclasses.replace(typed.vision, remat=remat))
    words = text.TextEncoder(dataclasses.replace(typed.text, remat=remat))

    def loss(p, visual=visual, words=words):
      features = visual.apply({"params": p["visual_encoder"]}, frames)
      pooled = words.apply({"params": p["text_encoder"]}, ids, mask)
      return jnp.sum(features ** 2) + jnp.sum(pooled ** 3)

    subset = {k: params[k] for k in ("visual_encoder", "text_encoder")}
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(subset))
    assert (jaxpr.count("checkpoint") + jaxpr.count("remat") > 0) == remat
    grads = jax.jit(jax.grad(loss))(subset)
    if not remat:
      plain = grads
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                         plain, grads)


def test_drop_path_is_random_in_training_only(params):
  model_config = tiny_model_config()
  model_config.vision.drop_path_rate = 0.5
  model = build(model_config)
  batch = {k: v for k, v in make_batch().items() if k.startswith("video")}
  run = lambda seed, train: model.apply({"params": params}, batch, "video", train,
                                        method=cope.COPE.embed,
                                        rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(0, False)["video_embedding"],
                                run(1, False)["video_embedding"])
  assert not np.allclose(run(0, True)["video_embedding"], run(1, True)["video_embedding"])


def test_params_carry_logical_axis_names(model_config):
  batch = make_batch()
  variables = jax.eval_shape(build(model_config).init, jax.random.key(0), batch)
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"],
                                          sep="/")
  leaves = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves.values())
  in_proj = "visual_encoder/visual/transformer/resblocks_0/attn/in_proj/kernel"
  assert tuple(specs[in_proj]) == ("embed", None, "heads", "kv")
  word = "text_encoder/bert_model/embeddings/word_embeddings/embedding"
  assert tuple(specs[word]) == ("vocab", "embed")


@pytest.mark.slow
def test_unsupported_frame_count_is_a_clear_error(params, model_config):
  batch = make_batch()
  batch["video_frames"] = batch["video_frames"][:, :2]
  with pytest.raises(ValueError, match="1 or 3 frames"):
    build(model_config).apply({"params": params}, batch, "video", method=cope.COPE.embed)


SHARDED_INIT_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn
import jax
import numpy as np
from configs import synthetic_tiny
from cope_jax.models import cope
from cope_jax.models.config import ModelConfig
from tests.test_models import make_batch, tiny_model_config

mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
rules = synthetic_tiny.get_config().mesh.rules
model, batch = cope.COPE(ModelConfig.from_config(tiny_model_config())), make_batch()
abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
kernel = variables["params"]["visual_encoder"]["visual"]["transformer"]["resblocks_0"][
    "attn"]["in_proj"]["kernel"].value
assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None), (
    kernel.sharding)
embeddings = jax.jit(model.apply)(variables, batch)
assert all(np.isfinite(np.asarray(e)).all() for e in embeddings.values())
print("sharded ok")
"""


@pytest.mark.slow
def test_params_shard_over_a_mesh_with_the_config_rules():
  """Init + forward with parameters placed by config.mesh.rules on 8 fake CPU devices."""
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", SHARDED_INIT_SCRIPT], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded ok" in result.stdout


# ---- attention implementation (config.model.attention) -------------------------------

from cope_jax.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position

ON_GPU = jax.default_backend() == "gpu"


def _numpy_attention(query, key, value, padding_mask):
  """softmax(q k^T / sqrt(d)) v over the real keys, in float64. [B, L, H, D] in and out."""
  q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(padding_mask[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_xla_attention_with_padding_matches_numpy():
  rng = np.random.default_rng(0)
  query, key, value = (rng.normal(size=(3, 7, 2, 8)).astype(np.float32) for _ in range(3))
  padding_mask = np.arange(7)[None] < np.array([7, 4, 1])[:, None]
  got = layers.attention(query, key, value, "xla", padding_mask)
  np.testing.assert_allclose(got, _numpy_attention(query, key, value, padding_mask),
                             atol=1e-5)


@pytest.mark.parametrize("name,dtype,backend,expected", [
    ("xla", jnp.bfloat16, "gpu", "xla"),
    ("auto", jnp.bfloat16, "gpu", "cudnn"),
    ("auto", jnp.float32, "gpu", "xla"),
    ("auto", jnp.bfloat16, "cpu", "xla"),
    ("cudnn", jnp.float16, "gpu", "cudnn"),
])
def test_attention_setting_resolves_per_backend_and_dtype(name, dtype, backend, expected):
  assert layers.resolve_attention(name, dtype, backend) == expected


@pytest.mark.parametrize("name,dtype,backend,message", [
    ("cudnn", jnp.bfloat16, "cpu", "needs an NVIDIA GPU"),
    ("cudnn", jnp.float32, "gpu", "computes in bfloat16 or float16"),
    ("flash", jnp.bfloat16, "gpu", "must be one of"),
])
def test_unusable_attention_setting_names_the_field(name, dtype, backend, message):
  with pytest.raises(ValueError, match=rf"config\.model\.attention.*{message}|{message}"):
    layers.resolve_attention(name, dtype, backend)


@pytest.mark.skipif(ON_GPU, reason="checks the error off GPU")
def test_cudnn_attention_in_the_config_fails_clearly_off_gpu():
  model_config = tiny_model_config()
  model_config.dtype = "bfloat16"
  model_config.attention = "cudnn"
  with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn' needs an NVIDIA GPU"):
    ModelConfig.from_config(model_config)


def _attention_inputs(batch, length, heads, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.bfloat16)
          for _ in range(3)]


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("batch,length,heads,head_dim,padded", [
    (16, 198, 12, 64, False),  # ViT-B/16 frame tokens + the message token
    (16, 8, 12, 64, False),  # message attention across 8 frames
    (16, 8, 8, 64, False),  # MIT over 8 positions
    (16, 32, 12, 64, True),  # text with right padding
])
def test_cudnn_attention_matches_xla_in_bfloat16(batch, length, heads, head_dim, padded):
  query, key, value = _attention_inputs(batch, length, heads, head_dim)
  mask = (np.arange(length)[None] < np.linspace(1, length, batch).astype(int)[:, None]
          if padded else None)

  def loss(q, k, v, implementation):
    out = layers.attention(q, k, v, implementation, mask)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  results = {}
  for implementation in ("xla", "cudnn"):
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                              static_argnums=3)(query, key, value, implementation)
    results[implementation] = [np.asarray(x, np.float32) for x in (out, *grads)]
  for name, xla, cudnn in zip(("out", "dq", "dk", "dv"), results["xla"], results["cudnn"]):
    scale = max(1.0, float(np.abs(xla).max()))
    assert np.abs(cudnn - xla).max() / scale < 2e-2, name


@pytest.mark.parametrize("query_length,key_length,head_dim,takes", [
    (198, 198, 64, True), (8, 8, 64, True), (32, 32, 8, True),
    (1, 1, 64, False),  # a page's single frame: the kernel refuses it
    (8, 8, 12, False), (8, 8, 256, False), (197, 197, 64, False),
])
def test_cudnn_takes_only_the_sizes_its_kernel_runs(query_length, key_length, head_dim,
                                                    takes):
  assert layers.cudnn_takes(query_length, key_length, head_dim) is takes


def test_cudnn_setting_runs_sizes_off_the_kernel_through_xla():
  # A page's single frame: no cuDNN call at all, so this runs on any backend.
  rng = np.random.default_rng(0)
  query, key, value = (rng.normal(size=(3, 1, 2, 64)).astype(np.float32) for _ in range(3))
  got = layers.attention(query, key, value, "cudnn")
  everything = np.ones((3, 1), bool)
  np.testing.assert_allclose(got, _numpy_attention(query, key, value, everything), atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_model_embeddings_match_xla_in_bfloat16():
  batch = make_batch()
  embeddings = {}
  params = None
  for implementation in ("xla", "cudnn"):
    model_config = tiny_model_config()
    model_config.vision.output_dim = 32  # integration head dim 16: on the kernel's grid
    model_config.dtype = "bfloat16"
    model_config.attention = implementation
    model = build(model_config)
    if params is None:
      params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    apply = jax.jit(model.apply)
    if implementation == "cudnn":  # the clips' attention really runs on the cuDNN kernel
      assert "cudnn" in apply.lower({"params": params}, batch).compile().as_text()
    embeddings[implementation] = apply({"params": params}, batch)
  for name, want in embeddings["xla"].items():
    np.testing.assert_allclose(embeddings["cudnn"][name], want, atol=2e-2, err_msg=name)
