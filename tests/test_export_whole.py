"""An export is swapped in whole: an export over an existing one that fails part-way
(an injected ENOSPC in the Parquet writer; a file-size limit on the command line) leaves
the previous export byte-identical with no temporary file, names the file, and exits 1;
--resume then continues from the domains the failed run completed. And the serving
artifacts made from the command line, loaded in a process without the model code, embed
an item of each domain as the export does (within 1e-5).

The tests share one export (made once, copied before it is written over)."""

import errno
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax import export
from cope_jax import export_format
from cope_jax.base import result_files
from cope_jax.base import domains
from cope_jax import serving_artifact
from data_pipelines import pipelines
from tests import test_serving
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory) -> str:
  config = config_checks.resolve_vocab_size(
      tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir))
  init_dir = str(tmp_path_factory.mktemp("weights"))
  checkpoints.save_params(init_dir, {"model": test_serving.random_params(config, seed=4)})
  return init_dir


def _config(tiny_prepared_dir, tiny_rope_dir, weights):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir)
  config.train.init_from = weights
  return config


@pytest.fixture(scope="module")
def first_export(tiny_prepared_dir, tiny_rope_dir, weights, tmp_path_factory):
  """(folder, manifest) of one complete export of the test split, made under umask 022;
  tests copy it before writing over it."""
  out = tmp_path_factory.mktemp("first_export") / "export"
  previous_umask = os.umask(0o022)
  try:
    manifest = export.export_embeddings(_config(tiny_prepared_dir, tiny_rope_dir, weights),
                                        str(tmp_path_factory.mktemp("run")), str(out),
                                        split="test")
  finally:
    os.umask(previous_umask)
  return str(out), manifest


def _copy_export(first_export, tmp_path) -> str:
  out = tmp_path / "export"
  shutil.copytree(first_export[0], out)
  return out


def _tree(root) -> dict[str, bytes]:
  """Every file under `root`, hidden ones and sibling staging folders included."""
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
  return found


def _temporaries(root) -> list[str]:
  return [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
          if name.endswith(".tmp")]


def test_a_failed_reexport_keeps_the_previous_one_and_resume_continues(
    tiny_prepared_dir, tiny_rope_dir, weights, first_export, tmp_path, monkeypatch):
  config = _config(tiny_prepared_dir, tiny_rope_dir, weights)
  first = first_export[1]
  assert stat.S_IMODE(os.stat(os.path.join(first_export[0], export_format.MANIFEST_FILE))
                      .st_mode) == 0o644
  out, workdir = _copy_export(first_export, tmp_path), str(tmp_path / "run")
  before = _tree(tmp_path)

  # The second domain's Parquet write fails after its first row group.
  domains_written = []
  write_table = export_format.pq.ParquetWriter.write_table

  def disk_full(writer, table, *args, **kwargs):
    domain = table.column("domain")[0].as_py()
    if domain not in domains_written:
      domains_written.append(domain)
    write_table(writer, table, *args, **kwargs)
    if len(domains_written) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(export_format.pq.ParquetWriter, "write_table", disk_full)
  with pytest.raises(result_files.ResultWriteError,
                     match=r"could not write .*-0-of-1\.parquet: No space left on device"):
    export.export_embeddings(config, workdir, str(out), split="test")
  failed_domain = domains_written[1]
  assert _tree(out) == _tree_of(before, "export")  # byte-identical
  assert _temporaries(tmp_path) == []
  staging = result_files.shared_staging_path(str(out))
  kept = export_format.Manifest.read(staging)  # what the failed run completed, for --resume
  assert list(kept.domains) == [domains_written[0]]

  monkeypatch.undo()
  resumed = export.export_embeddings(config, workdir, str(out), split="test", resume=True)
  assert resumed.to_json()["domains"] == first.to_json()["domains"]
  assert not os.path.exists(staging) and _temporaries(tmp_path) == []
  assert failed_domain in resumed.domains


def _tree_of(tree: dict[str, bytes], folder: str) -> dict[str, bytes]:
  prefix = folder + os.sep
  return {name[len(prefix):]: data for name, data in tree.items() if name.startswith(prefix)}


def test_export_command_over_an_export_under_a_file_size_limit(
    tiny_prepared_dir, tiny_rope_dir, weights, first_export, tmp_path):
  out, workdir = _copy_export(first_export, tmp_path), str(tmp_path / "run")
  before = _tree(tmp_path)
  largest = max(len(data) for data in _tree(out).values())
  limit = largest // 2  # the largest file cannot be written whole
  command = [sys.executable, "-m", "cope_jax.export", "--config",
             os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
             "--out", str(out), "--split", "test",
             *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir),
             f"--config.train.init_from={weights}"]
  # The limit is set by a small launcher that then execs the command (no preexec_fn:
  # forking this multithreaded process to run Python code in the child can deadlock).
  launcher = [sys.executable, "-c", "import os, resource, sys; limit = int(sys.argv[1]); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
              "os.execv(sys.argv[2], sys.argv[2:])", str(limit)]
  result = subprocess.run(launcher + command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-2].startswith("error: ResultWriteError: ") and "could not write" in lines[-2]
  assert "File too large" in lines[-2] and "Traceback" not in result.stderr
  assert _tree(out) == _tree_of(before, "export")
  assert _temporaries(tmp_path) == []


def test_serving_command_matches_the_export_in_a_process_without_model_code(
    tiny_prepared_dir, tiny_rope_dir, weights, first_export, tmp_path):
  # The weights served and exported: random ones, as `convert` leaves weights
  # (config.train.init_from).
  config = config_checks.resolve_vocab_size(
      _config(tiny_prepared_dir, tiny_rope_dir, weights))
  init_dir, workdir, export_dir = weights, str(tmp_path / "run"), first_export[0]

  serving_dir = str(tmp_path / "serving")
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
  made = subprocess.run(
      [sys.executable, "-m", "cope_jax.serving", "--config",
       os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
       "--out", serving_dir,
       *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir),
       f"--config.train.init_from={init_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert made.returncode == 0, made.stderr[-3000:]
  assert f"to {serving_dir}" in made.stdout

  # One item of each domain, as the eval pipeline feeds it (uint8 pixels, token ids).
  inputs, item_ids = {}, {}
  for domain in domains.NAMES:
    batch = next(iter(pipelines.make_eval_dataset(config, domain, "test")))
    assert batch["valid"][0]
    item_ids[domain] = str(batch["id"][0])
    for name in serving_artifact.domain_inputs(config, domain):
      inputs[name] = np.asarray(batch[name][:1])
  np.savez(tmp_path / "inputs.npz", **inputs)
  served = subprocess.run(
      [sys.executable, "-c", test_serving.SERVE_ONE_ITEM, serving_dir, str(tmp_path / "inputs.npz"),
       str(tmp_path / "outputs.npz")], cwd=tmp_path, capture_output=True, text=True,
      timeout=300, env=env)
  assert served.returncode == 0, served.stderr[-3000:]
  assert "model modules: []" in served.stdout
  with np.load(tmp_path / "outputs.npz") as outputs:
    for domain in domains.NAMES:
      got = outputs[domains.get(domain).embedding_key][0]
      want = test_serving.exported_embedding(export_dir, domain, item_ids[domain])
      np.testing.assert_allclose(got, want, atol=test_serving.ATOL, rtol=0, err_msg=domain)
