r"""TPU steps compiled ahead of time on a CPU host: memory, FLOPs, collectives, projection.

  python -m benchmarks.tpu_compile --shapes tiny --topologies v5e:2x2          # seconds
  python -m benchmarks.tpu_compile --shapes stage2 --topologies v5e:2x4,v5p:2x2x2 \
      --steps train,embed --layouts dp                                        # ~5 min each
  python -m benchmarks.tpu_compile --shapes stage2 --topologies v5e:2x4 --largest_batch
  python -m benchmarks.tpu_compile --shapes tiny --topologies v5e:2x2 --num_slices 2

libtpu's compiler (requirements-tpu.txt) compiles for a TPU topology description
(`jax.experimental.topologies.get_topology_desc`) on a host without TPUs: each step is
lowered over abstract arrays (`state.abstract_train_state`, batches of ShapeDtypeStructs)
sharded on a mesh of the description's devices, and compiled for TPU. Nothing runs.

Shapes: `tiny` (the test suite's tiny config), `stage1` and `stage2` (the paper recipe,
configs/rope_vitb16_stage1.py and configs/rope_vitb16.py). Steps: `train` (the training
step with AdamW) and `embed` (evaluation's embed step, per domain) and `search` (the
on-device approximate top-k search over a gallery sharded across the chips). Layouts
(config.mesh data x model and rules): `dp` (the configs' rules: data parallel,
parameters replicated), `fsdp` (parameters and Adam moments split over 'data' along
their embed axis), `dp_mp2` (a model axis of 2 for the MLP and heads).

For each (shape, topology, layout, step) it reports, per chip: compile seconds; the
argument, output, temporary and peak bytes of `memory_analysis()` and whether the step
fits the chip's HBM (`--largest_batch`: the largest per-chip batch that does, by
bisection over compiles); FLOPs per step from `cope_jax.flops` and from
`cost_analysis()`; the bytes each kind of collective moves (from the compiled HLO: ICI
collectives within a slice, `dcn-*` transfers between slices); and
a roofline PROJECTION of step time and MFU: max(FLOPs / peak bf16 FLOP/s, HBM bytes /
HBM bandwidth, collective bytes / ICI bandwidth) with each chip's published figures
(CHIPS). The projection is not a measurement: it assumes perfect overlap and peak rates.

Prints a table and writes JSON (benchmarks/results/tpu_compile_<shapes>.json).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from typing import Any

# A CPU host: JAX must not try to start a TPU backend, and several processes may load
# libtpu for topology descriptions at once. Read when JAX and libtpu initialise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from flax import linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from configs import rope_vitb16  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import rope_vitb16_stage1
from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from cope_jax import embed as embed_lib
from cope_jax import flops as model_flops
from cope_jax import optim
from cope_jax.testing import tiny_configs
from cope_jax.base import result_files
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.search import approx_topk
from cope_jax.base import domains
from data_pipelines import pipelines

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

SHAPES = ("tiny", "stage1", "stage2")
LAYOUTS = ("dp", "fsdp", "dp_mp2")
# The paper's training split (cope_reference.md): classifier rows, when that loss is on.
TRAIN_PRODUCTS = 187_431
SEARCH_GALLERY = 1_000_000  # gallery rows of the `search` step


def chip_of(topology: str) -> str:
  """'v5e:2x4' -> 'v5e'."""
  return topology.split(":")[0]


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of a TPU topology description ('v5e:2x2', 'v4:2x2x1', ...),
  `num_slices` slices of it (multi-slice devices carry `slice_index`)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if chip_of(topology) == "v4" else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           **kwargs).devices)


def make_config(shape: str, global_batch: int | None = None, layout: str = "dp"):
  """The run config of `shape` with the mesh of `layout` (model axis 1 unless dp_mp2)."""
  if shape == "tiny":
    config = tiny_configs.shrink(synthetic_tiny.get_config())
    config.model.text.vocab_size = 1000
    config.model.dtype = "bfloat16"
  else:
    config = (rope_vitb16_stage1 if shape == "stage1" else rope_vitb16).get_config()
  config.train.init_from = ""
  if global_batch:
    config.train.batch_size = global_batch
  config.mesh.model = 2 if layout == "dp_mp2" else 1
  if layout == "fsdp":
    config.mesh.rules = tuple((name, "data" if name == "embed" else axes)
                              for name, axes in config.mesh.rules)
  elif layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  return config


def _num_classes(config) -> int:
  return TRAIN_PRODUCTS if config.loss.classify_weight > 0 else 0


def abstract_batch(spec: dict[str, tuple[tuple[int, ...], Any]], mesh) -> dict:
  """ShapeDtypeStructs of a global batch {key: (shape, dtype)}, split over 'data'."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for key, (shape, dtype) in spec.items()}


