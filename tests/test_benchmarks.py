"""The benchmark scripts that an accelerator run depends on still run, at tiny shapes,
and keep what they measured when a run stops part-way."""

import json
import math
import os

import numpy as np
import pytest

from benchmarks import common
from benchmarks import data_pipeline
from benchmarks import train_step

# The 8 fake CPU devices of the test run share the batch: 8 examples, one per device.
TINY_STEP = ["--shapes", "tiny", "--batch_sizes", "8", "--steps", "1", "--warmup", "1"]


@pytest.mark.slow
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

  result = json.loads(out.read_text())
  assert result["machine"]["backend"] == "cpu" and result["machine"]["cpu_count"] > 0
  [row] = result["rows"]
  jax_rate, torch_rate = row["jax"]["examples_per_second"], row["torch"]["examples_per_second"]
  assert jax_rate == early["jax"]["examples_per_second"] and torch_rate > 0
  assert row["jax_over_torch"] == pytest.approx(jax_rate / torch_rate)
  parts = row["jax"]["profile_top_ops"]["by_model_part"]
  assert parts and sum(part["share"] for part in parts) <= 1.0 + 1e-6
  assert any("visual_encoder" in part["part"] for part in parts)


def _step_results(path, device, rates, machine=True):
  """A train-step result; `machine`: the device in "machine" (else at the top, as in
  results written before)."""
  rows = [{"shape": shape, "batch_size": batch, "jax": {"examples_per_second": rate}}
          for shape, batch, rate in rates]
  described = {"machine": {"device": device}} if machine else {"device": device}
  path.write_text(json.dumps({**described, "rows": rows}))
  return str(path)


def test_gpu_step_rate_is_the_best_paper_row_of_the_readable_files(tmp_path):
  batch8 = _step_results(tmp_path / "b8.json", "G", [("paper", 8, 150.0), ("tiny", 8, 900.0)],
                         machine=False)
  assert data_pipeline._gpu_step_rate(batch8)["device"] == "G"  # pylint: disable=protected-access
  best = _step_results(tmp_path / "best.json", "H", [("paper", 32, 210.0), ("paper", 64, 205.0)])
  partial = tmp_path / "partial.json"
  partial.write_text('{"rows": [{"shape": "paper"')  # a file being written
  paths = ",".join([batch8, str(partial), str(tmp_path / "missing.json"), best])
  rate = data_pipeline._gpu_step_rate(paths)  # pylint: disable=protected-access
  assert rate == {"file": best, "device": "H", "batch_size": 32,
                  "examples_per_second_per_device": 210.0}
  assert data_pipeline._gpu_step_rate(str(partial)) is None  # pylint: disable=protected-access


# ---- what the benchmarks share (benchmarks/common.py) ---------------------------------


def test_every_benchmark_describes_its_machine_with_the_same_keys():
  plain = common.machine()
  assert set(plain) == {"cpu_count", "platform", "python", "load_average_1min"}
  assert plain["cpu_count"] == os.cpu_count()
  with_jax = common.machine(jax=True, torch_threads=1)
  assert set(with_jax) == set(plain) | {"jax_version", "backend", "device", "device_count",
                                        "torch_threads"}
  assert with_jax["backend"] == "cpu" and with_jax["device_count"] >= 1


def test_a_result_is_strict_json_written_whole(tmp_path, capsys):
  path = tmp_path / "results" / "bench.json"
  common.write_result(str(path), {"rate": np.float32(2.5), "ratio": math.nan,
                                  "rows": np.arange(3), "z": 1, "a": 2})
  assert capsys.readouterr().out == f"wrote {path}\n"
  text = path.read_text()
  assert "NaN" not in text
  assert json.loads(text) == {"rate": 2.5, "ratio": None, "rows": [0, 1, 2], "z": 1, "a": 2}
  assert list(json.loads(text)) == ["rate", "ratio", "rows", "z", "a"]  # the order given
  with pytest.raises(TypeError):  # not JSON: the file written before stays as it was
    common.write_result(str(path), {"rate": object()})
  assert path.read_text() == text
  assert os.listdir(path.parent) == ["bench.json"]


def test_result_rows_are_on_disk_after_each_row(tmp_path, capsys):
  path = tmp_path / "rows.json"
  result = common.ResultRows(str(path), steps=3)
  result.add({"batch_size": 8})
  assert json.loads(path.read_text())["rows"] == [{"batch_size": 8}]
  result.rows[0]["rate"] = 1.5
  result.write(quiet=False)
  written = json.loads(path.read_text())
  assert written["rows"] == [{"batch_size": 8, "rate": 1.5}] and written["steps"] == 3
  assert set(written["machine"]) == set(common.machine())
  assert capsys.readouterr().out == f"wrote {path}\n"  # once: add() writes quietly


def test_parser_takes_the_first_paragraph_and_the_default_result_path():
  doc = """Throughput of a thing
  against its baseline.

  python -m benchmarks.thing --flag
  """
  parser = common.parser(doc, "thing.json")
  assert parser.description == "Throughput of a thing against its baseline."
  assert parser.parse_args([]).out == os.path.join(common.RESULTS_DIR, "thing.json")
  assert parser.parse_args(["--out", "x.json"]).out == "x.json"
  assert common.parser(doc).parse_args([]).out == ""


def test_table_aligns_columns_to_their_widest_cell():
  text = common.table(["name", "rate", "ratio"], [["naive", 6.3, "1.00x"],
                                                  ["grain host", 30.6, "4.87x"]])
  assert text.splitlines() == ["name       rate ratio",
                               "---------------------",
                               "naive       6.3 1.00x",
                               "grain host 30.6 4.87x"]
  assert common.table(["a", "b"], [[1, 2]], markdown=True).splitlines() == [
      "| a | b |", "|---|---|", "| 1 | 2 |"]


def test_busy_share_between_two_readings():
  assert common.busy_share((10.0, 100.0), (40.0, 200.0)) == 0.3
  assert common.busy_share(None, (1.0, 2.0)) == 0.0
  reading = common.core_jiffies()
  if os.path.exists("/proc/stat"):
    busy, total = reading
    assert 0 <= busy <= total
