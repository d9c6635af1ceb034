"""The benchmark scripts that an accelerator run depends on still run, at tiny shapes,
and keep what they measured when a run stops part-way."""

import json

import pytest

from benchmarks import data_pipeline
from benchmarks import train_step

# The 8 fake CPU devices of the test run share the batch: 8 examples, one per device.
TINY_STEP = ["--shapes", "tiny", "--batch_sizes", "8", "--steps", "1", "--warmup", "1"]


def test_train_step_keeps_the_jax_figure_when_pytorch_fails(tmp_path, monkeypatch):
  def stopped(*args, **kwargs):
    raise RuntimeError("stopped while PyTorch ran")

  monkeypatch.setattr(train_step, "_torch_result", stopped)
  out = tmp_path / "step.json"
  with pytest.raises(RuntimeError, match="stopped while PyTorch ran"):
    train_step.main(TINY_STEP + ["--profile", str(tmp_path / "trace"), "--out", str(out)])
  [row] = json.loads(out.read_text())["rows"]
  assert row["batch_size"] == 8 and row["jax"]["examples_per_second"] > 0
  assert "torch" not in row and "profile_top_ops" not in row["jax"]


def test_train_step_row_has_jax_pytorch_and_profile(tmp_path):
  out = tmp_path / "step.json"
  train_step.main(TINY_STEP + ["--profile", str(tmp_path / "trace"), "--out", str(out)])
  [row] = json.loads(out.read_text())["rows"]
  jax_rate, torch_rate = row["jax"]["examples_per_second"], row["torch"]["examples_per_second"]
  assert jax_rate > 0 and torch_rate > 0
  assert row["jax_over_torch"] == pytest.approx(jax_rate / torch_rate)
  parts = row["jax"]["profile_top_ops"]["by_model_part"]
  assert parts and sum(part["share"] for part in parts) <= 1.0 + 1e-6
  assert any("visual_encoder" in part["part"] for part in parts)


def _step_results(path, device, rates):
  path.write_text(json.dumps({"device": device, "rows": [
      {"shape": shape, "batch_size": batch, "jax": {"examples_per_second": rate}}
      for shape, batch, rate in rates]}))
  return str(path)


def test_gpu_step_rate_is_the_best_paper_row_of_the_readable_files(tmp_path):
  batch8 = _step_results(tmp_path / "b8.json", "H", [("paper", 8, 150.0), ("tiny", 8, 900.0)])
  best = _step_results(tmp_path / "best.json", "H", [("paper", 32, 210.0), ("paper", 64, 205.0)])
  partial = tmp_path / "partial.json"
  partial.write_text('{"rows": [{"shape": "paper"')  # a file being written
  paths = ",".join([batch8, str(partial), str(tmp_path / "missing.json"), best])
  rate = data_pipeline._gpu_step_rate(paths)  # pylint: disable=protected-access
  assert rate == {"file": best, "device": "H", "batch_size": 32,
                  "examples_per_second_per_device": 210.0}
  assert data_pipeline._gpu_step_rate(str(partial)) is None  # pylint: disable=protected-access
