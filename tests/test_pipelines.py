"""Grain pipelines: batch layout, determinism, resumption, sharding, eval coverage.

Most tests run on a tiny in-memory dataset (lists of record dicts, the interface of
`prepare.open_domain`) whose images are flat colours that encode who they belong to:
red = 20 * product_index, green = domain code, blue = 40 * record number within the
product (videos/lives: + 10 * frame number). A flat colour survives crops, flips and
resizing, so a batch row can be traced back to its records.
"""

import io
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from data_pipelines import pipelines
from data_pipelines import prepare
from data_pipelines import tokenizer as tokenizer_lib

_DOMAIN_CODE = {"page": 50, "video": 100, "live": 150}
_NUM_PRODUCTS = 12
_LACKING = {3: "live", 7: "video"}  # products missing a domain: never trained on
_USABLE = sorted(set(range(_NUM_PRODUCTS)) - set(_LACKING))  # 10 products
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色", "裙", "空",
          "新", "款", "视", "频", "直", "播"]


def _jpeg(colour, size=(20, 28)):
  buffer = io.BytesIO()
  PIL.Image.new("RGB", size, tuple(int(c) for c in colour)).save(
      buffer, format="JPEG", quality=98)
  return buffer.getvalue()


def _fake_data():
  """(products, sources): 12 products; product 3 lacks lives, product 7 videos."""
  sources = {domain: [] for domain in _DOMAIN_CODE}
  products = []
  for product_index in range(_NUM_PRODUCTS):
    product = {"product_id": f"p{product_index:02d}", "product_index": product_index}
    for domain, code in _DOMAIN_CODE.items():
      count = 0 if _LACKING.get(product_index) == domain else 1 + product_index % 3
      product[domain] = []
      for record in range(count):
        item = {"id": f"{domain}{product_index:02d}_{record}",
                "product_id": product["product_id"], "product_index": product_index,
                "text": "红色新款裙" * (1 + record) if domain == "page" else "视频直播"}
        colour = (20 * product_index, code, 40 * record)
        if domain == "page":
          item["image"] = _jpeg(colour)
        else:
          num_frames = 3 + record
          item["frames"] = [_jpeg(colour[:2] + (colour[2] + 10 * frame,))
                            for frame in range(num_frames)]
          item["frame_keys"] = list(range(num_frames))
        product[domain].append(len(sources[domain]))
        sources[domain].append(item)
    products.append(product)
  return products, sources


@pytest.fixture(scope="module")
def fake_data():
  return _fake_data()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
  return tokenizer_lib.Tokenizer(path)


def _config(batch_size=4, num_workers=0, seed=0):
  config = synthetic_tiny.get_config()
  config.data.image_size = 16
  config.data.num_frames = 2
  config.data.title_max_length = 12
  config.data.asr_max_length = 8
  config.data.num_workers = num_workers
  config.data.num_threads = 1
  config.data.shuffle_seed = seed
  config.train.batch_size = batch_size
  config.eval.batch_size = 4
  return config


def _train_dataset(fake_data, tokenizer, config, process_index=0, process_count=1):
  products, sources = fake_data
  return pipelines.train_dataset_from_sources(
      config, products, sources, tokenizer, process_index, process_count)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


def _channel_means(images):
  """Mean colour per image: [..., H, W, 3] -> [..., 3] (float)."""
  return images.reshape(images.shape[:-3] + (-1, 3)).mean(axis=-2)


# ---- training batches -------------------------------------------------------------

def test_train_batch_layout_matches_batch_spec(fake_data, tokenizer):
  config = _config(batch_size=4)
  batch = next(iter(_train_dataset(fake_data, tokenizer, config)))
  spec = batch_contract.batch_spec(config)
  assert set(batch) == set(spec)
  for key, (shape, dtype) in spec.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key
  assert spec["video_frames"][0] == (4, 2, 16, 16, 3)
  assert spec["page_title_ids"][0] == (4, 12)
  assert batch_contract.batch_spec(config, process_count=2)["live_frames"][0][0] == 2


def test_train_rows_show_records_of_their_product(fake_data, tokenizer):
  iterator = iter(_train_dataset(fake_data, tokenizer, _config(batch_size=5)))
  for batch in _take(iterator, 4):
    for domain, key in (("page", "page_image"), ("video", "video_frames"),
                        ("live", "live_frames")):
      colours = _channel_means(batch[key])
      if colours.ndim == 3:  # frames: every frame of the clip
        colours = colours.reshape(-1, colours.shape[-2], 3)
      else:
        colours = colours[:, None]
      for row, product_index in enumerate(batch["product_index"]):
        np.testing.assert_allclose(colours[row, :, 0], 20 * product_index, atol=4)
        np.testing.assert_allclose(colours[row, :, 1], _DOMAIN_CODE[domain], atol=4)
    # Token ids: [CLS] first; masks mark real tokens.
    assert np.all(batch["page_title_ids"][:, 0] == _VOCAB.index("[CLS]"))
    assert np.all(batch["video_asr_mask"].sum(axis=1) == 6)  # 视频直播 + CLS/SEP


