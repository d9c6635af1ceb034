"""The analytic FLOP count used for MFU agrees with XLA's count on CPU (where it is complete)."""

import jax
import numpy as np

from configs import synthetic_tiny
from cope_jax import flops
from cope_jax import losses
from cope_jax import state


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_forward_flops_match_xla_cost_analysis_on_cpu():
  config = synthetic_tiny.get_config()
  config.model.text.vocab_size = 100
  model = state.build_model(config)
  b, s, t = 2, config.data.image_size, config.data.num_frames
  batch = {"page_image": np.zeros((b, s, s, 3), np.float32),
           "page_title_ids": np.zeros((b, config.data.title_max_length), np.int32),
           "page_title_mask": np.ones((b, config.data.title_max_length), np.int32),
           "video_frames": np.zeros((b, t, s, s, 3), np.float32),
           "live_frames": np.zeros((b, t, s, s, 3), np.float32),
           **{f"{domain}_asr_{part}": np.ones((b, config.data.asr_max_length), np.int32)
              for domain in ("video", "live") for part in ("ids", "mask")}}
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
  # The embeddings a training step computes (not the clips' ASR text here).
  outputs = losses.needed_embeddings(config.loss)
  measured = _xla_flops(lambda p, x: model.apply(p, x, outputs=outputs), params, batch)
  analytic = flops.train_flops_per_example(config) / 3 * b
  # XLA also counts elementwise work (norms, softmax, GELU) that the analytic count omits.
  assert 0.85 * measured <= analytic <= 1.05 * measured, (analytic, measured)


def test_paper_size_visual_flops_match_the_known_vit_b16_figure():
  from configs import rope_vitb16
  vision = rope_vitb16.get_config().model.vision
  # ViT-B/16 at 224 px is about 17.6 G multiply-adds per image (35 GFLOPs); the message
  # token and the message attention add a little.
  per_frame = flops.visual_forward_flops(vision, 8) / 8
  assert 34e9 < per_frame < 38e9
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops_per_device("cpu") is None
