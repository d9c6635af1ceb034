r"""Train-step throughput: this implementation vs the PyTorch reference model, same run.

  python -m benchmarks.train_step                       # CPU: tiny shapes, both frameworks
  python -m benchmarks.train_step --shapes tiny --remat none,nothing_saveable,dots_saveable \
      --skip_torch                                      # remat policies, measured
  python -m benchmarks.train_step --shapes tiny --profile /tmp/profile --skip_torch
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python -m benchmarks.train_step --shapes paper \
      --batch_sizes 8,16,max --attention xla,cudnn --remat none,dots_saveable  # GPU

For each shape, JAX setting (attention kernel x remat policy x augmentation) and batch
size, JAX runs one jit-compiled `train.train_step` (AdamW inside the step, compute dtype
from --dtype) on a random batch; PyTorch runs the reference model of
`cope_jax/testing/torch_reference.py` on the same batch (float32 on CPU; fp16 autocast +
GradScaler on CUDA, as the release trains) at the same batch size. Batch size `max`
doubles the batch from the largest listed one, for the first setting, until the step no
longer fits in memory (records the largest that fits). `--augment_on device` feeds canvas-sized frames with
crop boxes, so the device-side crop is part of the timed step.

`--profile DIR` traces a few steps of the first JAX setting with `jax.profiler` and
prints the ops that took the most device time, named by the model code they come from.

Prints a table and writes JSON with examples/s, the JAX/PyTorch ratio and, on GPU,
model FLOPs utilisation (analytic FLOPs, cope_jax/flops.py).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import time

from flax import linen as nn
import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import rope_vitb16
from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from cope_jax import flops as model_flops
from cope_jax import losses
from cope_jax import optim
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.base import domains

VOCAB_SIZE = {"tiny": 1000, "paper": 21128}


def make_config(shape: str, batch_size: int, dtype: str, remat: str, attention: str = "xla",
                augment_on: str = "host"):
  """`remat`: "none" or a `jax.checkpoint_policies` name."""
  config = (synthetic_tiny if shape == "tiny" else rope_vitb16).get_config()
  config.model.text.vocab_size = VOCAB_SIZE[shape]
  config.model.dtype = dtype
  config.train.batch_size = batch_size
  config.train.num_steps = 1000
  config.train.init_from = ""
  config.optim.warmup_steps = 0
  config.model.remat = remat != "none"
  if remat != "none":
    config.model.remat_policy = remat
  config.model.attention = attention
  config.data.augment_on = augment_on
  return config


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A random training batch with the pipeline's layout (`pipeline_batch_spec`)."""
  rng = np.random.default_rng(seed)
  batch = {}
  for key, (shape, dtype) in batch_contract.pipeline_batch_spec(config).items():
    if dtype == np.uint8:
      batch[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif key.endswith("_crop_box"):  # (top, left, height, width) shares: area 0.64-1
      side = rng.uniform(0.8, 1.0, (shape[0], 2))
      batch[key] = np.concatenate([(1 - side) * rng.uniform(size=side.shape), side],
                                  axis=1).astype(np.float32)
    elif dtype == np.bool_:
      batch[key] = rng.random(shape) < 0.5
    elif key == "product_index":
      batch[key] = np.arange(shape[0], dtype=np.int32)
  for domain in domains.DOMAINS:  # ids and right-padded masks
    b, length = batch_contract.batch_spec(config)[domain.text_ids_key][0]
    ids = rng.integers(5, config.model.text.vocab_size, (b, length), dtype=np.int32)
    mask = np.ones((b, length), np.int32)
    mask[:, length // 2:] = rng.integers(0, 2, (b, length - length // 2)) == 1
    mask = np.minimum.accumulate(mask, axis=1)
    batch[domain.text_ids_key], batch[domain.text_mask_key] = ids * mask, mask
  return batch


def _progress(stage: str, since: float) -> float:
  """One line per set-up stage on stderr (where an accelerator run's time goes)."""
  now = time.perf_counter()
  print(f"[train_step] {stage}: {now - since:.1f} s", file=sys.stderr, flush=True)
  return now


def _compiled_step(config, batch):
  since = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = state_lib.create_train_state(
      config, mesh, num_classes=batch["product_index"].size)
  since = _progress("train state created", since)
  model = state_lib.build_model(config)
  step_fn = jax.jit(
      functools.partial(train.train_step, model=model,
                        optimizer=optim.make_optimizer(config.optim, config.train.num_steps),
                        loss_config=config.loss),
      in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
      donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(config.mesh)):
    device_batch = sharding.host_batch_to_global(batch, mesh)
    compiled = step_fn.lower(state, device_batch).compile()
  _progress(f"step compiled (attention {config.model.attention}, batch "
            f"{config.train.batch_size})", since)
  return compiled, state, device_batch, mesh


def time_jax(config, batch, steps: int, warmup: int):
  """Times the compiled step. Returns (result, profile): `profile(dir)` traces three more
  steps of the same compiled step and returns its top costs, so that a caller can take
  the trace after its other figures (a run stopped while tracing keeps those)."""
  compiled, state, device_batch, mesh = _compiled_step(config, batch)
  with jax.set_mesh(mesh):
    for _ in range(warmup):
      state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - start
  _progress(f"{steps} timed steps", start)
  flops_per_step = model_flops.train_flops_per_example(config) * config.train.batch_size
  result = {"seconds_per_step": elapsed / steps,
            "examples_per_second": steps * config.train.batch_size / elapsed,
            "model_flops_per_step": flops_per_step, "loss": float(metrics["loss"])}
  memory = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    result["peak_gib"] = memory["peak_bytes_in_use"] / 2 ** 30
  peak = model_flops.peak_flops_per_device()
  if peak:
    result["mfu"] = flops_per_step / result["seconds_per_step"] / (peak * jax.device_count())

  def profile(profile_dir: str) -> dict:
    nonlocal state
    since = time.perf_counter()
    with jax.set_mesh(mesh), jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics["loss"])
    all_ops = top_device_ops(profile_dir, compiled.as_text())
    _progress("3 steps traced and the trace read", since)
    return {"ops": all_ops[:15],
            "by_model_part": [{"part": part, "share": round(share, 4)}
                              for part, share in group_costs(all_ops)[:15]]}

  return result, profile


def top_device_ops(profile_dir: str, hlo_text: str, count: int = 0) -> list[dict]:
  """Device time per XLA op over the traced steps, largest first, with the model code
  (Flax module path / JAX op) each op comes from (from the HLO's op_name metadata)."""
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    return []
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  origin = {}
  for match in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
    origin.setdefault(match.group(1), match.group(2))
  totals = collections.Counter()
  for event in events:
    if event.get("ph") != "X":
      continue
    thread = threads.get((event.get("pid"), event.get("tid")), "")
    process = processes.get(event.get("pid"), "")
    on_device = "/device:" in process or thread.startswith("tf_XLA")
    if on_device and not event["name"].startswith(("$", "SlinkyThreadPool", "Thunk")):
      totals[event["name"]] += event.get("dur", 0.0)
  grand_total = sum(totals.values()) or 1.0
  return [{"op": name, "share": round(duration / grand_total, 4),
           "microseconds": round(duration, 1), "from": origin.get(name, "")}
          for name, duration in totals.most_common(count or None)]


def group_costs(top_ops: list[dict], all_ops: bool = False) -> list[tuple[str, float]]:
  """Op shares summed by the model part they come from: block numbers starred, the
  JAX primitive dropped, backward ops (transpose of the forward) marked."""
  groups = collections.Counter()
  for op in top_ops:
    origin = op["from"].split(";")[0]
    backward = "transpose(" in origin
    path = re.sub(r"jit\(train_step\)/|(transpose\()?jvp\(COPE\)\)?/|COPE\.embed/", "",
                  origin)
    path = re.sub(r"(resblocks|layer)_\d+", r"\1_*", path).rsplit("/", 1)[0] or op["op"]
    groups[("backward " if backward else "") + path] += op["share"]
  return groups.most_common()


def time_torch(config, batch, steps: int, warmup: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top
  since = time.perf_counter()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = torch_reference.ReferenceCOPE(
      config.model, clip_text=state_lib.needs_clip_text(config)).to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate,
                                weight_decay=config.optim.weight_decay)
  use_amp = device == "cuda"
  scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
  mean = torch.tensor(torch_reference.IMAGENET_MEAN, device=device).view(3, 1, 1)
  std = torch.tensor(torch_reference.IMAGENET_STD, device=device).view(3, 1, 1)
  tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()
             if k in batch_contract.batch_spec(config)}

  def to_model_batch():
    model_batch = dict(tensors)
    for domain in domains.DOMAINS:
      images = tensors[domain.media_key].float().div_(255.0)
      images = images.movedim(-1, -3)
      model_batch[domain.media_key] = (images - mean) / std
      for key in (domain.text_ids_key, domain.text_mask_key):
        model_batch[key] = tensors[key].long()
    return model_batch

  labels = torch.arange(config.train.batch_size, device=device)

  def loss_fn(embeddings):
    total = 0.0
    for name, (a, b) in losses.CONTRASTIVE_TERMS.items():
      weight = config.loss.weights[name]
      if not weight:
        continue
      logits = embeddings[a].float() @ embeddings[b].float().T / config.loss.temperature
      total = total + weight * 0.5 * (
          F.cross_entropy(logits, labels, label_smoothing=config.loss.label_smoothing)
          + F.cross_entropy(logits.T, labels, label_smoothing=config.loss.label_smoothing))
    return total

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.float16, enabled=use_amp):
      loss = loss_fn(model(to_model_batch()))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  since = _progress("PyTorch reference built", since)
  for _ in range(warmup):
    loss = step()
  if device == "cuda":
    torch.cuda.synchronize()
  _progress(f"PyTorch {warmup} warm-up steps", since)
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  if device == "cuda":
    torch.cuda.synchronize()
  elapsed = time.perf_counter() - start
  result = {"seconds_per_step": elapsed / steps,
            "examples_per_second": steps * config.train.batch_size / elapsed,
            "precision": "fp16 autocast + GradScaler" if use_amp else "float32",
            "loss": float(loss.detach())}
  del model, optimizer
  if device == "cuda":
    torch.cuda.empty_cache()
  return result


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _jax_row(shape, batch_size, dtype, remat, attention, augment_on, args):
  """The JAX figures at one setting, and its `profile` (see `time_jax`)."""
  config = make_config(shape, batch_size, dtype, remat, attention, augment_on)
  row = {"shape": shape, "batch_size": batch_size, "jax_dtype": dtype, "remat": remat,
         "attention": attention, "augment_on": augment_on,
         "image_size": config.data.image_size, "frames": config.data.num_frames}
  row["jax"], profile = time_jax(config, random_batch(config), args.steps, args.warmup)
  return row, profile


