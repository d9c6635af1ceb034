"""Downloading a ROPE release by URL, against a local HTTP server that misbehaves on cue.

The data is `data_pipelines.synthetic`'s URL form (txt files + a served image folder).
The server (`tests/image_server.py`: stdlib `http.server` on 127.0.0.1 in a thread)
serves it under /rope/images/ and can answer a given file name with 404, 403, 500,
429/503 with Retry-After, a slow response, a body shorter than its Content-Length, an
HTML page or a connection reset. The last check of every test: the ledger and the files
on disk agree.
"""

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from PIL import Image
import pytest

from cope_jax.base import domains
from data_pipelines import download
from data_pipelines import http_fetch
from data_pipelines import images
from data_pipelines import rope_format
from data_pipelines import synthetic
from data_pipelines import transforms
from tests import image_server

DATA = {"products": 3, "test_products": 2, "frames_per_clip": 4, "image_size": 32, "seed": 1}
NUM_FRAMES = 2  # of the 4 per clip: the two segment middles are fetched
FAST = {"workers": 4, "timeout": 5.0, "retries": 2, "backoff": 0.01, "max_backoff": 0.05,
        "progress": False, "log": lambda line: None}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """The URL form (txt files, served images) and the names training would use."""
  root = tmp_path_factory.mktemp("release")
  synthetic.generate(str(root / "rope"), url_form_images=str(root / "served"), **DATA)
  synthetic.generate(str(root / "local"), **DATA)  # the same data with local images
  expected, all_names = set(), set()
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(str(root / "local"), split)
    assert not catalog.problems
    for page in catalog.pages.values():
      expected.add(os.path.basename(page.image))
    for clips in (catalog.videos, catalog.lives):
      for clip in clips.values():
        names = [os.path.basename(frame) for frame in clip.frames]
        all_names.update(names)
        expected.update(names[i] for i in transforms.sample_frame_indices(len(names),
                                                                           NUM_FRAMES))
  all_names |= {n for n in expected}
  return {"rope": str(root / "rope"), "served": str(root / "served"),
          "expected": expected, "all": all_names}


@pytest.fixture(scope="module")
def module_server(release):
  server = image_server.FlakyServer(release["served"])
  yield server
  server.stop()


@pytest.fixture
def server(module_server):
  module_server.reset()
  return module_server


@pytest.fixture
def rope_dir(release, tmp_path):
  """A fresh copy of the release's txt files (no images)."""
  target = tmp_path / "rope"
  shutil.copytree(release["rope"], target)
  assert not os.path.exists(target / "images")
  return str(target)


def _page_names(rope_dir, split="training"):
  with open(os.path.join(rope_dir, f"{split}_page_images.txt"), encoding="utf-8") as f:
    return [line.rstrip("\n").split(", ")[-1] for line in f]


def _ledger(rope_dir):
  with open(os.path.join(rope_dir, download.REPORT_NAME), encoding="utf-8") as f:
    report = json.load(f)
  with open(os.path.join(rope_dir, download.FAILURES_NAME), encoding="utf-8") as f:
    failures = [json.loads(line) for line in f]
  return report, failures


def _decodes(path):
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except OSError:
    return False


def check_ledger_agrees_with_disk(rope_dir, out=None, expected=None):
  """Every complete file decodes, every failure has its line, the counts add up;
  with `expected`, every expected name is a file or a failure. Returns (report,
  failures by name, names on disk)."""
  out = out or os.path.join(rope_dir, "images")
  report, failures = _ledger(rope_dir)
  counts = report["counts"]
  on_disk = set(os.listdir(out)) - {download.PARTIAL_DIR} if os.path.isdir(out) else set()
  for name in on_disk:
    assert _decodes(os.path.join(out, name)), name
  by_name = {failure["name"]: failure for failure in failures}
  assert len(by_name) == len(failures) == counts["failed"]
  assert not set(by_name) & on_disk
  assert counts["requested"] == (counts["downloaded"] + counts["already_present"]
                                 + counts["failed"] + counts["not_attempted"])
  for failure in failures:
    assert set(failure) == {"file", "line", "id", "name", "url", "status", "error",
                            "attempts"}
    with open(os.path.join(rope_dir, failure["file"]), encoding="utf-8") as f:
      row = f.read().split("\n")[failure["line"] - 1]
    assert row.startswith(failure["id"] + ",") and row.endswith(failure["name"])
  if report["status"] == "complete":
    assert counts["not_attempted"] == 0
    assert not os.path.exists(os.path.join(out, download.PARTIAL_DIR))
    assert counts["downloaded"] + counts["already_present"] == len(on_disk)
    if expected is not None:
      assert on_disk | set(by_name) == expected
  return report, by_name, on_disk


