"""Training metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import time

from cope_jax import result_files


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The records of `WORKDIR/metrics.jsonl` in file order ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
