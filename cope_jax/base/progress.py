"""Progress of a long loop: a bar on a terminal, a line every few percent in a log.

  bar = progress.bar(total=1200, desc="train", unit="step", initial=0)
  for ...:
    bar.update(1)
    bar.set_postfix(loss="1.234")
  bar.close()

On a terminal (stderr is a TTY) this is tqdm's bar. Otherwise (a log file, a pipe, a CI
console) carriage-return redraws would fill the log with thousands of partial lines, so
a plain line is printed each time another `every_percent` of the total is done (but not
within `min_seconds` of the previous line: a short loop prints only its end), and at the
end:

  train: 300/1200 step (25%), 8.1 step/s, 1:51 left; loss=17.373

`COPE_PROGRESS=bar|lines|off` forces one kind.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

import tqdm

PROGRESS_ENV = "COPE_PROGRESS"
EVERY_PERCENT = 10
MIN_SECONDS = 5.0


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineProgress:
  """tqdm's interface as far as this project uses it, printing whole lines."""

  def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
               every_percent: float = EVERY_PERCENT, min_seconds: float = MIN_SECONDS,
               stream: TextIO | None = None, disable: bool = False,
               clock: Callable[[], float] = time.monotonic):
    self.total = total
    self.n = initial
    self._desc = desc
    self._unit = unit
    self._every = max(1, round((total or 0) * every_percent / 100.0))
    self._next = (initial // self._every + 1) * self._every
    self._postfix = ""
    self._stream = stream
    self._min_seconds = min_seconds
    self._clock = clock
    self._start_time = clock()
    self._last_print_time = self._start_time
    self._start_n = initial
    self._closed = disable
    self.disable = disable

  def update(self, count: int = 1) -> None:
    if self._closed:
      return
    self.n += count
    finished = self.total is not None and self.n >= self.total
    if self.n >= self._next or finished:
      self._next = (self.n // self._every + 1) * self._every
      if finished or self._clock() - self._last_print_time >= self._min_seconds:
        self._print()

  def set_postfix(self, refresh: bool = True, **values: Any) -> None:
    self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())

  def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
    self._postfix = text

  def set_description(self, desc: str, refresh: bool = True) -> None:
    self._desc = desc

  def refresh(self) -> None:
    pass

  def _print(self) -> None:
    now = self._clock()
    self._last_print_time = now
    elapsed = now - self._start_time
    done = self.n - self._start_n
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{self.n}/{self.total} {self._unit}" if self.total else f"{self.n} {self._unit}"]
    if self.total:
      parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
    if rate > 0:
      parts.append(f"{rate:.3g} {self._unit}/s")
      if self.total and self.n < self.total:
        parts.append(f"{_format_seconds((self.total - self.n) / rate)} left")
    line = (f"{self._desc}: " if self._desc else "") + ", ".join(parts)
    if self._postfix:
      line += f"; {self._postfix}"
    stream = self._stream or sys.stderr
    print(line, file=stream, flush=True)

  def close(self) -> None:
    if not self._closed and self.total and self.n < self.total and self.n > self._start_n:
      self._print()  # where it stopped
    self._closed = True

  def __enter__(self) -> LineProgress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _kind(stream: TextIO) -> str:
  forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
  if forced in ("bar", "lines", "off"):
    return forced
  try:
    return "bar" if stream.isatty() else "lines"
  except (AttributeError, ValueError):
    return "lines"


def bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
        disable: bool = False, **tqdm_options: Any):
  """A progress display for `total` units: tqdm on a terminal, `LineProgress` otherwise.

  `tqdm_options` (e.g. unit_scale, smoothing) apply to the terminal bar only.
  """
  kind = "off" if disable else _kind(sys.stderr)
  if kind == "bar":
    return tqdm.tqdm(total=total, desc=desc or None, unit=unit, initial=initial,
                     dynamic_ncols=True, **tqdm_options)
  return LineProgress(total, desc=desc, unit=unit, initial=initial, disable=kind == "off")
