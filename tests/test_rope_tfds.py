"""The `rope` TFDS builder: registration, read-back, no TensorFlow, Beam == single process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from cope_jax.base import domains
from data_pipelines import prepare
from data_pipelines import rope_examples
from data_pipelines import rope_format
from data_pipelines import rope_plan
from data_pipelines import rope_tfds
from data_pipelines import synthetic
from data_pipelines import transforms

QUIET = {"progress": False, "log": lambda line: None}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_NAMES = {f"{s}_{d}" for s in rope_format.SPLITS for d in domains.NAMES}


def test_registered_builder_and_data_source_read_what_prepare_wrote(tiny_prepared_dir):
  data_dir = os.path.join(tiny_prepared_dir, prepare.TFDS_SUBDIR)
  builder = tfds.builder("rope", data_dir=data_dir)  # default config: all_frames_original
  assert isinstance(builder, rope_tfds.Rope)
  info = builder.info
  assert info.disable_shuffling and info.file_format.value == "array_record"
  assert set(info.splits) == SPLIT_NAMES
  features = info.features
  assert set(features) == {"id", "product_id", "product_index", "text", "frames",
                           "frame_keys"}
  assert all(features[name].doc.desc for name in features)  # documented in DatasetInfo
  for split in rope_format.SPLITS:
    for domain in domains.NAMES:
      source = tfds.data_source("rope/all_frames_original", data_dir=data_dir,
                                split=f"{split}_{domain}")
      ours = prepare.open_domain(tiny_prepared_dir, split, domain)
      assert len(source) == len(ours) > 0
      # Our direct proto parsing and TFDS's own decoding agree on every record.
      for index, item in enumerate(ours):
        example = source[index]
        assert item["id"] == example["id"].decode()
        assert item["product_id"] == example["product_id"].decode()
        assert item["product_index"] == int(example["product_index"])
        assert item["text"] == example["text"].decode()
        frames = [bytes(frame) for frame in example["frames"]]
        if domain == "page":
          assert [item["image"]] == frames and list(example["frame_keys"]) == [0]
        else:
          assert item["frames"] == frames
          assert item["frame_keys"] == [int(key) for key in example["frame_keys"]]


def test_build_info_carries_products_and_problems(tiny_prepared_dir):
  dataset_dir = json.load(open(os.path.join(tiny_prepared_dir, prepare.REPORT_NAME),
                               encoding="utf-8"))["tfds"]["dataset_dir"]
  build_info = rope_tfds.read_build_info(dataset_dir)
  assert build_info["generated_with"] == "shard_writer"
  assert build_info["rope_splits"] == list(rope_format.SPLITS)
  for split in rope_format.SPLITS:
    assert rope_tfds.read_products(dataset_dir, split) == prepare.load_products(
        tiny_prepared_dir, split)


@pytest.mark.parametrize("num_available", range(1, 40))
def test_kept_frames_reproduce_sampling_from_the_whole_clip(num_available):
  for num_frames in range(1, 12):
    kept = rope_examples.kept_frame_positions(num_available, num_frames)
    assert kept == sorted(set(kept)) and len(kept) == min(num_available, num_frames)
    from_kept = [kept[i] for i in transforms.sample_frame_indices(len(kept), num_frames)]
    assert from_kept == transforms.sample_frame_indices(num_available, num_frames)
  assert rope_examples.kept_frame_positions(num_available, 0) == list(range(num_available))


def test_configs_are_named_by_shape():
  names = [config.name for config in rope_tfds.Rope.BUILDER_CONFIGS]
  assert len(names) == len(set(names)) and names[0] == "all_frames_original"
  assert "frames8_side256" in names
  assert rope_tfds.rope_config(8, 256) is rope_tfds.Rope.builder_configs["frames8_side256"]
  custom = rope_tfds.rope_config(3, 100)
  assert (custom.name, custom.num_frames, custom.max_side) == ("frames3_side100", 3, 100)
  with pytest.raises(ValueError):
    rope_tfds.rope_config(-1, 0)


_NO_TENSORFLOW_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow_datasets as tfds
    from data_pipelines import rope_format, rope_tfds  # registers "rope"
    rope_dir, data_dir = sys.argv[1], sys.argv[2]
    builder = tfds.builder("rope/frames4_side256", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=rope_dir))
    source = tfds.data_source("rope/frames4_side256", data_dir=data_dir,
                              split="test_video")
    ids = [source[i]["id"].decode() for i in range(len(source))]
    frames = [len(source[i]["frames"]) for i in range(len(source))]
    print(json.dumps({"ids": ids, "frames": frames,
                      "catalog": list(rope_format.load_rope(rope_dir, "test").videos),
                      "files": sorted(p.name for p in builder.data_path.iterdir()),
                      "tensorflow_imported": "tensorflow" in sys.modules}))
""")


