"""What the model reads of one record at evaluation, and a digest of it.

A record is a dict as `prepare.open_domain` gives it: `id`, `product_id`, `text` and
the encoded image of a page (`image`: bytes) or the frames of a clip in time order
(`frames`: [bytes]). Three functions define what an embedding of it depends on:

  model_frames(record, domain, T)     the encoded frames the model sees: a page's image;
                                      the T segment-middle frames of a clip
                                      (`transforms.sample_frame_indices`; repeated when
                                      the clip has fewer)
  eval_inputs(record, domain, ...)    those frames decoded and resized
                                      (`transforms.eval_transform`) and the text
                                      tokenised: the arrays of one eval-batch row
  content_digest(record, domain, T)   sha256 of the product id, the text and the bytes of
                                      `model_frames`: equal digests, equal inputs

The eval pipeline (`pipelines.make_eval_dataset`) and the Beam embedding job
(`cope_jax.embed_beam`, which reads ROPE files directly) both build their rows here, so
the two cannot disagree on what an item's inputs are; `cope_jax.export` records the
digest of every row so that a later export embeds only what changed (`--since`).
Light: NumPy, PIL, simplejpeg and the tokenizer; no JAX, Grain or TFDS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from cope_jax.base import domains
from data_pipelines import transforms

# Names the digest's definition; bump when what it covers changes (an export records it,
# and `--since` refuses an export whose digests were made otherwise).
CONTENT_DIGEST = "sha256(product_id, text, model frames) v1"


def model_frames(record: Mapping[str, Any], domain: domains.Domain,
                 num_frames: int) -> list[bytes]:
  """The encoded frames the model reads of `record`, in order: [image] for a page, the
  `num_frames` segment-middle frames of a clip. ValueError for a clip without frames."""
  if not domain.is_clip:
    return [record["image"]]
  frames = record["frames"]
  if not frames:
    raise ValueError(f"{domain.name} record {record['id']!r} has no frames")
  return [frames[index] for index in transforms.sample_frame_indices(len(frames), num_frames)]


def content_digest(record: Mapping[str, Any], domain: domains.Domain, num_frames: int) -> str:
  """sha256 (hex) of what an embedding of `record` depends on besides the model: its
  product id, its text and the bytes of `model_frames`, each length-prefixed."""
  digest = hashlib.sha256(CONTENT_DIGEST.encode("utf-8"))

  def add(data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)

  add(str(record["product_id"]).encode("utf-8"))
  add(str(record["text"]).encode("utf-8"))
  frames = model_frames(record, domain, num_frames)
  digest.update(len(frames).to_bytes(8, "little"))
  for frame in frames:
    add(bytes(frame))
  return digest.hexdigest()


def eval_inputs(record: Mapping[str, Any], domain: domains.Domain, tokenizer,
                image_size: int, num_frames: int, text_length: int) -> dict[str, np.ndarray]:
  """The arrays of `record`'s eval row: pixels uint8 [S, S, 3] (page) or [T, S, S, 3]
  (clip) under `domain.media_key`, token ids and mask int32 [text_length] under the
  domain's text keys.

  Raises:
    ValueError: a frame does not decode (the message names the record).
  """
  name = f"{domain.name} {record['id']}"
  pixels = np.stack([transforms.eval_transform(transforms.decode_jpeg(data, name), image_size)
                     for data in model_frames(record, domain, num_frames)])
  ids, mask = tokenizer.encode([record["text"]], text_length)
  return {domain.media_key: pixels if domain.is_clip else pixels[0],
          domain.text_ids_key: ids[0], domain.text_mask_key: mask[0]}
