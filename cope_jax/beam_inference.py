"""What the workers of `cope_jax.embed_beam` run: catalog rows to model inputs, and a
Beam `ModelHandler` over the serving artifact (`cope_jax.serving`).

  catalog row (JSON text)                        one ROPE record: domain, catalog
                                                 position (key), id, product id, text,
                                                 image paths and txt lines, the earlier
                                                 export's content digest of the id
   -> CatalogRowInputs                           reads the images, digests the inputs
                                                 (`eval_inputs.content_digest`); an
                                                 unchanged item is carried over, others
                                                 get the eval transforms (`eval_inputs`)
   -> (ItemKey, (domain, inputs))                batched per domain
   -> RunInference(ServingModelHandler)          the exported embedding function
   -> result lines (JSON text)                   embedded / carried / dropped rows and
                                                 every problem, with its file and line

The handler loads the artifact once per worker process (RunInference shares the loaded
model between the threads of a process) and sets the batch size; every batch is padded
to it, so each domain's function compiles once per process. A worker imports neither
the model code (`cope_jax.models`, Flax) nor TFDS or Grain: JAX, NumPy, PIL, the
tokenizer and apache-beam. Each load is recorded (host, process, seconds, whether any
model code was imported) in a file of the job's work folder, which the job's report
lists.

Images that do not decode are handled as `data_pipelines.prepare` handles them: a clip
keeps its frames that decode, a record none of whose images decode is dropped, each
reported with its txt file and line.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.ml.inference import base as inference
import numpy as np

from cope_jax.base import domains
from cope_jax import serving_artifact
from data_pipelines import eval_inputs
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import transforms

RESULTS = "results"  # CatalogRowInputs' second output: result lines
WORKER_FILE_PREFIX = "worker-"
# Modules whose presence in a worker means the model code was imported there.
MODEL_CODE_MODULES = ("cope_jax.models", "flax")
EMBEDDED, CARRIED, DROPPED, PROBLEM = "embedded", "carried", "dropped", "problem"


class ItemKey(NamedTuple):
  """What identifies a catalog row along the pipeline."""
  domain: str
  key: int  # position in the catalog's domain, in pair-file order
  id: str
  product_id: str
  content_digest: str


def catalog_row(domain: str, key: int, record, media_file: str,
                earlier_digest: str | None) -> str:
  """The JSON text of one catalog row (`rope_format.PageRecord` / `ClipRecord`)."""
  if domains.get(domain).is_clip:
    paths, lines = list(record.frames), list(record.frame_lines)
  else:
    paths, lines = [record.image], [record.image_line]
  return json.dumps({"domain": domain, "key": key, "id": record.id,
                     "product_id": record.product_id, "text": record.text, "paths": paths,
                     "lines": lines, "media_file": media_file,
                     "earlier_digest": earlier_digest}, ensure_ascii=False)


def _problem(row: Mapping[str, Any], line: int, stage: str, reason: str) -> str:
  return json.dumps({"type": PROBLEM, "stage": stage, "file": row["media_file"],
                     "line": line, "reason": reason}, ensure_ascii=False)


def _row_line(kind: str, row: Mapping[str, Any], digest: str | None) -> str:
  return json.dumps({"type": kind, "domain": row["domain"], "key": row["key"],
                     "id": row["id"], "product_id": row["product_id"],
                     "content_digest": digest}, ensure_ascii=False)


class CatalogRowInputs(beam.DoFn):
  """Catalog row -> (ItemKey, (domain, inputs)) to embed; result lines (carried,
  dropped, problems) on the RESULTS output."""

  def __init__(self, vocab_path: str, image_size: int, num_frames: int,
               text_lengths: Mapping[str, int]):
    self._vocab_path = vocab_path
    self._image_size = image_size
    self._num_frames = num_frames
    self._text_lengths = dict(text_lengths)  # domain -> tokens
    self._tokenizer = None

  def setup(self):
    self._tokenizer = tokenizer_lib.Tokenizer(self._vocab_path)

  def process(self, line: str):
    row = json.loads(line)
    domain = domains.get(row["domain"])
    frames, lines = [], []
    for path, frame_line in zip(row["paths"], row["lines"]):
      try:
        with open(path, "rb") as f:
          frames.append(f.read())
        lines.append(frame_line)
      except OSError as error:
        yield beam.pvalue.TaggedOutput(RESULTS, _problem(
            row, frame_line, "read", f"image {os.path.basename(path)} cannot be read "
            f"({error.strerror or error}); not used"))
    inputs = None
    if frames:
      digest = self._digest(row, domain, frames)
      if digest == row["earlier_digest"]:  # the same inputs as the earlier export's row
        yield beam.pvalue.TaggedOutput(RESULTS, _row_line(CARRIED, row, digest))
        return
      try:
        inputs = self._inputs(row, domain, frames)
      except ValueError:  # some image does not decode: keep those that do, as prepare
        kept = []
        for data, frame_line, path in zip(frames, lines, row["paths"]):
          try:
            transforms.decode_jpeg(data, os.path.basename(path))
            kept.append(data)
          except ValueError as error:
            yield beam.pvalue.TaggedOutput(RESULTS, _problem(
                row, frame_line, "decode", f"image {os.path.basename(path)} does not "
                f"decode ({type(error).__name__}: {error}); not used"))
        frames = kept
        if frames:
          digest = self._digest(row, domain, frames)
          if digest == row["earlier_digest"]:
            yield beam.pvalue.TaggedOutput(RESULTS, _row_line(CARRIED, row, digest))
            return
          inputs = self._inputs(row, domain, frames)
    if inputs is None:
      what = "all its frames" if domain.is_clip else "its image"
      yield beam.pvalue.TaggedOutput(RESULTS, _problem(
          row, row["lines"][0], "decode", f"{domain.name} {row['id']}: {what} failed to "
          "read or decode; dropped"))
      yield beam.pvalue.TaggedOutput(RESULTS, _row_line(DROPPED, row, None))
      return
    key = ItemKey(domain.name, int(row["key"]), row["id"], row["product_id"], digest)
    yield key, (domain.name, inputs)

  def _record(self, row, domain: domains.Domain, frames: Sequence[bytes]) -> dict:
    record = {"id": row["id"], "product_id": row["product_id"], "text": row["text"]}
    record["frames" if domain.is_clip else "image"] = list(frames) if domain.is_clip else frames[0]
    return record

  def _digest(self, row, domain, frames) -> str:
    return eval_inputs.content_digest(self._record(row, domain, frames), domain,
                                      self._num_frames)

  def _inputs(self, row, domain, frames) -> dict[str, np.ndarray]:
    return eval_inputs.eval_inputs(self._record(row, domain, frames), domain,
                                   self._tokenizer, self._image_size, self._num_frames,
                                   self._text_lengths[domain.name])


def domain_partition(item: tuple[ItemKey, Any], num_partitions: int) -> int:
  """beam.Partition: the domain's position in `domains.NAMES`."""
  del num_partitions
  return domains.NAMES.index(item[0].domain)


