"""`python -m cope_jax.convert`: PyTorch checkpoints of four kinds -> parameter checkpoints.

Parity is checked against the independent PyTorch reference
(cope_jax/testing/torch_reference.py) and Hugging Face's BertModel: float32 on CPU, max
abs difference <= 1e-4 for features and L2-normalised embeddings (values of order 1).
"""

import hashlib
import importlib
import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from cope_jax import checkpoints
from cope_jax import convert
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import weight_mapping
from cope_jax.models import cope
from cope_jax.models import text
from cope_jax.models import vision
from cope_jax.models.config import ModelConfig
from cope_jax.testing import parity
from cope_jax.testing import torch_reference
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4
VOCAB_SIZE = 50
BATCH = 2


def tiny_config():
  config = tiny_configs.training_config("unused_prepared", "unused_rope")
  config.model.text.vocab_size = VOCAB_SIZE
  return config


def tiny_shapes():
  """field -> value: the tiny config's sizes (the encoders' shapes, the embedding width,
  the image side and frame count), to shrink a recipe config without changing its
  structure."""
  tiny = tiny_config()
  shapes = {"data.image_size": tiny.data.image_size, "data.num_frames": tiny.data.num_frames,
            "model.emb_dim": tiny.model.emb_dim}
  for tower in ("vision", "text"):
    for field, value in tiny.model[tower].items():
      if field not in ("image_size", "num_frames"):  # references to data.*
        shapes[f"model.{tower}.{field}"] = value
  return shapes


def make_batch(config, seed=0):
  """Two rows, one padded; the clips' ASR tokens are the titles reversed, so that the
  converted clip heads' text projections are checked as well."""
  length = config.data.title_max_length
  batch = parity.random_batch(seed, batch_size=BATCH, image_size=config.data.image_size,
                              num_frames=config.data.num_frames, text_length=length,
                              vocab_size=VOCAB_SIZE, text_lengths=[length, 3], asr=False)
  for domain in domains.DOMAINS:
    if domain.is_clip:
      batch[domain.text_ids_key] = batch["page_title_ids"][::-1].copy()
      batch[domain.text_mask_key] = batch["page_title_mask"][::-1].copy()
  return batch


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def reference(config):
  return parity.build_reference(config.model)


@pytest.fixture(scope="module")
def release_checkpoint(reference, tmp_path_factory):
  """A file laid out like the release's training checkpoints (DDP prefix, optimizer...)."""
  path = tmp_path_factory.mktemp("release") / "checkpoint_epoch3.pth"
  state_dict = {f"module.{k}": v for k, v in reference.state_dict().items()}
  torch.save({"state_dict": state_dict, "optimizer": {}, "epoch": 3}, path)
  return str(path)


@pytest.fixture(scope="module")
def converted_dir(release_checkpoint, tmp_path_factory):
  """The command line run once, as a user would: the paper recipe's stage-2 config (the
  release's structure: clip heads without fc0), with the tiny shapes as overrides and no
  --allow_missing."""
  out = tmp_path_factory.mktemp("converted")
  overrides = [f"--config.{field}={value}" for field, value in tiny_shapes().items()]
  command = [sys.executable, "-m", "cope_jax.convert", f"--torch_checkpoint={release_checkpoint}",
             "--kind=cope", f"--out={out}", "--config=configs/rope_vitb16.py",
             f"--config.model.text.vocab_size={VOCAB_SIZE}"] + overrides
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "converted cope checkpoint" in result.stdout
  return str(out)


@pytest.mark.slow
def test_cli_conversion_reproduces_reference_embeddings(converted_dir, reference, config):
  params = checkpoints.load_params(converted_dir)["model"]
  # The release's layout: only the page head has a text projection.
  assert not hasattr(reference.photo_fusion_model, "fc0")
  assert "fc0" in params["page_head"]
  assert set(params["video_head"]) == set(params["live_head"]) == {"fc1"}
  batch = make_batch(config)
  got = jax.jit(cope.COPE(ModelConfig.from_config(config.model)).apply)(
      {"params": params}, batch)
  with torch.no_grad():
    want = reference(parity.torch_batch(batch))
  assert set(got) == set(want)
  for name in want:
    assert parity.max_abs_diff(got[name], want[name]) <= ATOL, name


