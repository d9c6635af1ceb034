"""The catalog at ROPE's size: seconds and peak memory of `load_rope`, extrapolated.

  python -m benchmarks.catalog_scale [--fractions 0.01,0.02,0.04] [--frames_per_clip 10]
      [--num_frames 8] [--full]

Writes the nine txt files of a `training` split (text only: no image files) at each
fraction of ROPE's real training size (`../shared/cope_reference.md`: 187,431 products,
3,025,236 product pages, 5,837,716 short videos, 3,464,116 live clips), parses each in a
fresh process with `rope_format.load_rope(root, "training", check_files=False,
num_frames=T)`, and records the seconds and the process's peak RSS (`VmHWM`, which
covers the parse and the interpreter). A linear fit of
seconds and of peak RSS against the number of rows, over the fractions, gives the full
size, with the fit's residuals. `--full` also parses the full size once.

Frames per clip: the release lists every frame of every clip (`*_video_frames.txt`,
`*_live_clips.txt`) and its readers sample T = 8 segment-middle frames of the frames in
time order, so a clip has at least 8 listed frames and the frame files hold "tens of
millions of rows" for 9.3M clips. `--frames_per_clip` (default 10: 93M frame rows, the
upper end of "tens of millions") sets it; all clips get the same count.

Rows look like the release's: numeric ids, `uuid.jpg` image names, Chinese titles and
ASR texts with ASCII and full-width commas, a space after the separator, frame rows of
each clip out of time order, 13-digit epoch-ms timestamps for live clips. Nothing is
malformed: this measures the reader's cost on clean rows. Prints a table and writes
JSON (`--out`, default benchmarks/results/catalog_scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROPE_TRAINING = {"products": 187_431, "pages": 3_025_236, "videos": 5_837_716,
                 "lives": 3_464_116}
_TITLE_WORDS = ("新款", "正品", "包邮", "红色", "条纹", "水杯", "大容量", "ins风", "官方旗舰店",
                "XL", "送礼", "，", ", ")
_ASR_WORDS = ("家人们", "看一下", "这个", "真的", "非常好用", "点个关注", "99元", "OK", "，",
              ", ", "上车", "1号链接")


def _texts(rng: np.random.Generator, words: tuple[str, ...], count: int,
           length: int) -> list[str]:
  picks = rng.integers(0, len(words), (count, length))
  table = np.array(words, dtype=object)
  return ["".join(row) for row in table[picks]]


def write_split(root: str, fraction: float, frames_per_clip: int, seed: int = 0) -> int:
  """Writes the nine `training_*.txt` files at `fraction` of ROPE's size; their rows."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  counts = {k: max(2, round(v * fraction)) for k, v in ROPE_TRAINING.items()}
  products = [str(p) for p in 10 ** 11 + rng.choice(10 ** 11, counts["products"],
                                                     replace=False)]
  rows = 0

  def write(name: str, lines: list[str]) -> None:
    nonlocal rows
    with open(os.path.join(root, f"training_{name}.txt"), "w", encoding="utf-8",
              newline="\n") as f:
      f.write("\n".join(lines) + "\n")
    rows += len(lines)

  for domain, plural, digits in (("page", "pages", 14), ("video", "videos", 16),
                                 ("live", "lives", 16)):
    count = counts[plural]
    ids = [str(i) for i in 10 ** (digits - 1) + rng.choice(9 * 10 ** (digits - 1), count,
                                                            replace=False)]
    owners = rng.integers(0, len(products), count)
    write(f"product_{plural}_pair", [f"{products[o]}, {i}" for o, i in zip(owners, ids)])
    words, length = (_TITLE_WORDS, 12) if domain == "page" else (_ASR_WORDS, 20)
    text_name = {"page": "page_titles", "video": "video_asrs", "live": "live_asrs"}[domain]
    write(text_name, [f"{i}, {t}" for i, t in zip(ids, _texts(rng, words, count, length))])
    names = (f"{u:032x}.jpg" for u in rng.integers(0, 2 ** 63, count * max(1, frames_per_clip)))
    if domain == "page":
      write("page_images", [f"{i}, {next(names)}" for i in ids])
      continue
    if domain == "video":
      keys = np.arange(frames_per_clip) * 25 + 3
    else:
      keys = 1_650_000_000_000 + np.arange(frames_per_clip) * 2000
    lines = []
    order = rng.permutation(frames_per_clip)  # rows of a clip out of time order
    for i in ids:
      lines.extend(f"{i}, {keys[k]}, {next(names)}" for k in order)
    write("video_frames" if domain == "video" else "live_clips", lines)
  return rows


