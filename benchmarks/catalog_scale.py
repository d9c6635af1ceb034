"""ROPE's training catalog at its full size: seconds and peak memory of `load_rope` and
of `prepare --plan_only`, and the cost of the image-file check.

  python -m benchmarks.catalog_scale --fractions 1 --data_dir /scratch/catalog
  python -m benchmarks.catalog_scale --fractions 0.1 [--num_frames 8] [--keep_data]
      [--file_check_fraction 0.01] [--out benchmarks/results/catalog_scale.json]

Writes the nine txt files of a `training` split (text only: no image files) at each
fraction of ROPE's training size (`../shared/cope_reference.md`: 187,431 products,
3,025,236 product pages, 5,837,716 short videos, 3,464,116 live clips; fraction 1 is
the full size, about 131M lines and 12 GB) and measures, each in a fresh process:

  load_rope   `rope_format.load_rope(root, "training", check_files=False,
              num_frames=T)`: seconds, peak RSS (`VmHWM`: the parse and the
              interpreter) and the RSS still held after it returned (the catalog)
  plan_only   `prepare --plan_only --check_files=false --num_frames T`: the same
              parse, the products table, the shard plan and the report (no image)
  plan_files  `rope_tfds.plan_build(..., plan_dir, check_files=False)`: what a full
              `prepare` does before it decodes an image: the parse and the plan's Arrow
              files (their size is recorded; they are deleted)

and checks that each reports exactly the problem rows planted in the files. With
`--file_check_fraction F` it also writes a catalog at F whose image names are hard
links to one JPEG (every name of every media row: no image data) and measures the
added time of the file check (`load_rope(check_files=True)` minus `check_files=False`),
and a `stat` per file from a Python loop for comparison, per million files.

Rows are as hard as ROPE's (an independent description of the release's files):
  * numeric ids (14 digits for pages, 16 for clips, 12 for products), uuid image
    names, a space after each separator;
  * frames per clip vary: videos 4-40, lives 4-30, about 11 on average (4 + a negative
    binomial), so about 103M frame rows at full size; a clip's rows are out of time
    order and the clips of a frame file in another order than the pair file's;
  * ASR texts have a long tail: log-normal lengths with a median of 100 characters and
    about 0.5% of 1,000 or more (at most 8,000); titles have 15-60 characters; both
    Chinese with ASCII and full-width commas. Texts are drawn from a pool of 2^18
    distinct ones (the reader does not deduplicate texts, so this costs it nothing);
  * about 0.01% of the rows are planted problem rows, each of which the reader must
    report once: exact duplicate pair rows, blank lines and unpaired ids in the text
    files, unpaired page-image rows, frame rows with a non-numeric key, exact duplicate
    frame rows.

The files are written column-wise (NumPy and pyarrow, a few minutes at full size).
`--data_dir` keeps them in a folder of one's choice (full size: 12 GB of disk) and
`--keep_data` reuses files written before with the same fraction and seed (a
`catalog.json` there says which). Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks import common

ROPE_TRAINING = {"products": 187_431, "pages": 3_025_236, "videos": 5_837_716,
                 "lives": 3_464_116}
FRAMES_PER_CLIP = {"video": (4, 40), "live": (4, 30)}  # least, most
ASR_MEDIAN_CHARS, ASR_SIGMA, ASR_MAX_CHARS = 100, 0.9, 8000
TITLE_CHARS = (15, 60)
PROBLEM_RATE = 1e-4
GENERATOR_VERSION = 2  # bump when the files written change
_POOL_SIZE = 1 << 18
_CHUNK_RECORDS = 1 << 18
_WORDS = ("新款", "正品", "包邮", "红色", "条纹", "水杯", "大容量", "ins风", "官方旗舰店", "XL",
          "送礼", "家人们", "看一下", "这个", "真的", "非常好用", "点个关注", "99元", "OK", "上车",
          "1号链接", "，", ", ", "的", "了", "我们", "宝宝", "today", "今天", "直播间", "优惠",
          "下单", "质量", "款式", "颜色", "尺码", "M码", "面料", "舒服", "！", "。")
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_LARGE = pa.large_string()
_COMMA, _EMPTY, _NEWLINE = (pa.scalar(s, _LARGE) for s in (", ", "", "\n"))


# --- writing the files ---------------------------------------------------------------

def _text_pool(rng: np.random.Generator, lengths: np.ndarray) -> pa.Array:
  """Distinct texts of the given lengths (characters), cut from one long random text."""
  picks = rng.integers(0, len(_WORDS), 1 << 20)  # about 2M characters
  source = "".join(np.array(_WORDS, dtype=object)[picks])
  starts = rng.integers(0, len(source) - int(lengths.max()), len(lengths))
  texts = [source[s:s + n].strip() or "空" for s, n in zip(starts.tolist(), lengths.tolist())]
  return pa.array(texts, _LARGE)


def _numbers(values: np.ndarray) -> pa.Array:
  return pa.array(values).cast(_LARGE)


def _uuid_names(rng: np.random.Generator, count: int) -> pa.Array:
  """`8-4-4-4-12` hex uuids + `.jpg`, as a large_string array (no Python string each)."""
  hexed = _HEX[rng.integers(0, 16, (count, 32), dtype=np.uint8)]
  out = np.empty((count, 40), np.uint8)
  out[:, 36:] = np.frombuffer(b".jpg", np.uint8)
  out[:, [8, 13, 18, 23]] = ord("-")
  for (a, b), (c, d) in zip(((0, 8), (9, 13), (14, 18), (19, 23), (24, 36)),
                            ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))):
    out[:, a:b] = hexed[:, c:d]
  offsets = np.arange(0, 40 * count + 1, 40, dtype=np.int64)
  return pa.Array.from_buffers(_LARGE, count, [None, pa.py_buffer(offsets),
                                               pa.py_buffer(out)])


def _unique_ids(rng: np.random.Generator, count: int, digits: int) -> np.ndarray:
  """`count` distinct numbers of `digits` digits, in random order."""
  span = 9 * 10 ** (digits - 1)
  gaps = rng.integers(1, max(2, span // (count + 1)), count)
  return rng.permutation(10 ** (digits - 1) + np.cumsum(gaps))


def _join(*columns) -> pa.Array:
  return pc.binary_join_element_wise(*columns, _COMMA)


class _Writer:
  """Writes rows (large_string arrays, no line end) to one txt file, planting problem
  rows after random rows: `plant(rows, positions) -> rows to insert` each."""

  def __init__(self, path: str, rng: np.random.Generator):
    self._file = open(path, "wb")  # pylint: disable=consider-using-with
    self._rng = rng
    self.rows = self.planted = self.bytes = 0

  def write(self, rows: pa.Array, plant=None) -> None:
    if plant is not None:
      count = int(self._rng.binomial(len(rows), PROBLEM_RATE))
      if count:
        after = np.sort(self._rng.choice(len(rows), count, replace=False))
        planted = plant(rows, after).cast(_LARGE)
        order = np.insert(np.arange(len(rows)), after + 1, len(rows) + np.arange(count))
        rows = pa.concat_arrays([rows, planted]).take(pa.array(order))
        self.planted += count
    lines = pc.binary_join_element_wise(rows, _EMPTY, _NEWLINE)
    offsets = np.frombuffer(lines.buffers()[1], np.int64, len(lines) + 1, lines.offset * 8)
    data = memoryview(lines.buffers()[2])[int(offsets[0]):int(offsets[-1])]
    self._file.write(data)
    self.rows += len(lines)
    self.bytes += len(data)

  def close(self) -> None:
    self._file.close()


def _duplicates(rows: pa.Array, after: np.ndarray) -> pa.Array:
  return rows.take(pa.array(after))


def _blank(rows: pa.Array, after: np.ndarray) -> pa.Array:
  return pa.array([""] * len(after), _LARGE)


def write_split(root: str, fraction: float, seed: int = 0) -> dict:
  """Writes the nine `training_*.txt` files at `fraction` of ROPE's size.

  Returns what was written: lines, bytes, planted problems, frame rows, text lengths.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  counts = {k: max(2, round(v * fraction)) for k, v in ROPE_TRAINING.items()}
  products = _numbers(_unique_ids(rng, counts["products"], 12))
  asr_lengths = np.clip(np.round(rng.lognormal(np.log(ASR_MEDIAN_CHARS), ASR_SIGMA,
                                               _POOL_SIZE)), 5, ASR_MAX_CHARS).astype(int)
  title_lengths = rng.integers(TITLE_CHARS[0], TITLE_CHARS[1] + 1, _POOL_SIZE)
  pools = {"asr": _text_pool(rng, asr_lengths), "title": _text_pool(rng, title_lengths)}
  pool_chars = {"asr": pc.utf8_length(pools["asr"]).to_numpy(),
                "title": pc.utf8_length(pools["title"]).to_numpy()}
  summary = {"lines": 0, "bytes": 0, "planted": 0, "planted_by_file": {},
             "frame_rows": 0, "records": {}, "text_chars": {}}
  writers = []

  def writer(name: str) -> _Writer:
    writers.append((name, _Writer(os.path.join(root, f"training_{name}.txt"), rng)))
    return writers[-1][1]

  for domain, plural, digits, text_file, media_file in (
      ("page", "pages", 14, "page_titles", "page_images"),
      ("video", "videos", 16, "video_asrs", "video_frames"),
      ("live", "lives", 16, "live_asrs", "live_clips")):
    count = counts[plural]
    ids = _unique_ids(rng, count, digits)  # pair-file order
    pool = "title" if domain == "page" else "asr"
    chars = []

    def unpaired(rows, after, digits=digits):  # ids of a length no real id has
      fake = _numbers(10 ** (digits - 2) + rng.integers(0, 10 ** (digits - 2), len(after)))
      return _join(fake, rows.take(pa.array(after)))

    pair, text = writer(f"product_{plural}_pair"), writer(text_file)
    text_plant = (lambda rows, after: _blank(rows, after) if rng.random() < 0.5
                  else unpaired(rows, after))
    text_order = rng.permutation(count)
    for start in range(0, count, _CHUNK_RECORDS):
      chunk = slice(start, start + _CHUNK_RECORDS)
      owners = rng.integers(0, len(products), len(ids[chunk]))
      pair.write(_join(products.take(pa.array(owners)), _numbers(ids[chunk])), _duplicates)
      picks = rng.integers(0, _POOL_SIZE, len(text_order[chunk]))
      chars.append(pool_chars[pool][picks])
      text.write(_join(_numbers(ids[text_order[chunk]]), pools[pool].take(pa.array(picks))),
                 text_plant)
    chars = np.concatenate(chars)
    summary["text_chars"][domain] = {
        "median": float(np.median(chars)), "mean": round(float(chars.mean()), 1),
        "at_least_1000": int((chars >= 1000).sum()), "max": int(chars.max())}
    summary["records"][domain] = count

    media = writer(media_file)
    clip_order = rng.permutation(count)
    if domain == "page":
      for start in range(0, count, _CHUNK_RECORDS):
        chunk_ids = _numbers(ids[clip_order[start:start + _CHUNK_RECORDS]])
        media.write(_join(chunk_ids, _uuid_names(rng, len(chunk_ids))), unpaired)
      continue
    least, most = FRAMES_PER_CLIP[domain]
    frames = np.minimum(least + rng.negative_binomial(2, 2 / 9, count), most)
    summary["frame_rows"] += int(frames.sum())

    def bad_key(rows, after):
      parts = pc.split_pattern(rows.take(pa.array(after)), ", ", max_splits=2)
      return _join(pc.list_element(parts, 0), pa.scalar("1x7", _LARGE),
                   pc.list_element(parts, 2))

    frame_plant = lambda rows, after: (bad_key(rows, after) if rng.random() < 0.5
                                       else _duplicates(rows, after))
    clips_per_chunk = _CHUNK_RECORDS // 4
    for start in range(0, count, clips_per_chunk):
      clips = clip_order[start:start + clips_per_chunk]
      per_clip = frames[clips]
      clip_of_row = np.repeat(np.arange(len(clips)), per_clip)
      rank = np.arange(len(clip_of_row)) - np.repeat(np.cumsum(per_clip) - per_clip, per_clip)
      shuffled = np.lexsort((rng.random(len(rank)), clip_of_row))  # out of time order
      clip_of_row, rank = clip_of_row[shuffled], rank[shuffled]
      if domain == "video":  # frame numbers: a clip's first frame and its step
        first = rng.integers(0, 50, len(clips))
        step = rng.integers(5, 40, len(clips))
      else:  # epoch-ms timestamps, 13 digits
        first = 1_650_000_000_000 + rng.integers(0, 10 ** 10, len(clips))
        step = rng.integers(1000, 5000, len(clips))
      keys = first[clip_of_row] + rank * step[clip_of_row]
      media.write(_join(_numbers(ids[clips][clip_of_row]), _numbers(keys),
                        _uuid_names(rng, len(keys))), frame_plant)

  for name, file_writer in writers:
    file_writer.close()
    summary["lines"] += file_writer.rows
    summary["bytes"] += file_writer.bytes
    summary["planted"] += file_writer.planted
    summary["planted_by_file"][f"training_{name}.txt"] = file_writer.planted
  return summary