def lower_train_step(config, mesh):
  """The training step (`train.jit_train_step`, as training runs it) lowered over
  the abstract state and a global batch. Returns (lowered, abstract state)."""
  abstract = state_lib.abstract_train_state(config, mesh, _num_classes(config))
  state_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract)
  step = train.jit_train_step(config, state_lib.build_model(config),
                              optim.make_optimizer(config.optim, config.train.num_steps),
                              state_shardings, mesh)
  batch = abstract_batch(batch_contract.pipeline_batch_spec(config), mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(config.mesh)):
    return step.lower(abstract, batch), abstract


def lower_embed_step(config, mesh, domain: str, batch_size: int):
  """Evaluation's embed step (`embed.make_embed_fn`) for `domain`, over abstract model
  parameters and a global batch of `batch_size`."""
  config = config.copy_and_resolve_references()
  config.eval.batch_size = batch_size
  params = state_lib.abstract_model_params(config, mesh)
  embed_fn = embed_lib.make_embed_fn(state_lib.build_model(config), domain, mesh)
  batch = abstract_batch(batch_contract.eval_batch_spec(config, domain), mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(config.mesh)):
    return embed_fn.lower(params, batch)


def lower_search(devices, num_gallery: int, num_queries: int, dim: int, k: int,
                 recall_target: float):
  """The approx_topk search (`search.approx_topk.make_search_fn`) over a gallery
  [num_gallery, dim] split across `devices`, for a block of queries."""
  mesh = approx_topk.gallery_mesh(devices)
  search = approx_topk.make_search_fn(mesh, num_gallery, k, recall_target)
  rows = approx_topk.padded_size(num_gallery, len(devices))
  gallery = jax.ShapeDtypeStruct(
      (rows, dim), np.float32,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(approx_topk.AXIS)))
  queries = jax.ShapeDtypeStruct((num_queries, dim), np.float32,
                                 sharding=jax.sharding.NamedSharding(
                                     mesh, jax.sharding.PartitionSpec()))
  return search.lower(queries, gallery)


