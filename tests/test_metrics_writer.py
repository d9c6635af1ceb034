"""The training log (`cope_jax.metrics_writer`): a resumed run logs each step once."""

import json

from cope_jax import metrics_writer


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path):
  log = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 7)]
  log.write_text("".join(lines) + '{"step": 7, "lo')  # killed while writing step 7
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]

  writer = metrics_writer.MetricsWriter(str(tmp_path), start_step=4)  # resumed from 4
  assert log.read_text() == "".join(lines[:4])
  writer.write(5, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]

  # A run that does not resume (no start step given) keeps every complete record.
  metrics_writer.MetricsWriter(str(tmp_path)).close()
  assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
