r"""Train-step throughput: this implementation vs the PyTorch reference model, same run.

  python -m benchmarks.train_step                       # CPU: tiny shapes, both frameworks
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python -m benchmarks.train_step --shapes paper \
      --batch_size 16                                 # GPU (leaves memory for PyTorch)

For each shape both frameworks train the same architecture on the same random batch
with AdamW and the seven contrastive terms: JAX with one jit-compiled `train.train_step`
(compute dtype from --dtype), PyTorch with the reference model of `tests/torch_reference.py`
(float32 on CPU; fp16 autocast + GradScaler on CUDA, as the release trains). Prints a table
and writes JSON with examples/s, the JAX/PyTorch ratio and, on GPU, model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

from flax import linen as nn
import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from configs import rope_vitb16  # pylint: disable=g-import-not-at-top
from configs import synthetic_tiny
from cope_jax import flops as model_flops
from cope_jax import losses
from cope_jax import optim
from cope_jax import result_files
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train

VOCAB_SIZE = {"tiny": 1000, "paper": 21128}


def make_config(shape: str, batch_size: int, dtype: str, remat: bool):
  config = (synthetic_tiny if shape == "tiny" else rope_vitb16).get_config()
  config.model.text.vocab_size = VOCAB_SIZE[shape]
  config.model.dtype = dtype
  config.train.batch_size = batch_size
  config.train.num_steps = 1000
  config.optim.warmup_steps = 0
  config.model.remat = remat
  return config


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, s, t = config.train.batch_size, config.data.image_size, config.data.num_frames
  batch = {"product_index": np.arange(b, dtype=np.int32),
           "page_image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)}
  for domain in ("video", "live"):
    batch[f"{domain}_frames"] = rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8)
  for key, length in (("page_title", config.data.title_max_length),
                      ("video_asr", config.data.asr_max_length),
                      ("live_asr", config.data.asr_max_length)):
    ids = rng.integers(5, config.model.text.vocab_size, (b, length), dtype=np.int32)
    mask = np.ones((b, length), np.int32)
    mask[:, length // 2:] = rng.integers(0, 2, (b, length - length // 2)) == 1
    mask = np.minimum.accumulate(mask, axis=1)
    batch[f"{key}_ids"], batch[f"{key}_mask"] = ids * mask, mask
  return batch


def time_jax(config, batch, steps: int, warmup: int) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = state_lib.create_train_state(
      config, mesh, num_classes=batch["product_index"].size)
  model = state_lib.build_model(config)
  step_fn = jax.jit(
      functools.partial(train.train_step, model=model,
                        optimizer=optim.make_optimizer(config.optim, config.train.num_steps),
                        loss_config=config.loss),
      in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
      donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(config.mesh)):
    device_batch = sharding.host_batch_to_global(batch, mesh)
    step_fn = step_fn.lower(state, device_batch).compile()
    for _ in range(warmup):
      state, metrics = step_fn(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - start
  flops_per_step = model_flops.train_flops_per_example(config) * config.train.batch_size
  result = {"seconds_per_step": elapsed / steps,
            "examples_per_second": steps * config.train.batch_size / elapsed,
            "model_flops_per_step": flops_per_step, "loss": float(metrics["loss"])}
  peak = model_flops.peak_flops_per_device()
  if peak:
    result["mfu"] = flops_per_step / result["seconds_per_step"] / (peak * jax.device_count())
  return result


def time_torch(config, batch, steps: int, warmup: int) -> dict:
  import torch
  import torch.nn.functional as F
  from tests import torch_reference
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = torch_reference.ReferenceCOPE(config.model).to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate,
                                weight_decay=config.optim.weight_decay)
  use_amp = device == "cuda"
  scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
  mean = torch.tensor(torch_reference.IMAGENET_MEAN, device=device).view(3, 1, 1)
  std = torch.tensor(torch_reference.IMAGENET_STD, device=device).view(3, 1, 1)
  tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

  def to_model_batch():
    model_batch = dict(tensors)
    for key in ("page_image", "video_frames", "live_frames"):
      images = tensors[key].float().div_(255.0)
      images = images.movedim(-1, -3)
      model_batch[key] = (images - mean) / std
    for key in ("page_title_ids", "page_title_mask", "video_asr_ids", "video_asr_mask",
                "live_asr_ids", "live_asr_mask"):
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
      loss = loss_fn(model(to_model_batch(), clip_text=False))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  for _ in range(warmup):
    loss = step()
  if device == "cuda":
    torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  if device == "cuda":
    torch.cuda.synchronize()
  elapsed = time.perf_counter() - start
  return {"seconds_per_step": elapsed / steps,
          "examples_per_second": steps * config.train.batch_size / elapsed,
          "precision": "fp16 autocast + GradScaler" if use_amp else "float32",
          "loss": float(loss.detach())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="tiny", help="comma-separated: tiny, paper")
  parser.add_argument("--batch_size", type=int, default=0, help="0: 32 (tiny), 8 (paper)")
  parser.add_argument("--dtype", default="", help="JAX compute dtype (default: float32 on "
                      "CPU, bfloat16 on accelerators)")
  parser.add_argument("--remat", action="store_true", help="rematerialise blocks (JAX)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  backend = jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  rows = []
  for shape in args.shapes.split(","):
    batch_size = args.batch_size or (32 if shape == "tiny" else 8)
    config = make_config(shape, batch_size, dtype, args.remat)
    batch = random_batch(config)
    row = {"shape": shape, "batch_size": batch_size, "jax_dtype": dtype,
           "image_size": config.data.image_size, "frames": config.data.num_frames,
           "jax": time_jax(config, batch, args.steps, args.warmup)}
    if not args.skip_torch:
      row["torch"] = time_torch(config, batch, args.steps, args.warmup)
      row["jax_over_torch"] = (row["jax"]["examples_per_second"]
                               / row["torch"]["examples_per_second"])
    rows.append(row)
    print(json.dumps(row), flush=True)

  device = jax.devices()[0].device_kind
  print(f"\ntrain step on {device} ({backend}), {args.steps} timed steps after {args.warmup}")
  print(f"{'shape':6} {'batch':>5} {'JAX ex/s':>10} {'MFU':>6} {'torch ex/s':>11} {'ratio':>6}")
  for row in rows:
    mfu = row["jax"].get("mfu")
    torch_rate = row.get("torch", {}).get("examples_per_second")
    ratio = row.get("jax_over_torch")
    mfu_text = f"{mfu:.1%}" if mfu else "-"
    torch_text = f"{torch_rate:.2f}" if torch_rate else "-"
    ratio_text = f"{ratio:.2f}" if ratio else "-"
    print(f"{row['shape']:6} {row['batch_size']:>5} {row['jax']['examples_per_second']:>10.2f} "
          f"{mfu_text:>6} {torch_text:>11} {ratio_text:>6}")
  out = args.out or os.path.join(REPO_ROOT, "benchmarks", "results",
                                 f"train_step_{backend}_{'_'.join(args.shapes.split(','))}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result_files.strict({"device": device, "backend": backend,
                              "jax_version": jax.__version__, "steps": args.steps,
                              "warmup": args.warmup, "rows": rows}),
              f, indent=2, allow_nan=False)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
