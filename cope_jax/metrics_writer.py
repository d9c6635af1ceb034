"""Training metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing. A run that
resumes from step N first drops the log's records of steps after N (written by a run
killed after its last checkpoint, and about to be logged again) and a half-written last
line, so that each step appears once.
"""

from __future__ import annotations

import json
import os
import time

from cope_jax.base import workdir as workdir_layout
from cope_jax.base import result_files


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
    """`start_step`: the step the run starts from; later records are dropped."""
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = workdir_layout.training_log(workdir)
    _drop_records_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._tensorboard = SummaryWriter(workdir_layout.tensorboard_dir(workdir))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(result_files.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _drop_records_after(path: str, start_step: int | None) -> None:
  """Rewrites `path` (whole) without records of steps after `start_step` and without an
  undecodable line; leaves it alone when there is nothing to drop."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # half a line: the write of a killed run
    if not line.endswith("\n"):
      continue
    if start_step is not None and int(record.get("step", 0)) > start_step:
      continue
    kept.append(line)
  if len(kept) != len(lines):
    result_files.write_text(path, "".join(kept))


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The records of `WORKDIR/metrics.jsonl` in file order ([] when there is none)."""
  path = workdir_layout.training_log(workdir)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue  # a half-written last line of a killed run
  return records
