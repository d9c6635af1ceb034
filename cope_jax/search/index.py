"""The `Index` protocol, the table of index kinds, and building an index to a recall target.

An index answers top-k inner-product queries over a gallery [G, D] of unit vectors.
Each kind is one class (`INDEX_KINDS`): ScaNN (`scann_index`), faiss HNSW
(`faiss_index`, optional: faiss is imported only when that kind is built or loaded) and
`approx_topk` (`jax.lax.approx_max_k` over the gallery on the devices, `approx_topk`).
Adding a kind is one class implementing `Index` and one line in `INDEX_KINDS`.

`build_index` builds an index from `config.eval` and tunes its search settings to
`config.eval.target_recall` (recall@k against exact search on held-out queries), unless
the config sets them by hand; it then measures the recall of the chosen settings on
other held-out queries, and says whether it meets the target and by how much it falls
short. Building is deterministic: one gallery, config and set of queries give the same
index, settings and recall every time (the samples are seeded, ScaNN's build is seeded,
faiss builds its graph deterministically). `save_index` / `load_index` write and read
an index folder: the kind's own files plus `index.json` (kind, parameters, size,
dimension).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Protocol

from absl import logging
import jax
import numpy as np

from cope_jax.search import exact
from cope_jax.search.approx_topk import ApproxTopKIndex
from cope_jax.search import metrics
from cope_jax.search import tuning
from cope_jax.search.embeddings import check_embeddings
from cope_jax.search.faiss_index import FaissHnswIndex
from cope_jax.search.scann_index import ScannIndex

INDEX_FILE = "index.json"
INDEX_FORMAT_VERSION = 1
# Tuning and recall-check query samples are drawn with this seed.
SAMPLE_SEED = 0


class Index(Protocol):
  """An approximate top-k index by inner product over a gallery [G, D].

  `parameters` is a frozen dataclass (`parameters_type`) holding what the index was
  built with and its search settings; `dataclasses.asdict` of it is what
  `index.json`, metrics.json and the export manifest record.
  """
  kind: ClassVar[str]
  parameters_type: ClassVar[type]
  parameters: Any
  size: int
  dim: int

  @classmethod
  def parameters_from_config(cls, eval_config, num_gallery: int
                             ) -> tuple[Any, frozenset[str]]:
    """Parameters for a gallery of `num_gallery` items, and the names of the search
    settings the config leaves to tuning."""

  @classmethod
  def build(cls, gallery: np.ndarray, parameters) -> Index:
    """Builds over gallery [G, D]."""

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> scores [Q, k] float32 (descending), indices [Q, k] int32
    (-1 with score -inf: no neighbour)."""

  def with_search_parameters(self, **changes) -> Index:
    """The same built index with other search settings."""

  def tuning_grid(self, k: int, free: frozenset[str]) -> list[list[dict[str, int]]]:
    """Search settings to sweep (see `tuning.tune_to_recall`)."""

  def search_cost(self) -> float:
    """Modelled cost per query (bytes read) of the current search settings."""

  def save(self, directory: str) -> None:
    """Writes the kind's own files into `directory`."""

  @classmethod
  def load(cls, directory: str, parameters, size: int, dim: int) -> Index:
    """Reads what `save` wrote."""


INDEX_KINDS: dict[str, type] = {
    ScannIndex.kind: ScannIndex,
    FaissHnswIndex.kind: FaissHnswIndex,
    ApproxTopKIndex.kind: ApproxTopKIndex,
}


def auto_index_kind(eval_config, backend: str | None = None) -> str:
  """The index kind search "auto" uses for large galleries: `approx_topk` on TPU (the
  gallery stays on the chips), else `eval_config.index`."""
  backend = backend or jax.default_backend()
  return ApproxTopKIndex.kind if backend == "tpu" else eval_config.index