def test_each_epoch_shows_every_usable_product_once(fake_data, tokenizer):
  iterator = iter(_train_dataset(fake_data, tokenizer, _config(batch_size=5)))
  epochs = [np.concatenate([batch["product_index"] for batch in _take(iterator, 2)])
            for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch.tolist()) == _USABLE
  assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled every epoch


def test_random_choices_vary_across_epochs(fake_data, tokenizer):
  # Product 2 has 3 pages; over 30 epochs each page should be drawn.
  iterator = iter(_train_dataset(fake_data, tokenizer, _config(batch_size=5)))
  page_numbers = set()
  for batch in _take(iterator, 60):
    for row in np.flatnonzero(batch["product_index"] == 2):
      page_numbers.add(int(round(_channel_means(batch["page_image"][row])[2] / 40)))
  assert page_numbers == {0, 1, 2}


def test_page_titles_are_augmented_only_when_long(fake_data, tokenizer):
  # Page r of a product has the title "红色新款裙" * (r + 1): 5 characters (never
  # perturbed) for r = 0, 10 for r = 1 (perturbed in about 60% of the draws).
  iterator = iter(_train_dataset(fake_data, tokenizer, _config(batch_size=5)))
  lengths = {0: set(), 1: set()}
  for batch in _take(iterator, 60):
    page_numbers = np.round(_channel_means(batch["page_image"])[:, 2] / 40)
    for row, page_number in enumerate(page_numbers):
      if page_number in lengths:
        lengths[page_number].add(int(batch["page_title_mask"][row].sum()))
  assert lengths[0] == {5 + 2}
  assert len(lengths[1]) > 2 and 10 + 2 in lengths[1]


def test_same_seed_same_batches_other_seed_other_batches(fake_data, tokenizer):
  first = _take(iter(_train_dataset(fake_data, tokenizer, _config())), 3)
  second = _take(iter(_train_dataset(fake_data, tokenizer, _config())), 3)
  _assert_batches_equal(first, second)
  other = _take(iter(_train_dataset(fake_data, tokenizer, _config(seed=1))), 3)
  assert any(not np.array_equal(a["page_image"], b["page_image"])
             for a, b in zip(first, other))


def _check_resume(dataset):
  iterator = iter(dataset)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  resumed = iter(dataset)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), expected)
  for it in (iterator, resumed):
    if hasattr(it, "close"):
      it.close()


def test_resume_from_iterator_state(fake_data, tokenizer):
  _check_resume(_train_dataset(fake_data, tokenizer, _config()))


@pytest.mark.slow
def test_resume_from_iterator_state_with_worker_processes(fake_data, tokenizer):
  dataset = _train_dataset(fake_data, tokenizer, _config(num_workers=2))
  _check_resume(dataset)
  # Workers split whole batches: the stream equals the in-process one.
  in_process = _train_dataset(fake_data, tokenizer, _config(num_workers=0))
  iterator = iter(dataset)
  _assert_batches_equal(_take(iterator, 4), _take(iter(in_process), 4))
  iterator.close()


