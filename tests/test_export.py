"""Embedding export: Parquet layout and values, resumption, the search index and its checks;
the release's format and its round trip through `cope_jax.compare`; two processes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import synthetic_tiny
from cope_jax import checkpoints
from cope_jax import compare
from cope_jax import config_checks
from cope_jax import embed
from cope_jax import export
from cope_jax import export_format
from cope_jax import release_format
from cope_jax import run_record
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax.search import exact
from cope_jax.search import index as search_index
from cope_jax.base import domains
from data_pipelines import prepare
from tests import multiprocess
from cope_jax.testing import tiny_configs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_TOLERANCE = 1e-5  # float32 rows: |norm - 1|
EMBEDDING_TOLERANCE = 1e-5  # export vs in-process embeddings (same model, same inputs)
MULTI_PROCESS_TOLERANCE = 1e-6  # two-process vs one-process export of the same records
CONVERTED_SEED = 7  # the saved weights come from another seed than the export config's


@pytest.fixture(scope="module")
def weights(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """A parameter checkpoint made with another seed, and its params."""
  config = config_checks.resolve_vocab_size(
      tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir))
  config.seed = CONVERTED_SEED
  mesh = sharding.make_mesh(config.mesh)
  num_classes = len(prepare.load_products(tiny_prepared_dir, config.data.train_split))
  state, _ = state_lib.create_train_state(config, mesh, num_classes)
  model_params = jax.tree.map(np.asarray, state.params["model"])
  weights_dir = tmp_path_factory.mktemp("weights")
  checkpoints.save_params(str(weights_dir), {"model": model_params})
  return str(weights_dir), model_params


@pytest.fixture(scope="module")
def exported(tiny_rope_dir, weights, tmp_path_factory):
  """(config, out_dir, workdir, manifest) of `python -m cope_jax.export --rope_dir ...`.

  The config is the command line's, rebuilt in-process (its data.prepared_dir names a
  folder that does not exist: --rope_dir replaces it).
  """
  root = tmp_path_factory.mktemp("export")
  out_dir, workdir, unused = str(root / "out"), str(root / "workdir"), str(root / "unused")
  command = [sys.executable, "-m", "cope_jax.export", "--config",
             os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"),
             *tiny_configs.command_line_overrides(unused, tiny_rope_dir),
             f"--config.train.init_from={weights[0]}", f"--workdir={workdir}",
             f"--out={out_dir}", f"--rope_dir={tiny_rope_dir}", "--split=test"]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "exported checkpoint step 0" in result.stdout
  config = tiny_configs.training_config(unused, tiny_rope_dir)
  config.train.num_steps = synthetic_tiny.get_config().train.num_steps  # not overridden
  config.train.init_from = weights[0]
  with open(os.path.join(out_dir, "manifest.json")) as f:
    manifest = json.load(f)
  return config, out_dir, workdir, manifest


def _prepared_config(exported):
  """The export's config reading the data it prepared."""
  config = exported[0].copy_and_resolve_references()
  config.data.prepared_dir = os.path.join(exported[1], "prepared")
  return config


@pytest.fixture(scope="module")
def in_process(exported, weights):
  """domain -> embed.embed_split output of the same model on the same split."""
  config = config_checks.resolve_vocab_size(_prepared_config(exported))
  mesh = sharding.make_mesh(config.mesh)
  model = state_lib.build_model(config)
  return {domain: embed.embed_split(config, model, weights[1], domain, mesh,
                                    show_progress=False)
          for domain in domains.NAMES}


def test_parquet_files_have_the_named_columns_and_counts(exported, tiny_prepared_dir):
  _, out_dir, _, manifest = exported
  assert manifest["prepared_dir"] == os.path.join(out_dir, "prepared")
  for domain in domains.NAMES:
    path = os.path.join(out_dir, f"{domain}-0-of-1.parquet")
    schema = pq.read_schema(path)
    assert schema.names == ["id", "product_id", "domain", "embedding", "content_digest"]
    assert schema.field("id").type == pa.string()
    assert schema.field("product_id").type == pa.string()
    assert schema.field("domain").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert schema.field("content_digest").type == pa.string()
    table = pq.read_table(path)
    num_records = len(prepare.open_domain(tiny_prepared_dir, "test", domain))
    assert table.num_rows == num_records > 0
    assert set(table.column("domain").to_pylist()) == {domain}
    assert len(set(table.column("id").to_pylist())) == num_records
    assert manifest["domains"][domain]["count"] == num_records
    assert manifest["domains"][domain]["files"] == [
        {"file": f"{domain}-0-of-1.parquet", "rows": num_records}]
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