def index_class(kind: str) -> type:
  """The class of index kind `kind`; ValueError naming the known kinds otherwise."""
  try:
    return INDEX_KINDS[kind]
  except KeyError:
    raise ValueError(f"unknown index kind {kind!r}; expected one of "
                     f"{', '.join(INDEX_KINDS)}") from None


def describe(index: Index) -> dict[str, Any]:
  """{'kind', 'parameters'} of an index, JSON-ready."""
  return {"kind": index.kind, "parameters": dataclasses.asdict(index.parameters)}


# ----------------------------------------------------------------------------
# Building to a recall target.


def _held_out_samples(num_rows: int, num_tune: int, num_check: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded disjoint samples of row numbers for tuning and for the recall check.

  With fewer than `num_tune + num_check` rows the rows are shared out in that
  proportion (a single row serves both).
  """
  order = np.random.default_rng(SAMPLE_SEED).permutation(num_rows)
  if num_rows == 1:
    return order[:min(1, num_tune)], order[:min(1, num_check)]
  if num_rows < num_tune + num_check:
    share = num_tune / (num_tune + num_check)
    num_tune = min(num_rows - int(num_check > 0), max(int(num_tune > 0), round(num_rows * share)))
    num_check = num_rows - num_tune if num_check else 0
  return np.sort(order[:num_tune]), np.sort(order[num_tune:num_tune + num_check])


def _exact_neighbours(gallery: np.ndarray, queries: np.ndarray, k: int,
                      own_rows: np.ndarray | None) -> np.ndarray:
  """Exact top-k [Q, k] of queries [Q, D] (without their own rows when given)."""
  if own_rows is None:
    return exact.exact_search(queries, gallery, k)[1]
  return tuning.drop_own_rows(exact.exact_search(queries, gallery, k + 1)[1], own_rows, k)


def _index_neighbours(index: Index, queries: np.ndarray, k: int,
                      own_rows: np.ndarray | None) -> np.ndarray:
  """The index's top-k [Q, k] of queries [Q, D] (without their own rows when given)."""
  if own_rows is None:
    return index.search(queries, k)[1]
  return tuning.drop_own_rows(index.search(queries, k + 1)[1], own_rows, k)


def build_index(kind: str, gallery, eval_config, k: int,
                queries=None) -> tuple[Index, dict[str, Any]]:
  """Builds an index of `kind` over gallery [G, D], tuned to the recall target.

  Config fields read: `target_recall`, `tune_queries`, `recall_check_queries`, and
  the kind's own (`ScannIndex.parameters_from_config`, ...).

  Args:
    kind: a key of `INDEX_KINDS`.
    gallery: [G, D] unit rows.
    eval_config: `config.eval`.
    k: the recall@k tuned for and checked (capped at G - 1 for gallery queries).
    queries: [Q, D] the queries the index is built for (evaluation), sampled for
      tuning and for the recall check; None (export): rows of the gallery are the
      held-out queries, each with its own row left out of its neighbours.

  Returns:
    The index and what `tune_index` reports.
  """
  cls = index_class(kind)
  gallery = check_embeddings("gallery", gallery)
  if gallery.shape[0] == 0:
    raise ValueError("gallery: cannot build an index over an empty gallery")
  parameters, free = cls.parameters_from_config(eval_config, gallery.shape[0])
  return tune_index(cls.build(gallery, parameters), free, gallery, eval_config, k, queries)


def tune_index(index: Index, free: frozenset[str], gallery: np.ndarray, eval_config, k: int,
               queries=None) -> tuple[Index, dict[str, Any]]:
  """Tunes the `free` search settings of a built index to `eval_config.target_recall`
  on `eval_config.tune_queries` held-out queries, then measures the recall of the
  result on `eval_config.recall_check_queries` other ones (arguments: `build_index`).

  Returns:
    The tuned index, and {'kind', 'parameters', 'target_recall', 'recall_k' (the k
    used), 'query_source', 'tuned': whether settings were tuned; when tuned
    'tuning_recall' (on the tuning queries), 'tuning_recall_bound' (its lower bound,
    `tuning.Trial.recall_bound`), 'reached_target' (whether that bound reached the
    target), 'tuning_queries', 'tuning_trials'; with held-out queries for the check
    'recall_vs_exact' (recall@k of the chosen settings on the other held-out queries),
    'recall_queries', 'met_target' (recall_vs_exact >= target_recall) and
    'recall_shortfall' (target_recall - recall_vs_exact where it falls short, else 0)}.
  """
  from_gallery = queries is None
  source = gallery if from_gallery else check_embeddings("queries", queries,
                                                         dim=gallery.shape[1])
  k = min(k, gallery.shape[0] - 1 if from_gallery else gallery.shape[0])
  info = {**describe(index), "target_recall": float(eval_config.target_recall),
          "recall_k": int(k),
          "query_source": "gallery rows (own row left out)" if from_gallery else "queries",
          "tuned": False}
  if k < 1 or source.shape[0] == 0:
    return index, info
  tune_rows, check_rows = _held_out_samples(
      source.shape[0], int(eval_config.tune_queries), int(eval_config.recall_check_queries))
  if free and tune_rows.size:
    own_rows = tune_rows if from_gallery else None
    index, result = tuning.tune_to_recall(
        index, source[tune_rows], _exact_neighbours(gallery, source[tune_rows], k, own_rows),
        float(eval_config.target_recall), k, free, own_rows=own_rows)
    logging.info("%s over %d items: %s (recall@%d %.4f, %d settings measured)", index.kind,
                 gallery.shape[0], result.settings, k, result.recall, len(result.trials))
    info.update({"parameters": describe(index)["parameters"], "tuned": True,
                 "tuning_recall": result.recall, "tuning_recall_bound": result.recall_bound,
                 "reached_target": result.reached, "tuning_queries": int(tune_rows.size),
                 "tuning_trials": len(result.trials)})
  if check_rows.size:
    own_rows = check_rows if from_gallery else None
    recall = metrics.recall_against(
        _exact_neighbours(gallery, source[check_rows], k, own_rows),
        _index_neighbours(index, source[check_rows], k, own_rows))
    target = info["target_recall"]
    info.update({"recall_vs_exact": recall, "recall_queries": int(check_rows.size),
                 "met_target": recall >= target, "recall_shortfall": max(0.0, target - recall)})
    if recall < target:
      logging.warning("%s over %d items: recall@%d %.4f on %d held-out queries, %.4f short "
                      "of the target %.4f", index.kind, gallery.shape[0], k, recall,
                      check_rows.size, target - recall, target)
  return index, info


# ----------------------------------------------------------------------------
# Index folders.


def save_index(index: Index, directory: str) -> None:
  """Writes `index` into `directory`: its own files, then `index.json`."""
  index.save(directory)
  record = {"format_version": INDEX_FORMAT_VERSION, **describe(index),
            "size": int(index.size), "dim": int(index.dim)}
  with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)


def read_index_record(directory: str) -> dict[str, Any]:
  """The `index.json` of an index folder; FileNotFoundError / ValueError naming it."""
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not an index folder ({INDEX_FILE} missing)")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error
  missing = [key for key in ("kind", "parameters", "size", "dim") if key not in record]
  if missing:
    raise ValueError(f"{path}: missing fields {missing}")
  return record


def load_index(directory: str) -> Index:
  """Reads an index folder written by `save_index`, of whatever kind it records."""
  record = read_index_record(directory)
  cls = index_class(record["kind"])
  try:
    parameters = cls.parameters_type(**record["parameters"])
  except TypeError as error:
    raise ValueError(f"{os.path.join(directory, INDEX_FILE)}: parameters do not fit "
                     f"{record['kind']} ({error})") from error
  return cls.load(directory, parameters, int(record["size"]), int(record["dim"]))
