r"""Visual-encoder forward throughput: the Flax encoder vs the PyTorch reference, same run.

  python -m benchmarks.encoder_forward                         # CPU: tiny and ViT-B/16
  python -m benchmarks.encoder_forward --jax_dtype bfloat16    # GPU: bf16 compute in both

Both frameworks run the same architecture with the same weights (the PyTorch reference
encoder of `cope_jax/testing/torch_reference.py`, converted with
`cope_jax/weight_mapping.py`) on the same uint8 clips [batch, T, S, S, 3], normalisation
included. Shapes: `tiny` (the vision settings of configs/synthetic_tiny.py) and `vitb16`
(configs/rope_vitb16.py: 224 px, T = 8). JAX runs on its default backend; PyTorch on
CUDA when JAX is on a GPU and CUDA is available, else on the CPU with --torch_threads
threads. Prints a table and writes JSON to benchmarks/results/encoder_forward_<backend>.json.

Reading the numbers: on a CPU shared with other processes, PyTorch's OpenMP threads
suffer most from oversubscription (the JSON records the load average; compare with
--torch_threads 1). On a GPU, JAX's default float32 matmul precision uses TF32 while
PyTorch's float32 matmuls do not, which shows in `max_abs_diff` and favours JAX.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import rope_vitb16
from configs import synthetic_tiny
from cope_jax import weight_mapping
from cope_jax.models import vision
from cope_jax.models.config import ModelConfig

SHAPES = {"tiny": synthetic_tiny, "vitb16": rope_vitb16}


def model_config(shape: str):
  config = SHAPES[shape].get_config().model
  config.text.vocab_size = config.text.vocab_size or 1000  # unused here; shapes need it
  return config


def random_clips(vision_config, batch_size: int, seed: int = 0) -> np.ndarray:
  """uint8 [batch, T, S, S, 3]."""
  side, frames = vision_config.image_size, vision_config.num_frames
  return np.random.default_rng(seed).integers(0, 256, (batch_size, frames, side, side, 3),
                                              dtype=np.uint8)


def reference_encoder(config, seed: int = 0):
  """The PyTorch reference encoder with seeded weights, and the same weights for Flax."""
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  encoder = torch_reference.randomize_(torch_reference.VisualEncoder(config.vision), seed)
  state_dict = {f"visual_encoder.{k}": v.detach().numpy()
                for k, v in encoder.state_dict().items()}
  params = weight_mapping.torch_state_dict_to_flax(state_dict, config, allow_missing=True)
  return encoder.eval(), params["visual_encoder"]


def time_calls(run, iterations: int, warmup: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds per call after `warmup` calls).

  The median of individually timed calls, not the mean: on a CPU shared with other
  processes single calls can take many times longer than the rest.
  """
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    run()
  seconds = []
  for _ in range(iterations):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return first, float(np.median(seconds))


def benchmark_shape(shape: str, batch_size: int, iterations: int, warmup: int,
                    jax_dtype: str, torch_device: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top
  config = model_config(shape)
  torch_model, params = reference_encoder(config)
  clips = random_clips(config.vision, batch_size)

  vision_config = dataclasses.replace(ModelConfig.from_config(config).vision, remat=False,
                                      dtype=jnp.dtype(jax_dtype), param_dtype=jnp.float32)
  encoder = vision.VisualEncoder(vision_config)
  forward = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
  device_params, device_clips = jax.device_put(params), jax.device_put(clips)
  jax_out = None

  def run_jax():
    nonlocal jax_out
    jax_out = forward(device_params, device_clips).block_until_ready()

  torch_model = torch_model.to(torch_device)
  mean = torch.tensor(torch_reference.IMAGENET_MEAN, device=torch_device).view(3, 1, 1)
  std = torch.tensor(torch_reference.IMAGENET_STD, device=torch_device).view(3, 1, 1)
  torch_clips = torch.from_numpy(clips).to(torch_device)
  use_autocast = torch_device == "cuda" and jax_dtype == "bfloat16"
  torch_out = None

  def run_torch():
    nonlocal torch_out
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_autocast):
      frames = (torch_clips.float().div(255.0).movedim(-1, -3) - mean) / std
      torch_out = torch_model(frames)
    if torch_device == "cuda":
      torch.cuda.synchronize()

  jax_first, jax_seconds = time_calls(run_jax, iterations, warmup)
  torch_first, torch_seconds = time_calls(run_torch, iterations, warmup)
  vision_config = config.vision
  return {
      "shape": shape, "batch_size": batch_size, "frames": vision_config.num_frames,
      "image_size": vision_config.image_size, "width": vision_config.width,
      "layers": vision_config.layers, "iterations": iterations, "jax_dtype": jax_dtype,
      "jax_clips_per_second": batch_size / jax_seconds,
      "torch_clips_per_second": batch_size / torch_seconds,
      "jax_over_torch": torch_seconds / jax_seconds,
      "jax_first_call_seconds": jax_first, "torch_first_call_seconds": torch_first,
      "max_abs_diff": float(np.max(np.abs(np.asarray(jax_out, np.float32)
                                          - torch_out.float().cpu().numpy()))),
  }


def main(argv=None) -> dict:
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "encoder_forward_<backend>.json)")
  parser.add_argument("--shapes", default="tiny,vitb16", help="comma-separated: tiny, vitb16")
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--tiny_iterations", type=int, default=20)
  parser.add_argument("--vitb16_iterations", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2, help="calls before timing (>= 1)")
  parser.add_argument("--jax_dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--torch_threads", type=int, default=2)
  args = parser.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  backend = jax.default_backend()
  torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  rows = []
  for shape in args.shapes.split(","):
    iterations = getattr(args, f"{shape}_iterations")
    rows.append(benchmark_shape(shape, args.batch_size, iterations, max(args.warmup, 1),
                                args.jax_dtype, torch_device))

  print(f"JAX {jax.__version__} on {backend} ({jax.devices()[0].device_kind}); torch "
        f"{torch.__version__} on {torch_device} ({torch.get_num_threads()} threads)")
  print(common.table(
      ["shape", "batch", "T", "side", "JAX clips/s", "torch clips/s", "JAX/torch",
       "JAX 1st call s", "max |diff|"],
      [[row["shape"], row["batch_size"], row["frames"], row["image_size"],
        f"{row['jax_clips_per_second']:.2f}", f"{row['torch_clips_per_second']:.2f}",
        f"{row['jax_over_torch']:.2f}", f"{row['jax_first_call_seconds']:.2f}",
        f"{row['max_abs_diff']:.1e}"] for row in rows]))
  result = {"machine": common.machine(jax=True, torch_version=torch.__version__,
                                      torch_device=torch_device,
                                      torch_threads=torch.get_num_threads()),
            "rows": rows}
  common.write_result(args.out or common.result_path(f"encoder_forward_{backend}.json"),
                      result)
  return result


if __name__ == "__main__":
  main()
