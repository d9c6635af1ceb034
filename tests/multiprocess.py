"""Runs one command as two JAX processes on localhost (4 fake CPU devices each), joined
by `jax.distributed` through the COPE_* variables that `cope_jax.sharding` reads."""

import os
import subprocess

import portpicker

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_processes(command: list[str], timeout: float = 420) -> list[str]:
  """Runs `command` as processes 0 and 1 of two; returns their stdouts, in that order.

  Fails the test with the end of a process's stderr when it exits with an error.
  """
  port = portpicker.pick_unused_port()
  processes = []
  for process_id in range(2):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               COPE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", COPE_NUM_PROCESSES="2",
               COPE_PROCESS_ID=str(process_id))
    processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  stdouts = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    stdouts.append(stdout)
  return stdouts