def _run(rope_dir, server, **kwargs):
  options = {**FAST, "num_frames": NUM_FRAMES, **kwargs}
  return download.download(rope_dir, server.prefix, **options)


# --- tests -------------------------------------------------------------------------

def test_fetches_the_sampled_frames_where_the_reader_finds_them(rope_dir, server, release):
  report = _run(rope_dir, server)
  _, failures, on_disk = check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  counts = report["counts"]
  assert not failures and on_disk == release["expected"]
  assert counts["downloaded"] == len(release["expected"])
  assert counts["frames_skipped_by_sampling"] == len(release["all"] - release["expected"])
  assert counts["bytes"] == sum(os.path.getsize(os.path.join(rope_dir, "images", n))
                                for n in on_disk)
  assert report["options"]["num_frames"] == NUM_FRAMES and report["status"] == "complete"
  # Every file bytewise as served, fetched once.
  for name in on_disk:
    with open(os.path.join(rope_dir, "images", name), "rb") as a, \
        open(os.path.join(release["served"], name), "rb") as b:
      assert a.read() == b.read()
  assert all(len(times) == 1 for times in server.requests.values())
  # The reader finds them; sampling again picks exactly the frames fetched.
  catalog = rope_format.load_rope(rope_dir, "training")
  for clip in list(catalog.videos.values()) + list(catalog.lives.values()):
    assert len(clip.frames) == NUM_FRAMES
    assert transforms.sample_frame_indices(len(clip.frames), NUM_FRAMES) == [0, 1]
  # The frames left out on purpose are not problems, only counted (over both splits).
  test_catalog = rope_format.load_rope(rope_dir, "test")
  assert catalog.problems == [] and test_catalog.problems == []
  assert (catalog.frames_skipped_by_download + test_catalog.frames_skipped_by_download
          == counts["frames_skipped_by_sampling"] > 0)
  # A segment-middle frame lost after the download is a problem again, on its line.
  lost_clip = next(iter(catalog.videos.values()))
  os.remove(lost_clip.frames[0])
  catalog = rope_format.load_rope(rope_dir, "training")
  assert [p["line"] for p in catalog.problems] == [lost_clip.frame_lines[0]]
  assert "not found" in catalog.problems[0]["reason"]


def test_all_frames_fetches_every_frame_and_the_reader_reports_nothing(rope_dir, server,
                                                                       release):
  report = _run(rope_dir, server, all_frames=True)
  check_ledger_agrees_with_disk(rope_dir, expected=release["all"])
  assert report["counts"]["frames_skipped_by_sampling"] == 0
  for split in rope_format.SPLITS:
    assert rope_format.load_rope(rope_dir, split).problems == []


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_prefix_with_or_without_trailing_slash(rope_dir, server, release, trailing_slash):
  prefix = server.prefix if trailing_slash else server.prefix.rstrip("/")
  download.download(rope_dir, prefix, split="test", **{**FAST, "num_frames": NUM_FRAMES})
  _, failures, on_disk = check_ledger_agrees_with_disk(rope_dir)
  assert not failures and on_disk
  assert set(_page_names(rope_dir, "test")) <= on_disk
  assert not set(_page_names(rope_dir, "training")) & on_disk  # --split test only


# name -> (scripted answers, then the answer for good, fetched in the end?, attempts,
#          last status, words of the error)
MISBEHAVIOURS = {
    "not_found": ([], "404", False, 1, 404, "HTTP 404"),
    "forbidden": ([], "403", False, 1, 403, "HTTP 403"),
    "server_error_twice": (["500", "500"], "ok", True, 3, None, None),
    "rate_limited": (["429"], "ok", True, 2, None, None),
    "unavailable": (["503"], "ok", True, 2, None, None),
    "slower_than_timeout": ([], "slow", False, 3, None, "timed out"),
    "truncated_body": ([], "truncated", False, 3, 200, "cut short"),
    "html_body": ([], "html", False, 1, 200, "not an image (text/html)"),
    "connection_reset": ([], "reset", False, 3, None, ""),
}


