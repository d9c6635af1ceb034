"""The ROPE reader: separators, commas in text, frame order, encodings, faults, errors."""

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from cope_jax.base import domains
from data_pipelines import rope_format
from data_pipelines import rope_txt
from data_pipelines import synthetic
from data_pipelines import transforms

KINDS = ("product_pages_pair", "product_videos_pair", "product_lives_pair", "page_titles",
         "video_asrs", "live_asrs", "page_images", "video_frames", "live_clips")


def write_rope(root, rows: dict, split="test", line_end="\n", bom=False, images=()):
  """Writes the nine files of `split` (`rows`: kind -> list of lines; others empty)."""
  os.makedirs(root / "images", exist_ok=True)
  for kind in KINDS:
    text = "".join(line + line_end for line in rows.get(kind, ()))
    data = text.encode("utf-8")
    (root / f"{split}_{kind}.txt").write_bytes(b"\xef\xbb\xbf" + data if bom else data)
  for name in images:
    (root / "images" / name).write_bytes(b"jpeg")
  return str(root)


def small_rope(root, **kwargs):
  """One product with a page, a video (frames 2, 9, 10, 100 shuffled) and a live clip."""
  rows = {
      "product_pages_pair": ["P1, g1"],
      "product_videos_pair": ["P1,v1"],
      "product_lives_pair": ["P1,   l1"],
      "page_titles": ["g1, 红色, 条纹，杯子,A款 "],
      "video_asrs": ["v1, 家人们，看一下, OK"],
      "live_asrs": ["l1, 上车"],
      "page_images": ["g1, page.jpg"],
      "video_frames": ["v1, 10, f10.jpg", "v1, 9, f9.jpg", "v1, 100, f100.jpg",
                       "v1, 2, f2.jpg"],
      "live_clips": ["l1, 1650000000999, b.jpg", "l1, 1650000000000, a.jpg"],
  }
  images = ["page.jpg", "f2.jpg", "f9.jpg", "f10.jpg", "f100.jpg", "a.jpg", "b.jpg"]
  return write_rope(root, rows, images=images, **kwargs)


def test_commas_inside_texts_survive_and_fields_are_stripped(tmp_path):
  catalog = rope_format.load_rope(small_rope(tmp_path), "test")
  assert catalog.problems == []
  assert catalog.pages["g1"].text == "红色, 条纹，杯子,A款"
  assert catalog.videos["v1"].text == "家人们，看一下, OK"
  assert catalog.lives["l1"].product_id == "P1"


def test_frames_are_in_numeric_time_order(tmp_path):
  catalog = rope_format.load_rope(small_rope(tmp_path), "test")
  video = catalog.videos["v1"]
  assert video.frame_keys == (2, 9, 10, 100)
  assert [os.path.basename(p) for p in video.frames] == ["f2.jpg", "f9.jpg", "f10.jpg",
                                                         "f100.jpg"]
  assert [os.path.basename(p) for p in catalog.lives["l1"].frames] == ["a.jpg", "b.jpg"]
  assert catalog.lives["l1"].frame_keys == (1650000000000, 1650000000999)


def test_bom_and_crlf_files_parse_like_plain_ones(tmp_path):
  plain = rope_format.load_rope(small_rope(tmp_path / "plain"), "test")
  windows = rope_format.load_rope(small_rope(tmp_path / "win", bom=True, line_end="\r\n"),
                                  "test")
  assert windows.problems == []
  assert list(windows.pages) == ["g1"]  # no BOM glued to the first id
  for domain in domains.NAMES:
    strip_paths = lambda record: {k: v for k, v in dataclasses.asdict(record).items()
                                  if k not in ("image", "frames")}
    assert ({i: strip_paths(r) for i, r in windows.domain(domain).items()}
            == {i: strip_paths(r) for i, r in plain.domain(domain).items()})