def ensure_split(root: str, fraction: float, seed: int, keep: bool) -> dict:
  """The files at `root` for (fraction, seed): reused when `keep` and `catalog.json`
  says they were written so; else written. Returns write_split's summary (+ seconds)."""
  manifest = os.path.join(root, "catalog.json")
  wanted = {"generator": GENERATOR_VERSION, "fraction": fraction, "seed": seed}
  if keep and os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      found = json.load(f)
    if found.get("key") == wanted:
      return {**found["summary"], "reused": True}
  shutil.rmtree(root, ignore_errors=True)
  start = time.perf_counter()
  summary = write_split(root, fraction, seed)
  summary["write_seconds"] = round(time.perf_counter() - start, 1)
  with open(manifest, "w", encoding="utf-8") as f:
    json.dump({"key": wanted, "summary": summary}, f)
  return {**summary, "reused": False}


_LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one file


def link_images(root: str) -> int:
  """Hard links, in root/images/, to small JPEGs (one per 60,000 names) under every
  image name the media files give (the planted bad rows' included): a folder of
  millions of files that costs no image data. Returns how many names."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image_dir = os.path.join(root, "images")
  sources = os.path.join(root, "sources")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(sources, exist_ok=True)
  count, source = 0, ""
  for name in ("page_images", "video_frames", "live_clips"):
    with open(os.path.join(root, f"training_{name}.txt"), encoding="utf-8") as f:
      for line in f:
        if count % _LINKS_PER_FILE == 0:
          source = os.path.join(sources, f"{count}.jpg")
          if not os.path.exists(source):
            Image.new("RGB", (8, 8), (200, 30, 30)).save(source, quality=90)
        image = line.rstrip("\n").rsplit(", ", 1)[-1]
        try:
          os.link(source, os.path.join(image_dir, image))
          count += 1
        except FileExistsError:  # a planted duplicate row
          pass
  return count


# --- measuring -----------------------------------------------------------------------

_MEASURE = """
import json, os, resource, sys, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
what, root, num_frames, check_files, out = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                            sys.argv[4] == "1", sys.argv[5])
if what == "load_rope":
    from data_pipelines import rope_format
    baseline, cpu_start = status("VmRSS"), cpu()
    start = time.perf_counter()
    catalog = rope_format.load_rope(root, "training", check_files=check_files,
                                    num_frames=num_frames or None)
    seconds = time.perf_counter() - start
    result = {"records": {d: len(catalog.domain(d)) for d in ("page", "video", "live")},
              "problems": len(catalog.problems), "held_rss_kib": status("VmRSS")}
