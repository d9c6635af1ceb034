"""cope_jax.state: what evaluation restores, and domains as configuration.

- Evaluation and export restore only the model parameters of a training checkpoint
  (equal to the trained ones), and read nothing from the training split, not even the
  product table that sizes the classifier.
- Fusing ASR text into the clip embeddings is one config field: the model then reads the
  clips' ASR tokens, trains and evaluates.
- The in-domain text<->visual terms (the release's stage 1) train through the loss table.
"""

import copy
import os
import shutil

import jax
import numpy as np
import pytest

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax import evaluate
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first


def _trained(config, workdir):
  train.train_and_evaluate(config, str(workdir))
  manager = checkpoints.checkpoint_manager(str(workdir), read_only=True)
  return manager, manager.latest_step()


@pytest.fixture(scope="module")
def classifier_run(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """A run with the classification loss (a classifier sized by the training products),
  on a private copy of the prepared data."""
  prepared = tmp_path_factory.mktemp("prepared")
  shutil.copytree(tiny_prepared_dir, prepared, dirs_exist_ok=True)
  config = tiny_configs.training_config(prepared, tiny_rope_dir, num_steps=2)
  config.loss.classify_weight = 1.0
  workdir = tmp_path_factory.mktemp("run")
  _trained(config, workdir)
  return config, str(workdir), str(prepared)


def test_evaluation_restores_only_the_trained_model_params(classifier_run):
  config, workdir, _ = classifier_run
  config = config_checks.resolve_vocab_size(config)
  mesh = sharding.make_mesh(config.mesh)
  params, step, source = state_lib.load_model_params(config, workdir, mesh)
  assert step == 2 and source.endswith("checkpoints/2")

  full, _ = checkpoints.restore_verified(
      workdir, state_lib.abstract_train_state(
          config, mesh, state_lib.classifier_size(config)), 2)
  assert "classifier" in full.params  # the checkpoint holds more than the model
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(full.params["model"]))
  # The restored tree is exactly the model's: no optimiser moments, no classifier.
  abstract = state_lib.abstract_model_params(config, mesh)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
    assert leaf.shape == want.shape and leaf.sharding == want.sharding


def test_evaluation_reads_nothing_from_the_training_split(classifier_run):
  config, workdir, prepared = classifier_run
  shutil.rmtree(os.path.join(prepared, config.data.train_split))
  metrics = evaluate.run(config, workdir)
  assert metrics["checkpoint_step"] == 2
  for name in domains.DIRECTION_NAMES:
    assert 0.0 <= metrics[name]["R@1"] <= 1.0


def test_asr_fusion_is_one_config_field_that_trains_and_evaluates(tiny_prepared_dir,
                                                                  tiny_rope_dir, tmp_path):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=2)
  config.model.use_asr_text = True  # the one line
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  _, abstract = _model_params_tree(config)
  for domain in domains.DOMAINS:  # every head now projects and fuses its text
    assert set(abstract[domain.head]) == {"fc0", "fc1", "attention_pooling"}
  released_config = copy.deepcopy(config)
  released_config.model.use_asr_text = False  # as released: the clip heads have fc1 only
  _, released = _model_params_tree(released_config)
  assert set(released["video_head"]) == set(released["live_head"]) == {"fc1"}
  released_config.loss.weights.live_text_visual = 1.0  # an in-domain term reads clip text
  _, in_domain = _model_params_tree(released_config)
  assert set(in_domain["video_head"]) == set(in_domain["live_head"]) == {"fc0", "fc1"}
  evaluated = evaluate.run(config, str(tmp_path))
  for name in domains.DIRECTION_NAMES:
    assert 0.0 <= evaluated[name]["R@1"] <= 1.0

  # The clip embeddings depend on the ASR tokens now: change them, the embedding moves.
  params, _, _ = state_lib.load_model_params(
      _resolved(config), str(tmp_path), sharding.make_mesh(config.mesh))
  model = state_lib.build_model(_resolved(config))
  batch = state_lib.zero_batch(_resolved(config), 2)
  batch["video_frames"][:] = 128
  batch["video_asr_mask"][:, :3] = 1
  first = model.apply({"params": params}, batch, "video", method=type(model).embed)
  batch["video_asr_ids"][:, 1:3] = 7
  second = model.apply({"params": params}, batch, "video", method=type(model).embed)
  assert not np.allclose(first["video_embedding"], second["video_embedding"])


def _resolved(config):
  return config_checks.resolve_vocab_size(config)


def _model_params_tree(config):
  config = _resolved(config)
  abstract = state_lib.abstract_model_params(config, sharding.make_mesh(config.mesh))
  return config, abstract
