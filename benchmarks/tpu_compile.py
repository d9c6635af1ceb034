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
(`benchmarks/tpu/roofline.py`). The projection is not a measurement: it assumes perfect
overlap and peak rates. The readers of XLA's output (collectives, buffers, live ranges)
are the package `benchmarks/tpu/`; this module lowers and compiles the steps.

Prints a table and writes JSON (benchmarks/results/tpu_compile_<shapes>.json).
"""

from __future__ import annotations

import ast
import dataclasses
import os
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

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.tpu import collectives
from benchmarks.tpu import memory
from benchmarks.tpu import roofline
from configs import rope_vitb16
from configs import rope_vitb16_stage1
from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from cope_jax import embed as embed_lib
from cope_jax import flops as model_flops
from cope_jax import optim
from cope_jax.testing import tiny_configs
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.search import approx_topk
from cope_jax.base import domains

GIB = 2 ** 30

SHAPES = ("tiny", "stage1", "stage2")
LAYOUTS = ("dp", "fsdp", "dp_mp2")
# The paper's training split (cope_reference.md): classifier rows, when that loss is on.
TRAIN_PRODUCTS = 187_431
SEARCH_GALLERY = 1_000_000  # gallery rows of the `search` step


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of a TPU topology description ('v5e:2x2', 'v4:2x2x1', ...),
  `num_slices` slices of it (multi-slice devices carry `slice_index`)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if roofline.chip_of(topology) == "v4" else {}
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


def _lower(step: str, config, mesh, devices: list, row: dict):
  """Lowers `step` ('train', 'search' or 'embed:<domain>') at `row`'s global batch;
  returns (lowered, analytic FLOPs per chip). A search row gets its gallery and query
  block."""
  chips, global_batch = len(devices), row["global_batch"]
  if step == "train":
    lowered, _ = lower_train_step(config, mesh)
    return lowered, model_flops.train_flops_per_example(config) * global_batch / chips
  if step == "search":
    # The evaluation gallery of the paper's test split is about 10^5 items: queries
    # in one block of approx_topk.QUERY_BLOCK against SEARCH_GALLERY rows.
    row["per_chip_batch"] = approx_topk.QUERY_BLOCK
    row["gallery"] = SEARCH_GALLERY
    lowered = lower_search(devices, SEARCH_GALLERY, approx_topk.QUERY_BLOCK,
                           config.model.emb_dim, 10, config.eval.target_recall)
    return lowered, 2 * SEARCH_GALLERY * approx_topk.QUERY_BLOCK * config.model.emb_dim / chips
  if step.startswith("embed:"):
    domain = step.split(":", 1)[1]
    lowered = lower_embed_step(config, mesh, domain, global_batch)
    return lowered, model_flops.embed_flops_per_example(config, domain) * global_batch / chips
  raise ValueError(f"unknown step {step!r}")


def _compiled_figures(row: dict, compiled, chip: roofline.Chip, analytic: float) -> None:
  """Adds to `row` the compiled step's memory (and whether it fits the chip's HBM),
  FLOPs, collectives and roofline projection."""
  row["memory"] = memory_figures(compiled)
  row["hbm_gib"] = chip.hbm_bytes / GIB
  held = row["memory"]
  # What the chip holds at once: arguments, outputs not aliased to them, temporaries
  # (XLA's peak figure can be lower; the larger of the two is taken).
  held["footprint_gib"] = round(max(held["peak_gib"], held["argument_gib"]
                                    + held["output_gib"] - held["alias_gib"]
                                    + held["temp_gib"]), 4)
  row["fits"] = held["footprint_gib"] <= row["hbm_gib"]
  row["flops"] = {"analytic_per_chip": analytic, **cost_figures(compiled)}
  if row["flops"]["xla_flops"]:
    row["flops"]["xla_over_analytic"] = round(row["flops"]["xla_flops"] / analytic, 3)
  row["collectives"] = collectives.collectives(compiled.as_text(), row["chips"])
  link_bytes = sum(entry["sent_bytes"] for kind, entry in row["collectives"].items()
                   if not kind.startswith("dcn-"))
  dcn_bytes = sum(entry["sent_bytes"] for kind, entry in row["collectives"].items()
                  if kind.startswith("dcn-"))
  row["projection"] = roofline.roofline(chip, analytic, row["flops"]["xla_bytes_accessed"],
                                        link_bytes, dcn_bytes)
  if row["step"] == "train":
    row["projection"]["examples_per_second"] = (
        row["global_batch"] / row["projection"]["projected_step_seconds"])


def compile_row(shape: str, topology: str, layout: str, step: str, per_chip_batch: int,
                num_slices: int = 1, overrides: dict[str, Any] | None = None,
                dump_dir: str = "") -> dict[str, Any]:
  """Compiles one step and returns its figures (or {'error': 'out of memory'}).

  `overrides`: config fields ('model.remat_policy': 'dots_saveable', ...) set first;
  `dump_dir`: XLA dumps its buffer assignment there, and the row lists the largest
  buffers (`memory.largest_buffers`) and what is live at the memory peak
  (`memory.live_at_peak`)."""
  devices = topology_devices(topology, num_slices)
  config = make_config(shape, layout=layout)
  config.update_from_flattened_dict(dict(overrides or {}))
  mesh = sharding.make_mesh(config.mesh, devices)
  global_batch = per_chip_batch * mesh.shape["data"]
  config.train.batch_size = global_batch
  row = {"shape": shape, "topology": topology, "num_slices": num_slices, "chips": len(devices),
         "device_kind": devices[0].device_kind, "layout": layout,
         "mesh": dict(mesh.shape), "step": step, "per_chip_batch": per_chip_batch,
         "global_batch": global_batch, "remat_policy": (config.model.remat_policy
                                                         if config.model.remat else "none"),
         "overrides": dict(overrides or {})}
  start = time.perf_counter()
  try:
    lowered, analytic = _lower(step, config, mesh, devices, row)
    row["lower_seconds"] = round(time.perf_counter() - start, 2)
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_pass_re": "^$"} if dump_dir else None
    compiled = lowered.compile(compiler_options=options)
  except Exception as error:  # pylint: disable=broad-except
    if not memory.is_out_of_memory(error):
      raise
    message = str(error).splitlines()[0][:300]
    row.update(compile_seconds=round(time.perf_counter() - start, 2), error="out of memory",
               fits=False, message=message, memory=memory.out_of_memory_figures(message))
    return row
  row["compile_seconds"] = round(time.perf_counter() - start, 2)
  _compiled_figures(row, compiled, roofline.CHIPS[roofline.chip_of(topology)], analytic)
  if dump_dir:
    row["largest_buffers"] = memory.largest_buffers(dump_dir)
    row["live_at_peak"] = memory.live_at_peak(dump_dir)
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


def _parser():
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "tpu_compile_<shapes>.json)")
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
  return parser


def compare_attention(args, result: common.ResultRows) -> None:
  """--attention: XLA against Pallas flash attention at each shape's token counts."""
  for shape in args.shapes.split(","):
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
          result.add(row)
          print(f"{shape:6} {topology:10} {row['attention']:12} L={row['length']:<4} "
                f"(kernel {row['kernel_length']:4}) temp {row['memory']['temp_gib']:.3f} GiB "
                f"peak {row['memory']['peak_gib']:.3f} GiB  XLA bytes accessed "
                f"{row['xla_bytes_accessed'] / GIB:.2f} GiB", flush=True)


