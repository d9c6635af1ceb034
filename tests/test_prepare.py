"""Preparation to ArrayRecord: counts, round trip, resumption, decode failures."""

import io
import json
import os
import shutil

import grain
from PIL import Image

from data_pipelines import domains
from data_pipelines import prepare
from data_pipelines import rope_format
from data_pipelines import synthetic

QUIET = {"progress": False, "log": lambda line: None}


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _report(prepared_dir):
  with open(os.path.join(prepared_dir, prepare.REPORT_NAME), encoding="utf-8") as f:
    return json.load(f)


def test_report_counts_match_the_catalog(tiny_rope_dir, tiny_prepared_dir):
  report = _report(tiny_prepared_dir)
  assert report["problems"] == []
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


def test_records_round_trip(tiny_rope_dir, tiny_prepared_dir):
  for split in rope_format.SPLITS:
    catalog = rope_format.load_rope(tiny_rope_dir, split)
    products = prepare.load_products(tiny_prepared_dir, split)
    assert [p["product_index"] for p in products] == list(range(len(products)))
    assert [p["product_id"] for p in products] == sorted(catalog.products)
    for domain in domains.NAMES:
      source = prepare.open_domain(tiny_prepared_dir, split, domain)
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
  assert len(os.listdir(os.path.join(tiny_prepared_dir, "training"))) > 8  # several shards
  dataset = grain.MapDataset.source(source).map(lambda item: item["id"])
  ids = list(dataset)
  assert len(ids) == len(source) == len(set(ids))
  assert ids[-1] == source[len(source) - 1]["id"]


def test_rerun_skips_finished_parts_and_redoes_changed_ones(tiny_rope_dir, tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  shutil.copytree(tiny_rope_dir, rope_dir)
  prepare.prepare(rope_dir, out, shard_size=8, **QUIET)
  shard = os.path.join(out, "training", "page-00000-of-00006.array_record")
  before = os.stat(shard).st_mtime_ns

  lines = []
  report = prepare.prepare(rope_dir, out, shard_size=8, progress=False, log=lines.append)
  assert len(lines) == 6 and all("skipped" in line for line in lines)
  assert os.stat(shard).st_mtime_ns == before
  assert all(d["status"] == "skipped (up to date)"
             for s in report["splits"].values() for d in s["domains"].values())

  with open(os.path.join(rope_dir, "test_video_asrs.txt"), "a", encoding="utf-8") as f:
    f.write("\n")  # any change to a split's txt files invalidates that split
  os.remove(os.path.join(out, "training", "live.complete.json"))  # as if killed mid-way
  lines.clear()
  report = prepare.prepare(rope_dir, out, shard_size=8, progress=False, log=lines.append)
  status = {(s, d): v["status"] for s, e in report["splits"].items()
            for d, v in e["domains"].items()}
  assert status == {("training", "page"): "skipped (up to date)",
                    ("training", "video"): "skipped (up to date)",
                    ("training", "live"): "written", ("test", "page"): "written",
                    ("test", "video"): "written", ("test", "live"): "written"}
  assert report["problems"] and all(p["file"] == "test_video_asrs.txt"
                                    for p in report["problems"])  # the blank line


def test_undecodable_images_are_reported_and_not_stored(tmp_path):
  rope_dir, out = str(tmp_path / "rope"), str(tmp_path / "prepared")
  synthetic.generate(rope_dir, products=5, test_products=2, frames_per_clip=3, image_size=16,
                     seed=2, inject_faults=True)
  with open(os.path.join(rope_dir, "injected_faults.json"), encoding="utf-8") as f:
    faults = json.load(f)["faults"]
  report = prepare.prepare(rope_dir, out, num_workers=2, **QUIET)
  reported = {(p["file"], p["line"]) for p in report["problems"] if p["stage"] == "decode"}
  truncated = [f for f in faults if f["kind"] == "truncated_jpeg"]
  assert len(truncated) == 4
  assert {(f["file"], f["line"]) for f in truncated} == reported
  for fault in truncated:
    split = fault["file"].split("_")[0]
    domain = "page" if "page_images" in fault["file"] else "video"
    catalog = rope_format.load_rope(rope_dir, split)
    items = {item["id"]: item for item in prepare.open_domain(out, split, domain)}
    if domain == "page":
      assert fault["id"] not in items
    else:
      clip = catalog.videos[fault["id"]]
      assert len(items[fault["id"]]["frames"]) == len(clip.frames) - 1
      for frame in items[fault["id"]]["frames"]:
        Image.open(io.BytesIO(frame)).load()
  reader_problems = [p for p in report["problems"] if p["stage"] == "read"]
  assert len(reader_problems) >= sum(f["detected_by"] == "load_rope" for f in faults)


def test_large_images_are_reencoded_within_max_side(tiny_rope_dir, tmp_path):
  out = str(tmp_path / "prepared")
  prepare.prepare(tiny_rope_dir, out, max_image_side=20, **QUIET)
  page = prepare.open_domain(out, "test", "page")[0]
  image = Image.open(io.BytesIO(page["image"]))
  assert image.format == "JPEG" and max(image.size) == 20


def test_open_domain_before_prepare_names_the_missing_marker(tmp_path):
  try:
    prepare.open_domain(str(tmp_path), "training", "page")
  except FileNotFoundError as error:
    assert "page.complete.json" in str(error)
  else:
    raise AssertionError("expected FileNotFoundError")
