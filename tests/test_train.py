"""The trainer end to end on tiny synthetic data: steps, resume after a kill, bad configs."""

import json
import os
import signal

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax import distributed
from cope_jax import evaluate
from cope_jax import train
from cope_jax.base import domains
from cope_jax.base import stop_signals
from cope_jax.testing import tiny_configs


def _final_params(workdir, step):
  manager = checkpoints.checkpoint_manager(workdir, read_only=True)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, restored["state"]["params"])


def _assert_same_tree(a, b, atol=1e-6):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.slow
def test_training_reduces_the_loss_and_logs(tiny_prepared_dir, tiny_rope_dir, tmp_path):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=12)
  config.train.log_every = 4
  config.optim.learning_rate = 3e-3
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  records = [line for line in open(tmp_path / "metrics.jsonl")]
  assert len(records) == 3
  first, last = json.loads(records[0]), json.loads(records[-1])
  assert last["loss"] < first["loss"]
  for key in ("examples_per_second", "grad_norm", "lr/visual", "loss/page_visual_video"):
    assert key in last
  assert os.listdir(tmp_path / "tensorboard")
  assert checkpoints.checkpoint_manager(str(tmp_path), read_only=True).latest_step() == 12


@pytest.mark.parametrize("field, value, message", [
    ("train.batch_size", 0, "config.train.batch_size"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("eval.search", "annoy", "config.eval.search"),
    ("data.image_size", 40, "config.data.image_size"),
])
def test_bad_config_value_names_the_field(tiny_prepared_dir, tiny_rope_dir, field, value, message):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=2)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message.replace(".", r"\.")):
    config_checks.check_config(config)


def test_missing_data_path_is_named(tiny_rope_dir, tmp_path):
  config = tiny_configs.training_config(str(tmp_path / "nowhere"), tiny_rope_dir, num_steps=2)
  with pytest.raises(config_checks.ConfigError, match=r"config\.data\.prepared_dir"):
    train.train_and_evaluate(config, str(tmp_path / "work"))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_prepared_dir, tiny_rope_dir,
                                                              tmp_path):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=6)
  config.train.checkpoint_every = 1
  # An absurd learning rate blows the parameters up after the first update.
  config.optim.learning_rate = 1e30
  config.optim.warmup_steps = 0
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step"):
    train.train_and_evaluate(config, str(tmp_path))
  manager = checkpoints.checkpoint_manager(str(tmp_path), read_only=True)
  saved = manager.all_steps()
  assert max(saved, default=0) < 6
  for step in saved:  # every saved state is finite
    params = _final_params(str(tmp_path), step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_evaluation_hook_and_entry_point_write_metrics(tiny_prepared_dir, tiny_rope_dir,
                                                       tmp_path):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=4)
  for entry in config.evals.values():
    entry.every = 4  # due at the last step only: not run during training
  # An evaluator added by one config entry and one file (tests/example_evaluator.py): the
  # trainer and cope_jax.evaluators are not edited, and it runs on its own schedule.
  config.evals.video_spread = ml_collections.ConfigDict(
      {"type": "tests.example_evaluator", "every": 2, "domain": "video"})
  train.train_and_evaluate(config, str(tmp_path), evaluate_fn=evaluate.evaluate_params)
  history = [json.loads(line) for line in open(tmp_path / "eval" / "history.jsonl")]
  assert [record["checkpoint_step"] for record in history] == [2]
  # Step 2 ran only the evaluator due there.
  assert set(history[0]["video_spread"]) == {"domain", "count", "mean_cosine_to_centre"}
  assert -1.0 <= history[0]["video_spread"]["mean_cosine_to_centre"] <= 1.0
  assert not any(name in history[0] for name in domains.DIRECTION_NAMES)

  metrics = evaluate.run(config, str(tmp_path))  # the entry point: latest checkpoint (4)
  on_disk = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert on_disk["checkpoint_step"] == metrics["checkpoint_step"] == 4
  for name in domains.DIRECTION_NAMES:
    for key in ("R@1", "R@5", "R@10", "median_rank", "one_shot_accuracy"):
      assert key in on_disk[name], (name, key)
  assert on_disk["search"] == "exact"
  assert 0 < on_disk["chance_R@1"] < 1
  assert on_disk["video_spread"]["count"] == on_disk["num_items"]["video"]
  for name in ("report.md", "recall_curves.png", "training_curves.png", "examples.html"):
    assert (tmp_path / "eval" / name).stat().st_size > 0


class _RequestStopAfter:
  """A hook that asks for a stop (as a SIGTERM would) after one step."""

  def __init__(self, signals, step):
    self._signals, self._step = signals, step

  def __call__(self, step, state, metrics):
    if step == self._step:
      self._signals.request(signal.SIGTERM)

  def close(self):
    pass


@pytest.mark.slow
def test_a_stop_request_saves_the_next_step_and_the_rerun_resumes_there(
    tiny_prepared_dir, tiny_rope_dir, tmp_path):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=6)
  config.train.log_every = 1
  config.train.checkpoint_every = 100  # no regular save before the last step
  signals = stop_signals.StopSignals(announce=lambda line: None)
  with signals.deferred():
    run = train.setup(config, str(tmp_path))
    hooks = train.default_hooks(run) + [_RequestStopAfter(signals, 2)]
    with pytest.raises(stop_signals.Stopped) as stopped:
      train.run_steps(run, hooks, stop=distributed.StepStop(signals))
  # The step in flight when the request came (3) is the one saved and logged last.
  assert stopped.value.status == 143
  assert str(stopped.value) == ("stopped at step 3 by SIGTERM; checkpoint saved; rerun the "
                                "same command to resume")
  assert checkpoints.checkpoint_manager(str(tmp_path), read_only=True).all_steps() == [3]
  logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert logged == [1, 2, 3]
  train.train_and_evaluate(config, str(tmp_path))
  logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert logged == [1, 2, 3, 4, 5, 6]