def attention_comparison(topology: str, images: int, length: int, heads: int, head_dim: int,
                         dtype=jnp.bfloat16) -> list[dict[str, Any]]:
  """Forward + backward of one softmax attention [images, length, heads, head_dim] on one
  chip of `topology`, compiled two ways: XLA (`jax.nn.dot_product_attention`, what
  config.model.attention='xla' runs) and the Pallas TPU flash-attention kernel (lengths
  padded to its 128-token blocks, padding masked by segment ids). Per-chip temporaries,
  peak bytes and XLA's cost figures of each."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
  mesh = jax.sharding.Mesh(np.array(topology_devices(topology)[:1]), ("chip",))
  spec = jax.ShapeDtypeStruct((images, length, heads, head_dim), dtype,
                              sharding=jax.sharding.NamedSharding(mesh,
                                                                  jax.sharding.PartitionSpec()))
  padded = -(-length // 128) * 128
  blocks = pallas_flash.BlockSizes(
      block_q=128, block_k_major=128, block_k=128, block_b=1, block_q_major_dkv=128,
      block_k_major_dkv=128, block_k_dkv=128, block_q_dkv=128, block_k_major_dq=128,
      block_k_dq=128, block_q_dq=128)

  def xla_loss(query, key, value):
    out = jax.nn.dot_product_attention(query, key, value, implementation="xla")
    return jnp.sum(out.astype(jnp.float32))

  def pallas_loss(query, key, value):
    def to_kernel(x):  # [B, L, H, d] -> [B, H, L', d]
      return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    segments = jnp.broadcast_to((jnp.arange(padded) < length).astype(jnp.int32),
                                (images, padded))
    out = pallas_flash.flash_attention(
        to_kernel(query), to_kernel(key), to_kernel(value),
        segment_ids=pallas_flash.SegmentIds(segments, segments), sm_scale=head_dim ** -0.5,
        block_sizes=blocks)
    return jnp.sum(out.transpose(0, 2, 1, 3)[:, :length].astype(jnp.float32))

  rows = []
  for name, loss in (("xla", xla_loss), ("pallas_flash", pallas_loss)):
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    rows.append({"topology": topology, "attention": name, "images": images,
                 "length": length, "kernel_length": padded if name != "xla" else length,
                 "heads": heads, "head_dim": head_dim,
                 "compile_seconds": round(time.perf_counter() - start, 2),
                 "memory": memory_figures(compiled), **cost_figures(compiled)})
  return rows


# ---- the compiled HLO's collectives -------------------------------------------------

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\((.*)$", re.M)
# Multi-slice programs move data between slices as host transfers of the megascale
# runtime (DCN); within a slice the collectives above run over ICI.
_DCN_SEND = re.compile(r"^\s*%?[\w.\-]+ = (.+?) send\(.*_xla_megascale_transfer_type=\"(\w+)\"",
                       re.M)
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(shape_text: str) -> list[float]:
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    sizes.append(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return sizes


def _group_size(operands: str, num_devices: int) -> int:
  """Devices per replica group of a collective's attributes (every HLO spelling)."""
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


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
  """Per kind of collective in the compiled (per-chip) HLO: how many, the bytes of their
  results, and the bytes each chip sends over the links with ring algorithms
  (all-reduce 2(n-1)/n of the buffer, all-gather (n-1)/n of the result, reduce-scatter
  (n-1) x the result, all-to-all (n-1)/n, collective-permute the buffer once).

  Async pairs count once (their -start op; a -start op's tuple holds the operand too,
  so its largest array is taken as the result)."""
  totals: dict[str, dict[str, float]] = {}
  for shape_text, kind, start, operands in _COLLECTIVE.findall(hlo_text):
    sizes = _array_bytes(shape_text)
    result = max(sizes) if (start and kind != "all-reduce") else sum(sizes)
    n = _group_size(operands, num_devices)
    sent = {"all-reduce": 2 * (n - 1) / n * result, "all-gather": (n - 1) / n * result,
            "reduce-scatter": (n - 1) * result, "all-to-all": (n - 1) / n * result,
            "collective-permute": result}[kind] if n > 1 or kind == "collective-permute" else 0
    entry = totals.setdefault(kind, {"count": 0, "result_bytes": 0.0, "sent_bytes": 0.0})
    entry["count"] += 1
    entry["result_bytes"] += result
    entry["sent_bytes"] += sent
  for shape_text, kind in _DCN_SEND.findall(hlo_text):
    sizes = _array_bytes(shape_text)  # (buffer, u32[] context): the buffer
    entry = totals.setdefault(f"dcn-{kind.lower().replace('_', '-')}",
                              {"count": 0, "result_bytes": 0.0, "sent_bytes": 0.0})
    entry["count"] += 1
    entry["result_bytes"] += max(sizes) if sizes else 0
    entry["sent_bytes"] += max(sizes) if sizes else 0
  return totals


# ---- figures of one compiled step ----------------------------------------------------


