"""Result files are written whole (`cope_jax.base.result_files`): a write that fails part-way
(a file-size limit standing in for a full disk) leaves the previous file or folder
byte-identical, no temporary file, and an error naming the file; files get the umask's
permissions. The report command under such a limit."""

import json
import os
import stat
import subprocess
import sys

import pytest

from cope_jax import eval_report
from cope_jax.base import result_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder) -> dict[str, bytes]:
  """Every file under `folder` (hidden ones too) -> its bytes."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, folder)] = f.read()
  return found


def _limited(command: list[str], limit_bytes: int | None) -> list[str]:
  """`command` run so that it may write files of at most `limit_bytes` (Python ignores
  SIGXFSZ, so a longer write fails with EFBIG, as on a full disk). A small launcher sets
  the limit and execs the command (no preexec_fn: forking this multithreaded process to
  run Python code in the child can deadlock)."""
  if limit_bytes is None:
    return command
  return [sys.executable, "-c", "import os, resource, sys; limit = int(sys.argv[1]); "
          "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
          "os.execv(sys.argv[2], sys.argv[2:])", str(limit_bytes), *command]


@pytest.fixture
def umask_022():
  previous = os.umask(0o022)
  yield
  os.umask(previous)


def test_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
  result_files.write_json(str(tmp_path / "metrics.json"), {"a": 1})
  with result_files.staged_directory(str(tmp_path / "eval")) as staging:
    result_files.write_json(os.path.join(staging, "manifest.json"), {"b": 2})
  with result_files.replaced_directory(str(tmp_path / "export")) as staging:
    result_files.write_text(os.path.join(staging, "index.txt"), "x")
  for path in ("metrics.json", "eval/manifest.json", "export/index.txt"):
    assert stat.S_IMODE(os.stat(tmp_path / path).st_mode) == 0o644, path
  os.umask(0o027)
  result_files.write_json(str(tmp_path / "group.json"), {"a": 1})
  assert stat.S_IMODE(os.stat(tmp_path / "group.json").st_mode) == 0o640
  assert result_files.file_mode() == 0o640


WRITER = """
import sys
from cope_jax.base import result_files
kind, path = sys.argv[1:]
if kind == "file":
  result_files.write_text(path, "new " * 10_000)
elif kind == "staged":
  with result_files.staged_directory(path, last=("metrics.json",)) as staging:
    result_files.write_json(staging + "/metrics.json", {"new": True})
    result_files.write_text(staging + "/report.md", "new " * 10_000)
elif kind == "replaced":
  with result_files.replaced_directory(path) as staging:
    result_files.write_text(staging + "/small.txt", "new")
    result_files.write_text(staging + "/big.bin", "new " * 10_000)
elif kind == "append":
  result_files.append_json_line(path, {"new": "x" * 30_000})