@pytest.mark.parametrize("misbehaviour", sorted(MISBEHAVIOURS))
def test_misbehaving_server(rope_dir, server, release, misbehaviour):
  script, always, fetched, attempts, status, error = MISBEHAVIOURS[misbehaviour]
  victim = _page_names(rope_dir)[1]
  server.script[victim] = list(script)
  server.always[victim] = always
  report = _run(rope_dir, server, **({"timeout": 0.5} if always == "slow" else {}))
  _, failures, on_disk = check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  requests = len(server.requests[victim])
  if misbehaviour == "connection_reset":
    # aiohttp itself resends once when a reused keep-alive connection is reset.
    assert attempts <= requests <= 2 * attempts
  else:
    assert requests == attempts
  if fetched:
    assert not failures and victim in on_disk
    assert report["counts"]["downloaded"] == len(release["expected"])
  else:
    assert set(failures) == {victim} and victim not in on_disk
    failure = failures[victim]
    assert failure["attempts"] == attempts and failure["status"] == status
    assert error in failure["error"]
    assert failure["url"] == server.prefix + victim
    assert failure["file"] == "training_page_images.txt" and failure["line"] == 2
  if script and script[0] in ("429", "503"):  # Retry-After: 1 honoured (backoff is 0.01)
    first, second = server.requests[victim]
    assert second - first >= 0.95


def test_unreachable_prefix_stops_early_with_a_clear_message(rope_dir, release):
  with socket.socket() as probe:  # a port nobody listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  prefix = f"http://127.0.0.1:{port}/rope/images/"
  start = time.monotonic()
  with pytest.raises(download.DownloadAborted, match=f"127.0.0.1:{port}.*no request has"):
    download.download(rope_dir, prefix, **{**FAST, "abort_after": 6, "retries": 5})
  assert time.monotonic() - start < 10
  report, failures, on_disk = check_ledger_agrees_with_disk(rope_dir)
  assert report["status"] == "aborted" and prefix in report["message"]
  assert not on_disk and 0 < len(failures) <= FAST["workers"]
  assert report["counts"]["not_attempted"] >= len(release["expected"]) - FAST["workers"]
  assert all("cannot connect" in f["error"] for f in failures.values())


def test_names_that_are_not_plain_file_names_are_reported_and_never_written(
    rope_dir, server, release, tmp_path):
  outside = tmp_path / "outside.jpg"
  pages = _page_names(rope_dir)
  bad = ["../escape.jpg", str(outside), server.prefix + pages[0], ".hidden.jpg"]
  path = os.path.join(rope_dir, "training_page_images.txt")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for index, name in enumerate(bad):
    lines[index] = lines[index].rsplit(", ", 1)[0] + ", " + name
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  shutil.copy(os.path.join(release["served"], pages[1]), release["served"] + "/../escape.jpg")
  try:
    _run(rope_dir, server)
  finally:
    os.remove(release["served"] + "/../escape.jpg")
  expected = release["expected"] - set(pages[:len(bad)]) | set(bad)
  _, failures, on_disk = check_ledger_agrees_with_disk(rope_dir, expected=expected)
  assert set(failures) == set(bad)
  for index, name in enumerate(bad):
    assert failures[name]["attempts"] == 0 and failures[name]["url"] is None
    assert "not a plain file name" in failures[name]["error"]
    assert failures[name]["line"] == index + 1
  assert not outside.exists() and not os.path.exists(os.path.join(rope_dir, "escape.jpg"))
  assert not (tmp_path / "escape.jpg").exists()
  assert not any(".." in n or n.startswith(".") for n in server.requests)


def test_rerun_skips_complete_files_and_refetches_missing_and_broken_ones(
    rope_dir, server, release):
  pages = _page_names(rope_dir)
  server.always[pages[0]] = "404"
  first = _run(rope_dir, server)
  assert first["counts"]["failed"] == 1
  check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  images = os.path.join(rope_dir, "images")
  with open(os.path.join(images, pages[1]), "r+b") as f:  # cut short, e.g. a power loss
    f.truncate(100)
  os.remove(os.path.join(images, pages[2]))
  os.makedirs(os.path.join(images, download.PARTIAL_DIR))  # left by a killed run
  with open(os.path.join(images, download.PARTIAL_DIR, "x.jpg.0"), "wb") as f:
    f.write(b"\xff\xd8 half")
  server.reset()
  second = _run(rope_dir, server)
  _, failures, _ = check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  assert not failures
  assert set(server.requests) == set(pages[:3])
  assert second["counts"]["downloaded"] == 3
  assert second["counts"]["already_present"] == len(release["expected"]) - 3


