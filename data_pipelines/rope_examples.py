"""Catalog rows -> examples: what one record of the `rope` dataset holds, built from a row.

Shared by the builder's two ways of writing (`rope_tfds` with Apache Beam, and the
project's own resumable shard writer `rope_shards`), and light: a worker process that
encodes rows imports PIL and NumPy only, not TFDS.

  row      {key, domain, media_file, id, product_id, product_index, text, paths,
            frame_keys, lines}: one catalog record, built from the build's plan file
            (`rope_plan.Plan.rows`) only for the records being encoded
  example  {id, product_id, product_index, text, frames: [JPEG bytes], frame_keys}:
            the record's features (`encode_row`)
"""

from __future__ import annotations

import os

from cope_jax.base import domains
from data_pipelines import images
from data_pipelines import transforms


def kept_frame_positions(num_available: int, num_frames: int) -> list[int]:
  """Positions of the frames a config keeps: the distinct segment-middle frames.

  With n >= T frames these are T distinct frames; with n < T every frame (sampling T
  from fewer frames visits each of them), so sampling T frames from the kept ones
  gives what sampling T from all n gives.
  """
  if not num_frames:
    return list(range(num_available))
  return sorted(set(transforms.sample_frame_indices(num_available, num_frames)))


def encode_row(row: dict, max_side: int) -> tuple[dict | None, list[dict]]:
  """Decodes / checks / re-encodes one catalog row -> (example or None, problems).

  Problems are `{"file", "line", "reason"}` plus `key` (the row's catalog position),
  `position` (frame position in the row) and `dropped` (True for the one problem that
  says the record was left out: every image failed). The example is None when dropped.
  """
  domain = row["domain"]
  frames, frame_keys, problems = [], [], []
  for position, (path, frame_key, line) in enumerate(
      zip(row["paths"], row["frame_keys"], row["lines"])):
    try:
      frames.append(images.read_stored_bytes(path, max_side))
      frame_keys.append(frame_key)
    except (OSError, ValueError) as e:
      problems.append({"file": row["media_file"], "line": line,
                       "reason": f"image {os.path.basename(path)} does not decode "
                                 f"({type(e).__name__}: {e}); not stored",
                       "key": row["key"], "position": position, "dropped": False})
  if not frames:
    what = "all its frames" if domains.get(domain).is_clip else "its image"
    problems.append({"file": row["media_file"], "line": row["lines"][0],
                     "reason": f"{domain} {row['id']}: {what} failed to decode; dropped",
                     "key": row["key"], "position": len(row["paths"]), "dropped": True})
    return None, problems
  example = {"id": row["id"], "product_id": row["product_id"],
             "product_index": row["product_index"], "text": row["text"],
             "frames": frames, "frame_keys": frame_keys}
  return example, problems


def encode_rows(rows: list[dict], max_side: int) -> list[tuple[dict | None, list[dict]]]:
  """`encode_row` of each row (what a worker process runs: this module imports no TFDS,
  so a worker starts without it)."""
  return [encode_row(row, max_side) for row in rows]
