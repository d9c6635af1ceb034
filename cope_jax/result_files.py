"""Result files that are either complete and valid or not there at all.

- JSON is strict: `allow_nan=False`, NaN/Inf written as `null`, NumPy values as plain
  numbers and lists, so that any JSON reader (a browser's `JSON.parse`) accepts it.
- A file is written under a temporary name in its folder, flushed to disk, then renamed
  over the old one (`os.replace` is atomic on one filesystem): a crash leaves the old
  file or the new one, never half of one.
- `staged_directory` writes a set of files into a staging folder and moves them into
  place only when every one of them was written; `replaced_directory` swaps a whole
  folder.
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


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (temporary file in the same folder, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
  try:
    with os.fdopen(handle, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def write_json(path: str, value: Any, indent: int | None = 2, sort_keys: bool = True,
               **kwargs) -> None:
  """Writes strict JSON to `path` atomically."""
  write_text(path, dumps(value, indent=indent, sort_keys=sort_keys, **kwargs) + "\n")


def append_json_line(path: str, value: Any) -> None:
  """Appends one strict JSON object as a line of a JSON-lines file."""
  line = dumps(value, sort_keys=True) + "\n"
  with open(path, "a", encoding="utf-8") as f:
    f.write(line)
    f.flush()


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


def remove_stale_staging(final_dir: str) -> None:
  """Removes staging folders of `final_dir` left by an interrupted write."""
  parent, name = os.path.split(os.path.abspath(final_dir))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith(f".{name}.staging-") or entry.startswith(f".{name}.old-"):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final_dir: str) -> Iterator[str]:
  """Yields an empty staging folder; on success its files replace those of `final_dir`.

  Files of `final_dir` that the staging folder does not hold are kept (an appended log,
  say). If the body raises, the staging folder is removed and `final_dir` is untouched.
  The move is one `os.replace` per file, after every file has been written.
  """
  with _fresh_staging(final_dir) as staging:
    yield staging
  os.makedirs(final_dir, exist_ok=True)
  for root, _, files in os.walk(staging):
    relative = os.path.relpath(root, staging)
    target_root = os.path.normpath(os.path.join(final_dir, relative))
    os.makedirs(target_root, exist_ok=True)
    for name in files:
      os.replace(os.path.join(root, name), os.path.join(target_root, name))
  shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def replaced_directory(final_dir: str) -> Iterator[str]:
  """Yields an empty folder that replaces `final_dir` as a whole once the body succeeds.

  The old folder is renamed aside, the new one renamed into place, then the old one is
  removed; if the body raises, `final_dir` is untouched.
  """
  with _fresh_staging(final_dir) as staging:
    yield staging
  parent, name = os.path.split(os.path.abspath(final_dir))
  old = os.path.join(parent, f".{name}.old-{os.getpid()}")
  if os.path.exists(final_dir):
    os.replace(final_dir, old)
  os.replace(staging, final_dir)
  shutil.rmtree(old, ignore_errors=True)
