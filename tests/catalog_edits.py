"""A catalog that changed since the last export: a copy of a ROPE folder with products
added, a title changed and a video removed (the incremental export and Beam job tests)."""

import os
import shutil

from cope_jax import checkpoints
from cope_jax import config_checks
from cope_jax.base import domains
from cope_jax.testing import tiny_configs
from data_pipelines import prepare
from data_pipelines import rope_format

NEW_TITLE_SUFFIX = " 正品 包邮 新款"
BROKEN_PAGE_ID = "990000000000001"
BROKEN_IMAGE = "broken-page.jpg"  # in the catalog's root: not a decodable image
MALFORMED_ROW = "a row without any separator"


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def _first_field(line):
  return line.split(",", 1)[0].strip()


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def copy_catalog(rope_dir, out_dir):
  """Copies the txt files of `rope_dir` into `out_dir`; its images folder is linked."""
  os.makedirs(out_dir)
  for name in os.listdir(rope_dir):
    source = os.path.join(rope_dir, name)
    if name == rope_format.IMAGE_SUBDIR:
      os.symlink(os.path.abspath(source), os.path.join(out_dir, name))
    elif os.path.isfile(source):
      shutil.copy(source, os.path.join(out_dir, name))
  return str(out_dir)


def prepared_copy_with_random_weights(rope_dir, root, seed):
  """A copy of `rope_dir`'s catalog in ROOT/catalog, prepared in ROOT/prepared, and the
  tiny config over it whose `train.init_from` holds a random model's weights (`seed`).
  Returns (config, catalog folder, prepared folder)."""
  from tests import test_serving  # pylint: disable=g-import-not-at-top

  catalog = copy_catalog(rope_dir, os.path.join(root, "catalog"))
  prepared = os.path.join(root, "prepared")
  prepare.prepare(catalog, prepared, progress=False, log=lambda line: None)
  config = tiny_configs.training_config(prepared, catalog)
  weights = os.path.join(root, "weights")
  checkpoints.save_params(weights, {"model": test_serving.random_params(
      config_checks.resolve_vocab_size(config), seed=seed)})
  config.train.init_from = weights
  return config, catalog, prepared


def change_catalog(root, split="test", added_products=2):
  """Changes `split` of the ROPE folder `root` in place, as a shop's catalog changes
  overnight: the records of the first `added_products` products of the training split
  are added to it (pairs, texts and images), the first page gets a new title and the
  first video is taken down. And two faults: a page whose image does not decode
  (BROKEN_PAGE_ID: dropped with a decode problem) and a malformed titles row.

  Returns {"added" | "changed" | "removed": {domain: [ids]}, "malformed": (txt file,
  line), "broken": (txt file, line of the broken image)}.
  """
  other = next(s for s in rope_format.SPLITS if s != split)
  page = domains.get("page")
  new_products = []
  for line in _lines(os.path.join(root, rope_format.file_name(other, page.files.pair))):
    product = _first_field(line)
    if product not in new_products:
      new_products.append(product)
  new_products = set(new_products[:added_products])

  result = {"added": {}, "changed": {}, "removed": {}}
  for domain in domains.DOMAINS:
    other_pairs = [line for line in _lines(os.path.join(
        root, rope_format.file_name(other, domain.files.pair))) if _first_field(line) in new_products]
    added = [line.split(",", 1)[1].strip() for line in other_pairs]
    result["added"][domain.name] = added
    for role in ("pair", "text", "media"):
      kind = getattr(domain.files, role)
      source = _lines(os.path.join(root, rope_format.file_name(other, kind)))
      target = os.path.join(root, rope_format.file_name(split, kind))
      moved = other_pairs if role == "pair" else [
          line for line in source if _first_field(line) in set(added)]
      _write(target, _lines(target) + moved)

  titles_path = os.path.join(root, rope_format.file_name(split, page.files.text))
  titles = _lines(titles_path)
  changed = _first_field(titles[0])
  titles[0] = titles[0] + NEW_TITLE_SUFFIX
  _write(titles_path, titles)
  result["changed"]["page"] = [changed]

  video = domains.get("video")
  pairs = _lines(os.path.join(root, rope_format.file_name(split, video.files.pair)))
  removed = pairs[0].split(",", 1)[1].strip()
  for role in ("pair", "text", "media"):
    path = os.path.join(root, rope_format.file_name(split, getattr(video.files, role)))
    lines = _lines(path)
    column = (lambda line: line.split(",", 1)[1].strip()) if role == "pair" else _first_field
    _write(path, [line for line in lines if column(line) != removed])
  result["removed"]["video"] = [removed]

  with open(os.path.join(root, BROKEN_IMAGE), "wb") as f:
    f.write(b"\xff\xd8 not a JPEG")
  product = _first_field(_lines(os.path.join(root, rope_format.file_name(split, page.files.pair)))[0])
  for role, line in (("pair", f"{product}, {BROKEN_PAGE_ID}"),
                     ("text", f"{BROKEN_PAGE_ID}, 粉色纯色抱枕"),
                     ("media", f"{BROKEN_PAGE_ID}, {BROKEN_IMAGE}")):
    path = os.path.join(root, rope_format.file_name(split, getattr(page.files, role)))
    _write(path, _lines(path) + [line])
    if role == "media":
      result["broken"] = (os.path.basename(path), len(_lines(path)))
  _write(titles_path, _lines(titles_path) + [MALFORMED_ROW])
  result["malformed"] = (os.path.basename(titles_path), len(_lines(titles_path)))
  return result
