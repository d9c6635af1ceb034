"""`data_pipelines.prepare`: counts, round trip, resume, decode failures, input checks."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
from PIL import Image
import pytest

from cope_jax.base import domains
from data_pipelines import images
from data_pipelines import prepare
from data_pipelines import rope_examples
from data_pipelines import rope_format
from data_pipelines import rope_shards
from data_pipelines import rope_tfds
from data_pipelines import synthetic
from data_pipelines import transforms

QUIET = {"progress": False, "log": lambda line: None}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _report(prepared_dir):
  with open(os.path.join(prepared_dir, prepare.REPORT_NAME), encoding="utf-8") as f:
    return json.load(f)


def _dataset_dir(prepared_dir):
  return _report(prepared_dir)["tfds"]["dataset_dir"]


def _files(directory):
  """{relative path: mtime_ns} of every file under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      found[os.path.relpath(path, directory)] = os.stat(path).st_mtime_ns
  return found


def test_report_counts_match_the_catalog(tiny_rope_dir, tiny_prepared_dir):
  report = _report(tiny_prepared_dir)
  assert report["problems"] == [] and report["tfds"]["generated_with"] == "shard_writer"
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(tiny_rope_dir, split)
    entry = report["splits"][split]
    assert entry["products"] == len(catalog.products)
    assert entry["products_with_all_domains"] == sum(
        all(ids.values()) for ids in catalog.products.values())
    for domain in domains.NAMES:
      assert entry["domains"][domain]["records"] == len(catalog.domain(domain))
      assert entry["domains"][domain]["products"] == sum(
          bool(ids[domain]) for ids in catalog.products.values())
      assert len(prepare.open_domain(tiny_prepared_dir, split, domain)) == len(
          catalog.domain(domain))


def test_records_round_trip_in_catalog_order(tiny_rope_dir, tiny_prepared_dir):
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(tiny_rope_dir, split)
    products = prepare.load_products(tiny_prepared_dir, split)
    assert [p["product_index"] for p in products] == list(range(len(products)))
    assert [p["product_id"] for p in products] == sorted(catalog.products)
    for domain in domains.NAMES:
      source = prepare.open_domain(tiny_prepared_dir, split, domain)
      # Record order is the pair file's order (nothing was dropped here).
      assert [item["id"] for item in source] == list(catalog.domain(domain))
      seen = []
      for product in products:
        for index in product[domain]:
          item = source[index]
          record = catalog.domain(domain)[item["id"]]
          assert item["product_id"] == record.product_id == product["product_id"]
          assert item["product_index"] == product["product_index"]
          assert item["text"] == record.text
          if domain == "page":
            assert item["image"] == _read_bytes(record.image)
            assert Image.open(io.BytesIO(item["image"])).convert("RGB").size == (32, 32)
          else:
            assert item["frame_keys"] == list(record.frame_keys)
            assert item["frame_keys"] == sorted(item["frame_keys"])
            assert item["frames"] == [_read_bytes(p) for p in record.frames]
          seen.append(index)
      assert sorted(seen) == list(range(len(source)))  # every record owned by one product


def test_sources_work_in_grain_with_several_shards(tiny_prepared_dir):
  source = prepare.open_domain(tiny_prepared_dir, "training", "video")
  assert _report(tiny_prepared_dir)["splits"]["training"]["domains"]["video"]["shards"] == 3
  dataset = grain.MapDataset.source(source).map(lambda item: item["id"])
  ids = list(dataset)
  assert len(ids) == len(source) == len(set(ids))
  assert ids[-1] == source[len(source) - 1]["id"]
  assert [item["id"] for item in source.__getitems__([2, 0])] == [ids[2], ids[0]]
  with pytest.raises(IndexError):
    source[len(source)]


