"""Download throughput: files/s at 1 worker vs 32 workers, against a server with latency.

  python -m benchmarks.download [--products 24] [--workers 1,32] [--delay_ms 20]
  python -m benchmarks.download --rerun_files 20000 [--delay_ms 0]

Writes a synthetic ROPE dataset in the URL form (`data_pipelines.synthetic --url_form`,
64 px JPEGs, 8 frames per clip) in a temporary folder, serves its images from a local
HTTP/1.1 server on 127.0.0.1 in a separate process (a thread per connection, every
response held back `--delay_ms` to simulate network latency), and times
`data_pipelines.download.download` fetching every image (`--all_frames`) into an empty
folder at each worker count, in the same run. The time covers the whole command
(reading the txt files, requests, checking and writing each image, the ledger);
`--repeats` runs per worker count, the best one kept. The baseline is 1 worker: one
request at a time, so its rate is bound by the latency (at most 1000 / delay_ms
files/s). Prints a table and writes JSON (`--out`, default
benchmarks/results/download.json).

`--rerun_files N` measures reruns instead: a dataset of at least N images (products
added until the txt files name N), fetched once with the largest worker count, then
three reruns over the complete folder, in the same run: `--verify quick` (size, JPEG
header and trailer of files the ledger knows as decoded), `--verify full` (every file
decoded whole: what every rerun cost before the quick check, the baseline), and quick
again after the ledger of decoded files was deleted (every file decoded once more and
recorded). Each rerun's time covers the whole command; files/s = files skipped /
seconds. JSON default: benchmarks/results/download_rerun.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import multiprocessing
import os
import shutil
import tempfile
import time
import urllib.parse

from benchmarks import common
from data_pipelines import download
from data_pipelines import synthetic

SERVED_PATH = "/images/"


class _DelayedHandler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  disable_nagle_algorithm = True  # as real servers: no 40 ms delayed-ACK stalls

  def log_message(self, *args):
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    time.sleep(self.server.delay_s)
    body = self.server.files.get(urllib.parse.unquote(self.path[len(SERVED_PATH):]))
    status = 200 if body is not None else 404
    body = body if body is not None else b"not found"
    self.send_response(status)
    self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


def serve(served_dir: str, delay_s: float, port_queue) -> None:
  """Serves the files of `served_dir` (held in memory) under /images/, each response
  `delay_s` late; puts the port on `port_queue`. Runs until killed."""
  files = {}
  for name in os.listdir(served_dir):
    with open(os.path.join(served_dir, name), "rb") as f:
      files[name] = f.read()
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DelayedHandler)
  server.daemon_threads = True
  server.files, server.delay_s = files, delay_s
  port_queue.put(server.server_address[1])
  server.serve_forever()


@contextlib.contextmanager
def image_server(served_dir: str, delay_ms: float):
  """Runs `serve` over `served_dir` in a separate process; yields the URL prefix of the
  served images, and kills the server on leaving."""
  context = multiprocessing.get_context("spawn")
  port_queue = context.Queue()
  server = context.Process(target=serve, args=(served_dir, delay_ms / 1000, port_queue),
                           daemon=True)
  server.start()
  try:
    yield f"http://127.0.0.1:{port_queue.get(timeout=60)}{SERVED_PATH}"
  finally:
    server.kill()
    server.join()


@dataclasses.dataclass
class Measurement:
  workers: int
  files: int
  seconds: float
  files_per_s: float
  megabytes_per_s: float


def measure(rope_dir: str, prefix: str, workers: int, repeats: int) -> Measurement:
  best = None
  for _ in range(repeats):
    out = os.path.join(rope_dir, "images")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = download.download(rope_dir, prefix, all_frames=True, workers=workers,
                               progress=False, log=lambda line: None)
    seconds = time.perf_counter() - start
    counts = report["counts"]
    assert counts["downloaded"] == counts["requested"] and not counts["failed"], counts
    if best is None or seconds < best[0]:
      best = (seconds, counts)
  seconds, counts = best
  return Measurement(workers, counts["downloaded"], round(seconds, 3),
                     round(counts["downloaded"] / seconds, 1),
                     round(counts["bytes"] / seconds / 1e6, 2))


@dataclasses.dataclass
class RerunMeasurement:
  rerun: str
  files: int
  checked_quickly: int
  checked_by_decode: int
  seconds: float
  files_per_s: float


def _images_named(rope_dir: str) -> int:
  names = set()
  for name in os.listdir(rope_dir):
    if name.endswith(("_page_images.txt", "_video_frames.txt", "_live_clips.txt")):
      with open(os.path.join(rope_dir, name), encoding="utf-8") as f:
        names.update(line.rsplit(",", 1)[-1].strip() for line in f)
  return len(names)


def measure_reruns(rope_dir: str, prefix: str, workers: int) -> list[RerunMeasurement]:
  """The first download (untimed here), then the three reruns of the module docstring."""
  quiet = {"all_frames": True, "workers": workers, "progress": False,
           "log": lambda line: None}
  first = download.download(rope_dir, prefix, **quiet)["counts"]
  assert first["downloaded"] == first["requested"] and not first["failed"], first
  runs = [("quick", "quick", False), ("full (baseline)", "full", False),
          ("quick, ledger deleted", "quick", True)]
  measurements = []
  for label, verify, forget in runs:
    if forget:
      os.remove(os.path.join(rope_dir, download.VERIFIED_NAME))
    start = time.perf_counter()
    counts = download.download(rope_dir, prefix, verify=verify, **quiet)["counts"]
    seconds = time.perf_counter() - start
    assert counts["already_present"] == counts["requested"] == first["requested"], counts
    measurements.append(RerunMeasurement(label, counts["already_present"],
                                         counts["checked_quickly"],
                                         counts["checked_by_decode"], round(seconds, 3),
                                         round(counts["already_present"] / seconds, 1)))
  return measurements


def _rerun_dataset(root: str, min_files: int, seed: int) -> tuple[str, str, int]:
  """A synthetic dataset whose txt files name at least `min_files` images (products
  added until they do): (ROPE folder, folder of the images to serve, products)."""
  rope_dir, served = os.path.join(root, "rope"), os.path.join(root, "served")
  products = max(2, min_files // 60)
  while True:
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    synthetic.generate(rope_dir, products=products, test_products=2, frames_per_clip=8,
                       image_size=64, seed=seed, url_form_images=served)
    if _images_named(rope_dir) >= min_files:
      return rope_dir, served, products
    products = int(products * 1.1) + 1


def main_reruns(args) -> None:
  """--rerun_files: the rerun measurements (see the module docstring)."""
  workers = max(int(w) for w in args.workers.split(","))
  with tempfile.TemporaryDirectory(prefix="cope_download_rerun_bench_") as root:
    rope_dir, served, products = _rerun_dataset(root, args.rerun_files, args.seed)
    with image_server(served, args.delay_ms) as prefix:
      measurements = measure_reruns(rope_dir, prefix, workers)
  baseline = measurements[1]
  print(common.table(
      ["rerun", "files", "quick", "decoded", "seconds", "files/s", "vs full"],
      [[m.rerun, m.files, m.checked_quickly, m.checked_by_decode, f"{m.seconds:.2f}",
        f"{m.files_per_s:.0f}", f"{baseline.seconds / m.seconds:.1f}x"]
       for m in measurements]))
  common.write_result(args.out or common.result_path("download_rerun.json"), {
      "machine": common.machine(),
      "setup": {"rerun_files": args.rerun_files, "train_products": products,
                "jpeg_side": 64, "frames_per_clip": 8, "all_frames": True,
                "workers": workers, "delay_ms": args.delay_ms},
      "measurements": [dataclasses.asdict(m) for m in measurements],
      "speedup_vs_full": {m.rerun: round(baseline.seconds / m.seconds, 2)
                          for m in measurements}})


def main(argv: list[str] | None = None) -> None:
  parser = common.parser(__doc__, out_help="JSON file (default benchmarks/results/"
                         "download.json; with --rerun_files download_rerun.json)")
  parser.add_argument("--products", type=int, default=24,
                      help="training products of the generated dataset (test: a quarter)")
  parser.add_argument("--workers", default="1,32", help="comma-separated worker counts; "
                      "the first is the baseline")
  parser.add_argument("--delay_ms", type=float, default=20.0,
                      help="latency the server adds to every response")
  parser.add_argument("--repeats", type=int, default=3,
                      help="runs per worker count above 1 (the best is kept)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rerun_files", type=int, default=0,
                      help="measure reruns over a folder of at least this many files")
  args = parser.parse_args(argv)
  if args.rerun_files:
    main_reruns(args)
    return
  worker_counts = [int(w) for w in args.workers.split(",")]

  with tempfile.TemporaryDirectory(prefix="cope_download_bench_") as root:
    rope_dir, served = os.path.join(root, "rope"), os.path.join(root, "served")
    synthetic.generate(rope_dir, products=args.products,
                       test_products=max(2, args.products // 4), frames_per_clip=8,
                       image_size=64, seed=args.seed, url_form_images=served)
    with image_server(served, args.delay_ms) as prefix:
      measurements = [measure(rope_dir, prefix, workers, 1 if workers == 1 else args.repeats)
                      for workers in worker_counts]

  baseline = measurements[0]
  speedups = {m.workers: m.files_per_s / baseline.files_per_s for m in measurements}
  bound = f" (bound for 1 worker: {1000 / args.delay_ms:.0f} files/s)" if args.delay_ms else ""
  print(f"server latency {args.delay_ms:g} ms per request{bound}")
  print(common.table(
      ["workers", "files", "seconds", "files/s", "MB/s", f"vs {baseline.workers} worker"],
      [[m.workers, m.files, f"{m.seconds:.2f}", f"{m.files_per_s:.1f}",
        f"{m.megabytes_per_s:.2f}", f"{speedups[m.workers]:.1f}x"] for m in measurements],
      left=0))
  common.write_result(args.out or common.result_path("download.json"), {
      "machine": common.machine(),
      "setup": {"delay_ms": args.delay_ms, "train_products": args.products,
                "jpeg_side": 64, "frames_per_clip": 8, "all_frames": True,
                "server": "http.server ThreadingHTTPServer, HTTP/1.1, separate process",
                "repeats": args.repeats},
      "measurements": [dataclasses.asdict(m) for m in measurements],
      "speedup_vs_baseline": {f"{w}_workers": round(r, 2) for w, r in speedups.items()},
  })


if __name__ == "__main__":
  main()
