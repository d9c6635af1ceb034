"""From the release's URL files to evaluation, without the internet.

synthetic (URL form: txt files apart from a served image folder) -> a local HTTP server on
127.0.0.1 -> `data_pipelines.download` (segment-middle frames only) -> `prepare` (the
`rope` TFDS dataset) -> two training steps -> evaluation of every retrieval direction.
"""

import json
import os

import numpy as np
import pytest

from cope_jax import evaluate
from cope_jax import train
from cope_jax.base import domains
from data_pipelines import download
from data_pipelines import prepare
from data_pipelines import rope_format
from data_pipelines import synthetic
from tests import image_server
from cope_jax.testing import tiny_configs

FRAMES_PER_CLIP = 6
NUM_FRAMES = 2  # data.num_frames of tiny_configs


@pytest.mark.slow
def test_release_url_files_to_metrics(tmp_path):
  rope_dir, served = str(tmp_path / "rope"), str(tmp_path / "served")
  synthetic.generate(rope_dir, products=10, test_products=6, frames_per_clip=FRAMES_PER_CLIP,
                     image_size=32, seed=5, url_form_images=served)
  assert not os.path.exists(os.path.join(rope_dir, "images"))

  server = image_server.FlakyServer(served)
  try:
    report = download.download(rope_dir, server.prefix, num_frames=NUM_FRAMES, workers=8,
                               timeout=10, retries=2, backoff=0.01, progress=False,
                               log=lambda line: None)
  finally:
    server.stop()
  counts = report["counts"]
  assert report["status"] == "complete" and counts["failed"] == 0
  assert counts["frames_skipped_by_sampling"] > 0  # only the frames training reads

  # The reader finds what was fetched, and the frames left out are not problems.
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(rope_dir, split)
    assert catalog.problems == []
    assert catalog.frames_skipped_by_download > 0
    for clip in list(catalog.videos.values()) + list(catalog.lives.values()):
      assert len(clip.frames) == NUM_FRAMES

  prepared_dir = str(tmp_path / "prepared")
  prepared = prepare.prepare(rope_dir, prepared_dir, num_frames=NUM_FRAMES, progress=False,
                             log=lambda line: None)
  assert prepared["num_problems"] == 0
  for split in rope_format.SPLITS:
    assert prepared["splits"][split]["frames_skipped_by_download"] > 0
    for domain in domains.NAMES:
      assert prepared["splits"][split]["domains"][domain]["records"] > 0

  config = tiny_configs.training_config(prepared_dir, rope_dir, num_steps=2)
  config.train.checkpoint_every = 1
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])

  evaluated = evaluate.run(config, str(tmp_path / "run"))
  on_disk = json.load(open(tmp_path / "run" / "eval" / "metrics.json"))
  assert on_disk["checkpoint_step"] == evaluated["checkpoint_step"] == 2
  for name in domains.DIRECTION_NAMES:
    for key in ("R@1", "R@5", "R@10", "median_rank", "one_shot_accuracy"):
      assert on_disk[name][key] is not None, (name, key)
    assert 0.0 <= on_disk[name]["R@1"] <= on_disk[name]["R@10"] <= 1.0
