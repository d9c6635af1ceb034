"""One writer per workdir (`cope_jax.workdir_lock`): a second run refuses at start-up,
naming the holder; a lock left by a process killed with -9 is taken over."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import soak
from cope_jax import workdir_lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from cope_jax import workdir_lock
workdir_lock.acquire(sys.argv[1], "test holder")
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(workdir) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO_ROOT,
                             env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  return process


def test_a_second_holder_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by pid {holder.pid} on host .*\(test holder, started"):
      workdir_lock.acquire(str(tmp_path), "second")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
  # The lock file still names the killed holder; the kernel released its lock.
  with workdir_lock.hold(str(tmp_path), "after the kill"):
    with open(tmp_path / workdir_lock.LOCK_FILE, encoding="utf-8") as f:
      written = json.loads(f.readline())
    assert written["pid"] == os.getpid() and written["role"] == "after the kill"
    # Re-entrant within a process (training's periodic evaluation): only counted.
    with workdir_lock.hold(str(tmp_path), "nested"):
      pass
    # A forked child (a data-loader worker) does not keep the lock: it is still ours,
    # and gone once we release it even while the child lives.
    child = os.fork()
    if child == 0:
      time.sleep(3)
      os._exit(0)  # pylint: disable=protected-access
  probe = subprocess.run([sys.executable, "-c", "import sys; from cope_jax import "
                          "workdir_lock; workdir_lock.acquire(sys.argv[1], 'probe')",
                          str(tmp_path)], cwd=REPO_ROOT,
                         env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True,
                         text=True, timeout=60)
  os.waitpid(child, 0)
  assert probe.returncode == 0, probe.stderr


def test_disabled_hold_takes_no_lock(tmp_path):
  holder = _start_holder(tmp_path)
  try:
    with workdir_lock.hold(str(tmp_path), "process 1 of 2", enabled=False):
      pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()


def _wait_for(predicate, timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _metrics_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow
def test_two_trainings_on_one_workdir(tiny_prepared_dir, tiny_rope_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # The kill -9 soak's command (tests/test_reliability.py runs it first: its compiled step
  # is in the shared compilation cache).
  command = soak.train_command(workdir, tiny_prepared_dir, tiny_rope_dir, 4 * 5, 2)
  env = soak.subprocess_env(os.environ.get("JAX_COMPILATION_CACHE_DIR"))
  checkpoint_2 = os.path.join(workdir, "checkpoints", "2")
  first_out = tmp_path / "first.out"
  with open(first_out, "w", encoding="utf-8") as out:
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
  third = None
  try:
    # Once its checkpoint 2 is committed, the first run is frozen (SIGSTOP) holding the
    # lock, so that it is still running whenever the second one starts.
    _wait_for(lambda: os.path.isdir(checkpoint_2) or first.poll() is not None, 600,
              "the first run's checkpoint 2")
    first.send_signal(signal.SIGSTOP)
    assert first.poll() is None, first_out.read_text()[-3000:]
    steps_before = _metrics_steps(workdir)

    started = time.monotonic()
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    second_seconds = time.monotonic() - started
    print(f"the second run ended after {second_seconds:.1f} s")
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"is in use by pid {first.pid} on host" in second.stderr
    assert "error: WorkdirLockedError:" in second.stderr and "Traceback" not in second.stderr
    assert second_seconds < 60  # start-up (imports) and the lock: no compilation, no data
    assert "resumed from" not in second.stdout
    assert _metrics_steps(workdir) == steps_before  # it wrote nothing
    assert steps_before == sorted(set(steps_before)), steps_before

    first.send_signal(signal.SIGKILL)
    first.wait()
    third_out = tmp_path / "third.out"
    with open(third_out, "w", encoding="utf-8") as out:
      third = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    resumed = re.compile(r"resumed from .*/checkpoints/(\d+)")
    _wait_for(lambda: resumed.search(third_out.read_text()) or third.poll() is not None, 300,
              "the third run to resume")
    assert int(resumed.search(third_out.read_text()).group(1)) >= 2, third_out.read_text()
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE), encoding="utf-8") as f:
      assert json.loads(f.readline())["pid"] == third.pid
  finally:
    for process in (first, third):
      if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
