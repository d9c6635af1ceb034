"""A run's folder describes itself (cope_jax/run_record.py).

One tiny run is trained through the command line into a module-scoped workdir over a
private prepared folder; the tests then run the later jobs on it (in process: `main(argv)`
raises CommandExit instead of ending the process) and check that

- `--workdir` alone gives the same metrics.json, byte for byte, as the config file with
  every override, and later jobs refuse a model or input-data field that differs from
  the run's, naming it with both values, while evaluation fields may change;
- a second `prepare` with other options into the same folder changes nothing for the run:
  evaluation gives the same bytes, a resumed training reads the run's prepared config,
  and once that config is gone a resume is refused naming it;
- every output says where it came from (checkpoint step, config digest, prepared data,
  code version);
- refusals that depend only on the config and the installed packages come before any
  model is built.
"""

import json
import os
import shutil

import pytest

from cope_jax import compare
from cope_jax import config_checks
from cope_jax import evaluate
from cope_jax import export
from cope_jax import run_record
from cope_jax import serving
from cope_jax import train
from cope_jax import serving_artifact
from cope_jax.search import faiss_index
from cope_jax.base import command_line
from data_pipelines import prepare
from cope_jax.testing import tiny_configs

CONFIG_FILE = "configs/synthetic_tiny.py"
NUM_STEPS = 2
FIRST_SIDE, SECOND_SIDE = 0, 16  # --max_image_side of the two prepares (0: as generated)


def _overrides(prepared_dir, rope_dir):
  return tiny_configs.command_line_overrides(prepared_dir, rope_dir) + [
      f"--config.train.num_steps={NUM_STEPS}", "--config.eval.report_examples=0"]


@pytest.fixture(scope="module")
def trained(tiny_rope_dir, tmp_path_factory):
  """(workdir, prepared dir, the training's overrides): a run of NUM_STEPS steps."""
  root = tmp_path_factory.mktemp("run_record")
  prepared_dir = str(root / "prepared")
  prepare.prepare(tiny_rope_dir, prepared_dir, max_image_side=FIRST_SIDE, num_shards=2,
                  progress=False, log=lambda line: None)
  workdir = str(root / "run")
  overrides = _overrides(prepared_dir, tiny_rope_dir)
  train.main(["--config", CONFIG_FILE, "--workdir", workdir, *overrides])
  return workdir, prepared_dir, overrides


def _metrics_bytes(workdir):
  with open(os.path.join(workdir, "eval", "metrics.json"), "rb") as f:
    return f.read()