elif what == "plan_files":
    from data_pipelines import rope_plan, rope_tfds
    baseline, cpu_start = status("VmRSS"), cpu()
    start = time.perf_counter()
    build, plans = rope_tfds.plan_build(root, ["training"], rope_tfds.rope_config(num_frames),
                                        os.path.join(out, "plan"), check_files=check_files)
    seconds = time.perf_counter() - start
    result = {"records": {name: len(rope_plan.open_plan(path)) for name, path in plans.items()},
              "plan_bytes": sum(os.path.getsize(path) for path in plans.values()),
              "problems": len(build["splits"]["training"]["read_problems"])}
    import shutil
    shutil.rmtree(os.path.join(out, "plan"))
else:
    from data_pipelines import prepare
    baseline, cpu_start = status("VmRSS"), cpu()
    start = time.perf_counter()
    report = prepare.prepare(root, out, splits=["training"], num_frames=num_frames,
                             plan_only=True, check_files=check_files, progress=False,
                             log=lambda line: None)
    seconds = time.perf_counter() - start
    entry = report["splits"]["training"]
    result = {"records": {d: c["records"] for d, c in entry["domains"].items()},
              "products": entry["products"], "problems": report["num_problems"],
              "images_planned": report["plan"]["images"],
              "shards_planned": report["plan"]["shards"]}
