"""Evaluation outputs are swapped in whole: a write of metrics.json or of the report that
fails part-way (an injected ENOSPC after half the bytes) leaves the previous eval/ folder
byte-identical with no temporary file, and the error names the file; a complete run
writes metrics.json with the umask's mode (0644)."""

import contextlib
import errno
import os
import stat

import pytest

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax import evaluate
from cope_jax import eval_report
from cope_jax.base import result_files
from tests import test_serving
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first


@pytest.fixture(scope="module")
def config(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """The tiny config, its model random weights given as converted ones (init_from)."""
  config = config_checks.resolve_vocab_size(
      tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir))
  init_dir = str(tmp_path_factory.mktemp("weights"))
  checkpoints.save_params(init_dir, {"model": test_serving.random_params(config, seed=2)})
  config.train.init_from = init_dir
  config.eval.report_examples = 2
  return config


def _folder(path) -> dict[str, bytes]:
  found = {}
  for root, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        found[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return found


@pytest.mark.parametrize("failing", [eval_report.METRICS_FILE, eval_report.EXAMPLES_FILE])
def test_a_failed_write_keeps_the_previous_evaluation(config, tmp_path, monkeypatch, failing):
  workdir = tmp_path / "run"
  eval_dir = workdir / "eval"
  eval_dir.mkdir(parents=True)
  previous = {"metrics.json": b'{"previous": true}\n', "report.md": b"# previous\n",
              "examples.html": b"<html>previous</html>\n"}
  for name, content in previous.items():
    (eval_dir / name).write_bytes(content)
  before = _folder(workdir)

  real_staged_file = result_files.staged_file

  @contextlib.contextmanager
  def disk_full_part_way(path):
    with real_staged_file(path) as temporary:
      yield temporary
      if os.path.basename(path) == failing:  # the writer wrote it: keep half, then fail
        size = os.path.getsize(temporary)
        with open(temporary, "rb+") as f:
          f.truncate(size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(result_files, "staged_file", disk_full_part_way)
  with pytest.raises(result_files.ResultWriteError,
                     match=rf"could not write .*/{failing}: No space left on device"):
    evaluate.run(config, str(workdir))
  after = _folder(workdir)
  after.pop(".lock")  # the workdir lock's holder line
  assert after == before  # byte-identical; no temporary file, no staging folder
  assert sorted(os.listdir(workdir)) == [".lock", "eval"]

  if failing != eval_report.METRICS_FILE:
    return
  monkeypatch.undo()
  previous_umask = os.umask(0o022)
  try:
    evaluate.run(config, str(workdir))
  finally:
    os.umask(previous_umask)
  assert (eval_dir / "metrics.json").read_bytes() != previous["metrics.json"]
  for name in ("metrics.json", "report.md", "examples.html", "history.jsonl"):
    assert stat.S_IMODE(os.stat(eval_dir / name).st_mode) == 0o644, name
