"""The collectives of a compiled (per-chip) HLO module and the bytes each chip sends."""

from __future__ import annotations

import math
import re

from benchmarks.tpu import shapes

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\((.*)$", re.M)
# Multi-slice programs move data between slices as host transfers of the megascale
# runtime (DCN); within a slice the collectives above run over ICI.
_DCN_SEND = re.compile(r"^\s*%?[\w.\-]+ = (.+?) send\(.*_xla_megascale_transfer_type=\"(\w+)\"",
                       re.M)


def group_size(operands: str, num_devices: int) -> int:
  """Devices per replica group of a collective's attributes (every HLO spelling:
  iota mesh axes, `[groups,size]<=[n]`, explicit `{{0,1},...}`; none: all devices)."""
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", operands)
  if match:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
    return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", match.group(2)))
  match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", operands)
  if match:
    return int(match.group(2))
  match = re.search(r"replica_groups=\{\{([\d,]*)\}", operands)
  if match:
    return len(match.group(1).split(","))
  return num_devices


def _sent_bytes(kind: str, result: float, n: int) -> float:
  """Bytes one chip sends for a collective over a group of `n`, with ring algorithms."""
  if kind == "collective-permute":
    return result
  if n <= 1:
    return 0
  return {"all-reduce": 2 * (n - 1) / n * result, "all-gather": (n - 1) / n * result,
          "reduce-scatter": (n - 1) * result, "all-to-all": (n - 1) / n * result}[kind]


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
  """Per kind of collective in the compiled (per-chip) HLO: how many, the bytes of their
  results, and the bytes each chip sends over the links with ring algorithms
  (all-reduce 2(n-1)/n of the buffer, all-gather (n-1)/n of the result, reduce-scatter
  (n-1) x the result, all-to-all (n-1)/n, collective-permute the buffer once). Transfers
  between slices are `dcn-<type>` entries (their buffer once).

  Async pairs count once (their -start op; a -start op's tuple holds the operand too,
  so its largest array is taken as the result)."""
  totals: dict[str, dict[str, float]] = {}

  def add(kind: str, result: float, sent: float) -> None:
    entry = totals.setdefault(kind, {"count": 0, "result_bytes": 0.0, "sent_bytes": 0.0})
    entry["count"] += 1
    entry["result_bytes"] += result
    entry["sent_bytes"] += sent

  for shape_text, kind, start, operands in _COLLECTIVE.findall(hlo_text):
    sizes = shapes.array_bytes(shape_text)
    result = max(sizes) if (start and kind != "all-reduce") else sum(sizes)
    add(kind, result, _sent_bytes(kind, result, group_size(operands, num_devices)))
  for shape_text, kind in _DCN_SEND.findall(hlo_text):
    sizes = shapes.array_bytes(shape_text)  # (buffer, u32[] context): the buffer
    buffer = max(sizes) if sizes else 0
    add(f"dcn-{kind.lower().replace('_', '-')}", buffer, buffer)
  return totals
