"""A synthetic dataset in exactly ROPE's format, small enough for a CPU demo.

  python -m data_pipelines.synthetic --out demo_run/rope --seed 0

writes `OUT/training_*.txt` and `OUT/test_*.txt` (the nine ROPE files per split, see
`data_pipelines/rope_format.py`), the JPEG files they name in `OUT/images/` (the txt
files name only `<uuid>.jpg`), and `OUT/vocab.txt`, a BERT WordPiece vocabulary covering
every text. The output depends only on the arguments: the same seed gives the same bytes.

  python -m data_pipelines.synthetic --out demo_run/rope --url_form demo_run/served

writes the URL form, as ROPE is released: the same txt files in OUT, nothing in
OUT/images, and the JPEG files in IMAGES_DIR, for a local HTTP server to serve
(`python -m http.server --bind 127.0.0.1 --directory demo_run/served 8000`) and
`data_pipelines.download` to fetch.

The data is learnable but hard in the ways ROPE is:
  * every product has a visual identity (the category's shape, a colour, a pattern and a
    glyph letter) and a Chinese title naming those attributes;
  * products come in families of the same category and glyph that differ in one
    attribute (colour or pattern): hard negatives;
  * product pages show the product cleanly on a plain background; short videos show it
    at varying scale, position and rotation over clutter, some frames without it; live
    clips are blurred, heavily compressed, partly hidden by a presenter and carry an
    overlay banner;
  * ASR text is noisy: filler words and a few attributes, ASCII and full-width commas;
  * some products lack a domain and some texts are missing (written `空`).

`--inject_faults` then damages the data the ways real dumps are damaged (malformed,
duplicate and contradictory rows, blank lines, ids without images, missing and truncated
JPEGs) and lists every fault in `OUT/injected_faults.json` as {file, line, kind, ...}
(`data_pipelines.synthetic_faults`). What the data shows (products, pictures, texts) is
`data_pipelines.synthetic_world`.
"""

from __future__ import annotations

import json
import os
import re
import string

import numpy as np

from cope_jax.base import command_line
from cope_jax.base import domains
from data_pipelines import rope_format
from data_pipelines import synthetic_faults as faults_lib
from data_pipelines import synthetic_world as world

_PAGE = domains.get("page").files
_VIDEO = domains.get("video").files
_LIVE = domains.get("live").files
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# --- writing a split ---------------------------------------------------------------

class _SplitFiles:
  """The nine files of one split as lists of lines, written out at the end."""

  def __init__(self, split: str):
    self.split = split
    self.lines: dict[str, list[faults_lib.Line]] = {
        getattr(domain.files, role): [] for domain in domains.DOMAINS
        for role in ("pair", "text", "media")}

  def add(self, kind: str, *fields) -> None:
    self.lines[kind].append(faults_lib.Line(", ".join(str(f) for f in fields)))

  def write(self, out_dir: str) -> list[dict]:
    """Writes the files; returns the injected faults with their final line numbers."""
    faults = []
    for kind, lines in self.lines.items():
      name = rope_format.file_name(self.split, kind)
      with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(lines, start=1):
          f.write(line.text + "\n")
          if line.fault is not None:
            faults.append({"file": name, "line": number, **line.fault})
    return faults


def _domain_count(rng: np.random.Generator, missing_probability: float) -> int:
  if rng.random() < missing_probability:
    return 0
  return int(min(7, 1 + rng.poisson(2.7)))


def _video_frame_numbers(rng: np.random.Generator, count: int) -> np.ndarray:
  """Frame numbers that cross digit-count boundaries (9 -> 10 ...)."""
  return int(rng.integers(0, 10)) + int(rng.integers(3, 30)) * np.arange(count)


def _live_timestamps(rng: np.random.Generator, count: int) -> np.ndarray:
  """13-digit epoch milliseconds, a second or so apart."""
  start = 1_650_000_000_000 + int(rng.integers(0, 10 ** 10))
  return start + np.cumsum(rng.integers(800, 5000, count))


