"""Host-side transforms: decoding, frame sampling, crops, flips, title noise."""

import io
import math

import numpy as np
import PIL.Image
import pytest

from data_pipelines import transforms


def _jpeg_bytes(array, mode=None):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array, mode=mode).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _gradient_image(height, width):
  """uint8 [H, W, 3] whose red channel grows left to right, green top to bottom."""
  cols = np.linspace(0, 255, width)[None, :].repeat(height, 0)
  rows = np.linspace(0, 255, height)[:, None].repeat(width, 1)
  return np.stack([cols, rows, np.full_like(cols, 128)], -1).astype(np.uint8)


# ---- decoding -------------------------------------------------------------------

def test_decode_jpeg_returns_rgb_uint8():
  image = np.full((12, 20, 3), (200, 30, 90), np.uint8)
  decoded = transforms.decode_jpeg(_jpeg_bytes(image))
  assert decoded.shape == (12, 20, 3) and decoded.dtype == np.uint8
  np.testing.assert_allclose(decoded, image, atol=6)  # JPEG is lossy


def test_decode_grayscale_jpeg_gives_three_channels():
  decoded = transforms.decode_jpeg(_jpeg_bytes(np.full((8, 8), 77, np.uint8), "L"))
  assert decoded.shape == (8, 8, 3)


def test_decode_garbage_names_the_source():
  with pytest.raises(ValueError, match="video_17"):
    transforms.decode_jpeg(b"not a jpeg at all", name="video_17")


# ---- frame sampling -------------------------------------------------------------

@pytest.mark.parametrize("n,t", [(8, 8), (16, 8), (20, 8), (100, 4), (3, 8), (1, 4),
                                 (7, 1)])
def test_frame_indices_are_segment_middles(n, t):
  indices = transforms.sample_frame_indices(n, t)
  assert len(indices) == t
  for i, index in enumerate(indices):
    assert index == math.floor((2 * i + 1) * n / (2 * t))
    if n >= t:  # the index lies inside segment i = [i n / T, (i + 1) n / T)
      assert i * n / t <= index < (i + 1) * n / t
  assert all(0 <= index < n for index in indices)
  assert indices == sorted(indices)


def test_frame_indices_examples():
  assert transforms.sample_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
  assert transforms.sample_frame_indices(2, 4) == [0, 0, 1, 1]


def test_frame_indices_reject_empty_clip():
  with pytest.raises(ValueError):
    transforms.sample_frame_indices(0, 8)


# ---- random resized crop ----------------------------------------------------------

@pytest.mark.parametrize("height,width", [(256, 256), (200, 240), (240, 200), (37, 41)])
def test_crop_inside_image_and_area_in_scale(height, width):
  rng = np.random.default_rng(0)
  scale, ratio = (0.64, 1.0), (3 / 4, 4 / 3)
  for _ in range(300):
    crop = transforms.random_resized_crop_params(rng, height, width, scale, ratio)
    assert 0 <= crop.top and crop.top + crop.height <= height
    assert 0 <= crop.left and crop.left + crop.width <= width
    assert crop.height > 0 and crop.width > 0
    # Rounding each side to whole pixels moves the area by under a pixel row/column.
    slack = (crop.height + crop.width + 1) / (height * width)
    area_share = crop.height * crop.width / (height * width)
    assert scale[0] - slack <= area_share <= scale[1] + slack
    if (crop.height, crop.width) != (height, width):  # the fallback keeps the image
      assert ratio[0] - 0.05 <= crop.width / crop.height <= ratio[1] + 0.05