_PARSE = """
import json, resource, sys, time
from data_pipelines import rope_format
root, num_frames = sys.argv[1], int(sys.argv[2])
with open("/proc/self/status") as status:
    baseline = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
start = time.perf_counter()
catalog = rope_format.load_rope(root, "training", check_files=False,
                                **({"num_frames": num_frames} if num_frames else {}))
seconds = time.perf_counter() - start
frames = sum(len(c.frames) for c in catalog.videos.values())
# VmHWM: this process image's own peak (ru_maxrss would carry the launching process's
# peak over fork + exec)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_kib": peak, "import_rss_kib": baseline,
    "pages": len(catalog.pages), "videos": len(catalog.videos), "lives": len(catalog.lives),
    "video_frames_kept": frames, "problems": len(catalog.problems)}))
"""


def parse(root: str, num_frames: int) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _PARSE, root, str(num_frames)],
                          cwd=repo, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": repo})
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  return json.loads(result.stdout.strip().splitlines()[-1])


def linear_fit(xs: list[float], ys: list[float]) -> dict:
  """Least squares y = a + b x; the residuals and the value at full size."""
  slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
  residuals = [float(y - (intercept + slope * x)) for x, y in zip(xs, ys)]
  return {"intercept": float(intercept), "slope_per_row": float(slope),
          "residuals": residuals}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fractions", default="0.01,0.02,0.04")
  parser.add_argument("--frames_per_clip", type=int, default=10)
  parser.add_argument("--num_frames", type=int, default=8,
                      help="load_rope(num_frames=T): frames kept per clip (0: all)")
  parser.add_argument("--full", action="store_true", help="also parse the full size")
  parser.add_argument("--out", default="benchmarks/results/catalog_scale.json")
  args = parser.parse_args(argv)
  fractions = [float(f) for f in args.fractions.split(",")]
  full_rows = None
  runs = []
  with tempfile.TemporaryDirectory(prefix="cope_catalog_scale_") as tmp:
    for fraction in fractions + ([1.0] if args.full else []):
      root = os.path.join(tmp, f"f{fraction}")
      start = time.perf_counter()
      rows = write_split(root, fraction, args.frames_per_clip)
      written = time.perf_counter() - start
      result = parse(root, args.num_frames)
      shutil.rmtree(root)
      runs.append({"fraction": fraction, "rows": rows, "write_seconds": round(written, 1),
                   **result})
      print(f"fraction {fraction:g}: {rows:,} rows, parsed in {result['seconds']:.1f} s, "
            f"peak RSS {result['peak_rss_kib'] / 2**20:.2f} GiB", flush=True)
  fitted = [r for r in runs if r["fraction"] in fractions]
  per_frac_rows = fitted[-1]["rows"] / fitted[-1]["fraction"]
  full_rows = round(per_frac_rows)
  time_fit = linear_fit([r["rows"] for r in fitted], [r["seconds"] for r in fitted])
  rss_fit = linear_fit([r["rows"] for r in fitted],
                       [r["peak_rss_kib"] / 2**20 for r in fitted])
  full_seconds = time_fit["intercept"] + time_fit["slope_per_row"] * full_rows
  full_gib = rss_fit["intercept"] + rss_fit["slope_per_row"] * full_rows
  header = (f"{'fraction':>8} {'rows':>12} {'seconds':>8} {'s / M rows':>10} "
            f"{'peak GiB':>9} {'GiB / M rows':>12}")
  print(header)
  print("-" * len(header))
  for r in runs:
    millions = r["rows"] / 1e6
    gib = r["peak_rss_kib"] / 2**20
    print(f"{r['fraction']:>8g} {r['rows']:>12,} {r['seconds']:>8.1f} "
          f"{r['seconds'] / millions:>10.2f} {gib:>9.2f} {gib / millions:>12.3f}")
  print(f"full size ({full_rows:,} rows, {args.frames_per_clip} frames per clip), linear "
        f"fit: {full_seconds / 60:.1f} min, {full_gib:.1f} GiB peak RSS (residuals: "
        f"seconds {', '.join(f'{v:+.2f}' for v in time_fit['residuals'])}; GiB "
        f"{', '.join(f'{v:+.3f}' for v in rss_fit['residuals'])})")
  report = {
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(),
                  "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
      "setup": {"rope_training": ROPE_TRAINING, "frames_per_clip": args.frames_per_clip,
                "num_frames": args.num_frames, "check_files": False,
                "fractions": fractions},
      "runs": runs,
      "fit": {"seconds": time_fit, "peak_rss_gib": rss_fit},
      "full_size": {"rows": full_rows, "seconds": round(full_seconds, 1),
                    "peak_rss_gib": round(full_gib, 2),
                    "measured": next((r for r in runs if r["fraction"] == 1.0), None)},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
