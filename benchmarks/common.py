"""What every benchmark shares: its command line, the machine it ran on, its result file.

  PARSER = common.parser(__doc__, "restore.json")   # --out, default benchmarks/results/
  args = PARSER.parse_args(argv)
  ...
  print(common.table(["restore", "seconds"], [[name, f"{seconds:.3f}"], ...]))
  common.write_result(args.out, {"machine": common.machine(), ...})

A result is strict JSON (`result_files.write_json`: NaN as null, NumPy values as
numbers), written whole or not at all, so that a benchmark can rewrite it after every
row and a run stopped part-way keeps what it measured; its "machine" entry has the same keys in every
benchmark (`machine`).
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

from cope_jax.base import result_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


def result_path(name: str) -> str:
  """`name` in benchmarks/results/ of this checkout (whatever the working folder)."""
  return os.path.join(RESULTS_DIR, name)


def parser(doc: str, out: str = "", out_help: str = "") -> argparse.ArgumentParser:
  """An argument parser described by the first paragraph of `doc` (the module's
  docstring), with `--out`: default benchmarks/results/`out`; without `out` the default
  is "" and `out_help` says which file the benchmark picks."""
  description = " ".join(doc.strip().split("\n\n")[0].split())
  command = argparse.ArgumentParser(description=description)
  command.add_argument(
      "--out", default=result_path(out) if out else "",
      help=out_help or f"JSON file of the result (default benchmarks/results/{out})")
  return command


def machine(jax: bool = False, **extra: Any) -> dict[str, Any]:
  """The machine a benchmark ran on: cpu_count, platform, python and the 1-minute load
  average now (call it as the result is written); with `jax`, also jax_version, backend,
  device (the first device's kind) and device_count. `extra`: the benchmark's own keys
  (torch_version, ...)."""
  described = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(),
               "load_average_1min": round(os.getloadavg()[0], 2)}
  if jax:
    import jax as jax_lib  # pylint: disable=g-import-not-at-top
    described.update(jax_version=jax_lib.__version__, backend=jax_lib.default_backend(),
                     device=jax_lib.devices()[0].device_kind,
                     device_count=jax_lib.device_count())
  return {**described, **extra}


def core_jiffies() -> tuple[float, float] | None:
  """(busy, total) jiffies of all the machine's cores so far (/proc/stat), or None off
  Linux: two readings give how busy the machine was between them (`busy_share`)."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      values = [float(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  idle = values[3] + values[4]  # idle + iowait
  return sum(values) - idle, sum(values)


def busy_share(before: tuple[float, float] | None,
               after: tuple[float, float] | None) -> float:
  """The share of all cores' time that was busy between two `core_jiffies` readings
  (0.0 when either is unknown)."""
  if not before or not after:
    return 0.0
  return round((after[0] - before[0]) / max(after[1] - before[1], 1), 3)


def write_result(path: str, result: Any, quiet: bool = False) -> None:
  """Writes `result` to `path` as strict JSON, whole or not at all (the folder made if
  needed), its keys in the order the benchmark gave them, and prints where unless `quiet`
  (a benchmark that rewrites its file after every row says it once, at the end)."""
  result_files.write_json(path, result, sort_keys=False)
  if not quiet:
    print(f"wrote {path}", flush=True)


class ResultRows:
  """A result whose "rows" grow as they are measured, rewritten whole after every change
  (`add`, or `write` after changing a row), so that a run stopped part-way keeps what it
  measured: {"machine": machine(jax), **fields, "rows": [...]}."""

  def __init__(self, path: str, jax: bool = False, **fields: Any):
    self.path, self.jax, self.fields = path, jax, fields
    self.rows: list[dict] = []

  def add(self, row: dict) -> dict:
    self.rows.append(row)
    self.write()
    return row

  def write(self, quiet: bool = True) -> None:
    write_result(self.path, {"machine": machine(jax=self.jax), **self.fields,
                             "rows": self.rows}, quiet=quiet)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1,
          markdown: bool = False) -> str:
  """A table of `rows` (cells already formatted, or anything `str` gives): each column
  as wide as its widest cell, the first `left` columns aligned left and the others
  right, a rule under the header. `markdown`: a Markdown table instead."""
  cells = [[str(cell) for cell in row] for row in [header, *rows]]
  if markdown:
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines)
  widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
  lines = [" ".join(cell.ljust(width) if column < left else cell.rjust(width)
                    for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
           for row in cells]
  lines.insert(1, "-" * max(len(line) for line in lines))
  return "\n".join(lines)