def _torch_result(shape, batch_size, dtype, args) -> dict:
  """The PyTorch reference at this batch size (or why it did not run)."""
  config = make_config(shape, batch_size, dtype, "none")
  try:
    return time_torch(config, random_batch(config), args.steps, args.warmup)
  except Exception as error:  # pylint: disable=broad-except
    if not _is_out_of_memory(error):
      raise
    return {"error": "out of memory"}


def _out_of_memory_row(shape, batch_size, remat, attention, augment_on) -> dict:
  return {"shape": shape, "batch_size": batch_size, "remat": remat, "attention": attention,
          "augment_on": augment_on, "jax": None, "error": "out of memory"}


def measure_batch_sizes(result: common.ResultRows, shape: str, sizes: list[int], dtype: str,
                        setting: tuple[str, str, str], args, torch_rates: dict) -> int:
  """The rows of one JAX setting at each batch size; returns the largest that fit (0:
  none). Each row is written at once, then again with PyTorch's figures (measured once
  per batch size, kept in `torch_rates`), then with the profile (the first row of the
  run only): a run stopped part-way keeps what it measured."""
  remat, attention, augment_on = setting
  largest = 0
  for batch_size in sizes:
    try:
      row, profile = _jax_row(shape, batch_size, dtype, remat, attention, augment_on, args)
    except Exception as error:  # pylint: disable=broad-except
      if not _is_out_of_memory(error):
        raise
      row = result.add(_out_of_memory_row(shape, batch_size, remat, attention, augment_on))
      print(json.dumps(row), flush=True)
      continue
    largest = batch_size
    first_row = not result.rows
    result.add(row)
    if not args.skip_torch and batch_size not in torch_rates:
      torch_rates[batch_size] = _torch_result(shape, batch_size, dtype, args)
    torch_result = torch_rates.get(batch_size, {})
    if "examples_per_second" in torch_result:
      row["torch"] = torch_result
      row["jax_over_torch"] = (row["jax"]["examples_per_second"]
                               / torch_result["examples_per_second"])
      result.write()
    if args.profile and first_row:
      row["jax"]["profile_top_ops"] = profile(args.profile)
      result.write()
    del profile  # frees the state and the compiled step before the next setting
    print(json.dumps(row), flush=True)
  return largest


