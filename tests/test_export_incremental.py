"""Incremental export (`--since`): a synthetic split is exported, then the catalog changes
(products added, a title changed, a video taken down) and is exported again with
--since the first export, in place. Only the new and changed items are embedded (the
manifest counts them); the result equals a full export of the new catalog row for row
and bit for bit, and compare gives it the same metrics; a failure part-way leaves the
earlier export byte-identical; an export of another config or checkpoint is refused."""

import errno
import json
import os
import shutil
import sys

import numpy as np
import pytest

from cope_jax import compare
from cope_jax import config_checks
from cope_jax import export
from cope_jax import export_format
from cope_jax.base import result_files
from cope_jax.base import domains
from data_pipelines import prepare
from tests import catalog_edits
from tests import multiprocess
from tests import test_export_whole
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first

SPLIT = "test"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_PROCESS_TOLERANCE = 1e-6  # rows embedded in other batches and on other devices


@pytest.fixture(scope="module")
def catalog(tiny_rope_dir, tmp_path_factory):
  """(config, workdir, catalog folder, prepared folder, weights folder) of the
  catalog before it changes: prepared, and the weights of a random model."""
  root = tmp_path_factory.mktemp("incremental")
  config, rope_dir, prepared = catalog_edits.prepared_copy_with_random_weights(
      tiny_rope_dir, str(root), seed=5)
  return config, str(root / "run"), rope_dir, prepared


@pytest.fixture(scope="module")
def exports(catalog, tmp_path_factory):
  """The first export (the catalog as it was), the catalog's changes, a full export of
  the changed catalog and an incremental one (--since the first, in a copy of it)."""
  config, workdir, rope_dir, prepared = catalog
  root = tmp_path_factory.mktemp("exports")
  first = str(root / "first")
  export.export_embeddings(config, workdir, first, split=SPLIT)
  changes = catalog_edits.change_catalog(rope_dir, SPLIT)
  prepare.prepare(rope_dir, prepared, progress=False, log=lambda line: None)  # same folder
  full = str(root / "full")
  export.export_embeddings(config, workdir, full, split=SPLIT)
  incremental = str(root / "incremental")
  shutil.copytree(first, incremental)
  export.export_embeddings(config, workdir, incremental, split=SPLIT, since=incremental)
  return {"first": first, "full": full, "incremental": incremental, "changes": changes}


def _rows(folder, domain):
  manifest = export_format.Manifest.read(folder)
  return export_format.read_rows(
      [os.path.join(folder, f["file"]) for f in manifest.domains[domain].files], domain)


def test_only_the_new_and_changed_items_are_embedded(exports):
  manifest = export_format.Manifest.read(exports["incremental"])
  first = export_format.Manifest.read(exports["first"])
  changes = exports["changes"]
  lineage = manifest.lineage
  assert lineage["since"] == os.path.abspath(exports["incremental"])
  assert lineage["since_writer"] == "cope_jax.export"
  for domain in domains.NAMES:
    added = len(changes["added"][domain])
    changed = len(changes["changed"].get(domain, []))
    removed = len(changes["removed"].get(domain, []))
    assert added > 0, domain  # every domain gains rows
    counts = lineage["domains"][domain]
    assert counts == {"added": added, "changed": changed, "removed": removed,
                      "carried": first.domains[domain].count - changed - removed}, domain
    entry = manifest.domains[domain]
    assert entry.embedded == added + changed
    assert entry.count == first.domains[domain].count + added - removed
    # A full export embeds every row.
    assert export_format.Manifest.read(exports["full"]).domains[domain].embedded == entry.count


def test_the_result_equals_a_full_export_of_the_new_catalog(exports, catalog):
  changes = exports["changes"]
  for domain in domains.NAMES:
    got, want = _rows(exports["incremental"], domain), _rows(exports["full"], domain)
    assert got.ids.tolist() == want.ids.tolist()
    assert got.product_ids.tolist() == want.product_ids.tolist()
    assert got.content_digests.tolist() == want.content_digests.tolist()
    assert got.embeddings.dtype == want.embeddings.dtype == np.float32
    np.testing.assert_array_equal(got.embeddings.view(np.uint32),
                                  want.embeddings.view(np.uint32), err_msg=domain)
    ids = set(got.ids.tolist())
    assert set(changes["added"][domain]) <= ids
    assert not set(changes["removed"].get(domain, [])) & ids  # taken down: absent
  # The carried rows are the first export's bytes.
  first = _rows(exports["first"], "live")
  got = _rows(exports["incremental"], "live")
  position = {item_id: row for row, item_id in enumerate(got.ids.tolist())}
  rows = [position[item_id] for item_id in first.ids.tolist()]
  np.testing.assert_array_equal(got.embeddings[rows].view(np.uint32),
                                first.embeddings.view(np.uint32))
  # And compare evaluates both the same.
  metrics = {name: compare.compare(exports[name], catalog[2], SPLIT,
                                   out_dir=exports[name] + "_compare")["metrics"]["reference"]
             for name in ("incremental", "full")}
  assert metrics["incremental"] == metrics["full"]
  assert metrics["full"]["page_to_video"]  # something was measured


def test_the_index_holds_the_new_rows(exports, catalog):
  config = catalog[0]
  manifest = export_format.Manifest.read(exports["incremental"])
  for domain in domains.NAMES:
    entry = manifest.domains[domain]
    assert entry.index_complete and entry.index_tuning["recall_vs_exact"] >= (
        config.eval.target_recall)
    loaded = export.load_exported_index(exports["incremental"], domain)
    assert loaded.ids.tolist() == _rows(exports["full"], domain).ids.tolist()
    rows = _rows(exports["incremental"], domain)
    _, found = loaded.search(rows.embeddings[:4], 1)
    assert found[:, 0].tolist() == [0, 1, 2, 3]  # each row is its own nearest neighbour


