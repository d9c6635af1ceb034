"""What the programs print: progress as whole lines in a log, a line before the step
compiles, "already at step N of N" for a finished run, no folder left by a job that
failed before it wrote anything."""

import io
import json
import os

import pytest

from cope_jax import evaluate
from cope_jax import train
from cope_jax.base import progress
from cope_jax.base import command_line
from cope_jax.testing import tiny_configs

CONFIG_FILE = "configs/synthetic_tiny.py"


def test_line_progress_prints_a_line_every_tenth_and_no_carriage_return():
  stream = io.StringIO()
  shown = progress.LineProgress(200, desc="embed page", unit="item", stream=stream,
                                min_seconds=0)
  for _ in range(200):
    shown.update(1)
    shown.set_postfix(loss="1.000")
  shown.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10
  assert lines[0].startswith("embed page: 20/200 item (10%), ") and "left" in lines[0]
  assert lines[-1].startswith("embed page: 200/200 item (100%)") and "left" not in lines[-1]
  assert all(line.endswith("; loss=1.000") for line in lines)
  assert "\r" not in stream.getvalue()


def test_line_progress_starts_where_a_resumed_loop_starts_and_says_where_it_stopped():
  stream = io.StringIO()
  shown = progress.LineProgress(100, desc="train", unit="step", initial=45, stream=stream,
                                min_seconds=0)
  for _ in range(10):
    shown.update(1)
  shown.close()
  printed = [line.split(" ")[1] for line in stream.getvalue().splitlines()]
  assert printed == ["50/100", "55/100"]  # the 50% mark, then where it stopped


def test_line_progress_keeps_a_quiet_interval_between_lines_but_always_prints_the_end():
  stream = io.StringIO()
  now = [0.0]
  shown = progress.LineProgress(100, desc="export", unit="item", stream=stream,
                                min_seconds=5.0, clock=lambda: now[0])
  for _ in range(100):
    now[0] += 0.125  # a tenth every 1.25 s
    shown.update(1)
  shown.close()
  printed = [line.split(" ")[1] for line in stream.getvalue().splitlines()]
  assert printed == ["40/100", "80/100", "100/100"]  # tenths 5 s apart, then the end


def test_the_kind_of_display_follows_the_terminal(monkeypatch):
  monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
  assert isinstance(progress.bar(10), progress.LineProgress)  # pytest's stderr: no TTY
  monkeypatch.setenv(progress.PROGRESS_ENV, "bar")
  terminal = progress.bar(10)
  assert not isinstance(terminal, progress.LineProgress)
  terminal.close()
  monkeypatch.setenv(progress.PROGRESS_ENV, "off")
  silent = progress.bar(10)
  assert silent.disable


@pytest.fixture()
def overrides(tiny_prepared_dir, tiny_rope_dir):
  return tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir) + [
      "--config.train.num_steps=3"]


@pytest.mark.slow
def test_training_output_in_a_log(overrides, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.main(["--config", CONFIG_FILE, "--workdir", workdir, *overrides])
  out, err = capsys.readouterr()
  assert "compiling the training step" in out
  assert out.index("compiling the training step") < out.index("step 1 done")
  assert "\r" not in out + err
  assert "train: 3/3 step (100%)" in err
  # A finished run says so, and still prints its final metrics.
  train.main(["--workdir", workdir])
  out, _ = capsys.readouterr()
  assert "already at step 3 of 3" in out and "compiling" not in out
  final = json.loads(out.strip().splitlines()[-1])["final_metrics"]
  assert final["loss"] > 0


def test_a_job_failing_before_it_writes_leaves_no_folder(overrides, tmp_path):
  typo = tmp_path / "runz"
  with pytest.raises(command_line.CommandExit) as ended:
    evaluate.main(["--config", CONFIG_FILE, "--workdir", str(typo), *overrides])
  assert "nothing to evaluate" in ended.value.message
  assert not typo.exists()
  with pytest.raises(command_line.CommandExit):
    train.main(["--config", CONFIG_FILE, "--workdir", str(typo), *overrides,
                "--config.train.batch_size=3"])  # not divisible by the 8 devices
  assert not typo.exists()
  assert sorted(os.listdir(tmp_path)) == []


def test_library_warnings_are_left_out_at_the_default_verbosity():
  import logging as python_logging  # pylint: disable=g-import-not-at-top
  from cope_jax.base import command_line as cl  # pylint: disable=g-import-not-at-top

  def record(level, path):
    return python_logging.LogRecord("absl", level, path, 1, "message", None, None)

  library = "/usr/lib/python3/site-packages/tensorflow_datasets/core/dataset_builder.py"
  own = os.path.join(os.path.dirname(cl.__file__), "domains.py")
  keep = cl._project_warnings_and_errors  # pylint: disable=protected-access
  assert not keep(record(python_logging.WARNING, library))
  assert keep(record(python_logging.ERROR, library))
  assert keep(record(python_logging.WARNING, own))
