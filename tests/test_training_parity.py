"""The training-parity benchmark (benchmarks/training_parity.py) at tiny shapes.

Its whole code path, from the command line: two seeds per side, a few dozen steps of the
JAX trainer and of the release's PyTorch loop from the same converted weights on the same
batches (the margin classifier on, to run that path too), both sides evaluated with the
project's code; then what it reports. The benchmark's own figures come from the demo's
length (benchmarks/results/training_parity.json).
"""

import ast
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import training_parity
from cope_jax.testing import parity
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, SEEDS = 24, 6, 2
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def benchmark_result(tiny_rope_dir, tiny_prepared_dir, tmp_path_factory):
  """The benchmark's command line, run once. In a process of its own on one CPU device
  (the test run's eight fake devices would make each side's step an 8-way program and
  triple the time its compilation takes), with XLA's cheaper compilation: what takes the
  time here is compiling, not running, the few steps."""
  tmp_path = tmp_path_factory.mktemp("training_parity")
  out = tmp_path / "training_parity.json"
  command = [sys.executable, "-m", "benchmarks.training_parity",
             "--config", "configs/synthetic_tiny.py",
             *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir),
             f"--config.train.log_every={LOG_EVERY}", "--config.optim.warmup_steps=2",
             "--config.loss.classify_weight=1.0", f"--seeds={SEEDS}", f"--steps={STEPS}",
             f"--out={out}", f"--workdir={tmp_path / 'runs'}"]
  xla_flags = " ".join([flag for flag in os.environ.get("XLA_FLAGS", "").split()
                        if "xla_force_host_platform_device_count" not in flag]
                       + list(FAST_COMPILE_FLAGS))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags}
  completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "JAX mean R@1 within 2 PyTorch std" in completed.stdout
  return json.loads(out.read_text()), out


def test_both_sides_train_from_the_same_weights_on_the_same_batches(benchmark_result):
  result, _ = benchmark_result
  assert result["complete"] and result["seeds"] == list(range(SEEDS))
  assert result["precision"] == {"jax": "float32", "pytorch": "float32"}
  jax_runs, torch_runs = (result["runs"][side] for side in training_parity.SIDES)
  assert [run["seed"] for run in jax_runs] == [run["seed"] for run in torch_runs] == [0, 1]
  for jax_run, torch_run in zip(jax_runs, torch_runs):
    # The converted weights give the PyTorch model's embeddings before training.
    assert jax_run["initial_embedding_max_abs_diff"] < 1e-4
    assert jax_run["batches_digest"] == torch_run["batches_digest"]
    assert jax_run["same_batches_as_other_side"] and torch_run["same_batches_as_other_side"]
  # Another seed: other batches (data order, crops) and other initial weights.
  assert jax_runs[0]["batches_digest"] != jax_runs[1]["batches_digest"]
  assert jax_runs[0]["curves"]["loss"][0] != jax_runs[1]["curves"]["loss"][0]
  assert result["verdict"]["same_batches"] is True


def test_both_sides_losses_fall_and_every_term_is_logged(benchmark_result):
  result, _ = benchmark_result
  terms = {f"loss/{term}" for term in parity.CROSS_DOMAIN_TERMS} | {"loss/classification"}
  for side in training_parity.SIDES:
    for run in result["runs"][side]:
      assert run["steps"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), side
      assert set(run["curves"]) == {"loss"} | terms, side
      loss = run["curves"]["loss"]
      assert all(math.isfinite(value) for value in loss)
      assert loss[-1] < loss[0], (side, run["seed"], loss)
      assert run["seconds_per_step"] > 0 and run["data_seconds_per_step"] >= 0
  for side, losses in result["final_losses"].items():
    assert losses["loss"]["per_seed"] == [run["curves"]["loss"][-1]
                                          for run in result["runs"][side]]


