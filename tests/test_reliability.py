"""Losing no work and not being misled: damaged checkpoints, typos, kills, error messages.

One test per defect of the reliability review:
  1 an unknown or empty split stops evaluate/export before earlier results are touched;
    results are swapped in only when complete;
  2-3 a damaged latest checkpoint (flipped bytes, deleted metadata, emptied data) is
    reported in one line and training/evaluation fall back to the newest intact step;
  4 a changed model shape lists `path: checkpoint shape vs model shape` and the field;
  5 JSON outputs are strict;
  7 non-finite config numbers are refused; the NaN stop on a fresh run says so;
  8 an undecodable image is named; a refused `export --resume` names the fields;
  and the entry points print a failure as one short paragraph.
Plus the soaks of `benchmarks/soak.py`: kill -9 (5 kills here), SIGTERM (5 signals: each
run stops with 143 within 30 s, its last logged step saved) and SIGINT (130), each ending
with the uninterrupted run's parameters; and a checkpoint write failing under a file-size
limit is one short paragraph.

Training runs as a subprocess sharing a persistent compilation cache (the runs compile the
same programs), so each run after the first costs seconds of compilation, not a minute.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import tensorstore as ts

from benchmarks import soak
from cope_jax import checkpoint_fit
from cope_jax import checkpoints
from cope_jax import cli
from cope_jax import config_checks
from cope_jax import evaluate
from cope_jax import export
from cope_jax import export_format
from cope_jax import metrics_writer
from cope_jax import eval_report
from cope_jax import run_record
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.evaluators import retrieval as retrieval_evaluator
from cope_jax.search import directions
from data_pipelines import prepare
from data_pipelines import synthetic
from data_pipelines import transforms
from cope_jax.testing import tiny_configs
from tests import multiprocess
from tests.conftest import TINY_ROPE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4  # checkpoints at steps 2 and 4 (checkpoint_every=2, keep_checkpoints=2)
# The soak's lives in CI, in this order: kill -9 and SIGTERM each during a checkpoint write
# and between writes (the even lives are signalled during a write), SIGINT once.
# COPE_SOAK_SIGNALS=KILL,TERM,... runs another sequence.
SOAK_SIGNALS = os.environ.get("COPE_SOAK_SIGNALS",
                              "KILL,TERM,TERM,KILL,INT,TERM,KILL,TERM,TERM").split(",")
STOP_STATUS = {"TERM": 143, "INT": 130}


def _strict_json(text: str):
  """json.loads that refuses NaN/Infinity (as JSON.parse does)."""
  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def compile_cache() -> str:
  """The run's one XLA compilation cache (tests/conftest.py), for the CLI subprocesses."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def _train_cli(workdir, prepared_dir, rope_dir, cache, *extra, num_steps=NUM_STEPS):
  command = soak.train_command(str(workdir), prepared_dir, rope_dir, num_steps, 2)
  command = [c for c in command if not c.startswith("--config.train.log_every")]
  return subprocess.run(command + list(extra), cwd=REPO_ROOT, env=soak.subprocess_env(cache),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_prepared_dir, tiny_rope_dir, compile_cache, tmp_path_factory) -> str:
  """A workdir trained NUM_STEPS steps from the command line (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = _train_cli(workdir, tiny_prepared_dir, tiny_rope_dir, compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return str(workdir)


def _copy(workdir: str, target) -> str:
  shutil.copytree(workdir, target)
  return str(target)


def _config(prepared_dir, rope_dir):
  return tiny_configs.training_config(prepared_dir, rope_dir, num_steps=NUM_STEPS)


def _stored_values(state_dir: str) -> list[tuple[bytes, str, int, int]]:
  """(key, file, offset, length) of every value the OCDBT database of `state_dir` stores
  out of line, read with TensorStore's own dump of its B+tree.

  Most files under `ocdbt.process_*/d` are no values at all but the B+tree nodes of the
  per-process database's successive versions, which the merged root tree no longer reads:
  damage aimed at the largest data file can miss every array; aimed at a value it cannot.
  """
  base = ts.KvStore.open(f"file://{os.path.abspath(state_dir)}/").result()
  manifest = ts.ocdbt.dump(base).result()
  values, pending = [], [manifest["versions"][-1]["root"]["location"]]
  while pending:
    for entry in ts.ocdbt.dump(base, pending.pop()).result()["entries"]:
      if "indirect_value" in entry:  # "value:<prefix>:<file>:<offset>:<length>"
        location, offset, length = entry["indirect_value"].rsplit(":", 2)
        _, prefix, name = location.split(":", 2)
        values.append((entry["key"], os.path.join(state_dir, prefix, name), int(offset),
                       int(length)))
      pending.extend(v for v in entry.values()
                     if isinstance(v, str) and v.startswith("btreenode:"))
  return values


def _damage(step_dir: str, kind: str) -> None:
  """The three damages of the review, applied to one step folder."""
  if kind == "flipped_bytes":  # in the largest stored chunk of a model parameter
    _, path, offset, length = max(
        (value for value in _stored_values(os.path.join(step_dir, "state"))
         if value[0].startswith(b"params.model.")), key=lambda value: value[3])
    data = bytearray(open(path, "rb").read())
    for quarter in (1, 2, 3):
      data[offset + length * quarter // 4] ^= 0xFF
    open(path, "wb").write(bytes(data))
  elif kind == "deleted_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "emptied_data":
    for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")):
      os.remove(path)
  else:
    raise ValueError(kind)


# ---- 2-3: damaged checkpoints --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flipped_bytes", "deleted_metadata", "emptied_data"])
def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(
    trained, tiny_prepared_dir, tiny_rope_dir, compile_cache, tmp_path, kind, capsys):
  workdir = _copy(trained, tmp_path / "run")
  _damage(os.path.join(workdir, "checkpoints", "4"), kind)

  # Evaluation of "latest" reads (and verifies) the model parameters only: it uses step 2
  # and says so when they are damaged in step 4, and never returns damaged values.
  config = config_checks.resolve_vocab_size(_config(tiny_prepared_dir, tiny_rope_dir))
  mesh = sharding.make_mesh(config.mesh)
  capsys.readouterr()
  params, step, source = state_lib.load_model_params(config, workdir, mesh)
  printed = capsys.readouterr().out
  assert step == 2
  assert source == f"{workdir}/checkpoints/2"
  assert f"checkpoint step 4 in {workdir}/checkpoints is damaged: " in printed
  assert "using checkpoint step 2 (newest intact; skipped damaged 4)" in printed
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  expected = soak.final_params(trained, step)
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = "model/" + jax.tree_util.keystr(path, simple=True, separator="/")
    np.testing.assert_array_equal(np.asarray(value), expected[key])
  # A training workdir given as init_from (stage 2) is read the same way.
  from_workdir = jax.tree_util.tree_flatten_with_path(
      checkpoints.load_training_model_params(workdir))[0]
  assert len(from_workdir) == len(jax.tree.leaves(params))
  for path, value in from_workdir:
    key = "model/" + jax.tree_util.keystr(path, simple=True, separator="/")
    np.testing.assert_array_equal(value, expected[key])

  # Training resumes from step 2: one line names step 4 and the reason; the damaged
  # step is moved aside, and the run ends with the uninterrupted run's parameters.
  result = _train_cli(workdir, tiny_prepared_dir, tiny_rope_dir, compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  damage_lines = [line for line in result.stdout.splitlines() if "is damaged" in line]
  assert len(damage_lines) == 1, result.stdout
  assert damage_lines[0].startswith("checkpoint step 4 ") and "trying step 2" in damage_lines[0]
  reason = damage_lines[0].split("is damaged: ")[1]
  if kind == "deleted_metadata":
    assert reason.startswith("state/_METADATA is missing")
  if kind == "emptied_data":  # the line that used to be buried in a 1,480-line log
    assert reason.startswith("Orbax cannot read it") and "Truncated Zstd" in reason
  if kind == "flipped_bytes":  # values that decode but differ, or a stream that does not
    assert reason.startswith(("checksum mismatch", "non-finite values", "Orbax cannot read it"))
  assert f"resumed from {workdir}/checkpoints/2" in result.stdout
  assert "Traceback" not in result.stderr
  moved = os.listdir(os.path.join(workdir, "checkpoints", "damaged"))
  assert len(moved) == 1 and moved[0].startswith("4-")
  assert sorted(s for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [
      "2", "4"]
  resumed, uninterrupted = soak.final_params(workdir, 4), soak.final_params(trained, 4)
  assert soak.max_abs_difference(resumed, uninterrupted) == 0.0


@pytest.mark.slow
def test_all_checkpoints_damaged_is_one_short_paragraph(trained, tiny_prepared_dir,
                                                        tiny_rope_dir, compile_cache, tmp_path):
  workdir = _copy(trained, tmp_path / "run")
  for step in ("2", "4"):
    _damage(os.path.join(workdir, "checkpoints", step), "emptied_data")
  command = [sys.executable, "-m", "cope_jax.evaluate", "--config",
             os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
             *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir)]
  env = soak.subprocess_env(compile_cache)
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert len(lines) <= 6, result.stdout + result.stderr
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  assert "error: NoIntactCheckpointError: no intact checkpoint" in result.stderr
  assert "step 4: " in result.stderr and "step 2: " in result.stderr
  assert "Nothing was deleted" in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  with_traceback = subprocess.run(command, cwd=REPO_ROOT, env=dict(env, COPE_TRACEBACK="1"),
                                  capture_output=True, text=True, timeout=300)
  assert with_traceback.returncode == 1
  assert "Traceback (most recent call last)" in with_traceback.stderr


def test_errors_of_background_tasks_print_one_line_and_a_count(capsys):
  # A failed Orbax read leaves dozens of such errors, garbage-collected at any moment:
  # the first gets one line, the others a count in the final error's last line.
  reports = cli._BackgroundErrorReports()  # pylint: disable=protected-access
  for error in (RuntimeError("Event loop is closed"),
                *[Exception(f"Encountered error while reading array index {i}")
                  for i in range(24)]):
    reports(types.SimpleNamespace(exc_value=error))
  printed = capsys.readouterr().err.splitlines()
  assert printed == ["ignored error in a background task: Exception: Encountered error "
                     "while reading array index 0"]
  assert reports.not_shown == 23


# ---- 4: shape mismatches -------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_another_emb_dim_lists_parameters_and_names_the_field(
    trained, tiny_prepared_dir, tiny_rope_dir, tmp_path):
  workdir = _copy(trained, tmp_path / "run")
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.model.emb_dim = 32
  # The run's record refuses it first, naming the field ...
  with pytest.raises(run_record.RunMismatchError, match=r"model\.emb_dim: run 16, now 32"):
    train.train_and_evaluate(config, workdir)
  # ... and the checkpoint itself, when the change is said to be meant.
  with pytest.raises(checkpoint_fit.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, workdir, allow_change=True)
  message = str(error.value)
  assert message.startswith(f"checkpoint step 4 ({workdir}/checkpoints/4) does not fit")
  assert "params/model/page_head/fc1/kernel: checkpoint (16, 16) vs model (16, 32)" in message
  assert "most likely differs: model.emb_dim (checkpoint 16, this config 32)" in message
  assert "strict=False" not in message


@pytest.mark.slow
def test_evaluate_with_another_vocabulary_names_the_vocab(trained, tiny_prepared_dir,
                                                          tiny_rope_dir, tmp_path):
  vocab = tmp_path / "vocab.txt"
  lines = open(os.path.join(tiny_rope_dir, "vocab.txt"), encoding="utf-8").read().splitlines()
  vocab.write_text("\n".join(lines + [f"extra{i}" for i in range(22)]) + "\n", encoding="utf-8")
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.data.vocab_path = str(vocab)
  config = config_checks.resolve_vocab_size(config)
  with pytest.raises(checkpoint_fit.CheckpointMismatchError) as error:
    state_lib.load_model_params(config, trained, sharding.make_mesh(config.mesh))
  message = str(error.value)
  words = "params/model/text_encoder/bert_model/embeddings/word_embeddings/embedding"
  assert (f"{words}: checkpoint ({len(lines)}, 32) vs model ({len(lines) + 22}, 32)"
          in message)
  assert "model.text.vocab_size" in message and "data.vocab_path" in message


# ---- 1 and 5: evaluation results -----------------------------------------------------


def _write_previous_results(workdir: str) -> dict[str, bytes]:
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  previous = {"metrics.json": b'{"previous": true}\n', "report.md": b"# previous report\n"}
  for name, content in previous.items():
    with open(os.path.join(eval_dir, name), "wb") as f:
      f.write(content)
  return previous


def _assert_unchanged(workdir: str, previous: dict[str, bytes]) -> None:
  for name, content in previous.items():
    with open(os.path.join(workdir, "eval", name), "rb") as f:
      assert f.read() == content, name


@pytest.mark.slow
def test_evaluate_with_unknown_or_empty_split_stops_and_keeps_results(
    trained, tiny_prepared_dir, tiny_rope_dir, tmp_path):
  workdir = _copy(trained, tmp_path / "run")
  previous = _write_previous_results(workdir)
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.data.eval_split = "tset"
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.data\.eval_split: no split 'tset' .*known splits: test, "
                           r"training"):
    evaluate.run(config, workdir)
  _assert_unchanged(workdir, previous)

  # A split with records of one domain only (its pair files of the others are empty):
  # no direction can be evaluated. Other data than the run's: allowed, to get there.
  rope_dir = tmp_path / "rope"
  synthetic.generate(str(rope_dir), **TINY_ROPE)
  for name in ("test_product_videos_pair.txt", "test_product_lives_pair.txt"):
    (rope_dir / name).write_text("", encoding="utf-8")
  prepared = tmp_path / "prepared"
  prepare.prepare(str(rope_dir), str(prepared), progress=False, log=lambda line: None)
  config = _config(str(prepared), str(rope_dir))
  with pytest.raises(config_checks.ConfigError,
                     match=r"split 'test' .* holds \d+ page, 0 video, 0 live records; no "
                           r"retrieval direction can be evaluated"):
    evaluate.run(config, workdir, allow_change=True)
  _assert_unchanged(workdir, previous)


@pytest.mark.slow
def test_evaluation_results_are_replaced_only_when_complete_and_are_strict_json(
    trained, tiny_prepared_dir, tiny_rope_dir, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path / "run")
  previous = _write_previous_results(workdir)
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.eval.report_examples = 0

  def half_a_report(eval_dir, *args, **kwargs):
    with open(os.path.join(eval_dir, "report.md"), "w", encoding="utf-8") as f:
      f.write("# half")
    raise OSError("disk full")

  monkeypatch.setattr(eval_report, "write_report", half_a_report)
  with pytest.raises(OSError, match="disk full"):
    evaluate.run(config, workdir)
  _assert_unchanged(workdir, previous)
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["metrics.json", "report.md"]
  monkeypatch.undo()

  # A metric that is not a number (an empty direction, say) is written as null.
  retrieval_directions = directions.retrieval_directions

  def with_a_nan(*args, **kwargs):
    metrics = retrieval_directions(*args, **kwargs)
    metrics["page_to_video"] = dict(metrics.get("page_to_video", {}), mAP=float("nan"))
    return metrics

  monkeypatch.setattr(retrieval_evaluator.Evaluator, "directions_fn",
                      staticmethod(with_a_nan))
  evaluate.run(config, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json"), encoding="utf-8") as f:
    written = _strict_json(f.read())
  assert written["page_to_video"]["mAP"] is None
  assert written["checkpoint_step"] == NUM_STEPS
  with open(os.path.join(workdir, "eval", "history.jsonl"), encoding="utf-8") as f:
    assert [_strict_json(line)["checkpoint_step"] for line in f] == [NUM_STEPS]
  assert open(os.path.join(workdir, "eval", "report.md"), "rb").read() != previous["report.md"]


# ---- 1 and 8: exports -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("export") / "out")
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  manifest = export.export_embeddings(config, trained, out_dir, split="test")
  assert manifest.domains
  return out_dir


@pytest.mark.slow
def test_export_with_unknown_split_keeps_the_previous_export(exported, trained,
                                                             tiny_prepared_dir, tiny_rope_dir):
  manifest_path = os.path.join(exported, export_format.MANIFEST_FILE)
  before = {name: open(os.path.join(exported, name), "rb").read()
            for name in os.listdir(exported) if os.path.isfile(os.path.join(exported, name))}
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  with pytest.raises(config_checks.ConfigError,
                     match=r"--split: no split 'tset' .*known splits: test, training"):
    export.export_embeddings(config, trained, exported, split="tset")
  after = {name: open(os.path.join(exported, name), "rb").read()
           for name in os.listdir(exported) if os.path.isfile(os.path.join(exported, name))}
  assert after == before
  _strict_json(open(manifest_path, encoding="utf-8").read())
  index = export.load_exported_index(exported, "page")
  assert len(index.ids) > 0


@pytest.mark.slow
def test_refused_export_resume_names_the_fields_that_differ(exported, trained,
                                                            tiny_prepared_dir, tiny_rope_dir):
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.eval.batch_size = 16
  config.loss.temperature = 0.07
  with pytest.raises(export_format.ExportMismatchError) as error:
    export.export_embeddings(config, trained, exported, split="test", resume=True)
  message = str(error.value)
  assert "different config_hash" in message
  assert "eval.batch_size: 8 -> 16" in message
  assert "loss.temperature: 0.05 -> 0.07" in message


# ---- 5: strict JSON -------------------------------------------------------------------


def test_json_outputs_write_null_for_nan_and_inf(tmp_path):
  from cope_jax.base import result_files  # pylint: disable=g-import-not-at-top

  path = tmp_path / "out.json"
  result_files.write_json(str(path), {"nan": float("nan"), "inf": np.float32(np.inf),
                                 "values": np.array([1.0, np.nan]), "ok": 0.5})
  assert _strict_json(path.read_text()) == {"nan": None, "inf": None, "values": [1.0, None],
                                            "ok": 0.5}
  writer = metrics_writer.MetricsWriter(str(tmp_path / "run"))
  writer.write(3, {"loss": 1.0, "mfu": float("nan")})
  writer.close()
  line = (tmp_path / "run" / "metrics.jsonl").read_text().strip()
  assert _strict_json(line)["mfu"] is None


# ---- 7: config numbers and the NaN stop ----------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("optim.learning_rate", float("inf")), ("optim.learning_rate", float("nan")),
    ("loss.temperature", float("inf")), ("optim.weight_decay", float("-inf")),
])
def test_non_finite_config_numbers_are_refused(tiny_prepared_dir, tiny_rope_dir, field, value):
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError,
                     match=rf"config\.{section}\.{name}: must be a finite number"):
    config_checks.check_config(config)


def test_keep_checkpoints_below_two_is_refused(tiny_prepared_dir, tiny_rope_dir):
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.train.keep_checkpoints = 1
  with pytest.raises(config_checks.ConfigError, match=r"config\.train\.keep_checkpoints"):
    config_checks.check_config(config)


@pytest.mark.slow
def test_non_finite_loss_on_a_fresh_run_says_there_is_no_checkpoint(tiny_prepared_dir,
                                                                    tiny_rope_dir, tmp_path):
  config = _config(tiny_prepared_dir, tiny_rope_dir)
  config.train.log_every = 1
  config.train.checkpoint_every = 100
  config.optim.learning_rate = 1e30
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert "there is no checkpoint yet" in str(error.value)
  assert "step 0" not in str(error.value)


# ---- 8: image decode ------------------------------------------------------------------


def test_undecodable_image_is_named_without_the_buffer():
  with pytest.raises(ValueError) as error:
    transforms.decode_jpeg(b"definitely not an image", name="page p17-3")
  message = str(error.value)
  assert "page p17-3" in message
  assert "BytesIO" not in message and "0x" not in message


# ---- the kill -9 soak -----------------------------------------------------------------


@pytest.mark.slow
def test_soak_of_kills_and_signals_resumes_to_identical_parameters(
    tiny_prepared_dir, tiny_rope_dir, compile_cache, tmp_path):
  """Training killed (-9) or signalled (TERM, INT) at random moments, each life resumed from
  the newest checkpoint: the final parameters are bit-identical to an uninterrupted run's,
  and each signalled life exits with its status within 30 s, its stop step saved."""
  result = soak.run_soak(tiny_prepared_dir, tiny_rope_dir, str(tmp_path),
                         kills=len(SOAK_SIGNALS), num_steps=8 * len(SOAK_SIGNALS),
                         cache_dir=compile_cache, seed=2, signal_name=",".join(SOAK_SIGNALS),
                         reference_checkpoint_every=8 * len(SOAK_SIGNALS))
  lives = result["lives"][:-1]  # the last life runs to the end
  assert [life["signal"] for life in lives] == SOAK_SIGNALS, result["lives"]
  assert all(life["killed"] for life in lives), result["lives"]  # none reached the end
  for life in lives:
    if life["signal"] == "KILL":
      assert life["returncode"] == -signal.SIGKILL, life
    else:
      assert life["returncode"] == STOP_STATUS[life["signal"]], life
      assert life["stop_seconds"] <= soak.MAX_STOP_SECONDS, life
      assert life["newest_checkpoint"] == life["last_logged"], life  # the step it stopped at
  during_write = {life["signal"] for life in lives if life["killed_during_write"]}
  assert {"KILL", "TERM"} <= during_write, result["lives"]
  resumed = [step for step in result["resumed_from"] if step is not None]
  assert len(set(resumed)) >= 2, result["lives"]  # lives made progress in between
  assert result["all_stopped_cleanly"]
  assert result["damaged_reports"] == []  # a kill never leaves a committed step damaged
  assert result["identical"], result["max_abs_param_difference"]


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_a_short_paragraph(tiny_prepared_dir, tiny_rope_dir,
                                                        compile_cache, tmp_path):
  # As `ulimit -f 200` (KiB): checkpoint files are larger.
  command = multiprocess.with_file_size_limit(
      soak.train_command(str(tmp_path / "run"), tiny_prepared_dir, tiny_rope_dir, 4, 2),
      200 * 1024)
  # Compiled programs are read from the cache but none is written (it would be too large).
  env = dict(soak.subprocess_env(compile_cache),
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(2**62))
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                          timeout=600)
  assert result.returncode == 1
  lines = [line for line in result.stderr.split(b"\n") if line.strip()]
  text = result.stderr.decode(errors="replace")
  assert len(lines) <= 5, text  # the progress line(s), the paragraph
  assert "error: CheckpointWriteError: writing a checkpoint to " in text
  assert "File too large" in text and "Traceback" not in text


@pytest.mark.slow
@pytest.mark.parametrize("job, signum", [("evaluate", signal.SIGTERM),
                                         ("export", signal.SIGINT)])
def test_a_signal_stops_evaluate_and_export_keeping_the_previous_result(
    trained, tiny_prepared_dir, tiny_rope_dir, compile_cache, tmp_path, job, signum):
  workdir = _copy(trained, tmp_path / "run")
  if job == "evaluate":
    previous_dir = os.path.join(workdir, "eval")
    _write_previous_results(workdir)
    extra = []
  else:
    previous_dir = str(tmp_path / "export")
    os.makedirs(previous_dir)
    with open(os.path.join(previous_dir, "manifest.json"), "w") as f:
      f.write('{"previous": true}\n')
    extra = ["--out", previous_dir]
  before = {name: open(os.path.join(previous_dir, name), "rb").read()
            for name in os.listdir(previous_dir)}
  command = [sys.executable, "-m", f"cope_jax.{job}", "--config",
             os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
             *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir), *extra]
  stderr_path = tmp_path / "stderr"
  with open(stderr_path, "w") as stderr:
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=soak.subprocess_env(compile_cache),
                               stdout=subprocess.DEVNULL, stderr=stderr)
  while "embed " not in stderr_path.read_text() and process.poll() is None:
    time.sleep(0.02)  # embedding has begun
  process.send_signal(signum)
  sent = time.monotonic()
  assert process.wait(timeout=300) == 128 + signum
  assert time.monotonic() - sent < 30
  lines = stderr_path.read_text().replace("\r", "\n").strip().splitlines()
  assert lines[-1] == f"stopped by {signal.Signals(signum).name}"
  after = {name: open(os.path.join(previous_dir, name), "rb").read()
           for name in os.listdir(previous_dir)}
  assert after == before
