"""Runs one command as two JAX processes on localhost (4 fake CPU devices each), joined
by `jax.distributed` through the COPE_* variables that `cope_jax.distributed` reads (or
JAX's own names)."""

import dataclasses
import os
import subprocess
import sys
import threading

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
  """One started process. Its stdout and stderr are read to the end by threads (also what
  a child that outlives it, such as `cope_jax/stderr_filter.py`, writes there), and
  copied to `<log_prefix>.out/.err`."""
  popen: subprocess.Popen
  log_prefix: str
  _readers: list = dataclasses.field(default_factory=list)
  _texts: dict = dataclasses.field(default_factory=dict)

  def wait(self, timeout: float) -> int:
    """The exit status, once the process has ended and its outputs are read to the end."""
    status = self.popen.wait(timeout=timeout)
    for reader in self._readers:
      reader.join(timeout=60)
    return status

  @property
  def stdout(self) -> str:
    return "".join(self._texts.get("out", []))

  @property
  def stderr(self) -> str:
    return "".join(self._texts.get("err", []))

  def stderr_lines(self) -> list[str]:
    """stderr's lines, progress-bar updates (ended by carriage returns) apart."""
    return [line for line in self.stderr.replace("\r", "\n").splitlines() if line.strip()]


def _read_to_end(stream, chunks: list, log_path: str) -> None:
  with open(log_path, "w", encoding="utf-8") as log:
    for chunk in iter(lambda: stream.read(4096), ""):
      chunks.append(chunk)
      log.write(chunk)


def with_file_size_limit(command: list[str], max_bytes: int) -> list[str]:
  """`command` run with a file-size limit (as `ulimit -f`): a file cannot grow past
  `max_bytes` (a write beyond fails with EFBIG). The limit is set by a small Python that
  then becomes the command (no `preexec_fn` in the test's threaded process)."""
  setter = ("import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); "
            "os.execv(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", setter, *command]


def start(command: list[str], env: dict[str, str], log_prefix: str) -> Process:
  popen = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, errors="replace")
  process = Process(popen, log_prefix)
  for name, stream in (("out", popen.stdout), ("err", popen.stderr)):
    chunks = process._texts.setdefault(name, [])  # pylint: disable=protected-access
    reader = threading.Thread(target=_read_to_end, args=(stream, chunks,
                                                         f"{log_prefix}.{name}"), daemon=True)
    reader.start()
    process._readers.append(reader)  # pylint: disable=protected-access
  return process


def start_two_processes(command: list[str], log_prefix: str, names: str = "COPE",
                        commands: tuple[list[str], list[str]] | None = None
                        ) -> list[Process]:
  """Starts `command` (or `commands[i]`) as processes 0 and 1 of two (logs:
  `log_prefix`-<i>.out/.err)."""
  port = portpicker.pick_unused_port()
  commands = commands or (command, command)
  return [start(commands[i], process_env(i, port, names=names), f"{log_prefix}-{i}")
          for i in range(2)]


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