def test_rerun_checks_files_quickly_and_verify_full_finds_a_damaged_middle(
    rope_dir, server, release):
  expected = len(release["expected"])
  assert _run(rope_dir, server)["counts"]["downloaded"] == expected
  server.reset()
  counts = _run(rope_dir, server)["counts"]  # every file decoded when stored: quick
  assert (counts["already_present"], counts["checked_quickly"],
          counts["checked_by_decode"]) == (expected, expected, 0)
  assert not server.requests
  # Bytes flipped in the middle of one file, its size and modification time kept.
  victim = _page_names(rope_dir)[1]
  path = os.path.join(rope_dir, "images", victim)
  stat = os.stat(path)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  middle = len(data) // 2
  data[middle - 8:middle + 8] = bytes(b ^ 0xFF for b in data[middle - 8:middle + 8])
  with open(path, "wb") as f:
    f.write(data)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  with pytest.raises(ValueError, match="not a decodable image"):
    images.check(bytes(data))
  server.reset()
  assert _run(rope_dir, server)["counts"]["checked_quickly"] == expected
  assert not server.requests  # the quick check cannot see a damaged middle
  counts = _run(rope_dir, server, verify="full")["counts"]
  assert set(server.requests) == {victim} and counts["downloaded"] == 1
  assert (counts["checked_quickly"], counts["checked_by_decode"]) == (0, expected - 1)
  check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  with open(path, "rb") as a, open(os.path.join(release["served"], victim), "rb") as b:
    assert a.read() == b.read()
  # Files the ledger does not know (put there by hand) are decoded once, then quick.
  os.remove(os.path.join(rope_dir, download.VERIFIED_NAME))
  server.reset()
  assert _run(rope_dir, server)["counts"]["checked_by_decode"] == expected
  assert _run(rope_dir, server)["counts"]["checked_quickly"] == expected
  assert not server.requests


def test_max_side_re_encodes_large_images(rope_dir, server):
  download.download(rope_dir, server.prefix, split="test", max_side=16,
                    **{**FAST, "num_frames": NUM_FRAMES})
  _, _, on_disk = check_ledger_agrees_with_disk(rope_dir)
  for name in on_disk:
    with Image.open(os.path.join(rope_dir, "images", name)) as image:
      assert image.size == (16, 16) and image.format == "JPEG"