def find_largest_batch(result: common.ResultRows, shape: str, batch_size: int, dtype: str,
                       setting: tuple[str, str, str], args) -> None:
  """Doubles `batch_size` (which fit) until the step no longer fits in memory or passes
  --max_batch_limit; a row for each that fits."""
  remat, attention, augment_on = setting
  while batch_size * 2 <= args.max_batch_limit:
    batch_size *= 2
    try:
      # [0]: the profile, and with it the state and compiled step, go at once, before
      # the next doubling compiles (else they would take its memory).
      row = _jax_row(shape, batch_size, dtype, remat, attention, augment_on, args)[0]
    except Exception as error:  # pylint: disable=broad-except
      if not _is_out_of_memory(error):
        raise
      print(json.dumps({"shape": shape, "batch_size": batch_size, "remat": remat,
                        "attention": attention, "error": "out of memory"}), flush=True)
      return
    row["largest_batch_search"] = True
    print(json.dumps(result.add(row)), flush=True)


def print_table(rows: list[dict], args) -> None:
  print(f"\ntrain step on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{args.steps} timed steps after {args.warmup}")
  lines = []
  for row in rows:
    jax_result = row.get("jax") or {}
    mfu, rate = jax_result.get("mfu"), jax_result.get("examples_per_second")
    torch_rate = row.get("torch", {}).get("examples_per_second")
    ratio = row.get("jax_over_torch")
    lines.append([row["shape"], row["batch_size"], row["attention"], row["remat"],
                  row["augment_on"], f"{rate:.2f}" if rate else "OOM",
                  f"{mfu:.1%}" if mfu else "-", f"{torch_rate:.2f}" if torch_rate else "-",
                  f"{ratio:.2f}" if ratio else "-"])
  print(common.table(["shape", "batch", "attention", "remat", "augment", "JAX ex/s", "MFU",
                      "torch ex/s", "ratio"], lines))
  for row in rows:  # where the device time of a profiled row went
    for part in (row.get("jax") or {}).get("profile_top_ops", {}).get("by_model_part", [])[:8]:
      print(f"    {row['shape']} batch {row['batch_size']}: {part['share']:6.1%}  "
            f"{part['part'][:100]}")


