"""Result files that are either complete and valid or not there at all.

- JSON is strict: `allow_nan=False`, NaN/Inf written as `null`, NumPy values as plain
  numbers and lists, so that any JSON reader (a browser's `JSON.parse`) accepts it.
- A file is written under a temporary name in its folder, flushed to disk, then renamed
  over the old one (`os.replace` is atomic on one filesystem): a crash leaves the old
  file or the new one, never half of one. A failed write (a full disk, a file-size
  limit) raises `ResultWriteError` naming the file, removes the temporary file and
  leaves the old one in place; temporary files of a writer killed part-way are removed
  by the next write of the same file.
- Files get the permissions of the user's umask (0644 under the usual 022), as `open`
  would give them, not the 0600 of `tempfile`.
- `staged_directory` writes a set of files into a staging folder and moves them into
  place only when every one of them was written; `replaced_directory` swaps a whole
  folder. Staging folders of an interrupted write are removed by the next one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


def strict(value: Any) -> Any:
  """`value` with NaN/Inf as None, NumPy/JAX scalars and arrays as numbers and lists."""
  if isinstance(value, Mapping):
    return {str(key): strict(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(item) for item in value]
  if isinstance(value, np.ndarray):
    return strict(value.tolist())
  if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):  # jax.Array
    return strict(np.asarray(value))
  if isinstance(value, np.generic):
    return strict(value.item())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps(value: Any, **kwargs) -> str:
  """Strict JSON text of `value` (see `strict`)."""
  return json.dumps(strict(value), allow_nan=False, **kwargs)


class ResultWriteError(OSError):
  """A result file could not be written; the message names it. The previous version of
  the file (or folder) is still in place."""


def file_mode() -> int:
  """The mode `open` gives a new file under the current umask (0o644 under 022)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return 0o666 & ~int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)  # no other way to read it: set, then restore at once
  os.umask(mask)
  return 0o666 & ~mask


def write_error(path: str, error: OSError) -> ResultWriteError:
  """`error` as a ResultWriteError naming `path` (the errno kept)."""
  if isinstance(error, ResultWriteError):
    return error
  reason = error.strerror or str(error)
  return ResultWriteError(error.errno or 0, f"could not write {path}: {reason}")


def _temporary_prefix(path: str) -> str:
  return f".{os.path.basename(path)}."