# VmHWM: this process image's own peak (ru_maxrss would carry the launching process's
# peak over fork + exec)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu() - cpu_start,
                  "load_average_1min": os.getloadavg()[0], "peak_rss_kib": status("VmHWM"),
                  "import_rss_kib": baseline, **result}))
"""


MEASURED = ("load_rope", "plan_only", "plan_files")


def measure(what: str, root: str, num_frames: int, check_files: bool = False) -> dict:
  """Runs `what` (one of MEASURED) on `root` in a fresh process."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory(prefix="cope_plan_") as out:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, what, root, str(num_frames),
         "1" if check_files else "0", out],
        cwd=repo, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"})
    if result.returncode:
      raise RuntimeError(result.stderr[-3000:])
    left = os.listdir(out)
  return {**json.loads(result.stdout.strip().splitlines()[-1]), "left_in_out": left}


_STAT_LOOP = """
import json, os, sys, time
root = sys.argv[1]
names = []
for name in ("page_images", "video_frames", "live_clips"):
    with open(os.path.join(root, f"training_{name}.txt"), encoding="utf-8") as f:
        names += [line.rstrip("\\n").rsplit(", ", 1)[-1] for line in f]
image_dir = os.path.join(root, "images")
start = time.perf_counter()
found = sum(os.path.exists(os.path.join(image_dir, name)) for name in names)
print(json.dumps({"seconds": time.perf_counter() - start, "names": len(names),
                  "found": found}))
"""


