"""The Beam embedding job (`cope_jax.embed_beam`) on the DirectRunner with 2 worker
processes, over a synthetic split that changed since an export of `cope_jax.export`
(products added, a title changed, a video taken down, a broken image, a malformed
row), with --since that export.

One run of the job is checked against `cope_jax.export`'s full export of the changed
split with the same weights: every embedding within 1e-5, the same ids in the same
order, the same `compare` metrics; the rows carried over bit-identical to the earlier
export's; the manifest readable by compare and by the export's reader; every refused
row and image reported with its file and line; the workers loaded the artifact once
each and imported no module of `cope_jax.models`. A killed run leaves OUT as it was.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="the Beam job needs apache-beam")
pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")

from cope_jax import compare  # pylint: disable=g-import-not-at-top
from cope_jax import embed_beam
from cope_jax import export
from cope_jax import export_format
from cope_jax import run_record
from cope_jax import serving
from cope_jax import sharding
from cope_jax import serving_artifact
from cope_jax import state
from cope_jax.base import domains
from data_pipelines import prepare
from tests import catalog_edits
from tests import test_export_whole

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "test"
ATOL = 1e-5
WORKERS = 2


def _env():
  return {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}


def _command(serving_dir, rope_dir, out, *extra):
  return [sys.executable, "-m", "cope_jax.embed_beam", f"--serving={serving_dir}",
          f"--rope_dir={rope_dir}", f"--split={SPLIT}", f"--out={out}",
          f"--workers={WORKERS}", *extra]


@pytest.fixture(scope="module")
def setup(tiny_rope_dir, tmp_path_factory):
  """The catalog before and after it changed, exports of both by cope_jax.export, the
  serving artifact of the same weights, and one run of the Beam job over the changed
  catalog --since the first export."""
  root = tmp_path_factory.mktemp("embed_beam")
  config, rope_dir, prepared = catalog_edits.prepared_copy_with_random_weights(
      tiny_rope_dir, str(root), seed=6)
  workdir = str(root / "run")
  first = str(root / "first")
  export.export_embeddings(config, workdir, first, split=SPLIT)

  # The serving artifact, as `python -m cope_jax.serving` writes it for this workdir.
  resolved = run_record.resolve(config)
  params, step, source = state.load_model_params(resolved, workdir,
                                                 sharding.make_mesh(resolved.mesh))
  serving_dir = str(root / "serving")
  serving.export_embedders(resolved, params, serving_dir,
                           provenance=run_record.provenance(resolved, step, source))

  changes = catalog_edits.change_catalog(rope_dir, SPLIT)
  prepare.prepare(rope_dir, prepared, progress=False, log=lambda line: None)
  full = str(root / "full")
  export.export_embeddings(config, workdir, full, split=SPLIT)

  out = str(root / "beam")
  started = time.perf_counter()
  result = subprocess.run(_command(serving_dir, rope_dir, out, f"--since={first}"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=_env())
  assert result.returncode == 0, result.stderr[-4000:]
  return {"rope_dir": rope_dir, "first": first, "full": full, "out": out,
          "serving": serving_dir, "changes": changes, "stdout": result.stdout,
          "seconds": time.perf_counter() - started, "config": resolved}


def _rows(folder, domain):
  manifest = export_format.Manifest.read(folder)
  return export_format.read_rows(
      [os.path.join(folder, f["file"]) for f in manifest.domains[domain].files], domain)


def test_embeddings_equal_the_exports_within_1e_5(setup):
  for domain in domains.NAMES:
    got, want = _rows(setup["out"], domain), _rows(setup["full"], domain)
    assert got.ids.tolist() == want.ids.tolist()  # catalog order, the broken page left out
    assert got.product_ids.tolist() == want.product_ids.tolist()
    assert got.content_digests.tolist() == want.content_digests.tolist()
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=ATOL, rtol=0,
                               err_msg=domain)
  assert catalog_edits.BROKEN_PAGE_ID not in _rows(setup["out"], "page").ids.tolist()


def test_since_carries_unchanged_rows_over_and_counts_the_changes(setup):
  manifest = export_format.Manifest.read(setup["out"])
  full = export_format.Manifest.read(setup["full"])
  first = export_format.Manifest.read(setup["first"])
  changes = setup["changes"]
  assert manifest.writer == "cope_jax.embed_beam"
  assert manifest.lineage["since"] == os.path.abspath(setup["first"])
  for domain in domains.NAMES:
    added, changed = len(changes["added"][domain]), len(changes["changed"].get(domain, []))
    removed = len(changes["removed"].get(domain, []))
    assert manifest.lineage["domains"][domain] == {
        "added": added, "changed": changed, "removed": removed,
        "carried": first.domains[domain].count - changed - removed}
    assert manifest.domains[domain].embedded == added + changed
    assert manifest.domains[domain].count == full.domains[domain].count
    earlier, got = _rows(setup["first"], domain), _rows(setup["out"], domain)
    position = {item_id: row for row, item_id in enumerate(got.ids.tolist())}
    kept = [(row, position[i]) for row, i in enumerate(earlier.ids.tolist())
            if i in position and i not in changes["changed"].get(domain, [])]
    assert len(kept) == manifest.lineage["domains"][domain]["carried"]
    np.testing.assert_array_equal(
        got.embeddings[[new for _, new in kept]].view(np.uint32),
        earlier.embeddings[[old for old, _ in kept]].view(np.uint32), err_msg=domain)


def test_the_manifest_is_read_by_compare_and_the_exports_reader(setup, tmp_path):
  config = setup["config"]
  for domain in domains.NAMES:
    loaded = export.load_exported_index(setup["out"], domain,
                                        config_hash=run_record.config_digest(config),
                                        dim=config.model.emb_dim)
    assert loaded.ids.tolist() == _rows(setup["full"], domain).ids.tolist()
  metrics = {name: compare.compare(setup[name], setup["rope_dir"], SPLIT,
                                   out_dir=str(tmp_path / name))["metrics"]["reference"]
             for name in ("out", "full")}
  got, want = _flat(metrics["out"]), _flat(metrics["full"])
  assert got.keys() == want.keys() and len(want) > 10
  for name, value in want.items():  # the same rankings: equal up to float rounding
    assert got[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name


def _flat(value, prefix=""):
  if isinstance(value, dict):
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}/").items()}
  if isinstance(value, list):
    return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}/").items()}
  return {prefix: value}


def test_refused_rows_and_images_are_reported_with_file_and_line(setup):
  with open(os.path.join(setup["out"], embed_beam.REPORT_FILE), encoding="utf-8") as f:
    report = json.load(f)
  problems = {(p["stage"], p["file"], p["line"]) for p in report["problems"]}
  malformed_file, malformed_line = setup["changes"]["malformed"]
  broken_file, broken_line = setup["changes"]["broken"]
  assert ("read", malformed_file, malformed_line) in problems
  assert ("decode", broken_file, broken_line) in problems
  assert report["counts"]["page"]["dropped"] == 1
  manifest = export_format.Manifest.read(setup["out"])
  assert manifest.inputs["problems"] == report["num_problems"] == len(report["problems"])


def test_workers_load_the_artifact_once_each_without_the_model_code(setup):
  with open(os.path.join(setup["out"], embed_beam.REPORT_FILE), encoding="utf-8") as f:
    report = json.load(f)
  loads = report["worker_processes"]
  pids = [load["pid"] for load in loads]
  assert loads and len(pids) == len(set(pids)) <= WORKERS  # once per process
  for load in loads:
    assert load["model_code_modules"] == [], load
    assert "cope_jax.beam_inference" in load["cope_jax_modules"]
    assert not [m for m in load["cope_jax_modules"] if m.startswith("cope_jax.models")]
  embedded_by = set(report["rows_per_worker"])
  assert embedded_by <= {load["worker"] for load in loads}


def test_a_killed_run_leaves_the_export_as_it_was(setup, tmp_path):
  out = str(tmp_path / "export")
  shutil.copytree(setup["first"], out)
  before = test_export_whole._tree(out)
  process = subprocess.Popen(_command(setup["serving"], setup["rope_dir"], out), cwd=REPO_ROOT,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
  work = os.path.join(export.result_files.shared_staging_path(out), embed_beam.WORK_DIR)
  deadline = time.monotonic() + 300
  try:
    while not os.path.exists(os.path.join(work, "catalog.jsonl")):  # the pipeline starts
      assert process.poll() is None and time.monotonic() < deadline, "never started"
      time.sleep(0.05)
    time.sleep(0.5)  # the workers start
  finally:
    os.killpg(process.pid, signal.SIGKILL)  # the job and its worker processes
    process.wait(timeout=60)
  assert os.path.isdir(work), "the job finished before it was killed"
  assert test_export_whole._tree(out) == before
  assert export_format.Manifest.read(out).writer == "cope_jax.export"


def test_an_artifact_without_config_or_vocabulary_is_refused_before_writing(setup, tmp_path):
  serving_dir = str(tmp_path / "serving")
  shutil.copytree(setup["serving"], serving_dir)
  path = os.path.join(serving_dir, serving_artifact.MANIFEST)
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  manifest["vocabulary"] = None
  with open(path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  out = str(tmp_path / "out")
  with pytest.raises(embed_beam.ServingArtifactError, match="no config or vocabulary"):
    embed_beam.embed(serving_dir, setup["rope_dir"], SPLIT, out)
  assert not os.path.exists(out)