def test_manifest_names_the_model_and_dimension(exported, weights):
  config, out_dir, _, manifest = exported
  with open(os.path.join(out_dir, "manifest.json")) as f:
    assert json.load(f) == manifest
  assert manifest["config_hash"] == run_record.config_digest(config)
  assert manifest["embedding_dim"] == config.model.emb_dim == 16
  assert manifest["checkpoint_step"] == 0  # converted weights, no training checkpoint
  assert manifest["checkpoint"] == weights[0]
  assert manifest["split"] == "test"
  for entry in manifest["domains"].values():  # small galleries: brute force, nothing tuned
    assert entry["index_kind"] == "scann" and entry["index_parameters"]["num_leaves"] == 0
    assert entry["index_tuning"]["recall_vs_exact"] == 1.0


def test_config_hash_changes_with_any_field(exported):
  config = exported[0]
  changed = config.copy_and_resolve_references()
  changed.model.emb_dim = 32
  assert config_checks.config_hash(config) == config_checks.config_hash(config.copy_and_resolve_references())
  assert config_checks.config_hash(changed) != config_checks.config_hash(config)


def test_embeddings_are_normalised_and_equal_the_in_process_ones(exported, in_process):
  out_dir = exported[1]
  for domain, expected in in_process.items():
    rows = export_format.read_parquet([os.path.join(out_dir, f"{domain}-0-of-1.parquet")], domain)
    np.testing.assert_allclose(np.linalg.norm(rows.embeddings, axis=1), 1.0,
                               atol=NORM_TOLERANCE)
    assert list(rows.ids) == list(expected.ids)
    assert list(rows.product_ids) == list(expected.product_ids)
    np.testing.assert_allclose(rows.embeddings, expected.embeddings, atol=EMBEDDING_TOLERANCE)


def test_exported_index_finds_the_in_process_neighbours(exported, in_process):
  config, out_dir, _, _ = exported
  queries = in_process["video"].embeddings
  for domain in ("page", "live"):
    loaded = export.load_exported_index(out_dir, domain, config_hash=run_record.config_digest(config),
                                        dim=config.model.emb_dim)
    assert list(loaded.ids) == list(in_process[domain].ids)
    built, _ = search_index.build_index("scann", in_process[domain].embeddings, config.eval,
                                        k=10)
    k = 5
    _, expected_indices = built.search(queries, k)
    scores, indices = loaded.search(queries, k)
    np.testing.assert_array_equal(indices, expected_indices)
    # And both agree with exact search on this small gallery.
    _, exact_indices = exact.exact_search(queries, in_process[domain].embeddings, k)
    np.testing.assert_array_equal(indices, exact_indices)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_index_of_another_model_or_dimension_is_refused(exported):
  config, out_dir, _, _ = exported
  other = config.copy_and_resolve_references()
  other.model.emb_dim = 32
  with pytest.raises(export_format.ExportMismatchError, match="another model"):
    export.load_exported_index(out_dir, "page", config_hash=run_record.config_digest(other))
  with pytest.raises(export_format.ExportMismatchError, match="32"):
    export.load_exported_index(out_dir, "page", dim=32)
  with pytest.raises(FileNotFoundError, match="manifest"):
    export.load_exported_index(os.path.join(out_dir, "nowhere"), "page")