def _gib(kib: int) -> float:
  return kib / 2 ** 20


def file_check(root: str, fraction: float, num_frames: int, seed: int) -> dict:
  """The file check's added cost, per million files, on hard-linked files."""
  summary = ensure_split(root, fraction, seed, keep=False)
  start = time.perf_counter()
  files = link_images(root)
  linked = time.perf_counter() - start
  unchecked = measure("load_rope", root, num_frames, check_files=False)
  checked = measure("load_rope", root, num_frames, check_files=True)
  planted = summary["planted"]
  assert checked["problems"] == unchecked["problems"] == planted, (checked, planted)
  stat = subprocess.run([sys.executable, "-c", _STAT_LOOP, root], capture_output=True,
                        text=True, check=True)
  stat = json.loads(stat.stdout)
  added = checked["seconds"] - unchecked["seconds"]
  return {"fraction": fraction, "files": files, "link_seconds": round(linked, 1),
          "load_rope_unchecked": unchecked, "load_rope_checked": checked,
          "added_seconds": round(added, 2),
          "added_seconds_per_million_files": round(added / files * 1e6, 2),
          "added_peak_rss_gib": round(_gib(checked["peak_rss_kib"]
                                           - unchecked["peak_rss_kib"]), 3),
          "stat_loop_seconds_per_million_files": round(stat["seconds"] / stat["names"]
                                                       * 1e6, 2)}