def test_missing_required_file_raises_naming_it(tmp_path):
  root = small_rope(tmp_path)
  os.remove(os.path.join(root, "test_video_asrs.txt"))
  with pytest.raises(FileNotFoundError, match="test_video_asrs.txt"):
    rope_format.load_rope(root, "test")
  with pytest.raises(FileNotFoundError, match="training_product_pages_pair.txt"):
    rope_format.load_rope(root, "training")


def test_images_resolve_in_images_dir_then_root_and_missing_ones_are_reported(tmp_path):
  rows = {"product_pages_pair": ["P, a", "P, b", "P, c"],
          "page_titles": ["a, x", "b, y", "c, z"],
          "page_images": ["a, in_images.jpg", "b, in_root.jpg", "c, nowhere.jpg"]}
  root = write_rope(tmp_path, rows, images=["in_images.jpg"])
  (tmp_path / "in_root.jpg").write_bytes(b"jpeg")
  catalog = rope_format.load_rope(root, "test")
  assert catalog.pages["a"].image == os.path.join(root, "images", "in_images.jpg")
  assert catalog.pages["b"].image == os.path.join(root, "in_root.jpg")
  assert "c" not in catalog.pages
  where = {(p["file"], p["line"]) for p in catalog.problems}
  assert ("test_page_images.txt", 3) in where  # the row naming the missing file
  assert ("test_product_pages_pair.txt", 3) in where  # the page left out


def test_bad_rows_are_reported_with_file_and_line_and_never_raise(tmp_path):
  rows = {
      "product_pages_pair": ["P, a", "P, a", "Q, a", "lonely", "", "P, b"],
      "page_titles": ["a, first", "a, second", "zzz, orphan"],
      "page_images": ["a, a.jpg", "b, b.jpg", "b, other.jpg"],
      "product_videos_pair": ["P, v"],
      "video_frames": ["v, 1, a.jpg", "v, x1, a.jpg", "v, 2", "v, 1, a.jpg", "w, 3, a.jpg"],
  }
  root = write_rope(tmp_path, rows, images=["a.jpg", "b.jpg"])
  with open(os.path.join(root, "test_live_asrs.txt"), "wb") as f:
    f.write(b"l1, \xff\xfe broken\n")
  catalog = rope_format.load_rope(root, "test")
  reported = {(p["file"], p["line"]) for p in catalog.problems}
  expected = {
      ("test_product_pages_pair.txt", 2),  # duplicate pair
      ("test_product_pages_pair.txt", 3),  # paired with a second product
      ("test_product_pages_pair.txt", 4),  # one column
      ("test_product_pages_pair.txt", 5),  # blank
      ("test_product_pages_pair.txt", 6),  # b has no title -> 空
      ("test_page_titles.txt", 2),  # second title
      ("test_page_titles.txt", 3),  # never paired
      ("test_page_images.txt", 3),  # second image for b
      ("test_video_frames.txt", 2),  # non-numeric frame number
      ("test_video_frames.txt", 3),  # two columns
      ("test_video_frames.txt", 4),  # duplicate
      ("test_video_frames.txt", 5),  # never paired
      ("test_live_asrs.txt", 1),  # not UTF-8
      ("test_product_videos_pair.txt", 1),  # video has no ASR row
  }
  assert reported == expected
  assert catalog.pages["a"].product_id == "P" and catalog.pages["a"].text == "first"
  assert catalog.pages["b"].text == rope_format.MISSING_TEXT
  assert catalog.pages["b"].image.endswith("b.jpg")
  assert catalog.videos["v"].frame_keys == (1,)
  assert catalog.products == {"P": {"page": ["a", "b"], "video": ["v"], "live": []}}


def test_clip_without_frames_is_excluded_and_reported(tmp_path):
  rows = {"product_lives_pair": ["P, l1", "P, l2"], "live_asrs": ["l1, a", "l2, b"],
          "live_clips": ["l1, 1650000000000, a.jpg"]}
  catalog = rope_format.load_rope(write_rope(tmp_path, rows, images=["a.jpg"]), "test")
  assert list(catalog.lives) == ["l1"]
  assert [(p["file"], p["line"]) for p in catalog.problems] == [
      ("test_product_lives_pair.txt", 2)]