@dataclasses.dataclass(frozen=True)
class LoadedArtifact:
  """The model RunInference holds per worker process (weakly referenced, so not a
  tuple): an embedding function per domain and the name of the process that loaded it."""
  embedders: Mapping[str, Any]
  worker: str


class ServingModelHandler(inference.ModelHandler[tuple[str, Mapping[str, np.ndarray]],
                                                 np.ndarray, LoadedArtifact]):
  """RunInference's handler for the serving artifact: examples are (domain, inputs)
  with the arrays of one eval row; predictions the domain's retrieval embedding [D]
  float32. Loads `serving_dir` without the model code; batches are padded to
  `batch_size` (repeating their first row), one compilation per domain and process."""

  def __init__(self, serving_dir: str, batch_size: int, report_dir: str | None = None):
    super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
    self._serving_dir = serving_dir
    self._batch_size = batch_size
    self._report_dir = report_dir

  def load_model(self) -> LoadedArtifact:
    started = time.perf_counter()
    embedders = serving_artifact.load_embedders(self._serving_dir)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if self._report_dir:
      loaded = sorted(name for name in sys.modules if name.startswith("cope_jax"))
      record = {"worker": worker, "pid": os.getpid(), "load_seconds":
                round(time.perf_counter() - started, 3), "cope_jax_modules": loaded,
                "model_code_modules": sorted(
                    name for name in sys.modules
                    if any(name == m or name.startswith(m + ".") for m in MODEL_CODE_MODULES))}
      path = os.path.join(self._report_dir,
                          f"{WORKER_FILE_PREFIX}{os.getpid()}-{time.time_ns()}.json")
      with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return LoadedArtifact(embedders, worker)

  def run_inference(self, batch: Sequence[tuple[str, Mapping[str, np.ndarray]]],
                    model: LoadedArtifact, inference_args=None
                    ) -> Iterable[inference.PredictionResult]:
    del inference_args
    embeddings: list[np.ndarray | None] = [None] * len(batch)
    by_domain: dict[str, list[int]] = {}
    for position, (domain, _) in enumerate(batch):
      by_domain.setdefault(domain, []).append(position)
    for domain, positions in by_domain.items():
      embed = model.embedders[domain]
      name = domains.get(domain).embedding_key
      for start in range(0, len(positions), self._batch_size):
        part = positions[start:start + self._batch_size]
        rows = [batch[p][1] for p in part]
        padded = rows + [rows[0]] * (self._batch_size - len(rows))
        stacked = {key: np.stack([row[key] for row in padded]) for key in rows[0]}
        output = np.asarray(embed(stacked)[name], np.float32)
        for p, vector in zip(part, output):
          embeddings[p] = vector
    return [inference.PredictionResult(example, vector, model_id=model.worker)
            for example, vector in zip(batch, embeddings)]

  def get_num_bytes(self, batch: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> int:
    return sum(value.nbytes for _, inputs in batch for value in inputs.values())

  def get_metrics_namespace(self) -> str:
    return "cope_jax.embed_beam"


def embedded_line(result: tuple[ItemKey, inference.PredictionResult]) -> str:
  """The result line of an embedded row: its key and the embedding, float32
  little-endian bytes in base64 (exact)."""
  key, prediction = result
  vector = np.asarray(prediction.inference, "<f4")
  return json.dumps({"type": EMBEDDED, "domain": key.domain, "key": key.key, "id": key.id,
                     "product_id": key.product_id, "content_digest": key.content_digest,
                     "embedding": base64.b64encode(vector.tobytes()).decode("ascii"),
                     "worker": prediction.model_id}, ensure_ascii=False)


def decode_embedding(text: str) -> np.ndarray:
  """`embedded_line`'s embedding back: float32 [D]."""
  return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32)