def main(argv: list[str] | None = None) -> None:
  parser = common.parser(__doc__, "catalog_scale.json")
  parser.add_argument("--fractions", default="1", help="comma-separated; 1: full size")
  parser.add_argument("--num_frames", type=int, default=8,
                      help="frames kept per clip (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default="", help="where the txt files go (default: a "
                      "temporary folder, removed at the end)")
  parser.add_argument("--keep_data", action="store_true", help="reuse and keep the files "
                      "in --data_dir")
  parser.add_argument("--file_check_fraction", type=float, default=0.0,
                      help="also measure the file check on hard links at this fraction")
  args = parser.parse_args(argv)
  fractions = [float(f) for f in args.fractions.split(",") if f]
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="cope_catalog_scale_")
  try:
    runs, check = _measure_all(args, fractions, data_dir)
  finally:
    if not args.data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
  _print_table(runs)
  common.write_result(args.out, {
      "machine": common.machine(),
      "setup": {"rope_training": ROPE_TRAINING, "frames_per_clip": FRAMES_PER_CLIP,
                "asr_chars": {"median": ASR_MEDIAN_CHARS, "log_sigma": ASR_SIGMA,
                              "max": ASR_MAX_CHARS},
                "title_chars": TITLE_CHARS, "problem_rate": PROBLEM_RATE,
                "num_frames": args.num_frames, "check_files": False,
                "generator": GENERATOR_VERSION, "seed": args.seed},
      "runs": runs, "file_check": check})


def _measure_all(args, fractions, data_dir):
  """Each fraction's catalog written (or reused) and measured; the file check."""
  runs = []
  for fraction in fractions:
    root = os.path.join(data_dir, f"training_f{fraction:g}")
    summary = ensure_split(root, fraction, args.seed, args.keep_data)
    print(f"fraction {fraction:g}: {summary['lines']:,} lines, "
          f"{summary['bytes'] / 1e9:.2f} GB, {summary['frame_rows']:,} frame rows, "
          f"{summary['planted']:,} planted problem rows"
          + (" (reused)" if summary["reused"] else
             f" (written in {summary['write_seconds']:.0f} s)"), flush=True)
    run = {"fraction": fraction, "catalog": summary}
    for what in MEASURED:
      run[what] = measure(what, root, args.num_frames)
      assert run[what]["problems"] == summary["planted"], (what, run[what], summary)
      print(f"  {what}: {run[what]['seconds']:.1f} s ({run[what]['cpu_seconds']:.1f} s of "
            f"CPU, load {run[what]['load_average_1min']:.1f}), peak RSS "
            f"{_gib(run[what]['peak_rss_kib']):.2f} GiB, problems "
            f"{run[what]['problems']:,} (planted {summary['planted']:,})", flush=True)
    assert run["plan_only"]["left_in_out"] == [] or all(
        name == "configs" for name in run["plan_only"]["left_in_out"])
    runs.append(run)
    if not args.keep_data:
      shutil.rmtree(root)
  check = None
  if args.file_check_fraction:
    root = os.path.join(data_dir, f"file_check_f{args.file_check_fraction:g}")
    check = file_check(root, args.file_check_fraction, args.num_frames, args.seed)
    shutil.rmtree(root)
    print(f"file check on {check['files']:,} hard-linked files: +{check['added_seconds']}"
          f" s ({check['added_seconds_per_million_files']} s per million files; a stat "
          f"per file from Python: {check['stat_loop_seconds_per_million_files']} s per "
          "million)", flush=True)
  return runs, check


def _print_table(runs):
  header = (f"{'fraction':>8} {'lines':>12} {'GB':>6} {'what':>10} {'seconds':>8} "
            f"{'CPU s':>7} {'peak GiB':>9} {'held GiB':>9} {'problems':>9}")
  print(header)
  print("-" * len(header))
  for run in runs:
    for what in MEASURED:
      result = run[what]
      held = (f"{_gib(result['held_rss_kib']):>9.2f}" if "held_rss_kib" in result
              else f"{'':>9}")
      print(f"{run['fraction']:>8g} {run['catalog']['lines']:>12,} "
            f"{run['catalog']['bytes'] / 1e9:>6.2f} {what:>10} {result['seconds']:>8.1f} "
            f"{result['cpu_seconds']:>7.1f} {_gib(result['peak_rss_kib']):>9.2f} {held} "
            f"{result['problems']:>9,}")


if __name__ == "__main__":
  main()