def _generate_pair(tmp_path):
  options = {"products": 6, "test_products": 3, "frames_per_clip": 3, "image_size": 16,
             "seed": 3}
  synthetic.generate(str(tmp_path / "clean"), **options)
  synthetic.generate(str(tmp_path / "faulty"), inject_faults=True, **options)
  with open(tmp_path / "faulty" / "injected_faults.json", encoding="utf-8") as f:
    faults = json.load(f)["faults"]
  return str(tmp_path / "clean"), str(tmp_path / "faulty"), faults


def _content(record):
  """A record without line numbers (they shift as rows are inserted) or directories."""
  content = {k: v for k, v in dataclasses.asdict(record).items()
             if k not in ("image_line", "frame_lines")}
  if "image" in content:
    content["image"] = os.path.basename(content["image"])
  else:
    content["frames"] = tuple(os.path.basename(p) for p in content["frames"])
  return content


def test_every_injected_fault_is_reported_and_every_good_row_kept(tmp_path):
  clean_root, faulty_root, faults = _generate_pair(tmp_path)
  kinds = {f["kind"] for f in faults}
  assert {"missing_columns", "non_numeric_frame_number", "blank_line", "duplicate_row",
          "conflicting_pair", "page_without_image", "video_without_frames", "unpaired_id",
          "missing_image_file", "truncated_jpeg", "missing_text"} <= kinds
  for split in rope_format.SPLITS:
    clean = rope_format.load_rope(clean_root, split)
    faulty = rope_format.load_rope(faulty_root, split)
    split_faults = [f for f in faults if f["file"].startswith(split + "_")]
    assert split_faults
    reported = {(p["file"], p["line"]) for p in faulty.problems}
    for fault in split_faults:
      if fault["detected_by"] == "load_rope":
        assert (fault["file"], fault["line"]) in reported, fault

    missing_page_images = {f["id"] for f in split_faults
                           if f["kind"] == "missing_image_file" and "page_images" in f["file"]}
    missing_frames = {f["id"]: f["image"] for f in split_faults
                      if f["kind"] == "missing_image_file" and "video_frames" in f["file"]}
    for domain in domains.NAMES:
      for item_id, record in clean.domain(domain).items():
        if item_id in missing_page_images:
          assert item_id not in faulty.pages
        elif item_id in missing_frames:
          kept = faulty.videos[item_id].frames
          assert [os.path.basename(p) for p in kept] == [
              os.path.basename(p) for p in record.frames
              if os.path.basename(p) != missing_frames[item_id]]
        else:
          assert _content(faulty.domain(domain)[item_id]) == _content(record)

    by_kind = {f["kind"]: f for f in split_faults}
    assert faulty.pages[by_kind["missing_text"]["id"]].text == rope_format.MISSING_TEXT
    assert by_kind["page_without_image"]["id"] not in faulty.pages
    assert by_kind["video_without_frames"]["id"] not in faulty.videos
    extra = set(faulty.pages) - set(clean.pages)
    assert extra == {by_kind["missing_text"]["id"]}


def test_num_frames_keeps_the_segment_middle_frames_of_the_usable_ones(tmp_path):
  clean_root, faulty_root, _ = _generate_pair(tmp_path)
  for root in (clean_root, faulty_root):
    everything = rope_format.load_rope(root, "training")
    for num_frames in (1, 2, 4):
      kept = rope_format.load_rope(root, "training", num_frames=num_frames)
      assert kept.problems == everything.problems
      for domain in ("video", "live"):
        assert list(kept.domain(domain)) == list(everything.domain(domain))
        for item_id, clip in everything.domain(domain).items():
          chosen = sorted(set(transforms.sample_frame_indices(len(clip.frames),
                                                              num_frames)))
          assert kept.domain(domain)[item_id] == dataclasses.replace(
              clip, frames=tuple(clip.frames[i] for i in chosen),
              frame_keys=tuple(clip.frame_keys[i] for i in chosen),
              frame_lines=tuple(clip.frame_lines[i] for i in chosen))
      assert dict(kept.pages.items()) == dict(everything.pages.items())