def memory_figures(compiled) -> dict[str, float]:
  """Per-chip bytes of `compiled.memory_analysis()`, in GiB."""
  memory = compiled.memory_analysis()
  figures = {name: getattr(memory, f"{name}_size_in_bytes") / GIB
             for name in ("argument", "output", "alias", "temp", "generated_code")}
  peak = getattr(memory, "peak_memory_in_bytes", 0) or (
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  figures["peak"] = peak / GIB
  return {f"{name}_gib": round(value, 4) for name, value in figures.items()}


def cost_figures(compiled) -> dict[str, float]:
  """FLOPs and HBM bytes accessed per chip from `compiled.cost_analysis()`."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"xla_flops": float(cost.get("flops", 0.0)),
          "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


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


def largest_buffers(dump_dir: str, count: int = 12) -> list[dict[str, Any]]:
  """The largest HBM allocations of the compiled step, from the memory-usage report XLA
  writes with `xla_dump_to` (its default memory space): [{'mib', 'shapes'}], largest
  first, each allocation (offset, size) once. Entries whose address ranges overlap are
  held at different times: what is held at once is `live_at_peak`'s."""
  reports = sorted(glob.glob(
      os.path.join(dump_dir, "*after_optimizations-memory-usage-report.txt")))
  if not reports:
    return []
  with open(reports[-1]) as f:
    text = f.read()
  default = text.split("Memory Space: default", 1)[-1].split("Memory Space:", 1)[0]
  allocations = {}
  for line in default.splitlines():
    parts = [part.strip() for part in line.split(";")]
    if len(parts) == 5 and re.fullmatch(r"[\d.]+[KMGT]?i?B", parts[1]):
      allocations[(parts[2], parts[1])] = {"bytes": _parse_size(parts[1]),
                                           "shapes": parts[4][:300]}
  rows = sorted(allocations.values(), key=lambda row: -row["bytes"])
  return [{"mib": round(row["bytes"] / 2 ** 20, 1), "shapes": row["shapes"]}
          for row in rows[:count]]


def _value_bytes(shape_text: str, index: str) -> tuple[float, str]:
  """('f32[8,4]{1,0}' or a tuple shape, '{}' or '{1}') -> (logical bytes, 'f32[8,4]')."""
  arrays = re.findall(r"\b(\w+)\[([\d,]*)\]", shape_text)  # every element, in order
  if shape_text.lstrip().startswith("("):
    if index == "{}":
      return 0, ""  # the tuple itself holds pointers only
    position = int(index.strip("{}").split(",")[0])
    arrays = arrays[position:position + 1]
  text = " ".join(f"{dtype}[{dims}]" for dtype, dims in arrays)
  return sum(_array_bytes(text)), text


def live_at_peak(dump_dir: str, count: int = 12, min_bytes: int = 2 ** 20
                 ) -> dict[str, Any]:
  """What the compiled step holds at its moment of highest memory, from the HLO and
  the live ranges XLA writes with `xla_dump_to`: {'peak_gib', 'instruction', 'values':
  [{'shape', 'count', 'mib'}] (largest total first)}. Sizes are logical (no TPU tile
  padding), values under `min_bytes` are left out, so the peak is a lower estimate."""
  hlo_files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")))
  range_files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt")))
  if not hlo_files or not range_files:
    return {}
  with open(hlo_files[-1]) as f:
    shape_of = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [\w\-]+\(", f.read(),
                               re.M))
  with open(range_files[-1]) as f:
    text = f.read()
  sequence_text, _, ranges_text = text.partition("BufferLiveRange:")
  sequence = dict(re.findall(r"^\s+(\d+):(\S+)", sequence_text, re.M))
  values, changes = [], {}
  for name, index, begin, end in re.findall(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)\s*$",
                                            ranges_text, re.M):
    size, shape = _value_bytes(shape_of.get(name, ""), index)
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
          "values": [{"shape": shape, "count": n, "mib": round(size / 2 ** 20, 1)}
                     for shape, (n, size) in rows]}


def _parse_size(text: str) -> float:
  """'1.5GiB' / '512B' -> bytes."""
  match = re.match(r"([\d.]+)\s*([KMGT]?i?B)", text)
  scale = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
  return float(match.group(1)) * scale.get(match.group(2), 1) if match else 0.0