def test_both_sides_are_scored_in_every_direction(benchmark_result):
  result, out = benchmark_result
  for side in training_parity.SIDES:
    for run in result["runs"][side]:
      assert set(run["metrics"]) == set(domains.DIRECTION_NAMES), side
      for values in run["metrics"].values():
        assert set(values) == set(training_parity.METRICS)
        assert all(0.0 <= value <= 1.0 for value in values.values())
        assert values["R@1"] <= values["R@5"] <= values["R@10"]
  summary = result["summary"]
  assert set(summary) == set(domains.DIRECTION_NAMES)
  row = summary["page_to_video"]["R@1"]
  assert row["jax"] == [run["metrics"]["page_to_video"]["R@1"] for run in result["runs"]["jax"]]
  assert row["jax_mean"] == pytest.approx(np.mean(row["jax"]))
  assert row["pytorch_std"] == pytest.approx(np.std(row["pytorch"], ddof=1))
  assert set(result["verdict"]["r1_within"]) == set(domains.DIRECTION_NAMES)
  assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_summary_counts_the_difference_in_pytorch_standard_deviations():
  def runs(values):
    return [{"metrics": {name: {metric: value for metric in training_parity.METRICS}
                         for name in domains.DIRECTION_NAMES}} for value in values]

  summary = training_parity.summarise({"jax": runs([0.5, 0.7, 0.6]),
                                       "pytorch": runs([0.4, 0.5, 0.45])})
  row = summary["live_to_video"]["R@1"]
  assert row["difference"] == pytest.approx(0.15)
  assert row["pytorch_std"] == pytest.approx(0.05)
  assert row["difference_in_pytorch_std"] == pytest.approx(3.0)
  assert row["within_2_pytorch_std"] is False
  assert row["paired_difference_mean"] == pytest.approx(0.15)
  assert row["paired_difference_std"] == pytest.approx(np.std([0.1, 0.2, 0.15], ddof=1))
  close = training_parity.summarise({"jax": runs([0.5, 0.45]), "pytorch": runs([0.4, 0.5])})
  assert close["page_to_live"]["one_shot_accuracy"]["within_2_pytorch_std"] is True


@pytest.mark.parametrize("field, value", [
    ("optim.grad_accum_steps", 2),
    ("optim.frozen", ("text",)),
    ("optim.grad_clip_groups", ("text", "visual", "fusion", "classifier")),
    ("data.augment_on", "device"),
    ("model.text.dropout_rate", 0.1),
])
def test_a_setting_the_release_cannot_follow_is_refused_by_name(field, value):
  config = tiny_configs.training_config("unused", "unused", num_steps=10)
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=re.escape(f"config.{field}")):
    training_parity.check_release_can_follow(config)


def test_a_clamped_schedule_the_run_goes_past_is_refused():
  config = tiny_configs.training_config("unused", "unused", num_steps=10)
  config.optim.decay_steps = 5
  config.optim.clamp_after_decay = True
  with pytest.raises(ValueError, match="config.optim.clamp_after_decay"):
    training_parity.check_release_can_follow(config)
  config.optim.clamp_after_decay = False  # the release's unclamped LambdaLR
  training_parity.check_release_can_follow(config)


def _imports_torch_at_module_level(path: pathlib.Path) -> bool:
  def statements(body):
    for node in body:
      yield node
      for field in ("body", "orelse", "finalbody", "handlers"):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          yield from statements(getattr(node, field, []))

  for node in statements(ast.parse(path.read_text(encoding="utf-8")).body):
    names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    if any(name == "torch" or name.startswith("torch.") for name in names):
      return True
  return False


def test_only_the_testing_package_imports_torch_when_loaded():
  """PyTorch stays optional: no library module outside cope_jax/testing imports it when
  it is loaded (the converter imports it inside the function that reads a file)."""
  library = [path for package in ("cope_jax", "data_pipelines", "configs")
             for path in sorted((ROOT / package).rglob("*.py"))]
  found = [str(path.relative_to(ROOT)) for path in library
           if _imports_torch_at_module_level(path)]
  assert found == ["cope_jax/testing/parity.py", "cope_jax/testing/torch_reference.py"]