def _remove_stale_temporaries(path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  prefix = _temporary_prefix(path)
  with contextlib.suppress(OSError):
    for entry in os.listdir(directory):
      if entry.startswith(prefix) and entry.endswith(".tmp"):
        with contextlib.suppress(OSError):
          os.remove(os.path.join(directory, entry))


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; once the body has written it, it is flushed
  to disk and renamed over `path`. If the body raises, `path` is untouched and the
  temporary file removed; an OSError becomes a ResultWriteError naming `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path),
                                         suffix=".tmp")
    os.close(handle)
  except OSError as error:
    raise write_error(path, error) from None
  try:
    yield temporary
    with open(temporary, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(temporary, file_mode())
    os.replace(temporary, path)
  except OSError as error:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise write_error(path, error) from None
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (temporary file in the same folder, then rename)."""
  with staged_file(path) as temporary:
    with open(temporary, "wb") as f:
      f.write(data)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (temporary file in the same folder, then rename)."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Any, indent: int | None = 2, sort_keys: bool = True,
               **kwargs) -> None:
  """Writes strict JSON to `path` atomically."""
  write_text(path, dumps(value, indent=indent, sort_keys=sort_keys, **kwargs) + "\n")


def append_json_line(path: str, value: Any) -> None:
  """Appends one strict JSON object as a line of a JSON-lines file.

  A failed append (a full disk) cuts the file back to its length before, so that it
  never ends in half a line.
  """
  line = (dumps(value, sort_keys=True) + "\n").encode("utf-8")
  try:
    with open(path, "ab") as f:
      size = f.tell()
      try:
        f.write(line)
        f.flush()
      except OSError:
        f.truncate(size)
        raise
  except OSError as error:
    raise write_error(path, error) from None


def _staging_name(final_dir: str) -> str:
  parent, name = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f".{name}.staging-{os.getpid()}")


@contextlib.contextmanager
def _fresh_staging(final_dir: str) -> Iterator[str]:
  """A new, empty staging folder beside `final_dir` (stale ones removed first), removed
  again if the body raises."""
  remove_stale_staging(final_dir)
  staging = _staging_name(final_dir)
  os.makedirs(staging)
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def recover_interrupted_swap(final_dir: str) -> None:
  """A folder swap interrupted between its two renames left the complete old folder
  aside and none in place: puts it back."""
  parent, name = os.path.split(os.path.abspath(final_dir))
  if not os.path.isdir(parent) or os.path.exists(final_dir):
    return
  aside = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.old-"))
  if aside:
    os.replace(os.path.join(parent, aside[0]), final_dir)


def remove_stale_staging(final_dir: str) -> None:
  """Removes staging folders of `final_dir` left by an interrupted write (after putting
  back the old folder of an interrupted swap)."""
  parent, name = os.path.split(os.path.abspath(final_dir))
  if not os.path.isdir(parent):
    return
  recover_interrupted_swap(final_dir)
  for entry in os.listdir(parent):
    if entry.startswith(f".{name}.staging-") or entry.startswith(f".{name}.old-"):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _settle(staging: str) -> list[tuple[str, str]]:
  """Flushes every file of `staging` to disk; returns [(path relative to `staging`,
  path)]. (Their modes are the umask's already: `staged_file` sets those of the files it
  makes, `open` those of the others.)"""
  files = []
  for root, _, names in os.walk(staging):
    for name in names:
      path = os.path.join(root, name)
      try:
        handle = os.open(path, os.O_RDONLY)
        try:
          os.fsync(handle)
        finally:
          os.close(handle)
      except OSError as error:
        raise write_error(path, error) from None
      files.append((os.path.relpath(path, staging), path))
  return files


@contextlib.contextmanager
def staged_directory(final_dir: str, last: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields an empty staging folder; on success its files replace those of `final_dir`.

  Files of `final_dir` that the staging folder does not hold are kept (an appended log,
  say). If the body raises, the staging folder is removed and `final_dir` is untouched.
  The move is one `os.replace` per file, after every file has been written and flushed
  to disk; the files named in `last` (paths relative to the folder: the one a reader
  looks for first, such as metrics.json) are moved after all others.
  """
  with _fresh_staging(final_dir) as staging:
    yield staging
    moves = _settle(staging)
  moves.sort(key=lambda move: move[0] in last)
  os.makedirs(final_dir, exist_ok=True)
  for relative, source in moves:
    target = os.path.join(final_dir, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(source, target)
  shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replaced_directory(final_dir: str) -> Iterator[str]:
  """Yields an empty folder that replaces `final_dir` as a whole once the body succeeds.

  The old folder is renamed aside, the new one renamed into place, then the old one is
  removed; if the body raises, `final_dir` is untouched.
  """
  with _fresh_staging(final_dir) as staging:
    yield staging
    swap_in(staging, final_dir)


# ---- a folder staged across runs and processes ------------------------------------------


def shared_staging_path(final_dir: str) -> str:
  """The staging folder of `final_dir` that every process of a job writes into (and a
  resumed job continues): `.<name>.staging-shared` beside it."""
  parent, name = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f".{name}.staging-shared")


def _link_tree(source: str, target: str) -> None:
  if os.path.isdir(source) and not os.path.islink(source):
    os.makedirs(target, exist_ok=True)
    for entry in os.listdir(source):
      _link_tree(os.path.join(source, entry), os.path.join(target, entry))
    return
  try:
    os.link(source, target)  # the same file: nothing copied, nothing rewritten
  except OSError:
    shutil.copy2(source, target)


def link_entries(source_dir: str, target_dir: str, keep) -> list[str]:
  """Hard-links (or copies) each entry `keep(name)` accepts of `source_dir` into
  `target_dir`, unless there already; returns the names linked. The originals are not
  touched, so an interruption loses nothing."""
  linked = []
  if not os.path.isdir(source_dir):
    return linked
  os.makedirs(target_dir, exist_ok=True)
  for entry in sorted(os.listdir(source_dir)):
    target = os.path.join(target_dir, entry)
    if keep(entry) and not os.path.lexists(target):
      try:
        _link_tree(os.path.join(source_dir, entry), target)
      except OSError as error:
        raise write_error(target, error) from None
      linked.append(entry)
  return linked


def swap_in(staging: str, final_dir: str) -> None:
  """Makes the complete folder `staging` `final_dir`: flushed, the old folder renamed
  aside, the new one renamed into place, the old one removed."""
  _settle(staging)
  parent, name = os.path.split(os.path.abspath(final_dir))
  old = os.path.join(parent, f".{name}.old-{os.getpid()}")
  if os.path.exists(final_dir):
    os.replace(final_dir, old)
  os.replace(staging, final_dir)
  shutil.rmtree(old, ignore_errors=True)