def compile_row(shape: str, topology: str, layout: str, step: str, per_chip_batch: int,
                num_slices: int = 1, overrides: dict[str, Any] | None = None,
                dump_dir: str = "") -> dict[str, Any]:
  """Compiles one step and returns its figures (or {'error': 'out of memory'}).

  `overrides`: config fields ('model.remat_policy': 'dots_saveable', ...) set first;
  `dump_dir`: XLA dumps its buffer assignment there, and the row lists the largest
  buffers (`largest_buffers`) and what is live at the memory peak (`live_at_peak`)."""
  devices = topology_devices(topology, num_slices)
  chips = len(devices)
  config = make_config(shape, layout=layout)
  for field, value in (overrides or {}).items():
    *path, name = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  mesh = sharding.make_mesh(config.mesh, devices)
  data_size = mesh.shape["data"]
  global_batch = per_chip_batch * data_size
  config.train.batch_size = global_batch
  chip = CHIPS[chip_of(topology)]
  row = {"shape": shape, "topology": topology, "num_slices": num_slices, "chips": chips,
         "device_kind": devices[0].device_kind, "layout": layout,
         "mesh": dict(mesh.shape), "step": step, "per_chip_batch": per_chip_batch,
         "global_batch": global_batch, "remat_policy": (config.model.remat_policy
                                                         if config.model.remat else "none"),
         "overrides": dict(overrides or {})}
  start = time.perf_counter()
  try:
    if step == "train":
      lowered, _ = lower_train_step(config, mesh)
      analytic = model_flops.train_flops_per_example(config) * global_batch / chips
    elif step == "search":
      # The evaluation gallery of the paper's test split is about 10^5 items: queries
      # in one block of approx_topk.QUERY_BLOCK against SEARCH_GALLERY rows.
      lowered = lower_search(devices, SEARCH_GALLERY, approx_topk.QUERY_BLOCK,
                             config.model.emb_dim, 10, config.eval.target_recall)
      analytic = 2 * SEARCH_GALLERY * approx_topk.QUERY_BLOCK * config.model.emb_dim / chips
      row["per_chip_batch"] = approx_topk.QUERY_BLOCK
      row["gallery"] = SEARCH_GALLERY
    elif step.startswith("embed:"):
      domain = step.split(":", 1)[1]
      lowered = lower_embed_step(config, mesh, domain, global_batch)
      analytic = model_flops.embed_flops_per_example(config, domain) * global_batch / chips
    else:
      raise ValueError(f"unknown step {step!r}")
    row["lower_seconds"] = round(time.perf_counter() - start, 2)
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_pass_re": "^$"} if dump_dir else None
    compiled = lowered.compile(compiler_options=options)
  except Exception as error:  # pylint: disable=broad-except
    if not is_out_of_memory(error):
      raise
    row["compile_seconds"] = round(time.perf_counter() - start, 2)
    row["error"] = "out of memory"
    row["fits"] = False
    row["message"] = str(error).splitlines()[0][:300]
    row["memory"] = out_of_memory_figures(row["message"])
    return row
  row["compile_seconds"] = round(time.perf_counter() - start, 2)
  row["memory"] = memory_figures(compiled)
  if dump_dir:
    row["largest_buffers"] = largest_buffers(dump_dir)
    row["live_at_peak"] = live_at_peak(dump_dir)
  row["hbm_gib"] = chip.hbm_bytes / GIB
  memory = row["memory"]
  # What the chip holds at once: arguments, outputs not aliased to them, temporaries
  # (XLA's peak figure can be lower; the larger of the two is taken).
  memory["footprint_gib"] = round(max(memory["peak_gib"], memory["argument_gib"]
                                      + memory["output_gib"] - memory["alias_gib"]
                                      + memory["temp_gib"]), 4)
  row["fits"] = memory["footprint_gib"] <= row["hbm_gib"]
  row["flops"] = {"analytic_per_chip": analytic, **cost_figures(compiled)}
  if row["flops"]["xla_flops"]:
    row["flops"]["xla_over_analytic"] = round(row["flops"]["xla_flops"] / analytic, 3)
  row["collectives"] = collectives(compiled.as_text(), chips)
  link_bytes = sum(entry["sent_bytes"] for kind, entry in row["collectives"].items()
                   if not kind.startswith("dcn-"))
  dcn_bytes = sum(entry["sent_bytes"] for kind, entry in row["collectives"].items()
                  if kind.startswith("dcn-"))
  row["projection"] = roofline(chip, analytic, row["flops"]["xla_bytes_accessed"], link_bytes,
                               dcn_bytes)
  if step == "train":
    row["projection"]["examples_per_second"] = (
        global_batch / row["projection"]["projected_step_seconds"])
  return row


