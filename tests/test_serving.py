"""Serving artifacts (`cope_jax.serving`): jax.export round trips against `COPE.apply`.

The exported function runs the same XLA computation as the in-process model, so the
tolerance is tight: max abs difference <= 1e-5 on L2-normalised float32 embeddings.
"""

import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")

from cope_jax import serving  # pylint: disable=g-import-not-at-top
from cope_jax import serving_artifact
from cope_jax import state
from cope_jax.models import cope
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-5
VOCAB_SIZE = 50


def tiny_config():
  config = tiny_configs.training_config("unused_prepared", "unused_rope")
  config.model.text.vocab_size = VOCAB_SIZE
  return config


def domain_batch(config, domain, batch_size, seed=0):
  """Random inputs of one domain with the shapes `serving_artifact.domain_inputs` declares."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in serving_artifact.domain_inputs(config, domain).items():
    if name.endswith("_mask"):
      lengths = rng.integers(1, shape[0] + 1, batch_size)
      batch[name] = (np.arange(shape[0])[None] < lengths[:, None]).astype(dtype)
    elif name.endswith("_ids"):
      batch[name] = rng.integers(1, VOCAB_SIZE, (batch_size,) + shape).astype(dtype)
    else:
      batch[name] = rng.integers(0, 256, (batch_size,) + shape).astype(dtype)
  return batch


def random_params(config, seed):
  """COPE parameters with random values (shapes from an abstract init: no compilation)."""
  abstract = jax.eval_shape(state.build_model(config).init, jax.random.key(0),
                            state.zero_batch(config, 1))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
    is_scale = path[-1].key == "scale"  # LayerNorm scales near 1
    return 1.0 + 0.1 * noise if is_scale else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract["params"]))


def apply_domain(config, params, domain, batch):
  """The in-process model's embeddings (jit-compiled: eager Flax is slow on CPU)."""
  apply = jax.jit(functools.partial(
      state.build_model(config).apply, domain=domain,
      outputs=serving_artifact.domain_outputs(config, domain), method=cope.COPE.embed))
  return apply({"params": params}, batch)


def assert_close(got, want):
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == want[name].shape, name
    np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def params(config):
  return random_params(config, seed=0)


@pytest.fixture(scope="module")
def serving_dir(config, params, tmp_path_factory):
  out = tmp_path_factory.mktemp("serving")
  serving.export_embedders(config, params, str(out))
  return str(out)


def test_manifest_describes_every_domain(serving_dir, config):
  manifest = serving_artifact.read_manifest(serving_dir)
  assert set(manifest["domains"]) == set(domains.NAMES)
  assert manifest["batch_size"] is None and manifest["embedding_dim"] == config.model.emb_dim
  side = config.data.image_size
  page = manifest["domains"]["page"]
  assert page["inputs"]["page_image"] == {"shape": ["b", side, side, 3], "dtype": "uint8"}
  assert set(page["outputs"]) == {"page_embedding", "page_text_embedding",
                                  "page_visual_embedding"}
  video = manifest["domains"]["video"]
  assert set(video["inputs"]) == {"video_frames"}  # no ASR branch in this config
  assert video["outputs"]["video_embedding"]["shape"] == ["b", config.model.emb_dim]
  for domain in domains.NAMES:
    assert os.path.isfile(os.path.join(serving_dir, f"{domain}.jax_exported"))
  # The config it was made with (a batch job reads the input sizes there); no vocabulary
  # file here, since this config's data.vocab_path does not exist.
  assert manifest["config"] == json.loads(config.to_json(sort_keys=True))
  assert manifest["vocabulary"] is None
  assert not os.path.exists(os.path.join(serving_dir, serving_artifact.VOCAB_FILE))


