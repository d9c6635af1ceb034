"""The embedding container of one domain, and the checks every search input passes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DomainEmbeddings:
  """One domain's records: ids [N] str, product_ids [N] str, embeddings [N, D] float32."""
  domain: str
  ids: np.ndarray
  product_ids: np.ndarray
  embeddings: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def checked(self) -> DomainEmbeddings:
    """This container with float32 embeddings; ValueError naming the domain when it is
    empty, its lengths differ, or an embedding holds NaN or Inf."""
    embeddings = check_embeddings(f"{self.domain} embeddings", self.embeddings)
    ids, product_ids = np.asarray(self.ids), np.asarray(self.product_ids)
    if embeddings.shape[0] == 0:
      raise ValueError(f"{self.domain}: no embeddings (empty domain, so an empty gallery)")
    if len(ids) != embeddings.shape[0] or len(product_ids) != embeddings.shape[0]:
      raise ValueError(f"{self.domain}: {len(ids)} ids, {len(product_ids)} product ids and "
                       f"{embeddings.shape[0]} embeddings differ in length")
    return DomainEmbeddings(self.domain, ids, product_ids, embeddings)


def check_embeddings(name: str, embeddings, dim: int | None = None) -> np.ndarray:
  """Returns `embeddings` as float32 [N, D]; raises ValueError naming `name`."""
  array = np.asarray(embeddings)
  if array.ndim != 2:
    raise ValueError(f"{name}: expected a [N, D] array, got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{name}: expected floating point embeddings, got {array.dtype}")
  array = array.astype(np.float32, copy=False)
  if dim is not None and array.shape[1] != dim:
    raise ValueError(
        f"{name}: embedding dimension {array.shape[1]} does not match {dim}")
  bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
  if bad_rows.size:
    raise ValueError(
        f"{name}: {bad_rows.size} embeddings contain NaN or Inf "
        f"(first at row {bad_rows[0]})")
  return array