def largest_batch(shape: str, topology: str, layout: str, start: int, limit: int,
                  max_compiles: int, log, overrides: dict[str, Any] | None = None,
                  known_fits: int = 0, known_fails: int | None = None
                  ) -> tuple[int, int | None, list[dict]]:
  """The largest per-chip training batch that compiles and fits HBM: doubling from
  `start` until one does not fit (or `limit`), then bisection; at most `max_compiles`.

  `known_fits` / `known_fails`: per-chip batches already compiled (a row of an earlier
  run) that fit / do not, so the search starts inside that bracket. Returns (largest
  batch seen to fit, 0 if none; smallest seen not to fit, None if none; the rows
  compiled): the two are adjacent when the search finished, a bracket otherwise.

  The TPU compiler's footprint is not monotonic in the batch: its scheduler spends the
  memory the chip has (on a v5e 2x4, 16 per chip compiles to 13.4 GiB held and 24 to
  6.6), so the answer is the largest batch the search saw fit, not a proven bound."""
  rows, fits, fails = [], known_fits, known_fails
  if fails is not None and fits >= fails:
    raise ValueError(f"known_fits ({fits}) must be below known_fails ({fails})")

  def next_batch():
    if fails is None:
      batch = max(start, 2 * fits) if fits else start
      return batch if batch <= limit else None
    if fails - fits <= 1:
      return None
    return (fits + fails) // 2 if fits else max(1, fails // 2)

  batch = next_batch()
  while batch is not None and len(rows) < max_compiles:
    row = compile_row(shape, topology, layout, "train", batch, overrides=overrides)
    rows.append(row)
    log(row)
    if row.get("fits"):
      fits = max(fits, batch)
    else:
      fails = batch if fails is None else min(fails, batch)
    batch = next_batch()
  return fits, fails, rows


# ---- table ---------------------------------------------------------------------------


def format_row(row: dict) -> str:
  memory = row.get("memory", {})
  projection = row.get("projection", {})
  comm = row.get("collectives", {})
  comm_text = " ".join(f"{kind.replace('collective-', 'c')[:10]}:{entry['count']}/"
                       f"{entry['sent_bytes'] / 2 ** 20:.0f}M"
                       for kind, entry in sorted(comm.items()))
  if "error" in row:
    return (f"{row['shape']:6} {row['topology']:10} {row['layout']:6} {row['step']:11} "
            f"{row['per_chip_batch']:>4} {row['compile_seconds']:>7.0f}  OOM: "
            f"{row.get('message', '')[:80]}")
  flops = row["flops"]
  return (f"{row['shape']:6} {row['topology']:10} {row['layout']:6} {row['step']:11} "
          f"{row['per_chip_batch']:>4} {row['compile_seconds']:>7.0f} "
          f"{memory['argument_gib']:>6.2f} {memory['temp_gib']:>6.2f} "
          f"{memory['footprint_gib']:>6.2f} {('yes' if row['fits'] else 'NO'):>4} "
          f"{flops['analytic_per_chip']:>9.3g} {flops['xla_flops']:>9.3g} "
          f"{projection['projected_step_seconds'] * 1e3:>8.1f} "
          f"{projection['projected_mfu']:>5.0%} {projection['bound_by']:>7}  {comm_text}")


