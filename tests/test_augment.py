"""Device-side augmentation (`data.augment_on="device"`): the host sampler's boxes, PIL's
pixels, unchanged evaluation, and training that still resumes exactly."""

import io

import jax
import numpy as np
import PIL.Image
import pytest
from scipy import stats

from configs import synthetic_tiny
from cope_jax.base import batch as batch_contract
from cope_jax import augment
from cope_jax import checkpoints
from cope_jax import train
from cope_jax.base import domains
from data_pipelines import pipelines
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import transforms
from tests import test_train
from cope_jax.testing import tiny_configs


def _textured(height, width, seed):
  """A smooth random uint8 RGB image [H, W, 3] (blobs and gradients, JPEG-friendly)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 6 + 2, width // 6 + 2, 3), dtype=np.uint8)
  return np.asarray(PIL.Image.fromarray(coarse).resize((width, height),
                                                       PIL.Image.Resampling.BICUBIC))


def _jpeg(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


# ---- pixels: the device crop is PIL's crop ----------------------------------------

@pytest.mark.parametrize("height,width,size", [(48, 80, 32), (64, 64, 64), (90, 40, 24),
                                               (30, 30, 48)])
def test_device_crop_resize_flip_matches_the_host_path(height, width, size):
  rng = np.random.default_rng(height * width)
  clip = np.stack([_textured(height, width, seed) for seed in range(3)])  # [T, H, W, 3]
  boxes, flips, expected = [], [], []
  for _ in range(6):
    crop = transforms.random_resized_crop_params(rng, height, width)
    flip = bool(rng.random() < 0.5)
    boxes.append(transforms.normalized_box(crop, height, width))
    flips.append(flip)
    expected.append(np.stack([transforms.apply_crop_resize_flip(frame, crop, flip, size)
                              for frame in clip]))
  clips = np.repeat(clip[None], len(boxes), axis=0)
  got = np.asarray(augment.crop_resize_flip(clips, np.stack(boxes), np.array(flips), size))
  expected = np.stack(expected).astype(int)
  assert got.shape == expected.shape and got.dtype == np.uint8
  difference = np.abs(got.astype(int) - expected)
  # PIL rounds to uint8 between its horizontal and vertical passes; JAX does not.
  assert difference.mean() < 0.5 and difference.max() <= 3
  # One image (a page) works the same as a clip of one frame.
  single = np.asarray(augment.crop_resize_flip(clips[:, 0], np.stack(boxes),
                                               np.array(flips), size))
  np.testing.assert_array_equal(single, got[:, 0])


def test_augment_batch_leaves_host_augmented_batches_alone():
  batch = {"page_image": np.zeros((2, 8, 8, 3), np.uint8), "product_index": np.arange(2)}
  assert augment.augment_batch(batch, 8) == batch


# ---- boxes: the host sampler's distribution -----------------------------------------

def _box_statistics(boxes, height, width):
  """(area shares, log aspect ratios in the image's pixels) of [N, 4] share boxes."""
  boxes = np.asarray(boxes)
  area = boxes[:, 2] * boxes[:, 3]
  log_aspect = np.log((boxes[:, 3] * width) / (boxes[:, 2] * height))
  return area, log_aspect


@pytest.mark.parametrize("height,width", [(720, 1280), (800, 800), (1280, 720)])
def test_device_path_crop_boxes_follow_the_host_sampler(height, width):
  # The pipeline draws a box on the decoded frame (DCT-scaled: the original's aspect),
  # then resizes the frame to the square canvas; torchvision draws on the original.
  decoded = np.zeros((height // 4, width // 4, 3), np.uint8)
  device_boxes, flips = [], []
  for seed in range(1500):
    clip = transforms.canvas_clip([decoded], np.random.default_rng(seed), canvas_size=16)
    assert clip.frames.shape == (1, 16, 16, 3)
    device_boxes.append(clip.crop_box)
    flips.append(clip.flip)
  rng = np.random.default_rng(12345)
  host_boxes = [transforms.normalized_box(
      transforms.random_resized_crop_params(rng, height, width), height, width)
                for _ in range(1500)]
  device_area, device_aspect = _box_statistics(device_boxes, height, width)
  host_area, host_aspect = _box_statistics(host_boxes, height, width)
  assert device_area.min() >= 0.64 - 0.01 and device_area.max() <= 1.0
  assert np.exp(device_aspect).min() >= 0.75 - 0.01 and np.exp(device_aspect).max() <= 4 / 3 + 0.01
  assert stats.ks_2samp(device_area, host_area).pvalue > 0.01
  assert stats.ks_2samp(device_aspect, host_aspect).pvalue > 0.01
  assert abs(np.mean(flips) - 0.5) < 0.05
  # The test can tell: boxes drawn on the square canvas instead would differ.
  if height != width:
    canvas_boxes = [transforms.normalized_box(
        transforms.random_resized_crop_params(rng, 16, 16), 16, 16) for _ in range(1500)]
    _, canvas_aspect = _box_statistics(canvas_boxes, height, width)
    assert stats.ks_2samp(canvas_aspect, host_aspect).pvalue < 1e-6


def test_same_generator_state_gives_the_host_box_and_flip():
  frames = [_textured(60, 100, seed) for seed in range(2)]
  for seed in range(20):
    host = transforms.train_transform_clip(frames, np.random.default_rng(seed), size=24)
    clip = transforms.canvas_clip(frames, np.random.default_rng(seed), canvas_size=100)
    on_device = np.asarray(augment.crop_resize_flip(
        clip.frames[None], clip.crop_box[None], np.array([clip.flip]), 24))[0]
    # The canvas resize (60x100 -> 100x100) resamples once more: a loose bound.
    assert np.abs(on_device.astype(int) - host.astype(int)).mean() < 3


# ---- the pipeline in device mode -------------------------------------------------------

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色", "裙", "空", "视", "频"]
_SIDE = 24  # every stored image is _SIDE x _SIDE: the canvas, so no canvas resampling


@pytest.fixture(scope="module")
def textured_data():
  """(products, sources): 6 products with a page, a video and a live clip each."""
  sources = {name: [] for name in domains.NAMES}
  products = []
  for product_index in range(6):
    product = {"product_id": f"p{product_index}", "product_index": product_index}
    for code, domain in enumerate(domains.DOMAINS):
      item = {"id": f"{domain.name}{product_index}", "product_id": product["product_id"],
              "product_index": product_index, "text": "红色裙红色裙红色裙视频"}
      images = [_jpeg(_textured(_SIDE, _SIDE, 100 * product_index + 10 * code + frame))
                for frame in range(3 if domain.is_clip else 1)]
      if domain.is_clip:
        item["frames"], item["frame_keys"] = images, list(range(len(images)))
      else:
        item["image"] = images[0]
      product[domain.name] = [len(sources[domain.name])]
      sources[domain.name].append(item)
    products.append(product)
  return products, sources


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
  return tokenizer_lib.Tokenizer(path)


def _config(augment_on):
  config = synthetic_tiny.get_config()
  config.data.image_size = 16
  config.data.num_frames = 2
  config.data.title_max_length = 12
  config.data.asr_max_length = 8
  config.data.num_threads = 1
  config.data.augment_on = augment_on
  config.data.canvas_size = _SIDE
  config.train.batch_size = 4
  config.eval.batch_size = 4
  return config


def _batches(config, data, tokenizer, count=3):
  products, sources = data
  iterator = iter(pipelines.train_dataset_from_sources(config, products, sources, tokenizer))
  return [next(iterator) for _ in range(count)]


def test_device_mode_batches_augment_to_the_host_mode_batches(textured_data, tokenizer):
  host_config, device_config = _config("host"), _config("device")
  spec = batch_contract.pipeline_batch_spec(device_config)
  for host, device in zip(_batches(host_config, textured_data, tokenizer),
                          _batches(device_config, textured_data, tokenizer)):
    assert {key: (value.shape, value.dtype) for key, value in device.items()} == spec
    augmented = jax.device_get(augment.augment_batch(device, device_config.data.image_size))
    assert augmented.keys() == host.keys()
    for key, value in host.items():
      if value.dtype == np.uint8:  # pixels: the same crop, resampled by JAX, not PIL
        difference = np.abs(augmented[key].astype(int) - value.astype(int))
        assert difference.mean() < 0.5 and difference.max() <= 3, key
      else:  # product, title noise, tokens: the same generator draws
        np.testing.assert_array_equal(augmented[key], value, err_msg=key)


def test_evaluation_does_not_depend_on_augment_on(textured_data, tokenizer):
  _, sources = textured_data
  for domain in domains.NAMES:
    host, device = (list(pipelines.eval_dataset_from_source(
        _config(where), domain, sources[domain], tokenizer)) for where in ("host", "device"))
    for a, b in zip(host, device):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("field,value,message", [
    ("augment_on", "gpu", "config.data.augment_on"),
    ("canvas_size", 8, "config.data.canvas_size"),
])
def test_bad_augmentation_fields_are_named(textured_data, tokenizer, field, value, message):
  config = _config("device")
  config.data[field] = value
  with pytest.raises(ValueError, match=message):
    _batches(config, textured_data, tokenizer, count=1)


# ---- training --------------------------------------------------------------------------

def _device_training_config(prepared_dir, rope_dir, num_steps):
  config = tiny_configs.training_config(prepared_dir, rope_dir, num_steps=num_steps)
  config.data.augment_on = "device"
  config.data.canvas_size = 32  # the fixture's JPEGs are 32 x 32
  return config


@pytest.mark.slow  # three short trainings, each compiling the step (~1 min each on 2 cores)
def test_device_augmented_training_resumes_exactly_after_a_kill(
    tiny_prepared_dir, tiny_rope_dir, tmp_path, monkeypatch):
  config = _device_training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=6)
  config.train.checkpoint_every = 2
  metrics = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["data_stall"] <= 1.0
  expected = test_train._final_params(str(tmp_path / "uninterrupted"), 6)

  save = checkpoints.save_training_state

  class Killed(BaseException):  # as a kill: not an error the checkpoint writer explains
    pass

  def save_then_die(manager, step, state, data_iterator):
    save(manager, step, state, data_iterator)
    if step == 4:
      manager.wait_until_finished()
      raise Killed()

  monkeypatch.setattr(checkpoints, "save_training_state", save_then_die)
  with pytest.raises(Killed):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(checkpoints, "save_training_state", save)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  test_train._assert_same_tree(test_train._final_params(str(tmp_path / "resumed"), 6),
                               expected)