def _jobs(workdir):
  with open(os.path.join(workdir, run_record.JOBS_FILE), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _ended(main, argv):
  with pytest.raises(command_line.CommandExit) as ended:
    main(argv)
  return ended.value


@pytest.mark.slow
def test_the_workdir_records_the_resolved_config_data_and_code(trained):
  workdir, prepared_dir, _ = trained
  record = run_record.load(workdir)
  config = record["config"]
  assert config["train"]["num_steps"] == NUM_STEPS
  assert config["model"]["text"]["vocab_size"] > 0  # read from the vocabulary
  assert config["data"]["prepared_dir"] == os.path.abspath(prepared_dir)
  identity = prepare.dataset_identity(prepared_dir, config["data"]["prepared_config"])
  assert record["prepared_data"]["config"] == identity["config"] == config["data"][
      "prepared_config"]
  assert record["prepared_data"]["fingerprint"] == identity["fingerprint"]
  assert record["prepared_data"]["splits"] == identity["splits"]
  assert record["prepared_data"]["metadata_digest"] == identity["metadata_digest"]
  assert record["config_digest"] == config_checks.config_hash(
      run_record.config_from_json(config))
  assert record["code"]["version"] and len(record["vocabulary"]["sha256"]) == 64
  assert _jobs(workdir)[0]["job"] == "train"


@pytest.mark.slow
def test_workdir_alone_gives_the_same_metrics_as_the_config_with_its_overrides(trained):
  workdir, _, overrides = trained
  evaluate.main(["--workdir", workdir])
  from_record = _metrics_bytes(workdir)
  evaluate.main(["--config", CONFIG_FILE, "--workdir", workdir, *overrides])
  assert _metrics_bytes(workdir) == from_record
  metrics = json.loads(from_record)
  assert metrics["checkpoint_step"] == NUM_STEPS
  assert metrics["config_digest"] == run_record.load(workdir)["config_digest"]
  assert metrics["prepared_data"]["config"] == run_record.load(workdir)["prepared_data"][
      "config"]
  assert metrics["code"]["version"]
  sources = [job["config_source"] for job in _jobs(workdir) if job["job"] == "evaluate"]
  assert sources[-2:] == [os.path.join(workdir, "run.json"), CONFIG_FILE]


@pytest.mark.slow
def test_a_model_field_is_refused_naming_both_values(trained):
  workdir, _, _ = trained
  ended = _ended(evaluate.main, ["--workdir", workdir, "--config.model.emb_dim=32"])
  assert ended.code == 1
  assert "model.emb_dim: run 16, now 32" in ended.message
  assert run_record.ALLOW_CHANGE_FLAG in ended.message
  ended = _ended(export.main, ["--workdir", workdir, "--out", os.path.join(workdir, "x"),
                               "--config.data.num_frames=1"])
  assert "data.num_frames: run 2, now 1" in ended.message
  assert not os.path.exists(os.path.join(workdir, "x"))
  # A resumed training also keeps its recipe.
  ended = _ended(train.main, ["--workdir", workdir, "--config.optim.learning_rate=0.5"])
  assert "optim.learning_rate: run 0.001, now 0.5" in ended.message


@pytest.mark.slow
def test_an_evaluation_field_is_accepted_and_recorded(trained):
  workdir, _, _ = trained
  evaluate.main(["--workdir", workdir, "--config.eval.one_shot_draws=2"])
  job = _jobs(workdir)[-1]
  assert job["job"] == "evaluate"
  assert job["overrides"] == ["--config.eval.one_shot_draws=2"]
  assert job["changed_fields"] == {"eval.one_shot_draws": [5, 2]}
  metrics = json.loads(_metrics_bytes(workdir))
  assert metrics["config_digest"] == job["config_digest"] != run_record.load(workdir)[
      "config_digest"]


@pytest.mark.slow
def test_outputs_say_where_they_come_from(trained, tiny_rope_dir, tmp_path):
  workdir, _, _ = trained
  record = run_record.load(workdir)
  export_dir = str(tmp_path / "export")
  export.main(["--workdir", workdir, "--out", export_dir])
  manifest = json.load(open(os.path.join(export_dir, "manifest.json")))
  assert manifest["checkpoint_step"] >= NUM_STEPS
  assert manifest["config_hash"] == record["config_digest"]
  assert manifest["prepared_data"]["fingerprint"] == record["prepared_data"]["fingerprint"]
  assert manifest["code"]["version"] == record["code"]["version"]

  serving_dir = str(tmp_path / "serving")
  serving.main(["--workdir", workdir, "--out", serving_dir, "--domains", "page"])
  served = json.load(open(os.path.join(serving_dir, serving_artifact.MANIFEST)))
  assert served["provenance"]["config_digest"] == record["config_digest"]
  assert served["provenance"]["checkpoint_step"] == manifest["checkpoint_step"]
  assert served["provenance"]["prepared_data"]["config"] == record["prepared_data"]["config"]

  compare_dir = str(tmp_path / "compare")
  compare.main(["--reference", export_dir, "--rope_dir", tiny_rope_dir, "--split", "test",
                "--out", compare_dir])
  compared = json.load(open(os.path.join(compare_dir, "compare.json")))
  origin = compared["sides"]["reference"]["provenance"]
  assert origin["config_digest"] == record["config_digest"]
  assert origin["checkpoint_step"] == manifest["checkpoint_step"]
  assert origin["prepared_data"]["fingerprint"] == record["prepared_data"]["fingerprint"]
  assert compared["code"]["version"] == record["code"]["version"]


def test_missing_faiss_is_refused_before_any_model_is_built(tiny_rope_dir, tiny_prepared_dir,
                                                            tmp_path, monkeypatch, capsys):
  def no_faiss():
    raise ImportError("index kind 'faiss_hnsw' needs faiss, which is not installed")

  monkeypatch.setattr(faiss_index, "import_faiss", no_faiss)
  overrides = _overrides(tiny_prepared_dir, tiny_rope_dir)
  ended = _ended(train.main, ["--config", CONFIG_FILE, "--workdir", str(tmp_path / "run"),
                              *overrides, "--config.eval.search=faiss_hnsw"])
  assert "config.eval.search" in ended.message and "faiss" in ended.message
  assert "COPE model:" not in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "run" / "run.json")


