"""faiss HNSW as an `Index` (optional: faiss is imported only when this kind is selected).

A hierarchical navigable small-world graph over the float32 gallery (inner product),
`m` links per node, built with candidate lists of `ef_construction`. A query walks the
graph keeping `ef_search` candidates: the search-time setting the recall tuning
(`cope_jax.search.tuning`) sweeps.

faiss-cpu is pinned in requirements-search.txt (the development requirements include
it); the runtime requirements do not. Its HNSW build is deterministic: one gallery gives
the same graph whatever the number of OpenMP threads (faiss-cpu 1.15.1 builds with
`hnsw_add_vertices_deterministic`; releases before it inserted the items in an
unspecified order when several threads ran, and a warning says so).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from absl import logging
import numpy as np

from cope_jax.search.embeddings import check_embeddings

KIND = "faiss_hnsw"
INDEX_FILE_NAME = "hnsw.faiss"
_EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def import_faiss():
  """The faiss module; ImportError saying how to install it when it is missing."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        f"index kind {KIND!r} needs faiss, which is not installed: "
        "pip install -r requirements-search.txt (faiss-cpu)") from error
  return faiss


@dataclasses.dataclass(frozen=True)
class HnswParameters:
  m: int  # graph links per node
  ef_construction: int
  ef_search: int  # candidates kept while searching (at least the k searched for)


class FaissHnswIndex:
  """A faiss `IndexHNSWFlat` (inner product) over a gallery [G, D]."""
  kind: ClassVar[str] = KIND
  parameters_type: ClassVar[type] = HnswParameters

  def __init__(self, index, parameters: HnswParameters, size: int, dim: int):
    self.index = index
    self.parameters = parameters
    self.size = size
    self.dim = dim

  def __len__(self) -> int:
    return self.size

  @classmethod
  def parameters_from_config(cls, eval_config, num_gallery: int
                             ) -> tuple[HnswParameters, frozenset[str]]:
    """`eval_config.hnsw_m`, `hnsw_ef_construction` and the override `hnsw_ef_search`
    (0: tuned to `target_recall`; until then the largest value of the grid)."""
    del num_gallery  # the graph's shape does not depend on it
    ef_search = int(eval_config.hnsw_ef_search)
    return HnswParameters(
        m=int(eval_config.hnsw_m), ef_construction=int(eval_config.hnsw_ef_construction),
        ef_search=ef_search if ef_search > 0 else _EF_SEARCH_GRID[-1],
    ), frozenset() if ef_search > 0 else frozenset({"ef_search"})

  @classmethod
  def build(cls, gallery, parameters: HnswParameters) -> FaissHnswIndex:
    faiss = import_faiss()
    gallery = check_embeddings("gallery", gallery)
    if gallery.shape[0] == 0:
      raise ValueError("gallery: cannot build an HNSW index over an empty gallery")
    if not hasattr(faiss, "hnsw_add_vertices_deterministic"):
      logging.warning("faiss %s builds HNSW graphs that can differ from build to build "
                      "with several threads; requirements-search.txt pins a release "
                      "whose build is deterministic", getattr(faiss, "__version__", "?"))
    index = faiss.IndexHNSWFlat(gallery.shape[1], parameters.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = parameters.ef_construction
    index.add(np.ascontiguousarray(gallery))
    return cls(index, parameters, gallery.shape[0], gallery.shape[1])

  def with_search_parameters(self, **changes) -> FaissHnswIndex:
    unknown = set(changes) - {"ef_search"}
    if unknown:
      raise ValueError(f"not HNSW search settings: {sorted(unknown)}")
    return FaissHnswIndex(self.index, dataclasses.replace(self.parameters, **changes),
                          self.size, self.dim)

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries [Q, D] -> scores [Q, k] float32, indices [Q, k] int32 (-1, -inf:
    no neighbour found)."""
    faiss = import_faiss()
    queries = check_embeddings("queries", queries, dim=self.dim)
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    settings = faiss.SearchParametersHNSW(efSearch=max(self.parameters.ef_search, k))
    scores, indices = self.index.search(np.ascontiguousarray(queries), k, params=settings)
    missing = indices < 0
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    return scores, np.where(missing, -1, indices).astype(np.int32)

  def tuning_grid(self, k: int, free: frozenset[str]) -> list[list[dict[str, int]]]:
    """One row of ef_search values (at least k), ascending; see `tuning.tune_to_recall`."""
    if "ef_search" not in free:
      return [[{"ef_search": self.parameters.ef_search}]]
    return [[{"ef_search": ef} for ef in sorted({max(ef, k) for ef in _EF_SEARCH_GRID})]]

  def search_cost(self) -> float:
    """Float32 rows scored per query under a simple model: ef_search candidates times
    the graph's degree (2m links at the bottom layer), in bytes."""
    return float(self.parameters.ef_search * 2 * self.parameters.m * self.dim * 4)

  def save(self, directory: str) -> None:
    faiss = import_faiss()
    os.makedirs(directory, exist_ok=True)
    faiss.write_index(self.index, os.path.join(directory, INDEX_FILE_NAME))

  @classmethod
  def load(cls, directory: str, parameters: HnswParameters, size: int, dim: int
           ) -> FaissHnswIndex:
    faiss = import_faiss()
    path = os.path.join(directory, INDEX_FILE_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory}: no HNSW index ({INDEX_FILE_NAME} missing)")
    return cls(faiss.read_index(path), parameters, size, dim)