def test_processes_see_disjoint_products(fake_data, tokenizer):
  config = _config(batch_size=4)  # 2 rows per process
  seen = []
  for process_index in range(2):
    iterator = iter(_train_dataset(fake_data, tokenizer, config, process_index, 2))
    # 10 usable products, 2 processes: an epoch is 5 rows per process.
    rows = np.concatenate([batch["product_index"] for batch in _take(iterator, 3)])
    seen.append(set(rows[:5].tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(_USABLE)


def test_train_rejects_bad_process_split(fake_data, tokenizer):
  with pytest.raises(ValueError, match="divisible"):
    _train_dataset(fake_data, tokenizer, _config(batch_size=5), 0, 2)
  with pytest.raises(ValueError, match="process_index"):
    _train_dataset(fake_data, tokenizer, _config(batch_size=4), 2, 2)


# ---- eval batches -----------------------------------------------------------------

@pytest.mark.parametrize("domain", ["page", "video", "live"])
def test_eval_covers_every_record_once_with_padding(fake_data, tokenizer, domain):
  _, sources = fake_data
  config = _config()
  eval_data = pipelines.eval_dataset_from_source(config, domain, sources[domain],
                                                 tokenizer)
  batches = list(eval_data)
  assert len(batches) == eval_data.num_batches == len(eval_data)
  assert eval_data.num_records == len(sources[domain])
  spec = batch_contract.eval_batch_spec(config, domain)
  for batch in batches:
    for key, (shape, dtype) in spec.items():
      assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert batch["id"].dtype == object and batch["product_id"].dtype == object
  valid = np.concatenate([batch["valid"] for batch in batches])
  ids = np.concatenate([batch["id"] for batch in batches])
  assert ids[valid].tolist() == [record["id"] for record in sources[domain]]
  assert not valid[len(sources[domain]):].any()  # padding only at the end
  assert len(valid) - valid.sum() < config.eval.batch_size
  product_ids = np.concatenate([batch["product_id"] for batch in batches])
  assert product_ids[valid].tolist() == [r["product_id"] for r in sources[domain]]


def test_eval_frames_are_segment_middles_without_augmentation(fake_data, tokenizer):
  _, sources = fake_data
  eval_data = pipelines.eval_dataset_from_source(_config(), "video", sources["video"],
                                                 tokenizer)
  batch = next(iter(eval_data))
  for row in range(4):
    record = sources["video"][row]
    num_frames = len(record["frames"])
    record_number = int(record["id"].split("_")[1])
    # T = 2 of n frames: indices floor(n/4) and floor(3n/4); blue = 40 r + 10 frame.
    expected_blue = [40 * record_number + 10 * (k * num_frames // 4) for k in (1, 3)]
    np.testing.assert_allclose(_channel_means(batch["video_frames"][row])[:, 2],
                               expected_blue, atol=4)


def test_eval_processes_split_records(fake_data, tokenizer):
  _, sources = fake_data
  parts = [pipelines.eval_dataset_from_source(_config(), "live", sources["live"],
                                              tokenizer, process_index, 3)
           for process_index in range(3)]
  assert len({part.num_batches for part in parts}) == 1  # same number of steps
  ids = []
  for part in parts:
    for batch in part:
      ids.extend(batch["id"][batch["valid"]].tolist())
  assert ids == [record["id"] for record in sources["live"]]


def test_eval_rejects_unknown_domain(fake_data, tokenizer):
  with pytest.raises(ValueError, match="domain"):
    pipelines.eval_dataset_from_source(_config(), "photo", [], tokenizer)


# ---- on prepared data ---------------------------------------------------------------

def test_missing_split_is_a_clear_error(tmp_path):
  config = _config()
  config.data.prepared_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="test"):
    pipelines.make_eval_dataset(config, "page", split="test")


def _prepared_config(rope_dir, prepared_dir):
  config = _config(batch_size=4)
  config.data.prepared_dir = str(prepared_dir)
  config.data.vocab_path = os.path.join(rope_dir, "vocab.txt")
  return config


def test_train_on_prepared_data(tiny_rope_dir, tiny_prepared_dir):
  config = _prepared_config(tiny_rope_dir, tiny_prepared_dir)
  dataset = pipelines.make_train_dataset(config)
  usable = {product["product_index"] for product in pipelines.train_products(
      prepare.load_products(tiny_prepared_dir, "training"))}
  spec = batch_contract.batch_spec(config)
  for batch in _take(iter(dataset), 2):
    assert {key: (value.shape, value.dtype) for key, value in batch.items()} == spec
    assert set(batch["product_index"].tolist()) <= usable
    assert batch["video_asr_mask"].sum(axis=1).min() >= 3  # [CLS] text [SEP]
  _check_resume(dataset)


def test_eval_on_prepared_data_covers_the_split(tiny_rope_dir, tiny_prepared_dir):
  config = _prepared_config(tiny_rope_dir, tiny_prepared_dir)
  source = prepare.open_domain(tiny_prepared_dir, "test", "video")
  eval_data = pipelines.make_eval_dataset(config, "video")
  assert eval_data.num_records == len(source)
  ids = [i for batch in eval_data for i in batch["id"][batch["valid"]]]
  assert ids == [source[index]["id"] for index in range(len(source))]


def test_pipelines_read_the_prepared_config_the_run_names(tiny_rope_dir, tmp_path):
  out = str(tmp_path / "prepared")
  quiet = {"progress": False, "log": lambda line: None}
  first = prepare.prepare(tiny_rope_dir, out, splits=["test"], max_image_side=16, **quiet)
  prepare.prepare(tiny_rope_dir, out, splits=["training"], **quiet)  # the default now
  config = _prepared_config(tiny_rope_dir, out)
  with pytest.raises(FileNotFoundError, match=r"no prepared split 'test' .*prepared: "
                                              r"training"):
    pipelines.make_eval_dataset(config, "video", split="test")
  config.data.prepared_config = first["tfds"]["config"]
  eval_data = pipelines.make_eval_dataset(config, "video", split="test")
  source = prepare.open_domain(out, "test", "video", first["tfds"]["config"])
  ids = [i for batch in eval_data for i in batch["id"][batch["valid"]]]
  assert ids == [item["id"] for item in source] and len(ids) == eval_data.num_records > 0
  config.data.prepared_config = "frames8_side256"
  with pytest.raises(FileNotFoundError, match="'frames8_side256' is not in"):
    pipelines.make_eval_dataset(config, "video", split="test")


def test_missing_domain_is_a_clear_error(tiny_rope_dir, tiny_prepared_dir, tmp_path):
  prepared_copy = tmp_path / "prepared"
  shutil.copytree(tiny_prepared_dir, prepared_copy)
  for shard in prepared_copy.glob("tfds/rope/*/*/rope-test_live.array_record-*"):
    shard.unlink()
  config = _prepared_config(tiny_rope_dir, prepared_copy)
  with pytest.raises(FileNotFoundError, match="live"):
    pipelines.make_eval_dataset(config, "live")