def test_a_partial_conversion_is_refused_before_any_model_is_built(
    tiny_rope_dir, tiny_prepared_dir, tmp_path, capsys):
  converted = tmp_path / "converted"
  os.makedirs(converted / "params")
  missing = ["page_head/fc1/kernel", "visual_encoder/mit/positional_embedding"]
  (converted / "conversion.json").write_text(json.dumps(
      {"kind": "xclip", "partial": True, "left_initialised": missing}))
  overrides = _overrides(tiny_prepared_dir, tiny_rope_dir)
  ended = _ended(train.main, ["--config", CONFIG_FILE, "--workdir", str(tmp_path / "run"),
                              *overrides, f"--config.train.init_from={converted}"])
  assert "config.train.init_from" in ended.message and "init_allow_missing" in ended.message
  assert "page_head/fc1/kernel" in ended.message
  assert "COPE model:" not in capsys.readouterr().out


def test_workdir_without_a_run_needs_a_config(tmp_path):
  ended = _ended(evaluate.main, ["--workdir", str(tmp_path)])
  assert ended.code == 2
  assert "missing --config" in ended.message and "run.json" in ended.message


# Last: it prepares a second config into the run's folder and then deletes the run's.
@pytest.mark.slow
def test_a_second_prepare_never_changes_the_runs_numbers(trained, tiny_rope_dir):
  workdir, prepared_dir, _ = trained
  evaluate.main(["--workdir", workdir])
  before = _metrics_bytes(workdir)
  run_config = run_record.load(workdir)["config"]["data"]["prepared_config"]
  second = prepare.prepare(tiny_rope_dir, prepared_dir, max_image_side=SECOND_SIDE,
                           num_shards=2, progress=False, log=lambda line: None)
  assert second["tfds"]["config"] != run_config
  assert prepare.dataset_identity(prepared_dir)["config"] == second["tfds"]["config"]
  evaluate.main(["--workdir", workdir])
  assert _metrics_bytes(workdir) == before
  # Naming the other config is a change of input data: refused, naming both.
  ended = _ended(evaluate.main, [
      "--workdir", workdir, f"--config.data.prepared_config={second['tfds']['config']}"])
  assert run_config in ended.message and second["tfds"]["config"] in ended.message

  # A resumed training reads the run's config, not the newer default.
  opened = []
  original = prepare.open_domain

  def spy(prepared, split, domain, config_name=""):
    opened.append(config_name)
    return original(prepared, split, domain, config_name=config_name)

  prepare.open_domain = spy
  try:
    train.main(["--workdir", workdir, f"--config.train.num_steps={NUM_STEPS + 1}"])
  finally:
    prepare.open_domain = original
  assert opened and set(opened) == {run_config}
  assert json.load(open(os.path.join(workdir, "run.json")))["prepared_data"]["config"] == (
      run_config)

  # Once the run's prepared config is gone, a resume is refused, naming it.
  for path in (os.path.join(prepared_dir, prepare.CONFIGS_SUBDIR, run_config),
               os.path.join(prepared_dir, prepare.TFDS_SUBDIR, "rope", run_config)):
    shutil.rmtree(path)
  ended = _ended(train.main, ["--workdir", workdir,
                              f"--config.train.num_steps={NUM_STEPS + 2}"])
  assert "trained on the prepared data" in ended.message and run_config in ended.message