HEADER = (f"{'shape':6} {'topology':10} {'layout':6} {'step':11} {'b/ch':>4} {'comp s':>7} "
          f"{'argGiB':>6} {'tmpGiB':>6} {'allGiB':>6} {'fits':>4} {'FLOPs/ch':>9} "
          f"{'XLA FLOPs':>9} {'proj ms':>8} {'pMFU':>5} {'bound':>7}  collectives "
          "(count/MiB sent per chip)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="tiny", help=f"comma-separated: {', '.join(SHAPES)}")
  parser.add_argument("--topologies", default="v5e:2x2",
                      help="comma-separated topology names, e.g. v5e:2x4,v5p:2x2x2,v6e:2x4")
  parser.add_argument("--layouts", default="dp", help=f"comma-separated: {', '.join(LAYOUTS)}")
  parser.add_argument("--steps", default="train",
                      help="comma-separated: train, embed (every domain) or embed:<domain>")
  parser.add_argument("--per_chip_batch", type=int, default=0,
                      help="training batch per chip (default: the config's global batch "
                           "over 8 chips, at least 1)")
  parser.add_argument("--embed_batch", type=int, default=0,
                      help="embed batch per chip (default: the config's eval batch over 8)")
  parser.add_argument("--num_slices", type=int, default=1,
                      help="slices of each topology (multi-slice: the 'data' axis spans "
                           "them over DCN, config.mesh.dcn_data)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE (Python literal), repeatable: "
                           "--set model.remat_policy='dots_saveable'")
  parser.add_argument("--dump_buffers", default="",
                      help="XLA dump folder: rows list the compiled step's largest buffers")
  parser.add_argument("--attention", action="store_true",
                      help="only compare XLA and Pallas flash attention (fwd+bwd, one chip) "
                           "at the shapes' token counts")
  parser.add_argument("--largest_batch", action="store_true",
                      help="bisect the largest per-chip training batch that fits")
  parser.add_argument("--max_compiles", type=int, default=6)
  parser.add_argument("--known_fits", type=int, default=0,
                      help="--largest_batch: a per-chip batch known to fit (an earlier row)")
  parser.add_argument("--known_fails", type=int, default=0,
                      help="--largest_batch: a per-chip batch known not to fit")
  parser.add_argument("--batch_limit", type=int, default=256)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  shapes = args.shapes.split(",")
  out = args.out or os.path.join(REPO_ROOT, "benchmarks", "results",
                                 f"tpu_compile_{'_'.join(shapes)}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  rows: list[dict] = []

  def write():
    with open(out, "w") as f:
      json.dump(result_files.strict({
          "jax_version": jax.__version__, "host_backend": jax.default_backend(),
          "note": "compiled ahead of time for TPU topology descriptions on a CPU host; "
                  "'projection' is a roofline projection from published chip figures, "
                  "not a measurement",
          "chips": {name: dataclasses.asdict(chip) for name, chip in CHIPS.items()},
          "rows": rows}), f, indent=2, allow_nan=False)

  def log(row):
    rows.append(row)
    write()
    print(format_row(row), flush=True)

  if args.attention:
    for shape in shapes:
      config = make_config(shape)
      vision = config.model.vision
      tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
      # A per-chip batch of 16 clips of T frames: 16 T images through every block.
      images = 16 * config.data.num_frames
      for topology in args.topologies.split(","):
        for length in (tokens, tokens + 1):  # frames, frames + the message token
          for row in attention_comparison(topology, images, length, vision.heads,
                                          vision.width // vision.heads):
            row["shape"] = shape
            rows.append(row)
            write()
            print(f"{shape:6} {topology:10} {row['attention']:12} L={row['length']:<4} "
                  f"(kernel {row['kernel_length']:4}) temp {row['memory']['temp_gib']:.3f} GiB "
                  f"peak {row['memory']['peak_gib']:.3f} GiB  XLA bytes accessed "
                  f"{row['xla_bytes_accessed'] / GIB:.2f} GiB", flush=True)
    print(f"wrote {out}")
    return
  overrides = {}
  for item in args.set:
    field, value = item.split("=", 1)
    overrides[field] = ast.literal_eval(value)
  print(HEADER, flush=True)
  for shape in shapes:
    base = make_config(shape)
    per_chip = args.per_chip_batch or max(1, base.train.batch_size // 8)
    embed_per_chip = args.embed_batch or max(1, base.eval.batch_size // 8)
    for topology in args.topologies.split(","):
      for layout in args.layouts.split(","):
        for step in args.steps.split(","):
          if step == "train" and args.largest_batch:
            fits, fails, _ = largest_batch(
                shape, topology, layout, per_chip, args.batch_limit, args.max_compiles,
                log, overrides, args.known_fits, args.known_fails or None)
            exact = fails is not None and fails - fits <= 1
            rows.append({"shape": shape, "topology": topology, "layout": layout,
                         "largest_per_chip_batch": fits, "smallest_not_fitting": fails,
                         "exact": exact, "overrides": overrides})
            write()
            bound = ("" if exact else f" (not exact: {fails} does not fit)" if fails
                     else f" (nothing up to --batch_limit {args.batch_limit} failed)")
            print(f"  largest per-chip batch that fits: {fits}{bound}", flush=True)
            continue
          names = ([f"embed:{d.name}" for d in domains.DOMAINS] if step == "embed"
                   else [step])
          for name in names:
            batch = embed_per_chip if name.startswith("embed") else per_chip
            log(compile_row(shape, topology, layout, name, batch, args.num_slices,
                            overrides, args.dump_buffers))
  write()
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
