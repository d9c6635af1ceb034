"""Published per-chip TPU figures and the roofline PROJECTION of a step's time from them
(not a measurement: every resource at its peak, all fully overlapped)."""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system-architecture pages, bf16 dense)."""
  peak_flops: float  # FLOP/s, bf16
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s per chip, bidirectional, all links together
  dcn_bandwidth: float  # bytes/s per chip between slices (the host NICs shared out)
  source: str


CHIPS = {
    "v4": Chip(275e12, 32 * GIB, 1228e9, 300e9, 100e9 / 8 / 4, "cloud.google.com/tpu/docs/v4"),
    # v5e: 2 x 100 Gbps NICs per host of 8 chips.
    "v5e": Chip(197e12, 16 * GIB, 819e9, 400e9, 200e9 / 8 / 8, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 95 * GIB, 2765e9, 1200e9, 50e9 / 8, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 32 * GIB, 1638e9, 800e9, 200e9 / 8 / 8, "cloud.google.com/tpu/docs/v6e"),
}


def chip_of(topology: str) -> str:
  """'v5e:2x4' -> 'v5e'."""
  return topology.split(":")[0]


def roofline(chip: Chip, flops_per_chip: float, hbm_bytes: float, link_bytes: float,
             dcn_bytes: float = 0.0) -> dict[str, float]:
  """PROJECTION of a step's time on `chip`: each resource at its published peak, all
  fully overlapped; ICI bytes at half the bidirectional figure (each chip sends that
  much while it receives as much); DCN bytes at the chip's share of the host NICs."""
  times = {"compute": flops_per_chip / chip.peak_flops,
           "HBM": hbm_bytes / chip.hbm_bandwidth,
           "ICI": link_bytes / (chip.ici_bandwidth / 2),
           "DCN": dcn_bytes / chip.dcn_bandwidth}
  step_s = max(times.values())
  return {"projected_step_seconds": step_s,
          "projected_mfu": times["compute"] / step_s if step_s else 0,
          "compute_seconds": times["compute"], "hbm_seconds": times["HBM"],
          "ici_seconds": times["ICI"], "dcn_seconds": times["DCN"],
          "bound_by": max(times, key=times.get)}