def _parser():
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "train_step_<backend>_<shapes>.json)")
  parser.add_argument("--shapes", default="tiny", help="comma-separated: tiny, paper")
  parser.add_argument("--batch_sizes", "--batch_size", default="",
                      help="comma-separated per-run batch sizes, or 'max' last (default: "
                           "32 tiny, 8 paper)")
  parser.add_argument("--dtype", default="", help="JAX compute dtype (default: float32 on "
                      "CPU, bfloat16 on accelerators)")
  parser.add_argument("--remat", default="none",
                      help="comma-separated: none or jax.checkpoint_policies names")
  parser.add_argument("--attention", default="xla", help="comma-separated: xla, cudnn, auto")
  parser.add_argument("--augment_on", default="host", help="comma-separated: host, device")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--max_batch_limit", type=int, default=256,
                      help="largest batch tried by 'max'")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--profile", default="", help="trace folder (first JAX setting)")
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  backend = jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  result = common.ResultRows(
      args.out or common.result_path(
          f"train_step_{backend}_{'_'.join(args.shapes.split(','))}.json"),
      jax=True, steps=args.steps, warmup=args.warmup)
  settings = [(remat, attention, augment_on) for attention in args.attention.split(",")
              for remat in args.remat.split(",") for augment_on in args.augment_on.split(",")]
  for shape in args.shapes.split(","):
    sizes = [s for s in args.batch_sizes.split(",") if s] or [
        "32" if shape == "tiny" else "8"]
    find_max = sizes[-1] == "max"
    sizes = [int(s) for s in sizes if s != "max"]
    torch_rates = {}
    for setting_index, setting in enumerate(settings):
      largest = measure_batch_sizes(result, shape, sizes, dtype, setting, args, torch_rates)
      # The largest batch that fits: doubled from the largest listed, first setting only.
      if find_max and setting_index == 0 and largest == (max(sizes) if sizes else 8):
        find_largest_batch(result, shape, largest, dtype, setting, args)
  print_table(result.rows, args)
  result.write(quiet=False)


if __name__ == "__main__":
  main()