# How each clip domain looks: (frame renderer, frame keys, ASR spoken by a live host).
_CLIP_STYLES = {"video": (world.render_video, _video_frame_numbers, False),
                "live": (world.render_live, _live_timestamps, True)}


def _write_split(split: str, products: list[world.Product], image_dir: str,
                 rng: np.random.Generator, used_ids: set[str], frames_per_clip: int,
                 image_size: int) -> _SplitFiles:
  files = _SplitFiles(split)
  clip_domains = [domain for domain in domains.DOMAINS if domain.is_clip]
  frame_rows = {domain.files.media: [] for domain in clip_domains}

  def save(jpeg: bytes) -> str:
    name = world.new_uuid(rng) + ".jpg"
    with open(os.path.join(image_dir, name), "wb") as f:
      f.write(jpeg)
    return name

  for product in products:
    sprite = world.render_product(product, image_size)
    for _ in range(_domain_count(rng, 0.04)):
      page_id = world.new_id(rng, 14, used_ids)
      files.add(_PAGE.pair, product.product_id, page_id)
      title = world.make_title(product, rng)
      files.add(_PAGE.text, page_id, world.maybe_missing(title, rng, 0.03))
      files.add(_PAGE.media, page_id, save(world.render_page(sprite, rng, image_size)))
    for domain in clip_domains:
      render, frame_keys, live = _CLIP_STYLES[domain.name]
      for _ in range(_domain_count(rng, 0.08)):
        clip_id = world.new_id(rng, 16, used_ids)
        files.add(domain.files.pair, product.product_id, clip_id)
        asr = world.make_asr(product, rng, live=live)
        files.add(domain.files.text, clip_id, world.maybe_missing(asr, rng, 0.1))
        keys = frame_keys(rng, frames_per_clip)
        for key, jpeg in zip(keys, render(sprite, rng, image_size, frames_per_clip)):
          frame_rows[domain.files.media].append(f"{clip_id}, {int(key)}, {save(jpeg)}")
  for kind, rows in frame_rows.items():  # ROPE's frame files are not in time order
    for i in rng.permutation(len(rows)):
      files.lines[kind].append(faults_lib.Line(rows[i]))
  return files


# --- vocabulary --------------------------------------------------------------------

def make_vocab(texts: list[str]) -> list[str]:
  """A WordPiece vocabulary covering `texts`: specials, every character, ASCII words.

  Chinese is tokenised per character; ASCII words come whole (as written and
  lower-cased), and single letters/digits plus their `##` forms cover any other word.
  """
  tokens = set(string.ascii_letters + string.digits)
  tokens |= {"##" + c for c in string.ascii_letters + string.digits}
  for text in texts:
    tokens |= {c for c in text  # Chinese characters and punctuation, one token each
               if not c.isspace() and not (c.isascii() and c.isalnum())}
    for word in re.findall(r"[A-Za-z0-9]+", text):
      tokens |= {word, word.lower()}
  return list(SPECIAL_TOKENS) + sorted(tokens - set(SPECIAL_TOKENS))


# --- entry point -------------------------------------------------------------------