def test_resume_keeps_complete_files_and_redoes_missing_ones(exported, tiny_rope_dir):
  config, out_dir, workdir, manifest = exported

  def stamp(*parts):
    return os.stat(os.path.join(out_dir, *parts)).st_mtime_ns

  kept = {name: stamp(name) for name in ("page-0-of-1.parquet", "video-0-of-1.parquet")}
  kept_indices = {domain: stamp("index", domain, "scann_assets.pbtxt")
                  for domain in ("page", "video")}
  live_before = export_format.read_parquet([os.path.join(out_dir, "live-0-of-1.parquet")], "live")
  os.remove(os.path.join(out_dir, "live-0-of-1.parquet"))

  resumed = export.export_embeddings(config, workdir, out_dir, rope_dir=tiny_rope_dir,
                                     split="test", resume=True)
  assert resumed.to_json()["domains"] == manifest["domains"]
  for name, before in kept.items():
    assert stamp(name) == before, f"{name} was rewritten"
  for domain, before in kept_indices.items():
    assert stamp("index", domain, "scann_assets.pbtxt") == before, f"{domain} index rebuilt"
  live_after = export_format.read_parquet([os.path.join(out_dir, "live-0-of-1.parquet")], "live")
  assert list(live_after.ids) == list(live_before.ids)
  np.testing.assert_allclose(live_after.embeddings, live_before.embeddings,
                             atol=EMBEDDING_TOLERANCE)


def test_resume_with_another_model_is_refused(exported, tiny_rope_dir):
  config, out_dir, workdir, _ = exported
  other = config.copy_and_resolve_references()
  other.seed = 1
  with pytest.raises(export_format.ExportMismatchError, match="config_hash"):
    export.export_embeddings(other, workdir, out_dir, rope_dir=tiny_rope_dir, split="test",
                             resume=True)


# ----------------------------------------------------------------------------
# The release's format, and several processes.


def _export_command(exported, weights, out_dir, workdir, *extra):
  config, export_dir = exported[0], exported[1]
  return [sys.executable, "-m", "cope_jax.export", "--config",
          os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"),
          *tiny_configs.command_line_overrides(os.path.join(export_dir, "prepared"),
                                               config.data.rope_dir),
          f"--config.train.init_from={weights[0]}", f"--workdir={workdir}",
          f"--out={out_dir}", "--split=test", *extra]


@pytest.fixture(scope="module")
def exported_release(exported, tmp_path_factory):
  """The same model and split exported in the release's format (in this process; the
  command line's --format=release runs in the two-process test)."""
  out_dir = str(tmp_path_factory.mktemp("export_release") / "out")
  summary = export.export_embeddings(_prepared_config(exported), exported[2], out_dir,
                                     split="test", output_format="release")
  assert set(summary.domains) == set(domains.NAMES)
  assert not any(entry.index for entry in summary.domains.values())  # no index, no manifest
  assert not os.path.exists(os.path.join(out_dir, export_format.MANIFEST_FILE))
  return out_dir


def test_release_format_export_writes_the_release_files(exported, exported_release):
  prepared_dir = os.path.join(exported[1], "prepared")
  assert sorted(os.listdir(exported_release)) == sorted(
      release_format.file_name(0, domain) for domain in domains.NAMES)
  for domain in domains.NAMES:
    parquet = export_format.read_parquet([os.path.join(exported[1], f"{domain}-0-of-1.parquet")],
                                  domain)
    rows = release_format.read_file(
        os.path.join(exported_release, release_format.file_name(0, domain)), domain)
    assert list(rows.ids) == list(parquet.ids)
    # The decimals read back as the very float32 values of the Parquet export.
    np.testing.assert_array_equal(rows.embeddings.astype(np.float32), parquet.embeddings)
    if domains.get(domain).release_times:
      records = prepare.open_domain(prepared_dir, "test", domain)
      expected = [[str(r["frame_keys"][0]), str(r["frame_keys"][-1])] for r in records]
      assert rows.times.tolist() == expected
      assert all(int(start) <= int(end) for start, end in expected)
    else:
      assert rows.times is None


