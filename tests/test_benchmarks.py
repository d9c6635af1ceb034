"""The benchmark scripts that an accelerator run depends on still run, at tiny shapes,
and keep what they measured when a run stops part-way."""

import json

import pytest

from benchmarks import data_pipeline
from benchmarks import train_step

# The 8 fake CPU devices of the test run share the batch: 8 examples, one per device.
TINY_STEP = ["--shapes", "tiny", "--batch_sizes", "8", "--steps", "1", "--warmup", "1"]


def test_train_step_writes_each_figure_as_it_is_measured(tmp_path, monkeypatch):
  """The row is on disk with its JAX figure before PyTorch starts (a run stopped then
  keeps it), and ends with the JAX and PyTorch rates, their ratio and the profile."""
  out = tmp_path / "step.json"
  on_disk_when_pytorch_started = []
  measure_pytorch = train_step._torch_result  # pylint: disable=protected-access

  def recording(*args, **kwargs):
    on_disk_when_pytorch_started.extend(json.loads(out.read_text())["rows"])
    return measure_pytorch(*args, **kwargs)

  monkeypatch.setattr(train_step, "_torch_result", recording)
  train_step.main(TINY_STEP + ["--profile", str(tmp_path / "trace"), "--out", str(out)])
  [early] = on_disk_when_pytorch_started
  assert early["batch_size"] == 8 and early["jax"]["examples_per_second"] > 0
  assert "torch" not in early and "profile_top_ops" not in early["jax"]

  [row] = json.loads(out.read_text())["rows"]
  jax_rate, torch_rate = row["jax"]["examples_per_second"], row["torch"]["examples_per_second"]
  assert jax_rate == early["jax"]["examples_per_second"] and torch_rate > 0
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