def test_kill_9_mid_run_loses_nothing_complete(rope_dir, server, release):
  server.delay = 0.1  # 4 workers: about 40 files/s, the whole run about 4 s
  out = os.path.join(rope_dir, "images")
  process = subprocess.Popen(
      [sys.executable, "-m", "data_pipelines.download", "--rope_dir", rope_dir,
       "--url_prefix", server.prefix, "--num_frames", str(NUM_FRAMES), "--workers", "4",
       "--no_progress"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and process.poll() is None:
    if os.path.isdir(out) and len(os.listdir(out)) > 10:
      break
    time.sleep(0.02)
  assert process.poll() is None, process.stderr.read().decode()
  process.send_signal(signal.SIGKILL)
  process.wait()
  process.stderr.close()
  report, _ = _ledger(rope_dir)
  assert report["status"] == "running"  # killed: no final report
  complete = set(os.listdir(out)) - {download.PARTIAL_DIR}
  assert 10 <= len(complete) < len(release["expected"])
  assert all(_decodes(os.path.join(out, name)) for name in complete)

  server.reset()
  rerun = _run(rope_dir, server)
  check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  assert rerun["counts"]["already_present"] == len(complete)
  assert not set(server.requests) & complete  # nothing complete was fetched again


def test_exit_status_follows_the_max_failure_rate(rope_dir, server, release, capsys):
  def main(*flags):
    download.main(["--rope_dir", rope_dir, "--url_prefix", server.prefix, "--num_frames",
                   str(NUM_FRAMES), "--workers", "4", "--retries", "0", "--no_progress",
                   *flags])

  main("--max_failure_rate", "0")  # every image fetched: success even with no margin
  assert _ledger(rope_dir)[0]["counts"]["failed"] == 0
  requested = len(release["expected"])
  victims = _page_names(rope_dir)[:2]
  for victim in victims:
    server.always[victim] = "404"
    os.remove(os.path.join(rope_dir, "images", victim))
  capsys.readouterr()
  main("--max_failure_rate", str(3 / requested))  # 2 failed: under the rate
  assert "2 failed" in capsys.readouterr().out
  assert 2 / requested > download.DEFAULT_MAX_FAILURE_RATE
  for flags in ([], ["--max_failure_rate", str(1 / requested)]):  # [] : the default
    with pytest.raises(SystemExit) as exit_info:
      main(*flags)
    assert exit_info.value.code == 1
    assert (f"TooManyFailures: 2 of the {requested} images requested failed "
            f"({2 / requested:.2%}, more than --max_failure_rate") in str(exit_info.value)
    assert download.FAILURES_NAME in str(exit_info.value)
  report, failures, _ = check_ledger_agrees_with_disk(rope_dir, expected=release["expected"])
  assert set(failures) == set(victims) and report["status"] == "complete"
  with pytest.raises(SystemExit, match="max_failure_rate must be in"):
    main("--max_failure_rate", "1.5")


def test_retry_after_accepts_seconds_and_http_dates():
  now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
  assert http_fetch.retry_after_seconds("7", now) == 7.0
  assert http_fetch.retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
  assert http_fetch.retry_after_seconds("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
  assert http_fetch.retry_after_seconds("soon", now) is None
  assert http_fetch.retry_after_seconds(None, now) is None


def test_bad_options_and_missing_files_give_clear_errors(rope_dir, tmp_path):
  with pytest.raises(SystemExit, match="url_prefix 'ftp://host/' is not an http"):
    download.main(["--rope_dir", rope_dir, "--url_prefix", "ftp://host/"])
  with pytest.raises(SystemExit, match="--workers must be >= 1"):
    download.main(["--rope_dir", rope_dir, "--url_prefix", "http://h/", "--workers", "0"])
  with pytest.raises(SystemExit, match="--out must not be ROPE_DIR itself"):
    download.main(["--rope_dir", rope_dir, "--url_prefix", "http://h/", "--out", rope_dir])
  os.remove(os.path.join(rope_dir, "test_live_clips.txt"))
  with pytest.raises(SystemExit, match="lacks 'test' file.*test_live_clips.txt"):
    download.main(["--rope_dir", rope_dir, "--url_prefix", "http://h/", "--split", "test"])
  with pytest.raises(SystemExit, match="holds no split"):
    download.main(["--rope_dir", str(tmp_path / "empty"), "--url_prefix", "http://h/"])
  assert not os.path.exists(os.path.join(rope_dir, download.REPORT_NAME))


def test_media_names_reads_what_the_reader_reads(tmp_path):
  root = str(tmp_path / "rope")
  synthetic.generate(root, inject_faults=True, **DATA)
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(root, split, check_files=False)
    for domain in domains.NAMES:
      names, problems = rope_format.media_names(root, split, domain)
      records = catalog.domain(domain)
      media_file = catalog.media_file(domain)
      assert set(names) >= set(records)  # records also need a text row or default
      for item_id, record in records.items():
        frames = [record.image] if domain == "page" else record.frames
        assert [name for _, name, _ in names[item_id]] == [os.path.basename(f) for f in frames]
      reader_problems = [p for p in catalog.problems if p["file"] == media_file]
      assert [p for p in problems if p["file"] == media_file] == reader_problems
      assert all(p in catalog.problems for p in problems)


def test_injected_image_faults_become_ledger_lines(tmp_path):
  rope, served = str(tmp_path / "rope"), str(tmp_path / "served")
  synthetic.generate(rope, url_form_images=served, inject_faults=True, **DATA)
  with open(os.path.join(rope, "injected_faults.json"), encoding="utf-8") as f:
    faults = json.load(f)["faults"]
  damaged = {fault["image"]: fault["kind"] for fault in faults
             if fault["kind"] in ("missing_image_file", "truncated_jpeg")}
  server = image_server.FlakyServer(served)
  try:
    report = download.download(rope, server.prefix, all_frames=True, **FAST)
  finally:
    server.stop()
  _, failures, _ = check_ledger_agrees_with_disk(rope)
  assert set(failures) == set(damaged)
  for name, kind in damaged.items():
    if kind == "missing_image_file":
      assert failures[name]["status"] == 404 and failures[name]["attempts"] == 1
    else:
      assert "not an image (image/jpeg)" in failures[name]["error"]
  assert report["catalog_problems"] > 0  # the malformed rows, counted, not fetched
