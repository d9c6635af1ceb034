"""On-device top-k as an `Index`: `jax.lax.approx_max_k` over a gallery split across chips.

The TPU-native nearest-neighbour search (the TPU-KNN approach): the gallery [G, D] stays
on the accelerators, its rows split evenly over the local devices (the last ones padded
and masked). Each device scores a block of queries against its rows and keeps its
`approx_max_k` candidates; the per-device candidates are then merged exactly with
`lax.top_k`. On TPU `approx_max_k` is the partial-reduction kernel, reaching
`recall_target` (here `config.eval.target_recall`) in expectation; on other backends it
falls back to an exact top-k, so there this index returns exactly what exact search
(`cope_jax.search.exact`) does.

Nothing is tuned: `recall_target` is the one setting, and the recall check of
`index.tune_index` measures what it gives.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cope_jax.search import exact
from cope_jax.search.embeddings import check_embeddings

KIND = "approx_topk"
GALLERY_FILE = "gallery.npy"
AXIS = "gallery"
QUERY_BLOCK = 1024  # queries scored at once: [QUERY_BLOCK, G / devices] scores per device


@dataclasses.dataclass(frozen=True)
class ApproxTopKParameters:
  recall_target: float  # approx_max_k's expected recall of the true top-k (TPU)


def gallery_mesh(devices=None) -> Mesh:
  """A 1-D mesh ('gallery',) over `devices` (default: this process's devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  return Mesh(np.array(devices), (AXIS,))


def padded_size(num_gallery: int, num_devices: int) -> int:
  """Gallery rows padded to a multiple of the device count."""
  return -(-num_gallery // num_devices) * num_devices


def make_search_fn(mesh: Mesh, num_gallery: int, k: int, recall_target: float,
                   query_block: int = QUERY_BLOCK):
  """jit-compiled `(queries [Q, D], gallery [G', D] split over mesh axis 'gallery')
  -> (scores [Q, k] float32 descending, indices [Q, k] int32)`.

  `G'` is `padded_size(num_gallery, devices)`; rows from `num_gallery` on are padding
  and never returned. Equal scores keep the lower gallery index first.
  """
  num_devices = mesh.shape[AXIS]
  local_rows = padded_size(num_gallery, num_devices) // num_devices
  local_k = min(k, local_rows)

  def local_candidates(query_block_embeddings, gallery_shard):
    # [b, D] x [G'/n, D] -> [b, local_k] scores and global row numbers of this shard.
    offset = jax.lax.axis_index(AXIS) * local_rows
    scores = jnp.matmul(query_block_embeddings, gallery_shard.T, precision=exact.DOT_PRECISION)
    rows = offset + jnp.arange(local_rows, dtype=jnp.int32)
    scores = jnp.where(rows[None, :] < num_gallery, scores, -jnp.inf)
    scores, positions = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target)
    return scores, offset + positions.astype(jnp.int32)

  candidates = jax.shard_map(
      local_candidates, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
      out_specs=(PartitionSpec(None, AXIS), PartitionSpec(None, AXIS)))

  def search_block(query_block_embeddings, gallery):
    scores, indices = candidates(query_block_embeddings, gallery)  # [b, n * local_k]
    # Devices hold ascending rows, so on equal scores top_k keeps the lower row first.
    best, positions = jax.lax.top_k(scores, k)
    return best, jnp.take_along_axis(indices, positions, axis=1)

  @jax.jit
  def search(queries, gallery):
    num_queries = queries.shape[0]
    block = max(1, min(query_block, num_queries))
    blocks = exact.pad_to_blocks(queries, block)  # [Q / b, b, D]
    scores, indices = jax.lax.map(lambda q: search_block(q, gallery), blocks)
    return scores.reshape(-1, k)[:num_queries], indices.reshape(-1, k)[:num_queries]

  return search


class ApproxTopKIndex:
  """A gallery [G, D] on the local devices, searched with `approx_max_k`."""
  kind: ClassVar[str] = KIND
  parameters_type: ClassVar[type] = ApproxTopKParameters

  def __init__(self, gallery: np.ndarray, parameters: ApproxTopKParameters,
               mesh: Mesh | None = None):
    self.parameters = parameters
    self.size, self.dim = gallery.shape
    self._host_gallery = gallery
    self.mesh = mesh or gallery_mesh()
    rows = padded_size(self.size, self.mesh.shape[AXIS])
    padded = np.zeros((rows, self.dim), np.float32)
    padded[:self.size] = gallery
    self.gallery = jax.device_put(padded, NamedSharding(self.mesh, PartitionSpec(AXIS)))
    self._search_fns = {}  # (k, recall_target) -> compiled search

  def __len__(self) -> int:
    return self.size

  @classmethod
  def parameters_from_config(cls, eval_config, num_gallery: int
                             ) -> tuple[ApproxTopKParameters, frozenset[str]]:
    """`recall_target` = `eval_config.target_recall`; nothing left to tuning."""
    del num_gallery
    return ApproxTopKParameters(recall_target=float(eval_config.target_recall)), frozenset()

  @classmethod
  def build(cls, gallery, parameters: ApproxTopKParameters) -> ApproxTopKIndex:
    gallery = check_embeddings("gallery", gallery)
    if gallery.shape[0] == 0:
      raise ValueError("gallery: cannot build an approx_topk index over an empty gallery")
    return cls(gallery, parameters)

  def with_search_parameters(self, **changes) -> ApproxTopKIndex:
    unknown = set(changes) - {"recall_target"}
    if unknown:
      raise ValueError(f"not approx_topk search settings: {sorted(unknown)}")
    index = object.__new__(ApproxTopKIndex)
    index.__dict__.update(self.__dict__)
    index.parameters = dataclasses.replace(self.parameters, **changes)
    return index

  def _search_fn(self, k: int, recall_target: float):
    key = (k, recall_target)
    if key not in self._search_fns:
      self._search_fns[key] = make_search_fn(self.mesh, self.size, k, recall_target)
    return self._search_fns[key]

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries [Q, D] -> scores [Q, k] float32 (descending), indices [Q, k]
    int32, for 1 <= k <= G."""
    queries = check_embeddings("queries", queries, dim=self.dim)
    if not 1 <= k <= self.size:
      raise ValueError(f"k={k} must be in [1, {self.size}] (the gallery size)")
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    search = self._search_fn(k, float(self.parameters.recall_target))
    scores, indices = search(jax.device_put(queries, NamedSharding(self.mesh, PartitionSpec())),
                             self.gallery)
    return np.asarray(scores, np.float32), np.asarray(indices, np.int32)

  def tuning_grid(self, k: int, free: frozenset[str]) -> list[list[dict[str, float]]]:
    """Nothing to sweep: the one setting is the configured recall target."""
    del k, free
    return [[{"recall_target": self.parameters.recall_target}]]

  def search_cost(self) -> float:
    """Bytes read per query: the whole float32 gallery (brute force on the chips)."""
    return float(self.size * self.dim * 4)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, GALLERY_FILE), self._host_gallery)

  @classmethod
  def load(cls, directory: str, parameters: ApproxTopKParameters, size: int, dim: int
           ) -> ApproxTopKIndex:
    path = os.path.join(directory, GALLERY_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory}: no approx_topk gallery ({GALLERY_FILE} missing)")
    gallery = np.load(path)
    if gallery.shape != (size, dim):
      raise ValueError(f"{path}: gallery of shape {gallery.shape}, index.json says "
                       f"({size}, {dim})")
    return cls(gallery, parameters)