def test_conversion_json_accounts_for_every_tensor(converted_dir, release_checkpoint, config):
  with open(os.path.join(converted_dir, "conversion.json")) as f:
    metadata = json.load(f)
  expected = weight_mapping.expected_param_shapes(config.model)
  with open(release_checkpoint, "rb") as f:
    assert metadata["source_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert metadata["kind"] == "cope"
  assert metadata["loaded_params"] == len(expected)
  assert metadata["missing_params"] == 0 and not metadata["partial"]
  assert metadata["skipped_source_keys"] == 0
  assert len(metadata["config_hash"]) == 64


@pytest.mark.slow
def test_converted_dir_initialises_training(converted_dir, config):
  config = tiny_config()
  config.train.init_from = converted_dir
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = state_lib.create_train_state(config, mesh, num_classes=4)
  model_params = state_lib.load_converted_weights(state.params["model"],
                                                  shardings.params["model"], config)
  loaded = parity.flat(checkpoints.load_params(converted_dir)["model"])
  started = parity.flat(flax.linen.meta.unbox(model_params))
  assert set(started) == set(loaded)
  for path, value in loaded.items():
    np.testing.assert_array_equal(np.asarray(started[path]), value, err_msg=path)


def test_xclip_checkpoint_gives_the_visual_encoder_only(reference, config, tmp_path):
  visual_state = reference.visual_encoder.state_dict()
  width = config.model.vision.width
  text_side = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * width, width),
               "token_embedding.weight": torch.zeros(10, width),
               "positional_embedding": torch.zeros(7, width),
               "prompts_visual_proj": torch.zeros(width, width),
               "prompts_generator.alpha": torch.zeros(width), "logit_scale": torch.zeros(())}
  path = tmp_path / "xclip_k600.pth"
  torch.save({"model": {**visual_state, **text_side}, "epoch": 30}, path)

  metadata = convert.run(str(path), "xclip", config, str(tmp_path / "out"))
  assert metadata["skipped_source_keys"] == len(text_side)
  params = checkpoints.load_params(str(tmp_path / "out"))["model"]
  assert set(params) == {"visual_encoder"}
  assert metadata["partial"] and "text_encoder" in metadata["missing_by_group"]

  frames = make_batch(config)["video_frames"]
  encoder = vision.VisualEncoder(ModelConfig.from_config(config.model).vision)
  got = jax.jit(encoder.apply)({"params": params["visual_encoder"]}, frames)
  with torch.no_grad():
    want = reference.visual_encoder(torch_reference.normalize_uint8_nhwc(frames))
  assert parity.max_abs_diff(got, want) <= ATOL

  # A partial checkpoint needs init_allow_missing, and the error says so.
  fresh = {"visual_encoder": jax.tree.map(np.zeros_like, params["visual_encoder"]),
           "text_encoder": {"kernel": np.zeros((2, 2), np.float32)}}
  with pytest.raises(ValueError, match="init_allow_missing=True"):
    checkpoints.merge_params(fresh, params, allow_missing=False, source=str(path))
  merged = checkpoints.merge_params(fresh, params, allow_missing=True, source=str(path))
  np.testing.assert_array_equal(merged["text_encoder"]["kernel"], 0.0)


def test_clip_vit_state_dict_fills_the_vit_but_not_the_message_parameters(
    reference, config, tmp_path):
  visual = {f"visual.{k}": v for k, v in reference.visual_encoder.visual.state_dict().items()
            if ".message_" not in k}
  text_side = {"token_embedding.weight": torch.zeros(10, 8), "text_projection": torch.zeros(8, 8),
               "ln_final.weight": torch.ones(8), "logit_scale": torch.zeros(())}
  path = tmp_path / "ViT-B-16.pt"
  torch.save({**visual, **text_side}, path)

  conversion, _ = convert.convert(str(path), "clip_vit", config)
  assert len(conversion.skipped) == len(text_side)
  loaded = set(conversion.loaded)
  assert all(p.startswith("visual_encoder/visual/") and "/message_" not in p for p in loaded)
  assert len(loaded) == len(visual)
  assert any("/message_fc/" in p for p in conversion.left_initialised)
  assert any(p.startswith("visual_encoder/mit/") for p in conversion.left_initialised)
  # conv1: PyTorch [out, in, p, p] -> Flax [p, p, in, out].
  conv = conversion.params["visual_encoder"]["visual"]["conv1"]["kernel"]
  np.testing.assert_array_equal(conv, visual["visual.conv1.weight"].numpy().transpose(2, 3, 1, 0))

  del visual["visual.ln_post.weight"]
  torch.save(visual, path)
  with pytest.raises(weight_mapping.WeightMappingError,
                     match="visual_encoder/visual/ln_post/scale"):
    convert.convert(str(path), "clip_vit", config)
  conversion, _ = convert.convert(str(path), "clip_vit", config, allow_missing=True)
  assert "visual_encoder/visual/ln_post/scale" in conversion.left_initialised


def tiny_hf_bert(text_config):
  torch.manual_seed(1)
  bert_config = transformers.BertConfig(
      vocab_size=VOCAB_SIZE, hidden_size=text_config.hidden_size,
      num_hidden_layers=text_config.layers, num_attention_heads=text_config.heads,
      intermediate_size=text_config.intermediate_size,
      max_position_embeddings=text_config.max_positions)
  model = transformers.BertModel(bert_config)
  return torch_reference.randomize_(model, 1).eval()