@pytest.mark.parametrize("height,width,expected", [
    # Too wide or too tall for any crop of >= 64% of the area with ratio in
    # [3/4, 4/3]: centre crop of the largest box with the nearest allowed ratio.
    (10, 1000, transforms.Crop(top=0, left=(1000 - 13) // 2, height=10, width=13)),
    (120, 300, transforms.Crop(top=0, left=70, height=120, width=160)),
    (300, 90, transforms.Crop(top=90, left=0, height=120, width=90)),
])
def test_crop_falls_back_to_centre_crop(height, width, expected):
  rng = np.random.default_rng(0)
  for _ in range(20):
    assert transforms.random_resized_crop_params(rng, height, width) == expected


def test_crop_is_deterministic_for_a_seed():
  first = transforms.random_resized_crop_params(np.random.default_rng(5), 200, 300)
  second = transforms.random_resized_crop_params(np.random.default_rng(5), 200, 300)
  assert first == second


def test_apply_crop_selects_the_box_and_flip_mirrors():
  image = _gradient_image(40, 60)
  crop = transforms.Crop(top=5, left=10, height=30, width=30)
  cropped = transforms.apply_crop_resize_flip(image, crop, flip=False, size=30)
  np.testing.assert_array_equal(cropped, image[5:35, 10:40])
  mirrored = transforms.apply_crop_resize_flip(image, crop, flip=True, size=30)
  np.testing.assert_array_equal(mirrored, image[5:35, 10:40][:, ::-1])


def test_apply_crop_resizes():
  out = transforms.apply_crop_resize_flip(
      _gradient_image(40, 60), transforms.Crop(0, 0, 40, 60), flip=False, size=16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# ---- clips ------------------------------------------------------------------------

def test_identical_frames_give_identical_outputs():
  frame = _gradient_image(48, 64)
  for seed in range(5):
    clip = transforms.train_transform_clip([frame] * 4, np.random.default_rng(seed), 24)
    assert clip.shape == (4, 24, 24, 3) and clip.dtype == np.uint8
    for t in range(1, 4):
      np.testing.assert_array_equal(clip[t], clip[0])


def test_frames_of_a_clip_share_crop_and_flip():
  # Frame t is frame 0 brightened by 10 t: with a shared crop and flip (bilinear
  # resampling is linear) the outputs differ by the same constant; with another
  # crop or flip of the gradient image they would differ by far more.
  base = _gradient_image(48, 64) // 2
  frames = [base + np.uint8(10 * t) for t in range(4)]
  for seed in range(10):
    clip = transforms.train_transform_clip(frames, np.random.default_rng(seed), 24)
    for t in range(1, 4):
      difference = clip[t].astype(int) - clip[0].astype(int)
      assert np.abs(difference - 10 * t).max() <= 1


def test_clip_flip_happens_about_half_the_time():
  image = _gradient_image(32, 32)  # red grows to the right
  flipped = 0
  for seed in range(200):
    out = transforms.train_transform_clip([image], np.random.default_rng(seed), 16)[0]
    flipped += int(out[:, 0, 0].mean() > out[:, -1, 0].mean())
  assert 60 < flipped < 140


def test_clip_frames_of_another_size_get_the_same_relative_crop():
  small, large = _gradient_image(30, 40), _gradient_image(60, 80)
  clip = transforms.train_transform_clip([small, large], np.random.default_rng(1), 20)
  np.testing.assert_allclose(clip[0].astype(int), clip[1].astype(int), atol=12)


# ---- eval and normalisation -------------------------------------------------------

def test_eval_transform_resizes_whole_image():
  image = _gradient_image(50, 90)
  out = transforms.eval_transform(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  # The whole width is kept: left column dark red, right column bright red.
  assert out[:, 0, 0].mean() < 10 and out[:, -1, 0].mean() > 245


def test_normalize_images_uses_imagenet_statistics():
  images = np.array([[[0, 128, 255]]], np.uint8)
  expected = (np.array([0, 128, 255]) / 255.0 - [0.485, 0.456, 0.406]) / [
      0.229, 0.224, 0.225]
  out = transforms.normalize_images(images)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


# ---- title augmentation -----------------------------------------------------------

def _distinct_chars(n):
  return "".join(chr(0x4E00 + i) for i in range(n))  # n different CJK characters


def test_augment_title_is_deterministic_for_a_seed():
  title = "红色连衣裙女夏季新款显瘦中长款"
  outputs = {transforms.augment_title(title, np.random.default_rng(3)) for _ in range(3)}
  assert len(outputs) == 1


def test_augment_title_leaves_short_titles_alone():
  for seed in range(50):
    rng = np.random.default_rng(seed)
    assert transforms.augment_title("短标题九个字而已", rng, prob=1.0) == "短标题九个字而已"


def test_augment_title_changes_about_a_fifth_of_the_characters():
  title = _distinct_chars(2000)
  out = transforms.augment_title(title, np.random.default_rng(0), prob=1.0,
                                 char_rate=0.2)
  dropped = sum(out.count(char) == 0 for char in title)
  doubled = sum(out.count(char) == 2 for char in title)
  spaced = out.count(" ")
  changed = dropped + doubled + spaced
  # Binomial(2000, 0.2): mean 400, standard deviation ~18; allow 4.5 sigma.
  assert abs(changed - 400) < 80
  for count in (dropped, doubled, spaced):  # each about a third of the changes
    assert abs(count - changed / 3) < 60
  assert len(out) == len(title) - dropped + doubled + spaced


def test_augment_title_applies_with_probability_prob():
  title = _distinct_chars(60)
  changed = sum(
      transforms.augment_title(title, np.random.default_rng(seed), prob=0.6) != title
      for seed in range(1000))
  assert abs(changed / 1000 - 0.6) < 0.06


def test_decode_with_min_side_reduces_scale_but_keeps_the_side():
  image = _gradient_image(480, 640)
  data = _jpeg_bytes(image)
  full = transforms.decode_jpeg(data)
  reduced = transforms.decode_jpeg(data, min_side=150)
  assert full.shape == (480, 640, 3)
  # DCT scaling in 1/8 steps: 3/8 gives 180 rows; 2/8 would give 120 < 150
  assert reduced.shape == (180, 240, 3)
  small = transforms.eval_transform(full, 64).astype(int)
  np.testing.assert_allclose(transforms.eval_transform(reduced, 64), small, atol=8)


def test_min_decode_side_keeps_every_crop_at_least_size():
  size = 224
  side = transforms.min_decode_side(size)
  rng = np.random.default_rng(0)
  for height, width in ((side, side), (side, 2 * side), (side + 7, side)):
    for _ in range(300):
      crop = transforms.random_resized_crop_params(rng, height, width)
      assert min(crop.height, crop.width) >= size - 1  # rounding
