"""Runs one command as two JAX processes on localhost (4 fake CPU devices each), joined
by `jax.distributed` through the COPE_* variables that `cope_jax.distributed` reads (or
JAX's own names)."""

import dataclasses
import os
import subprocess

import portpicker

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(process_id: int, port: int, num_processes: int = 2, names: str = "COPE",
                devices: int = 4, **extra: str) -> dict[str, str]:
  """The environment of process `process_id`: `names` "COPE" (COPE_COORDINATOR_ADDRESS,
  ...) or "JAX" (COPE_DISTRIBUTED=1 with JAX_COORDINATOR_ADDRESS, ...)."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
    for prefix in ("COPE", "JAX"):
      env.pop(f"{prefix}_{name}", None)
  env.pop("COPE_DISTRIBUTED", None)
  env.update({f"{names}_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
              f"{names}_NUM_PROCESSES": str(num_processes),
              f"{names}_PROCESS_ID": str(process_id)})
  if names == "JAX":
    env["COPE_DISTRIBUTED"] = "1"
  env.update(extra)
  return env


@dataclasses.dataclass
class Process:
  """One started process; its output goes to files (no pipe can fill up)."""
  popen: subprocess.Popen
  stdout_path: str
  stderr_path: str

  def wait(self, timeout: float) -> int:
    return self.popen.wait(timeout=timeout)

  @property
  def stdout(self) -> str:
    with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def stderr_lines(self) -> list[str]:
    """stderr's lines, progress-bar updates (ended by carriage returns) apart."""
    return [line for line in self.stderr.replace("\r", "\n").splitlines() if line.strip()]


def start(command: list[str], env: dict[str, str], log_prefix: str,
          preexec_fn=None) -> Process:
  stdout_path, stderr_path = f"{log_prefix}.out", f"{log_prefix}.err"
  with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
    popen = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr,
                             preexec_fn=preexec_fn)
  return Process(popen, stdout_path, stderr_path)


def start_two_processes(command: list[str], log_prefix: str, names: str = "COPE",
                        preexec_fns=(None, None)) -> list[Process]:
  """Starts `command` as processes 0 and 1 of two (logs: `log_prefix`-<i>.out/.err)."""
  port = portpicker.pick_unused_port()
  return [start(command, process_env(i, port, names=names), f"{log_prefix}-{i}",
                preexec_fn=preexec_fns[i]) for i in range(2)]


def run_two_processes(command: list[str], timeout: float = 420) -> list[str]:
  """Runs `command` as processes 0 and 1 of two; returns their stdouts, in that order.

  Fails the test with the end of a process's stderr when it exits with an error.
  """
  port = portpicker.pick_unused_port()
  processes = []
  for process_id in range(2):
    processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=process_env(process_id, port),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
  stdouts = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    stdouts.append(stdout)
  return stdouts
