"""Multi-process jobs: start-up, stopping at one agreed step, and losing a peer.

Start-up (`maybe_initialize`, before a job runs). Exactly these are read, the environment
before the config:

  COPE_DISTRIBUTED=1|0                  switch on (or off) multi-process start-up
  COPE_COORDINATOR_ADDRESS=host:port    process 0's address; setting it switches start-up
  COPE_NUM_PROCESSES=N                  on (as JAX_COORDINATOR_ADDRESS does)
  COPE_PROCESS_ID=i
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID   the same, JAX's names
  config.distributed.enabled / coordinator_address / num_processes / process_id
  config.distributed.initialization_timeout / heartbeat_timeout / shutdown_timeout

`enabled` with no address anywhere lets JAX discover the cluster (TPU pods, SLURM, Open
MPI). A job that is told of several processes while start-up is off refuses to run (it
would train as an independent single process), and so does one that finds another
process count than it was told. Each process prints who it waits for; a process that
does not come within `initialization_timeout` ends every waiting one.

Stopping (`StepStop`, used by the training loop). On one process the stop is the signal
of `cope_jax/base/stop_signals.py`. Under `jax.distributed` the process that got the
signal posts it to the coordination service (which process, which signal) and raises
JAX's preemption notice; every process then asks JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`) after each step, which turns true on
the same step everywhere. JAX's own SIGTERM notifier (installed by
`jax.distributed.initialize`) is replaced by the job's handler, which raises the same
notice, so that SIGINT works too and a second signal stops at once.

Losing a peer. JAX's distributed runtime ends the other processes when one stops sending
heartbeats (`heartbeat_timeout`) or when process 0, which runs the coordination service,
is gone; a collective operation whose peer died fails at once. A process that fails
with an error posts it first, so that the others name it (`explain_failure`). The
runtime's fatal log ends with a C++ stack trace: `cope_jax/stderr_filter.py` keeps the
trace off the terminal and ends with a paragraph naming the lost process. Lines that the
collective library prints on stdout go to stderr, so that stdout holds the job's results.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import jax
import ml_collections

from cope_jax import stderr_filter
from cope_jax.base import stop_signals

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
# Defaults of the timeouts (seconds); JAX's own defaults.
DEFAULT_TIMEOUTS = {"initialization_timeout": 300, "heartbeat_timeout": 100,
                    "shutdown_timeout": 300}
# Where JAX's preemption sync manager listens for a notice: the key its SIGTERM notifier
# writes (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc), value the
# expected time of death (RFC 3339).
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
STOP_SIGNAL_KEYS = "cope_jax/stop_signal/"  # + process id -> signal name
FAILURE_KEYS = "cope_jax/failed/"  # + process id -> the error, one line


class DistributedConfigError(ValueError):
  """The settings of multi-process start-up contradict each other or are incomplete."""


class PeerLostError(RuntimeError):
  """Another process of a multi-process job died, was killed or failed."""


# ---- settings -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """What multi-process start-up uses, and where each value came from (for messages)."""
  enabled: bool
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  initialization_timeout: int
  heartbeat_timeout: int
  shutdown_timeout: int
  sources: dict[str, str]  # field -> "COPE_NUM_PROCESSES=2", "config.distributed...", ...


def _int_value(text: str, source: str) -> int:
  try:
    return int(str(text).strip())
  except ValueError:
    raise DistributedConfigError(f"{source}: {text!r} is not an integer") from None


def resolve_settings(config: ml_collections.ConfigDict | None,
                     environ: dict[str, str] | None = None) -> Settings:
  """The start-up settings from the environment and `config.distributed` (see the module
  docstring); DistributedConfigError for contradictions."""
  environ = dict(os.environ if environ is None else environ)
  section = (config.get("distributed") if config is not None else None) or {}
  sources: dict[str, str] = {}

  def first(field: str, env_names: tuple[str, ...]) -> Any:
    for name in env_names:
      if environ.get(name, "").strip():
        sources[field] = f"{name}={environ[name].strip()}"
        return environ[name].strip()
    if field in section:
      sources[field] = f"config.distributed.{field}={section[field]!r}"
      return section[field]
    return None

  switch = environ.get("COPE_DISTRIBUTED")
  if switch is not None and switch.strip().lower() not in TRUE_WORDS + FALSE_WORDS:
    raise DistributedConfigError(
        f"COPE_DISTRIBUTED={switch!r}: use 1 (multi-process start-up) or 0 (one process)")
  address = first("coordinator_address", ("COPE_COORDINATOR_ADDRESS",
                                          "JAX_COORDINATOR_ADDRESS"))
  num_processes = first("num_processes", ("COPE_NUM_PROCESSES", "JAX_NUM_PROCESSES"))
  process_id = first("process_id", ("COPE_PROCESS_ID", "JAX_PROCESS_ID"))
  if num_processes is not None:
    num_processes = _int_value(num_processes, sources["num_processes"])
  if process_id is not None:
    process_id = _int_value(process_id, sources["process_id"])
  if switch is not None and switch.strip().lower() in FALSE_WORDS:
    enabled, sources["enabled"] = False, f"COPE_DISTRIBUTED={switch.strip()}"
  elif switch is not None:
    enabled, sources["enabled"] = True, f"COPE_DISTRIBUTED={switch.strip()}"
  elif section.get("enabled", False):
    enabled, sources["enabled"] = True, "config.distributed.enabled=True"
  elif address:
    enabled, sources["enabled"] = True, sources["coordinator_address"]
  else:
    enabled = False
  timeouts = {}
  for field, default in DEFAULT_TIMEOUTS.items():
    value = section.get(field, default) if hasattr(section, "get") else default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
      raise DistributedConfigError(f"config.distributed.{field}: {value!r} must be a "
                                   "positive number of seconds")
    timeouts[field] = max(1, int(round(value)))

  if not enabled and (num_processes or 1) > 1:
    off = sources.get("enabled", "multi-process start-up is off (COPE_DISTRIBUTED, "
                      "COPE_COORDINATOR_ADDRESS and config.distributed.enabled are unset)")
    raise DistributedConfigError(
        f"{sources['num_processes']} says {num_processes} processes, but {off}: this "
        "process would train on its own, as an independent job. Set "
        "COPE_COORDINATOR_ADDRESS=host:port (process 0's address) on every process, or "
        "unset the process count for a one-process run.")
  if enabled and address:
    missing = [name for name, value in (("COPE_NUM_PROCESSES", num_processes),
                                        ("COPE_PROCESS_ID", process_id)) if value is None]
    if missing:
      raise DistributedConfigError(
          f"{sources['coordinator_address']} is set but {' and '.join(missing)} "
          "(or config.distributed.num_processes / process_id) are not: every process needs "
          "the process count and its own id")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedConfigError(
          f"{sources['process_id'] if 'process_id' in sources else 'process id'} "
          f"{process_id} is outside [0, {num_processes}) "
          f"({sources.get('num_processes', 'num_processes')})")
  if not address:  # JAX discovers the cluster: only explicit environment values count
    if not sources.get("num_processes", "").startswith(("COPE_", "JAX_")):
      num_processes = None
    if not sources.get("process_id", "").startswith(("COPE_", "JAX_")):
      process_id = None
  return Settings(enabled=enabled, coordinator_address=address or None,
                  num_processes=num_processes, process_id=process_id,
                  sources=sources, **timeouts)


# ---- start-up -----------------------------------------------------------------------


def maybe_initialize(config: ml_collections.ConfigDict | None,
                     keep_traces: bool = False) -> bool:
  """Initialises the JAX distributed runtime if asked (see the module docstring); returns
  whether it did. `keep_traces`: leave stderr unfiltered (--traceback)."""
  settings = resolve_settings(config)
  if not settings.enabled:
    return False
  # Cross-process collectives between CPU devices need an explicit implementation; the
  # setting does not touch accelerators. (No backend may be initialised before this point.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = settings.coordinator_address or "the address the cluster provides"
  count = settings.num_processes or "all"
  who = "" if settings.process_id is None else f"this is process {settings.process_id}; "
  print(f"waiting for {count} processes at {address} ({who}giving up after "
        f"{settings.initialization_timeout} s: config.distributed.initialization_timeout)",
        file=sys.stderr, flush=True)
  if not keep_traces:
    _filter_runtime_output(settings)
  jax.distributed.initialize(
      settings.coordinator_address, settings.num_processes, settings.process_id,
      initialization_timeout=settings.initialization_timeout,
      heartbeat_timeout_seconds=settings.heartbeat_timeout,
      shutdown_timeout_seconds=settings.shutdown_timeout)
  # jax.distributed.initialize installed JAX's SIGTERM notifier: the job's handler again.
  signals = stop_signals.active()
  if signals is not None:
    signals.install()
  if settings.num_processes is not None and jax.process_count() != settings.num_processes:
    raise DistributedConfigError(
        f"{settings.sources.get('num_processes')} says {settings.num_processes} processes "
        f"but JAX started {jax.process_count()}")
  return True


def _filter_runtime_output(settings: Settings) -> None:
  """stderr through `stderr_filter` (a child process that outlives an abort), and the
  stdout of libraries to stderr; Python's `sys.stdout` keeps the real stdout."""
  sys.stdout.flush()
  sys.stderr.flush()
  command = [sys.executable, os.path.abspath(stderr_filter.__file__),
             f"--process_id={-1 if settings.process_id is None else settings.process_id}",
             f"--num_processes={settings.num_processes or 0}",
             f"--address={settings.coordinator_address or ''}",
             f"--initialization_timeout={settings.initialization_timeout}",
             f"--heartbeat_timeout={settings.heartbeat_timeout}"]
  reader = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            close_fds=True)
  real_stdout = os.dup(1)
  os.dup2(reader.stdin.fileno(), 2)
  reader.stdin.close()
  os.dup2(2, 1)
  sys.stdout = io.TextIOWrapper(io.FileIO(real_stdout, "w"), encoding="utf-8",
                                line_buffering=True)