def test_a_large_file_is_read_in_blocks_with_the_same_lines(tmp_path, monkeypatch):
  root = small_rope(tmp_path / "one")
  catalog = rope_format.load_rope(root, "test")
  monkeypatch.setattr(rope_txt, "BLOCK_BYTES", 7)  # lines cut across blocks
  in_blocks = rope_format.load_rope(root, "test")
  assert in_blocks.problems == catalog.problems
  for domain in domains.NAMES:
    assert dict(in_blocks.domain(domain).items()) == dict(catalog.domain(domain).items())


# ---- strings read back from their byte spans; the file check by directory listing ----

def test_spans_read_back_the_exact_strings_in_any_order(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  words = ["红色", "a", "条纹，杯子", "OK", " ", "é", "直播间"]
  lines = ["".join(rng.choice(words, int(rng.integers(0, 9)))) for _ in range(12000)]
  path = tmp_path / "lines.txt"
  data = "\n".join(lines).encode("utf-8")
  path.write_bytes(data)
  starts, position = [], 0
  for line in lines:
    starts.append(position)
    position += len(line.encode("utf-8")) + 1
  starts = np.array(starts, np.int64)
  lengths = np.array([len(line.encode("utf-8")) for line in lines], np.int32)
  monkeypatch.setattr(rope_txt, "_RUN_BYTES", 4096)  # many runs
  for count in (5, 3000, 6000, 12000):  # one read each; scattered; dense runs
    if count == 12000:
      chosen = np.arange(12000)
    else:
      chosen = rng.choice(12000, count, replace=False)
    asked = np.concatenate([chosen, chosen[:50]])  # in any order, some twice
    got = rope_txt.read_spans(str(path), starts[asked], lengths[asked]).to_pylist()
    assert got == [lines[i] for i in asked]
  stat = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
  names, index = rope_txt.Spans(str(path), starts, lengths, stat).read_all()
  assert [names[i].as_py() for i in index[:100]] == lines[:100]
  path.write_bytes(data + b"\n")  # changed since it was parsed
  with pytest.raises(ValueError, match="changed since"):
    rope_txt.Spans(str(path), starts, lengths, (len(data), 0)).read(0, 3)


def test_string_hashes_do_not_depend_on_the_other_strings():
  values = ["a", "abcdefgh", "abcdefghi", "", "红色" * 9, "x" * 300]
  together = rope_txt.string_hashes(pa.array(values))
  alone = [int(rope_txt.string_hashes(pa.array([v], pa.large_string()))[0]) for v in values]
  assert together.tolist() == alone and len(set(alone)) == len(values)
  names = pa.array([f"{i:032x}.jpg" for i in range(200000)])
  assert len(np.unique(rope_txt.string_hashes(names))) == 200000


def test_the_file_check_by_listing_finds_what_exists_finds(tmp_path):
  root = tmp_path / "rope"
  (root / "images" / "sub").mkdir(parents=True)
  present = ["a.jpg", "红色.jpg", "sub", "x y.jpg"]
  for name in present:
    if name != "sub":
      (root / "images" / name).write_bytes(b"jpeg")
  (root / "images" / "sub" / "b.jpg").write_bytes(b"jpeg")
  (root / "in_root.jpg").write_bytes(b"jpeg")
  asked = present + ["sub/b.jpg", "in_root.jpg", "missing.jpg", "sub/none.jpg", "..", "A.jpg"]
  resolver = rope_format._ImageResolver(str(root), check_files=True)
  places = resolver(pa.array(asked)).tolist()
  expected = []
  for name in asked:
    if os.path.exists(root / "images" / name):
      expected.append(0)
    elif os.path.exists(root / name):
      expected.append(1)
    else:
      expected.append(2)
  assert places == expected == [0, 0, 0, 0, 0, 1, 2, 2, 0, 2]
