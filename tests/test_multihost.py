"""Two JAX processes on localhost (4 fake CPU devices each) train as one 8-device mesh."""

import json
import os
import sys

from cope_jax import checkpoints
from tests import multiprocess
from cope_jax.testing import tiny_configs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_on_one_mesh_and_agree(tiny_prepared_dir, tiny_rope_dir, tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "cope_jax.train", "--config",
             os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", str(workdir),
             "--config.train.num_steps=3", "--config.train.log_every=3",
             "--config.train.checkpoint_every=3",
             *tiny_configs.command_line_overrides(tiny_prepared_dir, tiny_rope_dir)]
  results = []
  for stdout in multiprocess.run_two_processes(command):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    results.append(json.loads(lines[-1]))
  assert sorted(r["process_index"] for r in results) == [0, 1]
  losses = [r["final_metrics"]["loss"] for r in results]
  assert abs(losses[0] - losses[1]) <= 1e-6 * max(1.0, abs(losses[0]))
  # One checkpoint for both hosts, holding each host's data-iterator state.
  manager = checkpoints.checkpoint_manager(str(workdir), read_only=True)
  assert manager.latest_step() == 3
  data_dir = workdir / "checkpoints" / "3" / "data"
  iterator_states = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  assert iterator_states == ["process_0-of-2.json", "process_1-of-2.json"]