def is_multi_process() -> bool:
  # is_initialized first: process_count() would start a backend before initialisation.
  return jax.distributed.is_initialized() and jax.process_count() > 1


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


# ---- stopping at one step -----------------------------------------------------------


class StepStop:
  """Whether the training loop stops after a step: the same step on every process.

  begin(step) once before the first step, after(step) after each; `stopped(step)` is the
  `Stopped` to raise once the step is saved.
  """

  def __init__(self, signals: stop_signals.StopSignals | None):
    self._signals = signals
    self._multi = is_multi_process()
    self._posted = False

  def begin(self, step: int) -> bool:
    """True: stop before any step (one process, a signal during set-up)."""
    if not self._multi:
      return self._requested()
    _reached_sync_point(step)  # this process's step counter
    self._post_if_requested()
    return False

  def after(self, step: int) -> bool:
    if not self._multi:
      return self._requested()
    self._post_if_requested()
    return _reached_sync_point(step)

  @property
  def requested_here(self) -> bool:
    return self._requested()

  def _requested(self) -> bool:
    return self._signals is not None and self._signals.requested

  def _post_if_requested(self) -> None:
    if self._posted or not self._requested():
      return
    self._posted = True
    client = _client()
    client.key_value_set(f"{STOP_SIGNAL_KEYS}{jax.process_index()}", self._signals.name,
                         allow_overwrite=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    try:
      client.key_value_set(PREEMPTION_NOTICE_KEY, now)
    except Exception:  # pylint: disable=broad-except  # already there: another process's
      pass

  def _cause(self) -> tuple[int, str]:
    """(signal number, how to name it) of the stop."""
    if self._requested():
      return self._signals.signal_number, self._signals.name
    if self._multi:
      try:
        posted = sorted(_client().key_value_dir_get(STOP_SIGNAL_KEYS))
      except Exception:  # pylint: disable=broad-except
        posted = []
      if posted:
        key, name = posted[0]
        number = _signal_number(name)
        return number, f"{name} to process {key.rsplit('/', 1)[-1]}"
      return signal.SIGTERM, "a preemption notice (SIGTERM)"
    return signal.SIGTERM, "SIGTERM"

  def stopped(self, step: int, *, before_first_step: bool = False,
              finished: bool = False) -> stop_signals.Stopped:
    number, cause = self._cause()
    if before_first_step:
      what = (f"before training resumed from step {step} (that checkpoint is unchanged)"
              if step else "before the first step (nothing to save)")
      return stop_signals.Stopped(
          number, f"stopped by {cause} {what}; rerun the same command to resume")
    if finished:
      return stop_signals.Stopped(
          number, f"stopped by {cause} at step {step}, the last: training is complete and "
                  "its checkpoint saved", everywhere=self._multi)
    return stop_signals.Stopped(
        number, f"stopped at step {step} by {cause}; checkpoint saved; rerun the same "
                "command to resume", everywhere=self._multi)


def _reached_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
    return False


def _signal_number(name: str) -> int:
  return int(getattr(signal, name, signal.SIGTERM))


def after_stop(stop: stop_signals.Stopped) -> None:
  """Before a stopped multi-process job exits. Stopped everywhere (training's agreed step):
  JAX's shutdown barrier, so that process 0 (and its coordination service) leaves only
  once every process is done. Stopped here alone: the others are told why this process
  leaves (they stop on losing it, naming it)."""
  if not is_multi_process():
    return
  if stop.everywhere:
    jax.distributed.shutdown()
  else:
    _post_failure(stop)


# ---- losing a peer ------------------------------------------------------------------

_PEER_LOSS_WORDS = ("Gloo", "Connection closed by peer", "Connection reset by peer",
                    "UNAVAILABLE", "DEADLINE_EXCEEDED", "Barrier timed out", "heartbeat",
                    "Socket closed")


def explain_failure(error: BaseException) -> BaseException:
  """In a multi-process job: an error that says a peer was lost becomes a PeerLostError
  naming it; any other error is posted for the other processes to name. One process:
  `error` unchanged."""
  if not is_multi_process():
    return error
  text = f"{type(error).__name__}: {error}"
  if not any(word in text for word in _PEER_LOSS_WORDS):
    _post_failure(error)
    return error
  me, count = jax.process_index(), jax.process_count()
  failures = _posted_failures()
  if failures:
    named = "; ".join(f"process {pid} of {count} failed: {line}" for pid, line in failures)
  else:
    lost = _lost_processes(me, count)
    late = "DEADLINE_EXCEEDED" in text or "timed out" in text
    how = ("did not answer in time (it stopped, hangs or is far behind)" if late
           else "stopped (killed, crashed or unreachable)")
    named = (f"process {', '.join(map(str, lost))} of {count} {how}" if lost
             else f"another of the {count} processes {how}")
  return PeerLostError(f"{named}; process {me} stops too. Rerun the command on every "
                       "process (training resumes from its last complete checkpoint).")


def compile_together(jitted, *args, name: str, timeout_seconds: int):
  """`jitted` compiled for `args`, returned once every process has compiled it.

  A collective operation's first run waits only about 30 s for its peers to reach it
  (the collective library's set-up), and compile times differ between busy hosts: the
  barrier (of the coordination service, bounded by `initialization_timeout`) lets the
  first run start together. One process: compiled at once.
  """
  compiled = jitted.lower(*args).compile()
  if is_multi_process():
    _client().wait_at_barrier(f"cope_jax/compiled/{name}", int(timeout_seconds * 1000))
  return compiled


def _post_failure(error: BaseException) -> None:
  line = " ".join(f"{type(error).__name__}: {error}".split())[:300]
  try:
    _client().key_value_set(f"{FAILURE_KEYS}{jax.process_index()}", line,
                            allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except  # the service is gone: nothing to tell
    pass


def _posted_failures() -> list[tuple[int, str]]:
  try:
    entries = _client().key_value_dir_get(FAILURE_KEYS)
  except Exception:  # pylint: disable=broad-except
    return []
  me = jax.process_index()
  found = [(int(key.rsplit("/", 1)[-1]), line) for key, line in entries]
  return sorted((pid, line) for pid, line in found if pid != me)


def _lost_processes(me: int, count: int) -> list[int]:
  """The processes the coordination service no longer counts as alive: at once for two
  processes (the other one), else JAX's answer within its heartbeat timeout."""
  if count == 2:
    return [1 - me]
  answer: list[dict] = []

  def ask():
    answer.append(_client().get_live_nodes(list(range(count))))

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout=30)
  if not answer:
    return []
  return sorted(set(range(count)) - set(answer[0]))
