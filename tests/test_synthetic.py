"""The synthetic ROPE generator: format, determinism, difficulty, vocabulary."""

import collections
import json
import os

import numpy as np
from PIL import Image
import tokenizers

from cope_jax.base import domains
from data_pipelines import rope_format
from data_pipelines import synthetic
from data_pipelines import synthetic_faults
from data_pipelines import synthetic_world

SMALL = {"products": 4, "test_products": 2, "frames_per_clip": 2, "image_size": 16}


def _all_files(root):
  found = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = f.read()
  return found


def test_output_parses_with_zero_problems_in_both_splits(tiny_rope_dir):
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(tiny_rope_dir, split)
    assert catalog.problems == []
    assert catalog.pages and catalog.videos and catalog.lives
    assert all(len(v.frames) == 4 for v in catalog.videos.values())
  training = rope_format.load_rope(tiny_rope_dir, "training")
  test = rope_format.load_rope(tiny_rope_dir, "test")
  assert len(training.products) == 16 and len(test.products) == 8
  assert not set(training.products) & set(test.products)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
  synthetic.generate(str(tmp_path / "a"), seed=7, **SMALL)
  synthetic.generate(str(tmp_path / "b"), seed=7, **SMALL)
  synthetic.generate(str(tmp_path / "c"), seed=8, **SMALL)
  first = _all_files(tmp_path / "a")
  assert first == _all_files(tmp_path / "b")
  assert first != _all_files(tmp_path / "c")


def test_files_follow_rope_conventions(tiny_rope_dir):
  names = set(os.listdir(tiny_rope_dir))
  for split in rope_format.SPLITS:
    assert set(rope_format.split_file_names(split)) <= names
  with open(os.path.join(tiny_rope_dir, "training_live_clips.txt"), encoding="utf-8") as f:
    live_rows = [line.rstrip("\n").split(", ") for line in f]
  assert all(len(ts) == 13 and ts.isdigit() for _, ts, _ in live_rows)
  assert all(name.endswith(".jpg") and len(name) == 40 for _, _, name in live_rows)
  with open(os.path.join(tiny_rope_dir, "training_video_frames.txt"), encoding="utf-8") as f:
    frame_rows = [line.rstrip("\n").split(", ") for line in f]
  keys_by_video = collections.defaultdict(list)
  for video_id, key, _ in frame_rows:
    keys_by_video[video_id].append(int(key))
  assert any(keys != sorted(keys) for keys in keys_by_video.values())  # rows unordered
  image = Image.open(os.path.join(tiny_rope_dir, "images", frame_rows[0][2]))
  assert image.format == "JPEG" and image.size == (32, 32)


def test_texts_hold_commas_missing_markers_and_attributes(tmp_path):
  root = str(tmp_path / "rope")
  synthetic.generate(root, products=40, test_products=2, frames_per_clip=2, image_size=16)
  catalog = rope_format.load_rope(root, "training")
  titles = [p.text for p in catalog.pages.values()]
  asrs = [v.text for v in catalog.videos.values()] + [v.text for v in catalog.lives.values()]
  assert any("," in t for t in titles + asrs) and any("，" in t for t in titles + asrs)
  assert rope_format.MISSING_TEXT in asrs
  assert any(any(c.isascii() and c.isalpha() for c in t) for t in asrs)
  # A title names its product's colour; products of one family share their title words.
  assert all(t == rope_format.MISSING_TEXT or any(c in t for c in synthetic_world.COLOURS)
             for t in titles)
  products = catalog.products
  assert any(not all(entry.values()) for entry in products.values())  # a domain missing
  assert np.mean([len(e["page"]) for e in products.values()]) > 2


def test_products_come_with_hard_negatives():
  rng = np.random.default_rng(0)
  products = synthetic_world.plan_products(rng, 60, set(), set())
  looks = {(p.category, p.colour, p.pattern, p.glyph) for p in products}
  assert len(looks) == 60
  def differ_in_one(a, b):
    return (a.category == b.category and a.glyph == b.glyph
            and (a.colour != b.colour) + (a.pattern != b.pattern) == 1)
  hard_pairs = sum(differ_in_one(a, b) for i, a in enumerate(products) for b in products[i + 1:])
  assert hard_pairs >= 15


def test_vocab_tokenises_every_text_without_unknowns(tiny_rope_dir):
  vocab_path = os.path.join(tiny_rope_dir, "vocab.txt")
  with open(vocab_path, encoding="utf-8") as f:
    vocab = f.read().split("\n")[:-1]
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert len(vocab) == len(set(vocab))
  catalog = rope_format.load_rope(tiny_rope_dir, "training")
  texts = [r.text for d in domains.NAMES for r in catalog.domain(d).values()]
  for lowercase in (False, True):
    tokenizer = tokenizers.BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
    for text in texts:
      assert "[UNK]" not in tokenizer.encode(text).tokens, text


def test_live_frames_are_blurrier_than_page_images(tiny_rope_dir):
  catalog = rope_format.load_rope(tiny_rope_dir, "training")
  def sharpness(path):
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)
    return np.abs(np.diff(pixels, axis=1)).max(axis=1).mean()  # strongest edge per row
  page = np.mean([sharpness(p.image) for p in catalog.pages.values()])
  live = np.mean([sharpness(f) for c in catalog.lives.values() for f in c.frames])
  assert live < page


def test_url_form_writes_the_same_files_with_images_in_a_separate_folder(tmp_path):
  synthetic.generate(str(tmp_path / "local"), seed=5, inject_faults=True, **SMALL)
  synthetic.generate(str(tmp_path / "url" / "rope"), seed=5, inject_faults=True,
                     url_form_images=str(tmp_path / "url" / "served"), **SMALL)
  local = _all_files(tmp_path / "local")
  url_txt = _all_files(tmp_path / "url" / "rope")
  served = _all_files(tmp_path / "url" / "served")
  assert not os.path.exists(tmp_path / "url" / "rope" / "images")
  assert url_txt == {k: v for k, v in local.items() if not k.startswith("images" + os.sep)}
  assert served == {k[len("images" + os.sep):]: v for k, v in local.items()
                    if k.startswith("images" + os.sep)}
  # Each injector of the table leaves its kind in the fault list.
  faults = json.loads(url_txt["injected_faults.json"])["faults"]
  kinds = {fault["kind"] for fault in faults}
  assert kinds == {inject.__name__.lstrip("_") for inject in synthetic_faults.FAULT_INJECTORS}