def search_largest_batch(args, result: common.ResultRows, shape: str, topology: str,
                         layout: str, per_chip: int, overrides: dict) -> None:
  """--largest_batch: a row per compile, then one with the answer."""
  def log(row):
    print(format_row(result.add(row)), flush=True)

  fits, fails, _ = largest_batch(shape, topology, layout, per_chip, args.batch_limit,
                                 args.max_compiles, log, overrides, args.known_fits,
                                 args.known_fails or None)
  exact = fails is not None and fails - fits <= 1
  result.add({"shape": shape, "topology": topology, "layout": layout,
              "largest_per_chip_batch": fits, "smallest_not_fitting": fails,
              "exact": exact, "overrides": overrides})
  bound = ("" if exact else f" (not exact: {fails} does not fit)" if fails
           else f" (nothing up to --batch_limit {args.batch_limit} failed)")
  print(f"  largest per-chip batch that fits: {fits}{bound}", flush=True)


def compile_steps(args, result: common.ResultRows) -> None:
  """A row per (shape, topology, layout, step): the table of the module docstring."""
  overrides = {}
  for item in args.set:
    field, value = item.split("=", 1)
    overrides[field] = ast.literal_eval(value)
  print(HEADER, flush=True)
  for shape in args.shapes.split(","):
    base = make_config(shape)
    per_chip = args.per_chip_batch or max(1, base.train.batch_size // 8)
    embed_per_chip = args.embed_batch or max(1, base.eval.batch_size // 8)
    for topology in args.topologies.split(","):
      for layout in args.layouts.split(","):
        for step in args.steps.split(","):
          if step == "train" and args.largest_batch:
            search_largest_batch(args, result, shape, topology, layout, per_chip, overrides)
            continue
          names = ([f"embed:{d.name}" for d in domains.DOMAINS] if step == "embed"
                   else [step])
          for name in names:
            batch = embed_per_chip if name.startswith("embed") else per_chip
            row = compile_row(shape, topology, layout, name, batch, args.num_slices,
                              overrides, args.dump_buffers)
            print(format_row(result.add(row)), flush=True)


def main(argv=None):
  args = _parser().parse_args(argv)
  result = common.ResultRows(
      args.out or common.result_path(f"tpu_compile_{'_'.join(args.shapes.split(','))}.json"),
      jax=True,
      note="compiled ahead of time for TPU topology descriptions on a CPU host; "
           "'projection' is a roofline projection from published chip figures, "
           "not a measurement",
      chips={name: dataclasses.asdict(chip) for name, chip in roofline.CHIPS.items()})
  if args.attention:
    compare_attention(args, result)
  else:
    compile_steps(args, result)
  result.write(quiet=False)


if __name__ == "__main__":
  main()