def test_build_and_read_never_import_tensorflow(tmp_path):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=3, test_products=3, frames_per_clip=6, image_size=16,
                     seed=4)
  # A `tensorflow` package that records any attempt to import it, first on the path.
  stub = tmp_path / "stub" / "tensorflow"
  stub.mkdir(parents=True)
  marker = tmp_path / "tensorflow_imported.txt"
  (stub / "__init__.py").write_text(
      "import traceback\n"
      f"open({str(marker)!r}, 'a').write(''.join(traceback.format_stack()))\n"
      "raise ImportError('TensorFlow must not be imported')\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), REPO_ROOT])}
  result = subprocess.run(
      [sys.executable, "-c", _NO_TENSORFLOW_SCRIPT, rope_dir, str(tmp_path / "tfds")],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not marker.exists(), marker.read_text()
  output = json.loads(result.stdout.strip().splitlines()[-1])
  assert not output["tensorflow_imported"]
  assert output["ids"] == output["catalog"]  # catalog order
  assert set(output["frames"]) == {4}  # frames4: the 4 segment-middle frames of 6
  assert not [name for name in output["files"] if "tmp" in name]  # the plan is gone


@pytest.mark.slow
def test_beam_direct_runner_with_two_workers_writes_the_same_dataset(tmp_path):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=6, test_products=3, frames_per_clip=3, image_size=16,
                     seed=2, inject_faults=True)
  plain = prepare.prepare(rope_dir, str(tmp_path / "plain"), num_frames=2, **QUIET)
  beam = prepare.prepare(rope_dir, str(tmp_path / "beam"), num_frames=2, workers=2,
                         beam_runner="DirectRunner", num_shards=2, **QUIET)
  assert (plain["tfds"]["generated_with"], beam["tfds"]["generated_with"]) == (
      "shard_writer", "beam")
  assert beam["problems"] == plain["problems"]
  assert any(p["stage"] == "decode" for p in plain["problems"])
  for split in rope_format.SPLITS:
    assert beam["splits"][split]["products"] == plain["splits"][split]["products"]
    assert (prepare.load_products(str(tmp_path / "beam"), split)
            == prepare.load_products(str(tmp_path / "plain"), split))
    for domain in domains.NAMES:
      ours = list(prepare.open_domain(str(tmp_path / "plain"), split, domain))
      theirs = list(prepare.open_domain(str(tmp_path / "beam"), split, domain))
      assert theirs == ours and ours
      assert beam["splits"][split]["domains"][domain]["shards"] == 2
  dataset_dir = beam["tfds"]["dataset_dir"]
  leftovers = [name for name in os.listdir(dataset_dir) if "tmp" in name]
  assert not leftovers  # catalog rows and problem files of the workers are gone


def test_beam_workers_read_their_rows_from_the_columnar_plan(tmp_path, monkeypatch):
  rope_dir = str(tmp_path / "rope")
  synthetic.generate(rope_dir, products=4, test_products=2, frames_per_clip=3, image_size=16,
                     seed=6)
  plain = prepare.prepare(rope_dir, str(tmp_path / "plain"), splits=["test"], **QUIET)
  read = []
  original_rows = rope_plan.Plan.rows

  def rows(plan, start, stop):
    read.append((os.path.basename(plan.path), start, stop))
    return original_rows(plan, start, stop)

  monkeypatch.setattr(rope_plan.Plan, "rows", rows)
  # One DirectRunner worker runs in this process, so the plan reads are seen here.
  beam = prepare.prepare(rope_dir, str(tmp_path / "beam"), splits=["test"],
                         beam_runner="DirectRunner", **QUIET)
  assert beam["tfds"]["generated_with"] == "beam"
  for domain in domains.NAMES:
    name = f"test_{domain}"
    ranges = sorted((start, stop) for plan, start, stop in read if plan == f"{name}.arrow")
    records = plain["splits"]["test"]["domains"][domain]["records"]
    # Every row read once, in ranges of at most BEAM_RANGE_ROWS.
    assert [r for r in ranges] == [(a, min(records, a + rope_tfds.BEAM_RANGE_ROWS))
                                   for a in range(0, records, rope_tfds.BEAM_RANGE_ROWS)]
    assert (list(prepare.open_domain(str(tmp_path / "beam"), "test", domain))
            == list(prepare.open_domain(str(tmp_path / "plain"), "test", domain)))