def generate(out_dir: str, *, products: int = 240, test_products: int = 60,
             frames_per_clip: int = 8, image_size: int = 64, seed: int = 0,
             inject_faults: bool = False, url_form_images: str | None = None) -> dict:
  """Writes a synthetic ROPE directory to `out_dir`; returns a summary dict.

  Args:
    out_dir: output directory (created). Files of an earlier run are overwritten, but
      images it named and this run does not are left in place: use a fresh directory.
    products, test_products: number of products in the training / test split.
    frames_per_clip: frames of every short video and live clip.
    image_size: side of the square JPEGs, in pixels.
    seed: everything (ids, file names, pictures, texts) follows from it.
    inject_faults: damage the data and write `injected_faults.json`.
    url_form_images: None: the images go to `out_dir/images/`. A directory: the URL
      form, as ROPE is released: `out_dir` gets the txt files only, and the images go
      to this directory (serve it over HTTP and fetch them with
      `data_pipelines.download`). Same seed, same bytes either way.
  """
  if products < 2 or test_products < 2 or frames_per_clip < 2 or image_size < 16:
    raise ValueError("need products >= 2, test_products >= 2, frames_per_clip >= 2 and "
                     f"image_size >= 16; got {products}, {test_products}, "
                     f"{frames_per_clip}, {image_size}")
  image_dir = url_form_images or os.path.join(out_dir, rope_format.IMAGE_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  os.makedirs(image_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  used_ids: set[str] = set()
  used_looks: set[tuple] = set()
  summary = {"seed": seed, "splits": {}}
  texts: list[str] = []
  faults: list[dict] = []
  for split_index, (split, count) in enumerate((("training", products),
                                                ("test", test_products))):
    split_products = world.plan_products(rng, count, used_ids, used_looks)
    files = _write_split(split, split_products, image_dir, rng, used_ids, frames_per_clip,
                         image_size)
    summary["splits"][split] = {
        "products": count,
        **{domain.plural: len(files.lines[domain.files.pair]) for domain in domains.DOMAINS}}
    if inject_faults:  # a separate stream, so the clean content matches a clean run
      faults_lib.inject_faults(files.lines, image_dir,
                                     np.random.default_rng([seed, split_index]), used_ids)
    faults += files.write(out_dir)
    for kind in (_PAGE.text, _VIDEO.text, _LIVE.text):
      texts += [line.text.split(",", 1)[-1] for line in files.lines[kind]]
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
    f.write("\n".join(make_vocab(texts)) + "\n")
  fault_path = os.path.join(out_dir, "injected_faults.json")
  if inject_faults:
    with open(fault_path, "w", encoding="utf-8") as f:
      json.dump({"faults": faults}, f, ensure_ascii=False, indent=1)
  elif os.path.exists(fault_path):
    os.remove(fault_path)
  summary["faults"] = len(faults)
  return summary


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("out", None, "output directory", **define)
  flags.DEFINE_integer("products", 240, "training products", **define)
  flags.DEFINE_integer("test_products", 60, "test products", **define)
  flags.DEFINE_integer("frames_per_clip", 8, "frames of each clip", **define)
  flags.DEFINE_integer("image_size", 64, "JPEG side in pixels", **define)
  flags.DEFINE_integer("seed", 0, "random seed of the data", **define)
  flags.DEFINE_bool("inject_faults", False, "damage the data; list the faults in "
                    "OUT/injected_faults.json", **define)
  flags.DEFINE_string("url_form", None, "IMAGES_DIR: write the URL form: the txt files in "
                      "OUT, the images in IMAGES_DIR (to serve over HTTP), nothing in "
                      "OUT/images", **define)


COMMAND = command_line.Command("python -m data_pipelines.synthetic", __doc__,
                               define_flags=_define_flags, required=("out",))


def _main(args) -> None:
  summary = generate(args.out, products=args.products, test_products=args.test_products,
                     frames_per_clip=args.frames_per_clip, image_size=args.image_size,
                     seed=args.seed, inject_faults=args.inject_faults,
                     url_form_images=args.url_form)
  for split, counts in summary["splits"].items():
    print(f"{split}: {counts['products']} products, {counts['pages']} pages, "
          f"{counts['videos']} videos, {counts['lives']} lives")
  if args.inject_faults:
    print(f"{summary['faults']} injected faults listed in "
          f"{os.path.join(args.out, 'injected_faults.json')}")
  if args.url_form:
    print(f"images in {args.url_form} (URL form: fetch them with data_pipelines.download)")
  print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
  """The command line (`argv`: the arguments after the program name; see COMMAND)."""
  command_line.run(COMMAND, _main, argv)


if __name__ == "__main__":
  main()