"""


@pytest.mark.parametrize("kind", ["file", "staged", "replaced", "append"])
def test_a_write_failing_part_way_keeps_the_previous_result(tmp_path, kind):
  folder = tmp_path / "out"
  folder.mkdir()
  (folder / "report.md").write_text("# previous report\n")
  (folder / "metrics.json").write_text('{"previous": true}\n')
  (folder / "history.jsonl").write_text('{"previous": 1}\n')
  before = _files(tmp_path)
  target = {"file": folder / "report.md", "staged": folder, "replaced": folder,
            "append": folder / "history.jsonl"}[kind]
  result = subprocess.run(_limited([sys.executable, "-c", WRITER, kind, str(target)], 20_000),
                          cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "ResultWriteError" in result.stderr and "File too large" in result.stderr
  named = {"file": "report.md", "staged": "report.md", "replaced": "big.bin",
           "append": "history.jsonl"}[kind]
  assert f"could not write {tmp_path}/" in result.stderr and named in result.stderr
  assert _files(tmp_path) == before  # byte-identical, and no temporary or staging file


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
  (tmp_path / ".metrics.json.abc123.tmp").write_text("half")
  (tmp_path / ".eval.staging-999").mkdir()
  (tmp_path / ".eval.staging-999" / "metrics.json").write_text("half")
  result_files.write_json(str(tmp_path / "metrics.json"), {"a": 1})
  with result_files.staged_directory(str(tmp_path / "eval")) as staging:
    result_files.write_json(os.path.join(staging, "metrics.json"), {"a": 1})
  assert sorted(os.listdir(tmp_path)) == ["eval", "metrics.json"]
  # A folder swap killed between its two renames: the complete old folder is put back.
  os.rename(tmp_path / "eval", tmp_path / ".eval.old-999")
  with result_files.staged_directory(str(tmp_path / "eval")) as staging:
    result_files.write_text(os.path.join(staging, "report.md"), "new")
  assert sorted(os.listdir(tmp_path / "eval")) == ["metrics.json", "report.md"]
  assert sorted(os.listdir(tmp_path)) == ["eval", "metrics.json"]


def test_staged_directory_moves_the_named_file_last(tmp_path, monkeypatch):
  moved = []
  replace = os.replace
  monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)),
                                                   replace(a, b)))
  with result_files.staged_directory(str(tmp_path / "eval"), last=("metrics.json",)) as staging:
    for name in ("metrics.json", "a.md", "z.png"):
      result_files.write_text(os.path.join(staging, name), name)
  assert moved[-1] == "metrics.json" and set(moved[-3:]) == {"metrics.json", "a.md", "z.png"}


# ---- the report command ---------------------------------------------------------------


def _evaluated_workdir(root) -> str:
  """A workdir as evaluate leaves it (metrics, report), with a training log."""
  workdir = root / "run"
  (workdir / "eval").mkdir(parents=True)
  metrics = {"page_to_video": {"R@1": 0.5, "R@5": 0.75, "R@10": 1.0, "median_rank": 2.0,
                               "mAP": 0.5, "one_shot_accuracy": 0.5, "chance_R@1": 0.1},
             "checkpoint_step": 4, "split": "test", "num_items": {"page": 8, "video": 8}}
  (workdir / "eval" / "metrics.json").write_text(json.dumps(metrics))
  (workdir / "eval" / "report.md").write_text("# previous report\n")
  (workdir / "eval" / "examples.html").write_text("<html>previous</html>\n")
  with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
    for step in range(1, 41):
      f.write(json.dumps({"step": step, "loss": 5.0 / step, "loss/page_video": 1.0 / step,
                          "lr/visual": 1e-4}) + "\n")
  return str(workdir)


def _report_command(workdir: str, limit: int | None = None):
  return subprocess.run(
      _limited([sys.executable, "-m", "cope_jax.report", "--workdir", workdir], limit),
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True,
      text=True, timeout=300)


@pytest.mark.slow
def test_report_command_rewrites_the_report_and_keeps_it_when_a_write_fails(tmp_path,
                                                                           umask_022):
  workdir = _evaluated_workdir(tmp_path)
  before = _files(workdir)
  # The training-curves PNG is tens of KB: under a 4 KB limit its write fails part-way.
  failed = _report_command(workdir, limit=4096)
  assert failed.returncode == 1, failed.stderr
  lines = failed.stderr.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("error: ResultWriteError: ")
  assert eval_report.TRAINING_CURVES_FILE in lines[0] and "File too large" in lines[0]
  assert _files(workdir) == {**before, ".lock": _files(workdir)[".lock"]}

  done = _report_command(workdir)
  assert done.returncode == 0, done.stderr
  written = _files(os.path.join(workdir, "eval"))
  assert sorted(written) == ["examples.html", "metrics.json", "report.md",
                             "training_curves.png"]
  assert written["metrics.json"] == before[os.path.join("eval", "metrics.json")]
  markdown = written["report.md"].decode()
  assert "| page → video | 50.0 | 75.0 | 100.0 | 2 | 50.0 | 50.0 | 10.0 |" in markdown
  assert f"![training curves]({eval_report.TRAINING_CURVES_FILE})" in markdown
  assert f"({eval_report.EXAMPLES_FILE})" in markdown  # the kept page is linked
  for name in ("report.md", "training_curves.png"):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, "eval", name)).st_mode) == 0o644