def test_bert_model_directory_gives_the_text_encoder(config, tmp_path):
  hf_model = tiny_hf_bert(config.model.text)
  hf_model.save_pretrained(tmp_path / "rbt_tiny")
  conversion, _ = convert.convert(str(tmp_path / "rbt_tiny"), "bert", config)
  assert set(conversion.params) == {"text_encoder"}

  batch = make_batch(config)
  ids, mask = batch["page_title_ids"], batch["page_title_mask"]
  encoder = text.TextEncoder(ModelConfig.from_config(config.model).text)
  got = jax.jit(encoder.apply)({"params": conversion.params["text_encoder"]}, ids, mask)
  with torch.no_grad():
    want = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64))).pooler_output
  assert parity.max_abs_diff(got, want) <= ATOL

  # The same weights from an MLM model's state dict: `bert.` prefix, `cls.*` head skipped.
  mlm_state = {f"bert.{k}": v for k, v in hf_model.state_dict().items()}
  mlm_state["cls.predictions.bias"] = torch.zeros(VOCAB_SIZE)
  torch.save(mlm_state, tmp_path / "pytorch_model.bin")
  from_file, _ = convert.convert(str(tmp_path / "pytorch_model.bin"), "bert", config)
  assert from_file.skipped == ("cls.predictions.bias",)
  jax.tree.map(np.testing.assert_array_equal, from_file.params, conversion.params)


def test_bert_directory_with_other_head_count_is_refused(config, tmp_path):
  tiny_hf_bert(config.model.text).save_pretrained(tmp_path / "bert")
  with open(tmp_path / "bert" / "config.json") as f:
    hf_config = json.load(f)
  hf_config["num_attention_heads"] = 1
  with open(tmp_path / "bert" / "config.json", "w") as f:
    json.dump(hf_config, f)
  with pytest.raises(convert.ConversionError, match="num_attention_heads=1"):
    convert.convert(str(tmp_path / "bert"), "bert", config)


def test_safetensors_file_converts_like_the_pickle(reference, release_checkpoint, config,
                                                   tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                              str(path))
  from_safetensors, _ = convert.convert(str(path), "cope", config)
  from_pickle, _ = convert.convert(release_checkpoint, "cope", config)
  jax.tree.map(np.testing.assert_array_equal, from_safetensors.params, from_pickle.params)


def test_wrong_width_names_the_key_and_both_shapes(config, tmp_path):
  wide = tiny_config()
  wide.model.vision.width = 48
  state_dict = parity.build_reference(wide.model).state_dict()
  path = tmp_path / "wide.pth"
  torch.save({"state_dict": state_dict}, path)
  with pytest.raises(weight_mapping.WeightMappingError) as error:
    convert.convert(str(path), "cope", config)
  message = str(error.value)
  assert "visual_encoder.visual.conv1.weight: shape (48, 3, 16, 16)" in message
  assert "(32, 3, 16, 16)" in message


def test_missing_file_and_wrong_kind_are_clear_errors(release_checkpoint, config, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.convert(str(tmp_path / "nope.pth"), "cope", config)
  with pytest.raises(convert.ConversionError, match="--kind 'vit'"):
    convert.convert(release_checkpoint, "vit", config)
  # A COPE release file read as a BERT model: nothing maps, and unknown keys are listed.
  with pytest.raises(weight_mapping.WeightMappingError, match="unknown key"):
    convert.convert(release_checkpoint, "bert", config)


def tiny_recipe_config(name):
  """configs/<name>.py with the tiny shapes (the structure stays the recipe's)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  for field, value in tiny_shapes().items():
    *path, leaf = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def test_stage1_config_initialises_the_clip_text_projections_on_purpose(
    release_checkpoint, reference, config, tmp_path):
  stage1 = tiny_recipe_config("rope_vitb16_stage1")
  assert stage1.loss.weights.video_text_visual > 0  # it reads the clips' ASR text
  metadata = convert.run(release_checkpoint, "cope", stage1, str(tmp_path / "out"))
  clip_fc0 = {f"{head}/fc0/{leaf}" for head in ("video_head", "live_head")
              for leaf in ("kernel", "bias")}
  assert set(metadata["initialised"]) == clip_fc0
  assert not metadata["partial"] and metadata["missing_params"] == 0
  (note,) = [note for note in metadata["notes"] if note.startswith("initialised")]
  assert "video_head/fc0" in note and "loss.weights.video_text_visual" in note
  params = checkpoints.load_params(str(tmp_path / "out"))["model"]
  assert set(params["video_head"]) == {"fc0", "fc1"}
  kernel = params["video_head"]["fc0"]["kernel"]
  assert kernel.shape == (stage1.model.text.hidden_size, stage1.model.emb_dim)
  assert np.std(kernel) > 0 and not np.array_equal(kernel, params["live_head"]["fc0"]["kernel"])
  # Everything the release holds is loaded as it is: the same embeddings as the reference.
  stage2 = convert.convert(release_checkpoint, "cope", tiny_recipe_config("rope_vitb16"))[0]
  for path, value in parity.flat(stage2.params).items():
    np.testing.assert_array_equal(parity.flat(params)[path], value, err_msg=path)


def test_a_truly_missing_key_is_refused_by_name(reference, tmp_path):
  state_dict = {f"module.{k}": v for k, v in reference.state_dict().items()
                if k != "item_fusion_model.fc0.weight"}
  path = tmp_path / "damaged.pth"
  torch.save({"state_dict": state_dict}, path)
  for name in ("rope_vitb16", "rope_vitb16_stage1"):
    with pytest.raises(weight_mapping.WeightMappingError, match="page_head/fc0/kernel"):
      convert.convert(str(path), "cope", tiny_recipe_config(name))
