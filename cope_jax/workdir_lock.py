"""One writer per workdir: an exclusive `fcntl.flock` on `WORKDIR/.lock`.

  with workdir_lock.hold(workdir, "train"):    # refuses if another process holds it
    ...                                        # checkpoints, metrics.jsonl, eval/

The lock file holds one JSON line naming the holder (host, pid, what it runs, when it
started), so that a refused run can say who is in the way. The lock itself is the
kernel's: it goes with the holder's last open descriptor, so a holder killed with -9
leaves the file but not the lock, and the next run takes it over and rewrites the line.

Within one process the lock is re-entrant (training's periodic evaluation writes the
same workdir): a second `hold` of a held workdir only counts. A child made by `fork`
(data-loader workers) closes its copy of the descriptor, so a worker outliving a killed
holder does not keep the workdir locked.

Several hosts: only process 0 writes a workdir's outputs (metrics, evaluation, exports),
so only it takes the lock (`enabled=False` elsewhere). On NFS, `flock` is emulated with
byte-range (POSIX) locks by Linux clients since 2.6.12, so two hosts exclude each other
as long as the server implements NLM/NFSv4 locking; a client that loses its lease (a
network partition longer than the lease time) may lose the lock without being told. On
filesystems without lock support `flock` fails and the run stops with that error rather
than writing unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from cope_jax.base import workdir as workdir_layout

LOCK_FILE = workdir_layout.LOCK_FILE


class WorkdirLockedError(RuntimeError):
  """Another process writes this workdir."""


_held: dict[str, list] = {}  # real path of the lock file -> [descriptor, hold count]
_guard = threading.Lock()


def _close_in_child() -> None:
  for fd, _ in _held.values():
    try:
      os.close(fd)
    except OSError:
      pass
  _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _describe_holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.loads(f.readline())
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["start_time"]))
    return (f"pid {holder['pid']} on host {holder['host']} ({holder['role']}, started "
            f"{started})")
  except (OSError, ValueError, KeyError, TypeError):
    return "another process (its description in the lock file is unreadable)"


def acquire(workdir: str, role: str) -> None:
  """Takes the lock of `workdir` (created if needed) or raises WorkdirLockedError."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  with _guard:
    if path in _held:
      _held[path][1] += 1
      return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise WorkdirLockedError(
            f"{workdir} is in use by {_describe_holder(path)}: only one process may "
            "write a workdir at a time. Wait for it to end (or stop it), or use another "
            f"--workdir. Lock file: {path}") from None
      raise OSError(error.errno, f"cannot lock {path}: {error.strerror}") from error
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "role": role,
              "start_time": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode("utf-8"), 0)
    _held[path] = [fd, 1]


def release(workdir: str) -> None:
  """Releases one hold of `workdir`'s lock (the last one unlocks it)."""
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  with _guard:
    entry = _held.get(path)
    if entry is None:
      return
    entry[1] -= 1
    if entry[1] == 0:
      del _held[path]
      os.close(entry[0])  # the kernel drops the flock with the last descriptor


@contextlib.contextmanager
def hold(workdir: str, role: str, enabled: bool = True) -> Iterator[None]:
  """The lock of `workdir` for the body (nothing when `enabled` is False)."""
  if not enabled:
    yield
    return
  created = not os.path.exists(workdir)
  acquire(workdir, role)
  try:
    yield
  finally:
    release(workdir)
    if created:
      _remove_if_only_the_lock(workdir)


def _remove_if_only_the_lock(workdir: str) -> None:
  """Removes a workdir this job created and left holding nothing but its lock file (a
  job that failed before it wrote anything: a mistyped --workdir leaves no folder)."""
  try:
    if os.listdir(workdir) == [LOCK_FILE]:
      os.remove(os.path.join(workdir, LOCK_FILE))
      os.rmdir(workdir)
  except OSError:
    pass  # another job took it over meanwhile
