"""Two JAX processes on localhost (4 fake CPU devices each) as one 8-device job: they train
as one mesh, stop together on a signal to one of them, resume on another slice, and a
missing, killed or failing process ends the others with a paragraph naming it."""

import json
import os
import shutil
import signal
import sys
import time

import pytest

from cope_jax import checkpoints
from tests import multiprocess
from cope_jax.testing import tiny_configs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py")
NUM_STEPS = 6
TIMEOUT = 420  # one process's whole life, seconds (generous: CI machines are busy)
FAST = ["--config.distributed.heartbeat_timeout=5"]


def _train(workdir, prepared_dir, rope_dir, *extra):
  return [sys.executable, "-m", "cope_jax.train", "--config", CONFIG, "--workdir", str(workdir),
          *tiny_configs.command_line_overrides(prepared_dir, rope_dir),
          f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", *extra]


def _logged_steps(workdir) -> list[int]:
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      return [json.loads(line)["step"] for line in f if line.strip()]
  except FileNotFoundError:
    return []


def _wait_for(condition, processes, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while not condition():
    ended = [p for p in processes if p.popen.poll() is not None]
    assert not ended, ended[0].stderr[-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _final_loss(workdir) -> float:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    last = json.loads(f.read().splitlines()[-1])
  assert last["step"] == NUM_STEPS
  return last["loss"]


def _no_trace(text: str) -> bool:
  return "    @     0x" not in text and "Check failure stack trace" not in text


# ---- a signal to one process ----------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_by_sigterm(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """Two processes (started with JAX's variable names and COPE_DISTRIBUTED=1), process 1
  sent SIGTERM once two steps are logged. Returns (workdir, processes)."""
  root = tmp_path_factory.mktemp("sigterm")
  workdir = root / "run"
  processes = multiprocess.start_two_processes(
      _train(workdir, tiny_prepared_dir, tiny_rope_dir, *FAST,
             "--config.train.checkpoint_every=100"), str(root / "log"), names="JAX")
  _wait_for(lambda: len(_logged_steps(workdir)) >= 2, processes)
  processes[1].popen.send_signal(signal.SIGTERM)
  for process in processes:
    process.wait(TIMEOUT)
  return workdir, processes


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(stopped_by_sigterm):
  workdir, processes = stopped_by_sigterm
  assert [p.popen.returncode for p in processes] == [143, 143], processes[0].stderr[-3000:]
  step = _logged_steps(workdir)[-1]
  assert step < NUM_STEPS
  assert processes[1].stderr_lines()[-1] == (
      f"stopped at step {step} by SIGTERM; checkpoint saved; rerun the same command to "
      "resume")
  assert processes[0].stderr_lines()[-1] == (
      f"stopped at step {step} by SIGTERM to process 1; checkpoint saved; rerun the same "
      "command to resume")
  assert checkpoints.checkpoint_manager(str(workdir), read_only=True).all_steps() == [step]
  assert sorted(os.listdir(workdir / "checkpoints" / str(step) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


# ---- another slice --------------------------------------------------------------------


def _run_single(command, devices, log_prefix):
  env = multiprocess.process_env(0, 0, devices=devices)
  for name in ("COPE_COORDINATOR_ADDRESS", "COPE_NUM_PROCESSES", "COPE_PROCESS_ID"):
    env.pop(name)
  process = multiprocess.start(command, env, log_prefix)
  assert process.wait(TIMEOUT) == 0, process.stderr[-3000:]
  return process


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """One process x 8 devices, NUM_STEPS steps without a stop (checkpoints 3 and 6)."""
  root = tmp_path_factory.mktemp("uninterrupted")
  _run_single(_train(root / "run", tiny_prepared_dir, tiny_rope_dir), 8, str(root / "log"))
  return root / "run"


def _assert_resumed_intact(workdir, process, step):
  assert f"resumed from {workdir}/checkpoints/{step}" in process.stdout
  assert "is damaged" not in process.stdout + process.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "damaged"))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [8, 4])
def test_two_process_checkpoint_resumes_on_one_process(stopped_by_sigterm, uninterrupted,
                                                       tiny_prepared_dir, tiny_rope_dir,
                                                       tmp_path, devices):
  stopped, _ = stopped_by_sigterm
  step = _logged_steps(stopped)[-1]
  workdir = shutil.copytree(stopped, tmp_path / "run")
  process = _run_single(_train(workdir, tiny_prepared_dir, tiny_rope_dir), devices,
                        str(tmp_path / "log"))
  _assert_resumed_intact(workdir, process, step)
  assert _final_loss(workdir) == pytest.approx(_final_loss(uninterrupted), rel=1e-4)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_that_train_as_one_mesh_and_agree(
    uninterrupted, tiny_prepared_dir, tiny_rope_dir, tmp_path):
  workdir = shutil.copytree(uninterrupted, tmp_path / "run")
  shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))  # from step 3, on 2 x 4
  os.remove(workdir / "metrics.jsonl")
  processes = multiprocess.start_two_processes(
      _train(workdir, tiny_prepared_dir, tiny_rope_dir, *FAST), str(tmp_path / "log"))
  for process in processes:
    assert process.wait(TIMEOUT) == 0, process.stderr[-3000:]
  _assert_resumed_intact(workdir, processes[0], 3)
  assert _final_loss(workdir) == pytest.approx(_final_loss(uninterrupted), rel=1e-4)
  results = []
  for process in processes:
    lines = process.stdout.splitlines()  # only the job's own lines: no [Gloo] connection lines
    assert all(not line.startswith("[Gloo]") for line in lines), process.stdout
    results.append(json.loads([line for line in lines if line.startswith("{")][-1]))
  assert sorted(r["process_index"] for r in results) == [0, 1]
  losses = [r["final_metrics"]["loss"] for r in results]
  assert abs(losses[0] - losses[1]) <= 1e-6 * max(1.0, abs(losses[0]))
  # One checkpoint for both hosts, holding each host's data-iterator state.
  data_dir = workdir / "checkpoints" / str(NUM_STEPS) / "data"
  iterator_states = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  assert iterator_states == ["process_0-of-2.json", "process_1-of-2.json"]


# ---- missing, killed and failing processes --------------------------------------------


@pytest.mark.slow
def test_a_missing_process_at_start_up_is_one_paragraph(tiny_prepared_dir, tiny_rope_dir,
                                                        tmp_path):
  env = multiprocess.process_env(0, multiprocess.portpicker.pick_unused_port())
  process = multiprocess.start(
      _train(tmp_path / "run", tiny_prepared_dir, tiny_rope_dir,
             "--config.distributed.initialization_timeout=5"), env, str(tmp_path / "log"))
  assert process.wait(TIMEOUT) != 0
  lines = process.stderr_lines()
  assert lines[0].startswith("waiting for 2 processes at 127.0.0.1:")
  assert lines[-2].startswith("error: PeerLostError: process 0 of 2 was ended by JAX's "
                              "distributed runtime: not all 2 processes connected")
  assert "within 5 s (config.distributed.initialization_timeout)" in lines[-2]
  assert _no_trace(process.stderr)


@pytest.mark.slow
def test_a_killed_peer_ends_training_on_the_other_naming_it(tiny_prepared_dir, tiny_rope_dir,
                                                            tmp_path):
  workdir = tmp_path / "run"
  processes = multiprocess.start_two_processes(
      _train(workdir, tiny_prepared_dir, tiny_rope_dir, *FAST), str(tmp_path / "log"))
  _wait_for(lambda: len(_logged_steps(workdir)) >= 1, processes)
  processes[1].popen.send_signal(signal.SIGKILL)
  killed = time.monotonic()
  status = processes[0].wait(TIMEOUT)
  assert status != 0
  assert time.monotonic() - killed < 60  # JAX's heartbeat timeout here: 5 s
  last = "\n".join(processes[0].stderr_lines()[-2:])
  assert "process 1 of 2" in last and "error: PeerLostError" in last, last
  assert _no_trace(processes[0].stderr) and "Gloo" not in last


def _export(workdir, prepared_dir, rope_dir, out):
  return [sys.executable, "-m", "cope_jax.export", "--config", CONFIG, "--workdir",
          str(workdir), "--out", str(out), *FAST,
          *tiny_configs.command_line_overrides(prepared_dir, rope_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["killed", "failed"])
def test_a_peer_lost_during_export_ends_the_other_naming_it(uninterrupted, tiny_prepared_dir,
                                                            tiny_rope_dir, tmp_path, ending):
  out = tmp_path / "export"
  command = _export(uninterrupted, tiny_prepared_dir, tiny_rope_dir, out)
  # "failed": process 1 cannot write a file over 1 KiB (its Parquet files are larger).
  process_1 = (multiprocess.with_file_size_limit(command, 1024) if ending == "failed"
               else command)
  processes = multiprocess.start_two_processes(command, str(tmp_path / "log"),
                                               commands=(command, process_1))
  if ending == "killed":  # once the processes share the staging folder
    _wait_for(lambda: os.path.isdir(tmp_path / ".export.staging-shared"), processes)
    processes[1].popen.send_signal(signal.SIGKILL)
  assert processes[0].wait(TIMEOUT) != 0
  assert processes[1].wait(TIMEOUT) != 0
  last = "\n".join(processes[0].stderr_lines()[-2:])
  assert "error: PeerLostError" in last and "process 1 of 2" in last, last
  if ending == "failed":
    assert "process 1 of 2 failed: " in last and "File too large" in last, last
  assert _no_trace(processes[0].stderr) and "Gloo" not in last
  assert not os.path.exists(out / "manifest.json")  # no export was swapped in