def test_a_failed_incremental_export_leaves_the_earlier_one_byte_identical(
    exports, catalog, tmp_path, monkeypatch):
  config, workdir, _, _ = catalog
  out = str(tmp_path / "export")
  shutil.copytree(exports["first"], out)
  before = test_export_whole._tree(tmp_path)

  write_table = export_format.pq.ParquetWriter.write_table
  written = []

  def disk_full(writer, table, *args, **kwargs):
    write_table(writer, table, *args, **kwargs)
    written.append(table.column("domain")[0].as_py())
    if len(set(written)) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(export_format.pq.ParquetWriter, "write_table", disk_full)
  with pytest.raises(result_files.ResultWriteError, match="No space left on device"):
    export.export_embeddings(config, workdir, out, split=SPLIT, since=out)
  assert test_export_whole._tree(tmp_path) == before  # byte-identical, staging gone


def test_an_export_of_another_config_or_checkpoint_is_refused(exports, catalog, tmp_path):
  config, workdir, _, _ = catalog
  other = config.copy_and_resolve_references()
  other.eval.batch_size = 4  # another config (the hash covers every field)
  with pytest.raises(export_format.ExportMismatchError,
                     match=r"--since an export of another model or data: config_hash .*"
                           r"eval\.batch_size: 4 -> 8"):
    export.export_embeddings(config, workdir, str(tmp_path / "a"), split=SPLIT,
                             since=_relabelled(exports["first"], tmp_path / "other_config",
                                               config=other))
  with pytest.raises(export_format.ExportMismatchError,
                     match=r"checkpoint_step \(manifest: 7, this run: 0\)"):
    export.export_embeddings(config, workdir, str(tmp_path / "b"), split=SPLIT,
                             since=_relabelled(exports["first"], tmp_path / "other_step",
                                               checkpoint_step=7))
  for name in ("a", "b"):  # nothing written
    assert not os.path.exists(tmp_path / name / export_format.MANIFEST_FILE)
    assert not os.path.exists(result_files.shared_staging_path(str(tmp_path / name)))
  with pytest.raises(FileNotFoundError, match="no export there"):
    export.export_embeddings(config, workdir, str(tmp_path / "c"), split=SPLIT,
                             since=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="--since and --resume"):
    export.export_embeddings(config, workdir, str(tmp_path / "d"), split=SPLIT,
                             since=exports["first"], resume=True)


def _relabelled(folder, out, config=None, checkpoint_step=None) -> str:
  """A copy of the export in `folder` whose manifest says it was made with `config` (its
  hash) or at `checkpoint_step`: an export of another config or checkpoint."""
  shutil.copytree(folder, out)
  manifest = export_format.Manifest.read(str(out))
  if config is not None:
    from cope_jax import run_record  # pylint: disable=g-import-not-at-top
    resolved = run_record.resolve(config)
    manifest.config = json.loads(resolved.to_json(sort_keys=True))
    manifest.config_hash = config_checks.config_hash(resolved)
  if checkpoint_step is not None:
    manifest.checkpoint_step = checkpoint_step
  manifest.write(str(out))
  return str(out)


@pytest.mark.slow
def test_two_processes_export_since_as_one_does(exports, catalog, tmp_path):
  """Two JAX processes digest their parts of the records, embed the new and changed
  ones together and each write its part: the rows of the one-process full export, the
  carried ones bit for bit."""
  config, _, rope_dir, prepared = catalog
  out = tmp_path / "out"
  multiprocess.run_two_processes([
      sys.executable, "-m", "cope_jax.export", "--config",
      os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"),
      *tiny_configs.command_line_overrides(prepared, rope_dir),
      f"--config.train.num_steps={config.train.num_steps}",
      f"--config.train.init_from={config.train.init_from}",
      f"--workdir={tmp_path / 'run'}", f"--out={out}", f"--split={SPLIT}",
      f"--since={exports['first']}"])
  manifest = export_format.Manifest.read(str(out))
  incremental = export_format.Manifest.read(exports["incremental"])
  assert manifest.process_count == 2
  assert manifest.lineage["domains"] == incremental.lineage["domains"]
  for domain in domains.NAMES:
    entry = manifest.domains[domain]
    assert entry.embedded == incremental.domains[domain].embedded
    assert [f["file"] for f in entry.files] == [
        export_format.parquet_name(domain, p, 2) for p in range(2)]
    assert all(f["rows"] > 0 for f in entry.files)
    got, want = _rows(str(out), domain), _rows(exports["full"], domain)
    assert got.ids.tolist() == want.ids.tolist()
    assert got.content_digests.tolist() == want.content_digests.tolist()
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=MULTI_PROCESS_TOLERANCE)
    earlier = _rows(exports["first"], domain)
    carried = {i: row for row, (i, d) in enumerate(zip(earlier.ids.tolist(),
                                                        earlier.content_digests.tolist()))
               if d in set(got.content_digests.tolist())}
    rows = [got.ids.tolist().index(i) for i in carried]
    assert len(rows) == manifest.lineage["domains"][domain]["carried"]
    np.testing.assert_array_equal(got.embeddings[rows].view(np.uint32),
                                  earlier.embeddings[list(carried.values())].view(np.uint32))
