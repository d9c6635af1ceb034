"""The ledger of `data_pipelines.download`: report, failure lines, verified files.

Files in ROPE_DIR (the module docstring of `download` lists their fields):
  download_report.json      counts, failures by reason, options; written atomically when
                            a run starts and when it ends
  download_failures.jsonl   one line per image that failed in this run, written as
                            failures happen
  download_verified.u64     the files that were fully decoded once, so that a rerun
                            checks them cheaply (`VerifiedFiles`)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
import time

import numpy as np

from cope_jax.base import result_files
from cope_jax.base import progress as progress_display
from data_pipelines import rope_format

REPORT_NAME = rope_format.DOWNLOAD_REPORT
FAILURES_NAME = "download_failures.jsonl"
VERIFIED_NAME = "download_verified.u64"
_KEY_BYTES = 8
_FLUSH_EVERY = 1024


class VerifiedFiles:
  """Which image files in OUT were fully decoded after they were last written.

  One 64-bit key per file: the first 8 bytes of BLAKE2b over (OUT, name, size,
  mtime_ns), appended little-endian to `download_verified.u64` in ROPE_DIR. A file whose
  current (size, mtime) gives a known key was decoded whole and has not been rewritten
  since, so a rerun only checks its size and JPEG header and trailer
  (`images.quick_check`). Eight bytes a file: 80M files take 640 MB on disk and in
  memory (sorted keys, looked up with a binary search).

  A false match (two different files with one key) has a probability of about
  n^2 / 2^65 (1e-4 at 80M files) and costs only the full decode of that one file, which
  `--verify full` redoes for every file. A kill -9 loses at most the keys not yet
  flushed (those files are decoded again on the rerun); a torn last key is dropped.
  Thread-safe.
  """

  def __init__(self, path: str, out: str):
    self._path = path
    self._prefix = os.path.abspath(out).encode("utf-8") + b"\0"
    data = b""
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
    whole = len(data) - len(data) % _KEY_BYTES
    self._known = np.unique(np.frombuffer(data[:whole], dtype="<u8"))
    self._lock = threading.Lock()
    self._pending: list[int] = []
    self._file = open(path, "r+b" if data else "wb")
    self._file.truncate(whole)  # a torn last key, from a killed run
    self._file.seek(whole)
    self.added = 0

  def key(self, name: str, stat: os.stat_result) -> int:
    digest = hashlib.blake2b(self._prefix + name.encode("utf-8")
                             + f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode(),
                             digest_size=_KEY_BYTES).digest()
    return int.from_bytes(digest, "little")

  def known(self, keys: list[int]) -> np.ndarray:
    """bool [len(keys)]: which keys were recorded (by earlier runs)."""
    keys_array = np.asarray(keys, dtype=np.uint64)
    if not len(self._known) or not len(keys_array):
      return np.zeros(len(keys_array), bool)
    positions = np.minimum(np.searchsorted(self._known, keys_array), len(self._known) - 1)
    return self._known[positions] == keys_array

  def add(self, key: int) -> None:
    with self._lock:
      self._pending.append(key)
      self.added += 1
      if len(self._pending) >= _FLUSH_EVERY:
        self._flush()

  def _flush(self) -> None:
    if self._pending:
      self._file.write(np.asarray(self._pending, dtype="<u8").tobytes())
      self._file.flush()
      self._pending = []

  def close(self) -> None:
    with self._lock:
      self._flush()
      self._file.close()


class Ledger:
  """Counts, the failure lines and the progress bar of one run."""

  def __init__(self, rope_dir: str, options, splits: list[str], plan, progress: bool):
    """`options`: the run's `download.Options`; `plan`: its `download.PlanCounts`."""
    self.report_path = os.path.join(rope_dir, REPORT_NAME)
    self.failures_path = os.path.join(rope_dir, FAILURES_NAME)
    self._options = options
    self._splits = splits
    self._plan = plan
    self.downloaded = self.already_present = self.failed = self.bytes = 0
    self.checked_quickly = self.checked_by_decode = 0
    self.failed_by_reason: collections.Counter = collections.Counter()
    self._start = time.monotonic()
    self._failures = open(self.failures_path, "w", encoding="utf-8")
    self._bar = progress_display.bar(plan.requests, desc="download", unit="file",
                                     disable=not progress, smoothing=0.05)
    self._last_postfix = 0.0
    self.write_report("running")

  def _advance(self, count: int = 1) -> None:
    self._bar.update(count)
    now = time.monotonic()
    if now - self._last_postfix > 0.2 or self._bar.n == self._bar.total:
      self._last_postfix = now
      megabytes_per_s = self.bytes / max(now - self._start, 1e-9) / 1e6
      self._bar.set_postfix_str(f"{megabytes_per_s:.2f} MB/s, {self.failed} failed",
                                refresh=False)

  def stored(self, size: int) -> None:
    self.downloaded += 1
    self.bytes += size
    self._advance()

  def present(self, quickly: int, by_decode: int) -> None:
    """Files found complete: `quickly` by the quick check, `by_decode` decoded whole."""
    self.already_present += quickly + by_decode
    self.checked_quickly += quickly
    self.checked_by_decode += by_decode
    self._advance(quickly + by_decode)

  def failure(self, request, url: str | None, status: int | None, error: str,
              attempts: int, reason: str) -> None:
    """Records a failed image (`request`: a `download.ImageRequest`); `reason` is the
    short form counted in the report."""
    self.failed += 1
    self.failed_by_reason[reason] += 1
    line = {"file": request.file, "line": request.line, "id": request.id,
            "name": request.name, "url": url, "status": status, "error": error,
            "attempts": attempts}
    self._failures.write(json.dumps(line, ensure_ascii=False) + "\n")
    self._failures.flush()  # a killed run keeps every line written so far
    self._advance()

  def counts(self) -> dict:
    done = self.downloaded + self.already_present + self.failed
    return {"requested": self._plan.requests, "downloaded": self.downloaded,
            "already_present": self.already_present,
            "checked_quickly": self.checked_quickly,
            "checked_by_decode": self.checked_by_decode, "failed": self.failed,
            "not_attempted": self._plan.requests - done,
            "invalid_names": self._plan.invalid_names,
            "duplicate_names": self._plan.duplicate_names,
            "frames_skipped_by_sampling": self._plan.frames_skipped_by_sampling,
            "bytes": self.bytes}

  def write_report(self, status: str, message: str = "") -> dict:
    report = {"status": status, "message": message, "splits": self._splits,
              "counts": self.counts(),
              "failed_by_reason": dict(self.failed_by_reason.most_common()),
              "catalog_problems": self._plan.catalog_problems,
              "seconds": round(time.monotonic() - self._start, 2),
              "options": dataclasses.asdict(self._options),
              "failures_file": FAILURES_NAME}
    result_files.write_json(self.report_path, report, indent=1, sort_keys=False,
                            ensure_ascii=False)
    return report

  def close(self) -> None:
    self._bar.close()
    self._failures.close()