def test_round_trip_through_the_release_format_compares_identical(exported, exported_release,
                                                                  tmp_path):
  result = compare.compare(exported[1], exported[0].data.rope_dir, "test",
                           candidate_dir=exported_release, out_dir=str(tmp_path))
  assert result["sides"]["reference"]["format"] == "export"
  assert result["sides"]["candidate"]["format"] == "release"
  assert result["metrics"]["reference"] == result["metrics"]["candidate"]
  evaluated = [name for name in domains.DIRECTION_NAMES
               if "skipped" not in result["metrics"]["reference"][name]]
  assert evaluated == list(domains.DIRECTION_NAMES)
  assert all(value == 0.0 for entry in result["differences"].values()
             for value in entry.values() if value is not None)
  for domain in domains.NAMES:
    cosine = result["cosine"][domain]
    assert cosine["identical"] == cosine["count"] == result["ids"][domain]["both"] > 0
    assert cosine["min"] == 1.0
    assert result["ids"][domain]["reference_only"] == result["ids"][domain]["candidate_only"] == 0
  assert all(o["mean"] == 1.0 for o in result["top10_overlap"].values())


def test_release_format_refuses_resume(exported):
  config, out_dir, workdir, _ = exported
  with pytest.raises(ValueError, match="--format parquet only"):
    export.export_embeddings(config, workdir, out_dir, split="test", resume=True,
                             output_format="release")


@pytest.mark.slow
def test_two_processes_export_the_rows_of_one(exported, weights, tmp_path):
  """Two JAX processes (one 8-device mesh) each write their part; together the files
  hold the one-process export's rows in order."""
  out_dir = tmp_path / "out"
  multiprocess.run_two_processes(_export_command(exported, weights, str(out_dir), str(tmp_path / "workdir")))

  with open(out_dir / "manifest.json") as f:
    manifest = json.load(f)
  one_process = exported[3]
  assert manifest["process_count"] == 2
  assert manifest["checkpoint"] == one_process["checkpoint"] == weights[0]
  for domain in domains.NAMES:
    entry = manifest["domains"][domain]
    names = [export_format.parquet_name(domain, p, 2) for p in range(2)]
    assert [f["file"] for f in entry["files"]] == names
    parts = [export_format.read_parquet([str(out_dir / name)], domain) for name in names]
    assert [f["rows"] for f in entry["files"]] == [len(p) for p in parts]
    assert all(len(p) > 0 for p in parts)  # both processes wrote rows
    expected = export_format.read_parquet([os.path.join(exported[1], f"{domain}-0-of-1.parquet")],
                                   domain)
    assert entry["count"] == len(expected)
    assert [i for p in parts for i in p.ids] == list(expected.ids)
    assert [i for p in parts for i in p.product_ids] == list(expected.product_ids)
    # Each process batches its own part of the records, so a record meets other batch
    # neighbours and devices than in the one-process run: float32 rounding differs (by
    # about 5e-8 here), the values do not.
    np.testing.assert_allclose(np.concatenate([p.embeddings for p in parts]),
                               expected.embeddings, atol=MULTI_PROCESS_TOLERANCE)
    loaded = export.load_exported_index(str(out_dir), domain)
    assert list(loaded.ids) == list(expected.ids)  # the index covers both processes' rows


@pytest.mark.slow
def test_two_processes_write_the_release_files_of_one(exported, weights, exported_release,
                                                      tmp_path):
  """With --format release each process writes its `{rank}_*` files: rank 0's then rank
  1's lines are the one-process files' lines (ids, live times; values within rounding)."""
  out_dir = tmp_path / "out"
  multiprocess.run_two_processes(_export_command(exported, weights, str(out_dir), str(tmp_path / "workdir"),
                                     "--format=release"))
  assert sorted(os.listdir(out_dir)) == sorted(
      release_format.file_name(rank, domain) for rank in range(2) for domain in domains.NAMES)
  for domain in domains.NAMES:
    parts = [release_format.read_file(str(out_dir / release_format.file_name(rank, domain)),
                                      domain) for rank in range(2)]
    expected = release_format.read_file(
        os.path.join(exported_release, release_format.file_name(0, domain)), domain)
    assert all(len(part) > 0 for part in parts)
    assert [i for part in parts for i in part.ids] == list(expected.ids)
    if expected.times is not None:
      assert np.concatenate([part.times for part in parts]).tolist() == expected.times.tolist()
    np.testing.assert_allclose(np.concatenate([part.embeddings for part in parts]),
                               expected.embeddings, atol=MULTI_PROCESS_TOLERANCE)
