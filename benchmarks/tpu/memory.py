"""What a compiled step holds: the largest buffers and what is live at the memory peak
(from the files XLA writes with `xla_dump_to`), and the figures of the compiler's refusal
when the step does not fit."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from benchmarks.tpu import shapes

GIB = 2 ** 30
MIB = 2 ** 20


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "exceeds available HBM" in text or (
      "Ran out of memory" in text)


def out_of_memory_figures(message: str) -> dict[str, float]:
  """The compiler's own figures from its refusal ('... HLO temporaries (16.27G) exceeds
  available HBM (15.75G).'): {'temp_gib', 'compiler_available_gib'}, or {}."""
  match = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                    message)
  if not match:
    return {}
  return {"temp_gib": float(match.group(1)), "compiler_available_gib": float(match.group(2))}


def parse_size(text: str) -> float:
  """'1.5GiB' / '512B' -> bytes (0.0 when `text` is not a size)."""
  match = re.match(r"([\d.]+)\s*([KMGT]?i?B)", text)
  scale = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
  return float(match.group(1)) * scale.get(match.group(2), 1) if match else 0.0


def _last(dump_dir: str, pattern: str) -> str | None:
  """The text of the last file of `dump_dir` matching `pattern` (the latest module)."""
  paths = sorted(glob.glob(os.path.join(dump_dir, pattern)))
  if not paths:
    return None
  with open(paths[-1], encoding="utf-8") as f:
    return f.read()


def largest_buffers(dump_dir: str, count: int = 12) -> list[dict[str, Any]]:
  """The largest HBM allocations of the compiled step, from the memory-usage report XLA
  writes with `xla_dump_to` (its default memory space): [{'mib', 'shapes'}], largest
  first, each allocation (offset, size) once. Entries whose address ranges overlap are
  held at different times: what is held at once is `live_at_peak`'s."""
  text = _last(dump_dir, "*after_optimizations-memory-usage-report.txt")
  if text is None:
    return []
  default = text.split("Memory Space: default", 1)[-1].split("Memory Space:", 1)[0]
  allocations = {}
  for line in default.splitlines():
    parts = [part.strip() for part in line.split(";")]
    if len(parts) == 5 and re.fullmatch(r"[\d.]+[KMGT]?i?B", parts[1]):
      allocations[(parts[2], parts[1])] = {"bytes": parse_size(parts[1]),
                                           "shapes": parts[4][:300]}
  rows = sorted(allocations.values(), key=lambda row: -row["bytes"])
  return [{"mib": round(row["bytes"] / MIB, 1), "shapes": row["shapes"]}
          for row in rows[:count]]


def live_at_peak(dump_dir: str, count: int = 12, min_bytes: int = MIB) -> dict[str, Any]:
  """What the compiled step holds at its moment of highest memory, from the HLO and
  the live ranges XLA writes with `xla_dump_to`: {'peak_gib', 'instruction', 'values':
  [{'shape', 'count', 'mib'}] (largest total first)}, or {} without those files. Sizes
  are logical (no TPU tile padding), values under `min_bytes` are left out, so the peak
  is a lower estimate."""
  hlo = _last(dump_dir, "*after_optimizations.txt")
  live_ranges = _last(dump_dir, "*after_optimizations-live-range.txt")
  if hlo is None or live_ranges is None:
    return {}
  shape_of = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [\w\-]+\(", hlo, re.M))
  sequence_text, _, ranges_text = live_ranges.partition("BufferLiveRange:")
  sequence = dict(re.findall(r"^\s+(\d+):(\S+)", sequence_text, re.M))
  values, changes = [], {}
  for name, index, begin, end in re.findall(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)\s*$",
                                            ranges_text, re.M):
    size, shape = shapes.value_bytes(shape_of.get(name, ""), index)
    if size < min_bytes:
      continue
    begin, end = int(begin), int(end)
    values.append((begin, end, size, shape))
    changes[begin] = changes.get(begin, 0) + size
    changes[end + 1] = changes.get(end + 1, 0) - size
  held, peak, peak_time = 0, 0, 0
  for time_step in sorted(changes):
    held += changes[time_step]
    if held > peak:
      peak, peak_time = held, time_step
  by_shape: dict[str, list[int]] = {}
  for begin, end, size, shape in values:
    if begin <= peak_time <= end:
      entry = by_shape.setdefault(shape, [0, 0])
      entry[0] += 1
      entry[1] += size
  rows = sorted(by_shape.items(), key=lambda item: -item[1][1])[:count]
  return {"peak_gib": round(peak / GIB, 3), "instruction": sequence.get(str(peak_time), ""),
          "values": [{"shape": shape, "count": n, "mib": round(size / MIB, 1)}
                     for shape, (n, size) in rows]}