def test_the_vocabulary_travels_with_the_artifact(config, params, tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n红\n", encoding="utf-8")
  with_vocab = config.copy_and_resolve_references()
  with_vocab.data.vocab_path = str(vocab)
  out = tmp_path / "serving"
  manifest = serving.export_embedders(with_vocab, params, str(out), domains=("page",))
  assert (out / serving_artifact.VOCAB_FILE).read_bytes() == vocab.read_bytes()
  assert manifest["vocabulary"] == {
      "file": serving_artifact.VOCAB_FILE, "sha256": hashlib.sha256(vocab.read_bytes()).hexdigest()}
  embedders = serving_artifact.load_embedders(str(out))
  assert list(embedders) == ["page"]
  batch = domain_batch(config, "page", 2, seed=5)
  assert_close(embedders["page"](batch), apply_domain(config, params, "page", batch))


@pytest.mark.parametrize("domain", domains.NAMES)
def test_round_trip_matches_model_apply(serving_dir, config, params, domain):
  batch = domain_batch(config, domain, 3, seed=1)
  got = serving_artifact.load_embedder(serving_dir, domain)(batch)
  assert_close(got, apply_domain(config, params, domain, batch))


def test_symbolic_batch_serves_other_batch_sizes(serving_dir, config, params):
  embed = serving_artifact.load_embedder(serving_dir, "video")
  for batch_size in (1, 5):
    batch = domain_batch(config, "video", batch_size, seed=batch_size)
    got = embed(batch)
    assert got["video_embedding"].shape == (batch_size, config.model.emb_dim)
    assert_close(got, apply_domain(config, params, "video", batch))


def test_artifact_is_independent_of_the_weights(serving_dir, config):
  other_params = random_params(config, seed=7)
  batch = domain_batch(config, "page", 2, seed=2)
  got = serving_artifact.load_embedder(serving_dir, "page", params=other_params)(batch)
  assert_close(got, apply_domain(config, other_params, "page", batch))


def test_fixed_batch_size_export_rejects_other_sizes(config, params, tmp_path):
  serving.export_embedders(config, params, str(tmp_path), batch_size=2, domains=("live",))
  manifest = serving_artifact.read_manifest(str(tmp_path))
  assert set(manifest["domains"]) == {"live"}
  assert manifest["domains"]["live"]["inputs"]["live_frames"]["shape"][0] == 2
  embed = serving_artifact.load_embedder(str(tmp_path), "live")
  batch = domain_batch(config, "live", 2, seed=3)
  assert_close(embed(batch), apply_domain(config, params, "live", batch))
  with pytest.raises(serving_artifact.ServingError, match="live_frames"):
    embed(domain_batch(config, "live", 3))


def test_bad_inputs_and_directories_are_clear_errors(serving_dir, config, tmp_path):
  embed = serving_artifact.load_embedder(serving_dir, "page")
  batch = domain_batch(config, "page", 2)
  with pytest.raises(serving_artifact.ServingError, match="page_title_mask"):
    embed({k: v for k, v in batch.items() if k != "page_title_mask"})
  with pytest.raises(serving_artifact.ServingError, match="page_image"):
    embed(dict(batch, page_image=batch["page_image"][:, :-1]))
  with pytest.raises(serving_artifact.ServingError, match="dtype float32"):
    embed(dict(batch, page_image=batch["page_image"].astype(np.float32)))
  # int64 token ids (what tokenizers often return) are cast to the exported int32.
  wide = dict(batch, page_title_ids=batch["page_title_ids"].astype(np.int64))
  np.testing.assert_array_equal(embed(wide)["page_embedding"], embed(batch)["page_embedding"])
  with pytest.raises(serving_artifact.ServingError, match="serving_manifest.json"):
    serving_artifact.load_embedder(str(tmp_path), "page")
  with pytest.raises(serving_artifact.ServingError, match="'shop'"):
    serving_artifact.load_embedder(serving_dir, "shop")


SERVE_SCRIPT = """
import sys
import numpy as np
from cope_jax import serving_artifact
from cope_jax.base import domains

serving_dir, inputs_path, outputs_path = sys.argv[1:]
inputs = np.load(inputs_path)
outputs = {}
for domain in domains.NAMES:
  embed = serving_artifact.load_embedder(serving_dir, domain)
  outputs.update(embed({k: inputs[k] for k in inputs.files if k.startswith(domain)}))
np.savez(outputs_path, **outputs)
loaded = sorted(m for m in sys.modules if m.startswith(("cope_jax", "flax", "torch")))
assert "cope_jax.models" not in sys.modules, loaded
print("modules:", loaded)
"""


@pytest.mark.slow
def test_a_process_without_the_model_code_serves_the_same_embeddings(
    serving_dir, config, params, tmp_path):
  batch, want = {}, {}
  for domain in domains.NAMES:
    domain_inputs = domain_batch(config, domain, 2, seed=4)
    batch.update(domain_inputs)
    want.update(apply_domain(config, params, domain, domain_inputs))
  np.savez(tmp_path / "inputs.npz", **batch)
  python_path = os.pathsep.join([str(ROOT)] + [p for p in sys.path if p])  # same packages
  result = subprocess.run(
      [sys.executable, "-c", SERVE_SCRIPT, serving_dir, str(tmp_path / "inputs.npz"),
       str(tmp_path / "outputs.npz")], cwd=tmp_path, capture_output=True, text=True,
      timeout=300, env={**os.environ, "PYTHONPATH": python_path, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("modules: ['cope_jax', 'cope_jax.base', 'cope_jax.base.domains', "
          "'cope_jax.serving_artifact']") in result.stdout
  with np.load(tmp_path / "outputs.npz") as outputs:
    got = {name: outputs[name] for name in outputs.files}
  assert_close(got, want)


# ---- from the command line, against the export ------------------------------------------
# (the test is in tests/test_export_whole.py, which makes the export once for its tests)

SERVE_ONE_ITEM = """
import json, sys
import numpy as np
from cope_jax import serving_artifact
from cope_jax.base import domains

serving_dir, inputs_path, outputs_path = sys.argv[1:]
inputs = np.load(inputs_path)
outputs = {}
for domain in domains.NAMES:
  embed = serving_artifact.load_embedder(serving_dir, domain)
  name = domains.get(domain).embedding_key
  outputs[name] = embed({k: inputs[k] for k in inputs.files if k.startswith(domain)})[name]
np.savez(outputs_path, **outputs)
heavy = sorted(m for m in sys.modules if m.startswith(("cope_jax.models", "cope_jax.state",
                                                       "flax", "torch")))
print("model modules:", heavy)
"""


def exported_embedding(export_dir: str, domain: str, item_id: str) -> np.ndarray:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
    entry = json.load(f)["domains"][domain]
  for file_entry in entry["files"]:
    table = pq.read_table(os.path.join(export_dir, file_entry["file"]),
                          columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    if item_id in ids:
      return np.asarray(table.column("embedding")[ids.index(item_id)].as_py(), np.float32)
  raise AssertionError(f"{item_id} not in the {domain} export")
