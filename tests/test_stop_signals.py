"""SIGINT and SIGTERM for every program (`cope_jax/base/stop_signals.py`): the first stops
the job cleanly (exit 130 or 143, or at the training loop's step boundary), a second one
at once; an inherited "ignore SIGINT" does not make Ctrl-C useless; forked workers leave
the signal to the job."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cope_jax.base import command_line
from cope_jax.base import stop_signals

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A command whose job prints "ready" and waits; the mode is in STOP_TEST_MODE:
# "immediate" (the default handling), "deferred" (as the training loop runs) or "fork"
# (it forks a worker that sleeps 3 s, then waits for it).
PROGRAM = textwrap.dedent("""
    import os, signal, time
    if os.environ.get("STOP_TEST_IGNORE_SIGINT"):  # as a shell starts a background job
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    from cope_jax.base import command_line, stop_signals

    def job(args):
      mode = os.environ["STOP_TEST_MODE"]
      if mode == "fork":
        child = os.fork()
        if child == 0:
          time.sleep(3)
          os._exit(0)
        print("ready", child, flush=True)
        _, status = os.waitpid(child, 0)
        print("worker status", status, flush=True)
        return 0
      if mode == "deferred":
        with stop_signals.active().deferred():
          print("ready", flush=True)
          while True:
            time.sleep(0.05)
      print("ready", flush=True)
      time.sleep(60)

    command_line.run(command_line.Command("prog", "A test program."), job, None)
""")


def _start(mode: str, ignore_sigint: bool = False) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, STOP_TEST_MODE=mode)
  if ignore_sigint:
    env["STOP_TEST_IGNORE_SIGINT"] = "1"
  process = subprocess.Popen(
      [sys.executable, "-c", PROGRAM], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  line = process.stdout.readline()
  assert line.startswith("ready"), (line, process.stderr.read())
  return process, line


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_command_with_its_status(signum, status):
  process, _ = _start("immediate", ignore_sigint=True)
  sent = time.monotonic()
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == status
  assert time.monotonic() - sent < 30
  assert stderr.strip().splitlines()[-1] == f"stopped by {signal.Signals(signum).name}"


def test_deferred_signal_waits_and_a_second_one_stops_at_once():
  process, _ = _start("deferred")
  process.send_signal(signal.SIGTERM)
  time.sleep(1.0)
  assert process.poll() is None  # deferred: the job goes on
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == -signal.SIGTERM  # ended by the signal itself
  assert "SIGTERM: finishing the step in flight" in stderr


def test_a_forked_worker_leaves_the_signal_to_the_job():
  process, line = _start("fork")
  worker = int(line.split()[1])
  os.kill(worker, signal.SIGTERM)  # the worker inherited the handler: it ignores this one
  stdout, _ = process.communicate(timeout=60)
  assert "worker status 0" in stdout
  assert process.returncode == 0


def test_in_process_first_signal_raises_then_the_default_action_is_restored():
  previous = signal.getsignal(signal.SIGTERM)
  with stop_signals.StopSignals() as signals:
    assert stop_signals.active() is signals
    with pytest.raises(stop_signals.Stopped) as stopped:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)  # the handler runs in this thread, at the next bytecode
    assert stopped.value.status == 143 and signals.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one would kill
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
  assert signal.getsignal(signal.SIGTERM) == previous
  assert stop_signals.active() is None


def test_deferred_request_is_recorded_and_announced_once():
  lines = []
  signals = stop_signals.StopSignals(announce=lines.append)
  with signals.deferred():
    signals.request(signal.SIGINT)
    signals.request(signal.SIGINT)
  assert signals.requested and signals.name == "SIGINT"
  assert len(lines) == 1 and "SIGINT: finishing the step in flight" in lines[0]
  with pytest.raises(stop_signals.Stopped) as stopped:
    signals.request(signal.SIGINT)  # outside `deferred`: raised
  assert stopped.value.status == 130


def test_command_line_turns_stopped_into_its_status():
  def job(args):
    raise stop_signals.Stopped(signal.SIGTERM, "stopped at step 7 by SIGTERM; checkpoint saved")

  with pytest.raises(command_line.CommandExit) as ended:
    command_line.run(command_line.Command("prog", "A test program."), job, [])
  assert ended.value.code == 143
  assert str(ended.value) == "stopped at step 7 by SIGTERM; checkpoint saved"
