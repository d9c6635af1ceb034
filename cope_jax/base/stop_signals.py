"""SIGINT and SIGTERM for every program: stop cleanly on the first, at once on the second.

`command_line.run` installs a `StopSignals` for the duration of a job. Its handler reacts
to the first SIGINT (Ctrl-C) or SIGTERM (a scheduler: `scancel`, Kubernetes, a TPU
maintenance event) in one of two ways:

  immediate (the default)   raises `Stopped` in the main thread: the job unwinds through
                            its `finally` blocks, staged results are never swapped in, and
                            the program exits 130 (SIGINT) or 143 (SIGTERM);
  deferred (`deferred()`)   only records the signal: the training loop asks `requested`
                            after each step, saves the step it reached and raises `Stopped`
                            itself (`cope_jax/train.py`).

Either way the first signal restores the operating system's default action for both
signals, so a second one ends the process at once, wherever it is (even inside a long C++
call). What was completely written before stays: a half-written checkpoint step is a
temporary folder that the next run removes, as after `kill -9`.

The handler is installed explicitly, whatever the inherited disposition: a program started
in the background by a shell inherits SIGINT ignored, and `kill -INT` must still stop it.
Processes forked from the job (worker pools) inherit the handler but leave the signal to
the job (they ignore it); spawned workers call `ignore_in_worker` at start-up.

The installed `StopSignals` is process-wide, as signal dispositions are: `active()` returns
it to the training loop, which runs under the entry point that installed it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signal_number: int) -> int:
  """The shell's status of a program ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + int(signal_number)


def signal_name(signal_number: int) -> str:
  return signal.Signals(signal_number).name


class Stopped(KeyboardInterrupt):
  """The job stopped on a signal. `status`: the exit status; `str()`: the line to print;
  `everywhere`: every process of a multi-process job stops at this same point (the
  training loop's agreed step), rather than this one alone.

  A KeyboardInterrupt, so that `except Exception` in library code does not swallow it.
  """

  def __init__(self, signal_number: int, message: str | None = None,
               everywhere: bool = False):
    self.signal_number = int(signal_number)
    self.status = exit_status(signal_number)
    self.message = message or f"stopped by {signal_name(signal_number)}"
    self.everywhere = everywhere
    super().__init__(self.message)

  def __str__(self) -> str:
    return self.message


class StopSignals:
  """The SIGINT/SIGTERM handler of one job (see the module docstring).

  Use as a context manager around the job (`command_line.run` does); `request(signum)` does
  what a delivered signal does, for tests and for callers that learn of a stop otherwise.
  """

  def __init__(self, announce=None):
    """`announce(line)`: told once when a deferred stop is requested (default: stderr)."""
    self._owner_pid = os.getpid()
    self._deferred = 0
    self._previous: dict[int, object] = {}
    self._announce = announce or _write_stderr
    self.signal_number: int | None = None

  # ---- installation ------------------------------------------------------------------

  def __enter__(self) -> StopSignals:
    self.install()
    return self

  def __exit__(self, *exc_info) -> None:
    self.uninstall()

  def install(self) -> None:
    """Installs the handler for SIGINT and SIGTERM (again after a library replaced it, e.g.
    JAX's preemption notifier). Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
      return
    for signum in SIGNALS:
      previous = signal.signal(signum, self._handle if self.signal_number is None
                               else signal.SIG_DFL)
      self._previous.setdefault(signum, previous)
    _ACTIVE[:] = [self]

  def uninstall(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    if _ACTIVE and _ACTIVE[0] is self:
      _ACTIVE.clear()

  # ---- the signal ----------------------------------------------------------------------

  @property
  def requested(self) -> bool:
    """Whether a stop was requested (a signal arrived, or `request` was called)."""
    return self.signal_number is not None

  @property
  def name(self) -> str | None:
    return None if self.signal_number is None else signal_name(self.signal_number)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[StopSignals]:
    """Inside, a first signal only records itself (the caller polls `requested`). A
    signal that arrived before entering stays recorded."""
    self._deferred += 1
    try:
      yield self
    finally:
      self._deferred -= 1

  def request(self, signal_number: int) -> None:
    """What the first delivered signal does: record it, make the next one fatal, and
    (unless deferred) raise Stopped."""
    first = self.signal_number is None
    if first:
      self.signal_number = int(signal_number)
      if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
          if signum in self._previous:
            signal.signal(signum, signal.SIG_DFL)
    if not self._deferred:
      raise Stopped(signal_number)
    if first:
      self._announce(f"\n{signal_name(signal_number)}: finishing the step in flight, then "
                     "saving it (a second signal stops at once, without saving)")

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if os.getpid() != self._owner_pid:
      return  # a forked worker: the job itself stops it
    self.request(signum)


# The installed StopSignals, or empty: process-wide like the signal disposition it mirrors.
_ACTIVE: list[StopSignals] = []


def active() -> StopSignals | None:
  """The StopSignals installed by the running entry point, if any."""
  return _ACTIVE[0] if _ACTIVE else None


def ignore_in_worker(*unused_worker_info) -> None:
  """For worker processes (e.g. Grain's `worker_init_fn`): leave SIGINT and SIGTERM to the
  job, which stops its workers itself; a worker killed by Ctrl-C would fail the job instead
  of letting it stop at a step boundary."""
  for signum in SIGNALS:
    signal.signal(signum, signal.SIG_IGN)


def _write_stderr(line: str) -> None:
  # os.write, not print: a signal handler may run while the main thread is printing.
  try:
    os.write(2, (line + "\n").encode("utf-8", "replace"))
  except OSError:
    pass
