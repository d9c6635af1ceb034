"""Exact top-k search by inner product: blocked brute force in JAX.

Loops over gallery blocks keeping a running top-k per query block, so at most
`[query_block, gallery_block]` scores exist at once. The blocking helpers are shared
with the exact metrics (`cope_jax.search.metrics`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cope_jax.search.embeddings import check_embeddings

# Full float32 products: exact search and the metrics rank by the same scores.
DOT_PRECISION = jax.lax.Precision.HIGHEST


def pad_to_blocks(x: jax.Array, block: int, pad_value=0) -> jax.Array:
  """[N, ...] -> [ceil(N / block), block, ...], padding the last block."""
  num_blocks = -(-x.shape[0] // block)
  padding = [(0, num_blocks * block - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  x = jnp.pad(x, padding, constant_values=pad_value)
  return x.reshape((num_blocks, block) + x.shape[1:])


def block_sizes(num_queries: int, num_gallery: int, query_block: int,
                gallery_block: int) -> tuple[int, int]:
  """The block sizes capped at the array sizes; ValueError unless positive."""
  if query_block < 1 or gallery_block < 1:
    raise ValueError(
        f"block sizes must be positive, got query_block={query_block}, "
        f"gallery_block={gallery_block}")
  return (max(1, min(query_block, num_queries)),
          max(1, min(gallery_block, num_gallery)))


@functools.partial(jax.jit, static_argnames=("k", "query_block", "gallery_block"))
def _blocked_top_k(queries, gallery, *, k, query_block, gallery_block):
  num_gallery = gallery.shape[0]
  query_blocks = pad_to_blocks(queries, query_block)
  gallery_blocks = pad_to_blocks(gallery, gallery_block)
  block_offsets = jnp.arange(gallery_blocks.shape[0], dtype=jnp.int32) * gallery_block
  block_k = min(k, gallery_block)

  def search_query_block(query_block_embeddings):
    def merge_gallery_block(best, block):
      best_scores, best_indices = best
      gallery_block_embeddings, offset = block
      scores = jnp.matmul(query_block_embeddings, gallery_block_embeddings.T,
                          precision=DOT_PRECISION)
      gallery_indices = offset + jnp.arange(gallery_block, dtype=jnp.int32)
      scores = jnp.where(gallery_indices < num_gallery, scores, -jnp.inf)
      block_scores, block_positions = jax.lax.top_k(scores, block_k)
      # The running best comes first: all its indices are lower than this
      # block's, and top_k keeps the lower position first on ties.
      scores = jnp.concatenate([best_scores, block_scores], axis=1)
      indices = jnp.concatenate([best_indices, offset + block_positions], axis=1)
      best_scores, positions = jax.lax.top_k(scores, k)
      return (best_scores, jnp.take_along_axis(indices, positions, axis=1)), None

    initial = (jnp.full((query_block, k), -jnp.inf, jnp.float32),
               jnp.full((query_block, k), -1, jnp.int32))
    best, _ = jax.lax.scan(merge_gallery_block, initial, (gallery_blocks, block_offsets))
    return best

  scores, indices = jax.lax.map(search_query_block, query_blocks)
  num_queries = queries.shape[0]
  return scores.reshape(-1, k)[:num_queries], indices.reshape(-1, k)[:num_queries]


def exact_search(queries, gallery, k: int, query_block: int = 256,
                 gallery_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product.

  Args:
    queries: [Q, D] embeddings.
    gallery: [G, D] embeddings.
    k: neighbours per query, 1 <= k <= G.
    query_block, gallery_block: rows scored at once; memory is bounded by
      [query_block, gallery_block] scores (plus the top-k candidates).

  Returns:
    scores [Q, k] float32 (descending) and indices [Q, k] int32 into `gallery`.
    Equal scores are ordered by gallery index, lower first.
  """
  queries = check_embeddings("queries", queries)
  gallery = check_embeddings("gallery", gallery, dim=queries.shape[1])
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (the gallery size)")
  if queries.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  query_block, gallery_block = block_sizes(
      queries.shape[0], gallery.shape[0], query_block, gallery_block)
  scores, indices = _blocked_top_k(
      jnp.asarray(queries), jnp.asarray(gallery), k=k, query_block=query_block,
      gallery_block=gallery_block)
  return np.asarray(scores), np.asarray(indices)