def test_rerun_skips_and_a_changed_input_rebuilds(tiny_rope_dir, tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  shutil.copytree(tiny_rope_dir, rope_dir)
  prepare.prepare(rope_dir, out, **QUIET)
  dataset_dir = _dataset_dir(out)
  before = _files(dataset_dir)

  lines = []
  report = prepare.prepare(rope_dir, out, progress=False, log=lines.append)
  assert report["status"] == "skipped (up to date)" and "skipped" in lines[-1]
  assert _files(dataset_dir) == before  # nothing rewritten
  assert all(d["status"] == "skipped (up to date)"
             for s in report["splits"].values() for d in s["domains"].values())

  # A killed build leaves TFDS's temporary folder; the rerun removes it.
  leftover = os.path.join(os.path.dirname(dataset_dir), "incomplete.ABC123_1.0.0")
  os.makedirs(leftover)
  with open(os.path.join(rope_dir, "test_video_asrs.txt"), "a", encoding="utf-8") as f:
    f.write("\n")  # any change to a split's txt files invalidates the dataset
  report = prepare.prepare(rope_dir, out, **QUIET)
  assert report["status"] == "written" and not os.path.exists(leftover)
  assert _files(dataset_dir) != before
  assert [(p["file"], p["stage"]) for p in report["problems"]] == [
      ("test_video_asrs.txt", "read")]  # the blank line

  # Lost reader files (products table, pointer) are rewritten without a rebuild.
  os.remove(os.path.join(out, "training", "products.json"))
  os.remove(os.path.join(out, prepare.POINTER_NAME))
  report = prepare.prepare(rope_dir, out, **QUIET)
  assert report["status"] == "skipped (up to date)"
  assert len(prepare.load_products(out, "training")) == report["splits"]["training"]["products"]


def test_undecodable_images_are_reported_and_not_stored(tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  synthetic.generate(rope_dir, products=5, test_products=2, frames_per_clip=3, image_size=16,
                     seed=2, inject_faults=True)
  with open(os.path.join(rope_dir, "injected_faults.json"), encoding="utf-8") as f:
    faults = json.load(f)["faults"]
  report = prepare.prepare(rope_dir, out, **QUIET)
  decode = [p for p in report["problems"] if p["stage"] == "decode"]
  truncated = [f for f in faults if f["kind"] == "truncated_jpeg"]
  assert len(truncated) == 4
  assert {(f["file"], f["line"]) for f in truncated} == {(p["file"], p["line"]) for p in decode}
  not_decoded = [p["reason"] for p in decode if "does not decode" in p["reason"]]
  assert len(not_decoded) == 4  # each names its image file, not a BytesIO object
  assert all(".jpg does not decode" in r and "BytesIO" not in r for r in not_decoded)
  for fault in truncated:
    split = fault["file"].split("_")[0]
    domain = "page" if "page_images" in fault["file"] else "video"
    catalog = rope_format.load_rope(rope_dir, split)
    items = {item["id"]: item for item in prepare.open_domain(out, split, domain)}
    if domain == "page":
      assert fault["id"] not in items
      assert report["splits"][split]["domains"]["page"]["dropped_at_decode"] >= 1
    else:
      clip = catalog.videos[fault["id"]]
      assert len(items[fault["id"]]["frames"]) == len(clip.frames) - 1
      for frame in items[fault["id"]]["frames"]:
        Image.open(io.BytesIO(frame)).load()
  # Product table indices still point at the right records after a page was dropped.
  for split in rope_format.SPLITS:
    source = prepare.open_domain(out, split, "page")
    for product in prepare.load_products(out, split):
      for index in product["page"]:
        assert source[index]["product_id"] == product["product_id"]
  reader_problems = [p for p in report["problems"] if p["stage"] == "read"]
  assert len(reader_problems) >= sum(f["detected_by"] == "load_rope" for f in faults)


def test_large_images_are_reencoded_within_max_side(tiny_rope_dir, tmp_path):
  out = str(tmp_path / "prepared")
  report = prepare.prepare(tiny_rope_dir, out, max_image_side=20, splits=["test"], **QUIET)
  assert report["tfds"]["config"] == "all_frames_side20"
  page = prepare.open_domain(out, "test", "page")[0]
  image = Image.open(io.BytesIO(page["image"]))
  assert image.format == "JPEG" and max(image.size) == 20


def test_num_frames_keeps_the_frames_training_samples(tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  synthetic.generate(rope_dir, products=3, test_products=2, frames_per_clip=7, image_size=16,
                     seed=1)
  report = prepare.prepare(rope_dir, out, num_frames=3, splits=["training"], **QUIET)
  assert report["tfds"]["config"] == "frames3_original"
  catalog = rope_format.load_rope(rope_dir, "training")
  for domain in ("video", "live"):
    for item in prepare.open_domain(out, "training", domain):
      clip = catalog.domain(domain)[item["id"]]
      chosen = transforms.sample_frame_indices(len(clip.frames), 3)
      assert item["frame_keys"] == [clip.frame_keys[i] for i in chosen]
      # What the pipeline samples from the stored frames is what it would have sampled.
      stored = transforms.sample_frame_indices(len(item["frames"]), 3)
      assert [item["frames"][i] for i in stored] == [_read_bytes(clip.frames[i])
                                                     for i in chosen]
  with pytest.raises(FileNotFoundError, match="'test' was not prepared"):
    prepare.open_domain(out, "test", "page")


def test_open_domain_before_prepare_names_the_missing_file(tmp_path):
  for read in (lambda: prepare.open_domain(str(tmp_path), "training", "page"),
               lambda: prepare.load_products(str(tmp_path), "training"),
               lambda: prepare.dataset_identity(str(tmp_path))):
    with pytest.raises(FileNotFoundError, match=rf"{prepare.POINTER_NAME} is missing .*run "
                                                r"`python -m data_pipelines\.prepare"):
      read()
  assert prepare.prepared_configs(str(tmp_path)) == []


def test_a_damaged_products_file_is_named_with_the_command_that_rebuilds_it(
    tiny_prepared_dir, tmp_path):
  out = str(tmp_path / "prepared")
  shutil.copytree(tiny_prepared_dir, out)
  products_path = os.path.join(out, prepare.CONFIGS_SUBDIR, prepare.default_config(out),
                               "training", "products.json")
  with open(products_path, "r+", encoding="utf-8") as f:
    f.truncate(len(f.read()) // 2)  # a half-written file is not JSON
  with pytest.raises(FileNotFoundError,
                     match=r"products\.json is missing or unreadable: run .*prepare"):
    prepare.load_products(out, "training")
  assert prepare.open_domain(out, "training", "page")  # the pointer is still read


# ---- several configs in one OUT, each read by name; the identity of a prepared config --

def _records(prepared_dir, config_name=""):
  return {(split, domain): list(prepare.open_domain(prepared_dir, split, domain,
                                                    config_name))
          for split in prepare.prepared_splits(prepared_dir, config_name)
          for domain in domains.NAMES}


@pytest.fixture(scope="module")
def small_rope_dir(tmp_path_factory):
  rope_dir = str(tmp_path_factory.mktemp("small") / "rope")
  synthetic.generate(rope_dir, products=4, test_products=2, frames_per_clip=5,
                     image_size=24, seed=3)
  return rope_dir


def test_two_configs_live_side_by_side_and_each_is_read_by_name(small_rope_dir, tmp_path):
  out = str(tmp_path / "prepared")
  first = prepare.prepare(small_rope_dir, out, num_frames=2, max_image_side=16, **QUIET)
  first_name = first["tfds"]["config"]
  assert first_name == "frames2_side16" and prepare.default_config(out) == first_name
  first_records, first_identity = _records(out), prepare.dataset_identity(out)
  first_products = {s: prepare.load_products(out, s) for s in rope_format.SPLITS}

  second = prepare.prepare(small_rope_dir, out, **QUIET)  # every frame, as released
  second_name = second["tfds"]["config"]
  assert second_name == "all_frames_original"
  assert prepare.prepared_configs(out) == sorted([first_name, second_name])
  assert prepare.default_config(out) == second_name  # the latest is the default

  # The first config reads exactly as before the second prepare, by name.
  assert _records(out, first_name) == first_records
  assert {s: prepare.load_products(out, s, first_name)
          for s in rope_format.SPLITS} == first_products
  assert prepare.dataset_identity(out, first_name) == first_identity
  # The default now reads the second, whose clips keep every frame.
  default_records = _records(out)
  assert default_records == _records(out, second_name) != first_records
  video = ("training", "video")
  assert {len(item["frames"]) for item in first_records[video]} == {2}
  assert {len(item["frames"]) for item in default_records[video]} == {5}
  assert max(Image.open(io.BytesIO(item["image"])).size[0]
             for item in first_records[("training", "page")]) == 16

  # Both reports are kept; the top-level one is the latest prepare's.
  for report in (first, second):
    config_report = _report(os.path.join(out, prepare.CONFIGS_SUBDIR,
                                          report["tfds"]["config"]))
    assert config_report == json.loads(json.dumps(report))
  assert _report(out) == json.loads(json.dumps(second))

  # Identities: strict JSON, name the config and its counts, differ between configs.
  second_identity = prepare.dataset_identity(out)
  assert second_identity == prepare.dataset_identity(out, second_name)
  assert json.loads(json.dumps(second_identity, allow_nan=False)) == second_identity
  assert (first_identity["config"], second_identity["config"]) == (first_name, second_name)
  assert (first_identity["num_frames"], first_identity["max_image_side"]) == (2, 16)
  assert first_identity["fingerprint"] != second_identity["fingerprint"]
  assert first_identity["metadata_digest"] != second_identity["metadata_digest"]
  for split in rope_format.SPLITS:
    assert second_identity["splits"][split] == {
        "products": second["splits"][split]["products"],
        "records": {d: c["records"] for d, c in second["splits"][split]["domains"].items()}}

  # A config that is not prepared there is refused, naming it and those that are.
  for read in (lambda: prepare.open_domain(out, "training", "page", "frames8_side256"),
               lambda: prepare.load_products(out, "training", "frames8_side256"),
               lambda: prepare.dataset_identity(out, "frames8_side256")):
    with pytest.raises(FileNotFoundError,
                       match=r"config 'frames8_side256' is not in .*\(prepared there: "
                             r"all_frames_original, frames2_side16\)"):
      read()

  # Preparing the first again (up to date) makes it the default, unchanged.
  again = prepare.prepare(small_rope_dir, out, num_frames=2, max_image_side=16, **QUIET)
  assert again["status"] == "skipped (up to date)"
  assert prepare.default_config(out) == first_name and _records(out) == first_records
  assert prepare.dataset_identity(out) == first_identity


def test_identity_is_the_same_for_a_rebuild_elsewhere_and_changes_with_the_data(
    small_rope_dir, tmp_path):
  rope_dir = str(tmp_path / "rope")
  shutil.copytree(small_rope_dir, rope_dir)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  prepare.prepare(rope_dir, one, splits=["test"], num_shards=1, **QUIET)
  prepare.prepare(rope_dir, two, splits=["test"], num_shards=2, workers=2, **QUIET)
  assert prepare.dataset_identity(one) == prepare.dataset_identity(two)
  identity = prepare.dataset_identity(one)
  with open(os.path.join(rope_dir, "test_page_titles.txt"), "a", encoding="utf-8") as f:
    f.write("\n")  # a blank line: a problem, the same records
  prepare.prepare(rope_dir, one, splits=["test"], **QUIET)
  changed = prepare.dataset_identity(one)
  assert changed["config"] == identity["config"]
  assert changed["splits"] == identity["splits"]
  assert changed["fingerprint"] != identity["fingerprint"]
  assert changed["metadata_digest"] != identity["metadata_digest"]


def test_a_folder_of_one_config_from_before_is_read_and_kept(small_rope_dir, tmp_path):
  out = str(tmp_path / "prepared")
  prepare.prepare(small_rope_dir, out, num_frames=2, **QUIET)
  records, identity = _records(out), prepare.dataset_identity(out)
  # The layout of format 2: OUT/dataset.json and OUT/<split>/products.json only.
  shutil.rmtree(os.path.join(out, prepare.CONFIGS_SUBDIR))
  pointer_path = os.path.join(out, prepare.POINTER_NAME)
  with open(pointer_path, encoding="utf-8") as f:
    pointer = json.load(f)
  with open(pointer_path, "w", encoding="utf-8") as f:
    json.dump({**pointer, "format": 2}, f)
  assert prepare.prepared_configs(out) == ["frames2_original"]
  assert _records(out) == _records(out, "frames2_original") == records
  assert prepare.dataset_identity(out, "frames2_original") == identity
  with pytest.raises(FileNotFoundError, match=r"'all_frames_original' is not in .*"
                                              r"prepared there: frames2_original\)"):
    prepare.load_products(out, "training", "all_frames_original")

  prepare.prepare(small_rope_dir, out, **QUIET)  # another config: the old one is kept
  assert prepare.prepared_configs(out) == ["all_frames_original", "frames2_original"]
  assert _records(out, "frames2_original") == records
  assert prepare.dataset_identity(out, "frames2_original") == identity


def test_prepare_without_usable_products_exits_1_saying_why(small_rope_dir, tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  shutil.copytree(small_rope_dir, rope_dir)
  prepare.prepare(rope_dir, out, splits=["test"], **QUIET)
  before, records = _files(out), _records(out)
  shutil.rmtree(os.path.join(rope_dir, rope_format.IMAGE_SUBDIR))  # not downloaded yet
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--rope_dir", rope_dir, "--out", out, "--num_frames", "2"])
  assert exit_info.value.code == 1
  message = str(exit_info.value)
  assert "NoUsableProductError" in message and "has no usable product" in message
  assert "image files not found" in message
  assert "run `python -m data_pipelines.download" in message
  # Nothing of the earlier preparation changed; no dataset of the new config.
  assert _files(out) == before and _records(out) == records
  assert prepare.prepared_configs(out) == ["all_frames_original"]
  assert not os.path.exists(os.path.join(out, prepare.TFDS_SUBDIR, "rope", "frames2_original"))

  # As a program: exit status 1, the reason on stderr.
  process = subprocess.run(
      [sys.executable, "-m", "data_pipelines.prepare", "--rope_dir", rope_dir, "--out",
       str(tmp_path / "other"), "--splits", "test"],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert process.returncode == 1, process.stderr[-2000:]
  assert "has no usable product" in process.stderr and "download" in process.stderr


# ---- prepare --plan_only: everything before decoding an image --------------------------

def _no_image_is_decoded(monkeypatch):
  """Makes any image decode fail the test (and any record encode)."""
  def refuse(*args, **kwargs):
    raise AssertionError("an image was decoded")
  monkeypatch.setattr(images, "read_stored_bytes", refuse)
  monkeypatch.setattr(rope_examples, "encode_row", refuse)


@pytest.mark.parametrize("faults", [False, True])
def test_plan_only_reports_what_a_full_prepare_finds_without_decoding(tmp_path, monkeypatch,
                                                                      faults):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=5, test_products=3, frames_per_clip=5,
                     image_size=16, seed=5, inject_faults=faults)
  options = {"num_frames": 3, "num_shards": 2}
  full = prepare.prepare(rope_dir, str(tmp_path / "full"), **options, **QUIET)

  out = str(tmp_path / "planned")
  with monkeypatch.context() as patch:
    _no_image_is_decoded(patch)
    plan = prepare.prepare(rope_dir, out, plan_only=True, **options, **QUIET)
  # Only the report is left: no dataset, no plan files, no reader files.
  report_path = os.path.join(out, prepare.CONFIGS_SUBDIR, "frames3_original",
                             prepare.PLAN_REPORT_NAME)
  assert sorted(_files(out)) == [os.path.relpath(report_path, out)]
  assert prepare.prepared_configs(out) == []
  with open(report_path, encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(plan))
  assert plan["status"] == "planned (no image decoded)"

  # The same problems as the full prepare's read stage; decode problems need decoding.
  assert plan["problems"] == [p for p in full["problems"] if p["stage"] == "read"]
  assert any(p["stage"] == "decode" for p in full["problems"]) == faults
  for split, entry in plan["splits"].items():
    built = full["splits"][split]
    for key in ("products", "fingerprint", "frames_skipped_by_download"):
      assert entry[key] == built[key], (split, key)
    for domain, counts in entry["domains"].items():
      done = built["domains"][domain]
      assert counts["records"] == done["records"] + done["dropped_at_decode"]
      assert (counts["images"], counts["shards"]) == (done["images"], done["shards"])
      if not faults:
        assert counts["products"] == done["products"]
    if not faults:
      assert entry["products_with_all_domains"] == built["products_with_all_domains"]
  assert plan["plan"]["records"] == sum(c["records"] for e in plan["splits"].values()
                                        for c in e["domains"].values())


def test_plan_only_without_file_checks_and_with_images_missing(small_rope_dir, tmp_path,
                                                              monkeypatch):
  rope_dir = str(tmp_path / "rope")
  shutil.copytree(small_rope_dir, rope_dir)
  checked = prepare.prepare(rope_dir, str(tmp_path / "a"), plan_only=True, **QUIET)
  image_dir = os.path.join(rope_dir, rope_format.IMAGE_SUBDIR)
  lost = sorted(os.listdir(image_dir))[:3]
  for name in lost:
    os.remove(os.path.join(image_dir, name))
  _no_image_is_decoded(monkeypatch)
  unchecked = prepare.prepare(rope_dir, str(tmp_path / "b"), plan_only=True,
                              check_files=False, **QUIET)
  assert unchecked["problems"] == checked["problems"] == []
  assert unchecked["splits"] == checked["splits"]  # the files are not looked at
  assert unchecked["options"]["check_files"] is False
  missing = prepare.prepare(rope_dir, str(tmp_path / "c"), plan_only=True, **QUIET)
  assert sorted(p["reason"].split()[2] for p in missing["problems"]
                if rope_format.IMAGE_NOT_FOUND in p["reason"]) == lost

  # No image at all: the report is written, then the command exits 1 saying why.
  shutil.rmtree(image_dir)
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--rope_dir", rope_dir, "--out", str(tmp_path / "d"), "--plan_only"])
  assert exit_info.value.code == 1
  assert "has no usable product" in str(exit_info.value)
  assert os.path.exists(os.path.join(tmp_path / "d", prepare.CONFIGS_SUBDIR,
                                     "all_frames_original", prepare.PLAN_REPORT_NAME))
  with pytest.raises(ValueError, match="check_files=False .* is for --plan_only"):
    prepare.prepare(rope_dir, str(tmp_path / "e"), check_files=False, **QUIET)


# ---- every file of every requested split is checked before anything is written ------

def _damaged_copy(tiny_rope_dir, tmp_path):
  rope_dir = str(tmp_path / "rope")
  shutil.copytree(tiny_rope_dir, rope_dir)
  os.remove(os.path.join(rope_dir, "test_video_asrs.txt"))
  os.remove(os.path.join(rope_dir, "training_product_pages_pair.txt"))
  os.remove(os.path.join(rope_dir, "training_live_clips.txt"))
  os.mkdir(os.path.join(rope_dir, "training_live_clips.txt"))
  return rope_dir


def test_missing_files_and_directories_are_named_before_anything_is_written(tiny_rope_dir,
                                                                            tmp_path):
  rope_dir, out = _damaged_copy(tiny_rope_dir, tmp_path), str(tmp_path / "prepared")
  with pytest.raises(rope_tfds.RopeFilesError) as error:
    prepare.prepare(rope_dir, out, **QUIET)
  message = str(error.value)
  assert "test_video_asrs.txt: missing" in message
  assert "training_product_pages_pair.txt: missing" in message
  assert "training_live_clips.txt: is a directory, not a file" in message
  assert not os.path.exists(out)  # nothing written, not even the output folder


def test_bad_input_leaves_an_earlier_preparation_untouched(tiny_rope_dir, tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  shutil.copytree(tiny_rope_dir, rope_dir)
  prepare.prepare(rope_dir, out, **QUIET)
  before = _files(out)
  shutil.rmtree(rope_dir)
  shutil.copytree(_damaged_copy(tiny_rope_dir, tmp_path / "damaged"), rope_dir)
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--rope_dir", rope_dir, "--out", out])
  assert exit_info.value.code == 1
  assert "training_live_clips.txt: is a directory" in str(exit_info.value)
  assert _files(out) == before


def test_a_requested_split_must_be_complete(tiny_rope_dir, tmp_path):
  rope_dir = str(tmp_path / "rope")
  shutil.copytree(tiny_rope_dir, rope_dir)
  for name in rope_format.split_file_names("test"):
    os.remove(os.path.join(rope_dir, name))
  with pytest.raises(rope_tfds.RopeFilesError, match="test_page_titles.txt: missing"):
    prepare.prepare(rope_dir, str(tmp_path / "out"), splits=["training", "test"], **QUIET)
  report = prepare.prepare(rope_dir, str(tmp_path / "out"), **QUIET)  # default: present ones
  assert list(report["splits"]) == ["training"]
  with pytest.raises(FileNotFoundError, match="no ROPE split"):
    prepare.prepare(str(tmp_path / "out"), str(tmp_path / "out2"), **QUIET)


# ---- the shard writer: resumable per shard, the same records with any worker count ----

def _all_records(prepared_dir):
  return {(split, domain): list(prepare.open_domain(prepared_dir, split, domain))
          for split in rope_format.SPLITS for domain in domains.NAMES}


def _done_shards(building_dir):
  """{shard file path: mtime_ns} of the shards whose done file exists."""
  found = {}
  for root, _, names in os.walk(building_dir):
    for name in names:
      if name.endswith(rope_shards.DONE_SUFFIX):
        path = os.path.join(root, name[:-len(rope_shards.DONE_SUFFIX)])
        try:
          found[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
        except FileNotFoundError:  # the finished build was moved out meanwhile
          pass
  return found


def _kill_three_runs(rope_dir, out, total_shards, rng):
  """Runs `prepare` three times on `out`, SIGKILLing each a little after a random count
  of finished shards (1 or 2 workers).

  Returns the shards done before the last kill ({path: mtime_ns}), or None when a kill
  landed only after the build had finished (a loaded machine can delay the kill that
  long), so that the caller starts the sequence again.
  """
  building = os.path.join(out, prepare.BUILDING_SUBDIR)
  done_before_last_kill = {}
  for attempt, kill_after in enumerate(sorted(rng.sample(range(1, total_shards - 2), 3))):
    process = subprocess.Popen(
        [sys.executable, "-m", "data_pipelines.prepare", "--rope_dir", rope_dir,
         "--out", out, "--num_shards", "4", "--max_image_side", "48",
         "--workers", str(1 + attempt % 2)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)  # its workers are killed with it
    deadline = time.monotonic() + 60
    while process.poll() is None and len(_done_shards(building)) < kill_after:
      assert time.monotonic() < deadline, (
          f"attempt {attempt}: fewer than {kill_after} shards done in 60 s: "
          f"{os.killpg(process.pid, signal.SIGKILL) or process.stderr.read().decode()[-2000:]}")
      time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.02))  # somewhere inside the next shard
    if process.poll() is not None:
      stderr = process.stderr.read().decode()
      process.stderr.close()
      assert process.returncode == 0, stderr[-2000:]
      return None  # it ran to the end before the kill
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = _done_shards(building)
    if not done:  # >= kill_after were seen: the finished build was renamed away
      return None
    assert len(done) >= kill_after and len(done) < total_shards
    # Shards finished before an earlier kill were not rewritten by this run.
    assert {p: done[p] for p in done_before_last_kill} == done_before_last_kill
    done_before_last_kill = done
  return done_before_last_kill


def test_kill_9_at_random_points_loses_at_most_the_shard_being_written(tmp_path):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=8, test_products=4, frames_per_clip=6,
                     image_size=96, seed=1)
  options = {"num_shards": 4, "max_image_side": 48}
  uninterrupted = str(tmp_path / "uninterrupted")
  prepare.prepare(rope_dir, uninterrupted, **options, **QUIET)

  out = str(tmp_path / "killed")
  building = os.path.join(out, prepare.BUILDING_SUBDIR)
  total_shards = 4 * len(rope_format.SPLITS) * len(domains.NAMES)
  rng = random.Random(0)
  for _ in range(3):
    shutil.rmtree(out, ignore_errors=True)
    done_before_last_kill = _kill_three_runs(rope_dir, out, total_shards, rng)
    if done_before_last_kill is not None:
      break
  else:
    pytest.fail("in three sequences a kill always came after the build had finished")

  report = prepare.prepare(rope_dir, out, **options, **QUIET)
  assert report["shards"] == {"written": total_shards - len(done_before_last_kill),
                              "reused": len(done_before_last_kill)}
  dataset_dir = _dataset_dir(out)
  for path, mtime in done_before_last_kill.items():  # untouched, now in the dataset
    assert os.stat(os.path.join(dataset_dir, path)).st_mtime_ns == mtime
  assert not os.path.exists(building) or not os.listdir(building)
  assert not [n for n in os.listdir(dataset_dir)
              if n.endswith((rope_shards.DONE_SUFFIX, ".tmp")) or n == rope_shards.STATE_NAME]
  assert _all_records(out) == _all_records(uninterrupted)
  for split in rope_format.SPLITS:
    assert prepare.load_products(out, split) == prepare.load_products(uninterrupted, split)
  assert report["problems"] == _report(uninterrupted)["problems"]


def test_workers_write_the_records_of_a_single_process(tmp_path):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=4, test_products=2, frames_per_clip=3,
                     image_size=16, seed=2, inject_faults=True)
  single = prepare.prepare(rope_dir, str(tmp_path / "one"), num_frames=2, **QUIET)
  pooled = prepare.prepare(rope_dir, str(tmp_path / "two"), num_frames=2, workers=2,
                           **QUIET)
  assert pooled["problems"] == single["problems"]
  assert any(p["stage"] == "decode" for p in single["problems"])
  assert _all_records(str(tmp_path / "two")) == _all_records(str(tmp_path / "one"))


def test_shard_bounds_cut_rows_in_order():
  images = [3, 1, 4, 1, 5, 9, 2, 6]
  assert rope_shards.shard_bounds(images, 3) == [(0, 2), (2, 5), (5, 8)]
  assert rope_shards.shard_bounds(images, 20) == [(i, i + 1) for i in range(8)]
  by_images = rope_shards.shard_bounds(images, None, images_per_shard=8)
  assert by_images == [(0, 3), (3, 5), (5, 6), (6, 8)]  # a 9-image row alone
  assert rope_shards.shard_bounds(images[:1], None, images_per_shard=1) == [(0, 1)]
  assert rope_shards.shard_bounds([4, 4, 4], None, images_per_shard=8) == [(0, 2), (2, 3)]
