"""Retrieval metrics: exact ranks, R@K, mAP, one-shot accuracy, chance level, recall.

Metrics from embeddings (`retrieval_metrics`, `one_shot_accuracy`) are exact: they
count, for every correct gallery item of a query, the wrong items scoring at or above
it over the whole gallery (blocked, never the full `[Q, G]` matrix). Ties are resolved
pessimistically: a wrong item with the same score as a correct one ranks first.

`recall_at_k_from_topk` scores a top-k list (from an approximate index) instead, and
`recall_against` compares two top-k lists (an index against exact search).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cope_jax.search import exact
from cope_jax.search.embeddings import check_embeddings

DEFAULT_KS = (1, 5, 10)  # the K of the R@K columns of metrics.json
# Most score comparisons held at once by the metric counts (~128 MiB of bools).
_MAX_COMPARISONS = 1 << 27


def recall_per_query(reference_indices: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """[Q] share of each reference top-k row (entries >= 0) found in the same row of
  `indices`; 1.0 for a row without reference entries."""
  reference_indices = np.asarray(reference_indices)
  indices = np.asarray(indices)
  valid = reference_indices >= 0
  found = (reference_indices[:, :, None] == indices[:, None, :]).any(axis=2) & valid
  return found.sum(axis=1) / np.maximum(valid.sum(axis=1), 1) + (valid.sum(axis=1) == 0)


def recall_against(reference_indices: np.ndarray, indices: np.ndarray) -> float:
  """Mean share of each reference top-k row found in the same row of `indices`."""
  reference_indices = np.asarray(reference_indices)
  indices = np.asarray(indices)
  if reference_indices.size == 0:
    return float("nan")
  found = [np.isin(ref[ref >= 0], row).mean() for ref, row in zip(reference_indices, indices)]
  return float(np.mean(found))


def _encode_products(query_product_ids, gallery_product_ids):
  """Integer product codes and each query's correct gallery items.

  Args:
    query_product_ids [Q]; gallery_product_ids [G], G >= 1.

  Returns:
    query_codes [Q] int32 (-1: product absent from the gallery),
    gallery_codes [G] int32,
    correct_indices [Q, M] int32 gallery indices of each query's product,
      ascending, padded with -1 (M: most gallery items of one queried product).
  """
  query_product_ids = np.asarray(query_product_ids)
  products, gallery_codes = np.unique(np.asarray(gallery_product_ids), return_inverse=True)
  gallery_codes = gallery_codes.astype(np.int32).reshape(-1)
  positions = np.minimum(np.searchsorted(products, query_product_ids), len(products) - 1)
  found = products[positions] == query_product_ids
  query_codes = np.where(found, positions, -1).astype(np.int32)

  order = np.argsort(gallery_codes, kind="stable")
  counts = np.bincount(gallery_codes, minlength=len(products))
  starts = np.cumsum(counts) - counts
  query_counts = np.where(found, counts[positions], 0)
  slots = np.arange(max(int(query_counts.max(initial=0)), 1))
  valid = slots[None, :] < query_counts[:, None]
  flat = np.minimum(starts[positions][:, None] + slots[None, :], len(order) - 1)
  correct_indices = np.where(valid, order[flat], -1).astype(np.int32)
  return query_codes, gallery_codes, correct_indices


@functools.partial(jax.jit, static_argnames=("query_block", "gallery_block"))
def _wrong_items_at_or_above(queries, query_codes, correct_indices, gallery,
                             gallery_codes, *, query_block, gallery_block):
  """Scores of each query's correct items and wrong items scoring >= each.

  Args:
    queries [Q, D], query_codes [Q], correct_indices [Q, M] (-1: none),
    gallery [G, D], gallery_codes [G].

  Returns:
    correct_scores [Q, M] float32 (-inf where no item) and
    wrong_at_or_above [Q, M] int32: gallery items of another product whose
    score is >= that correct item's score.
  """
  num_gallery = gallery.shape[0]
  gallery_blocks = exact.pad_to_blocks(gallery, gallery_block)
  gallery_code_blocks = exact.pad_to_blocks(gallery_codes, gallery_block, pad_value=-1)
  block_offsets = jnp.arange(gallery_blocks.shape[0], dtype=jnp.int32) * gallery_block
  gallery_xs = (gallery_blocks, gallery_code_blocks, block_offsets)

  def block_scores(query_block_embeddings, gallery_block_embeddings):
    # The same jitted product in both passes, so a correct item's score is
    # bit-identical to the score it is compared against.
    return jnp.matmul(query_block_embeddings, gallery_block_embeddings.T,
                      precision=exact.DOT_PRECISION)

  def per_query_block(xs):
    query_block_embeddings, codes, correct = xs

    def gather_correct(correct_scores, block):
      embeddings, _, offset = block
      scores = block_scores(query_block_embeddings, embeddings)
      local = correct - offset
      in_block = (correct >= 0) & (local >= 0) & (local < gallery_block)
      values = jnp.take_along_axis(scores, jnp.clip(local, 0, gallery_block - 1), axis=1)
      return jnp.where(in_block, values, correct_scores), None

    correct_scores, _ = jax.lax.scan(
        gather_correct, jnp.full(correct.shape, -jnp.inf, jnp.float32), gallery_xs)

    def count_wrong(counts, block):
      embeddings, block_codes, offset = block
      scores = block_scores(query_block_embeddings, embeddings)
      real = (offset + jnp.arange(gallery_block)) < num_gallery
      wrong = (block_codes[None, :] != codes[:, None]) & real[None, :]
      at_or_above = scores[:, :, None] >= correct_scores[:, None, :]
      return counts + jnp.sum(at_or_above & wrong[:, :, None], axis=1, dtype=jnp.int32), None

    counts, _ = jax.lax.scan(count_wrong, jnp.zeros(correct.shape, jnp.int32), gallery_xs)
    return correct_scores, counts

  xs = (exact.pad_to_blocks(queries, query_block),
        exact.pad_to_blocks(query_codes, query_block, pad_value=-1),
        exact.pad_to_blocks(correct_indices, query_block, pad_value=-1))
  correct_scores, counts = jax.lax.map(per_query_block, xs)
  num_queries = queries.shape[0]
  num_slots = correct_indices.shape[1]
  return (correct_scores.reshape(-1, num_slots)[:num_queries],
          counts.reshape(-1, num_slots)[:num_queries])


def _query_rankings(query_embeddings, query_product_ids, gallery_embeddings,
                    gallery_product_ids, query_block, gallery_block):
  """Per included query: rank [Qi] and average precision [Qi]; excluded count."""
  queries = check_embeddings("query embeddings", query_embeddings)
  gallery = check_embeddings("gallery embeddings", gallery_embeddings, dim=queries.shape[1])
  if len(query_product_ids) != queries.shape[0]:
    raise ValueError(f"query_product_ids: {len(query_product_ids)} ids for "
                     f"{queries.shape[0]} query embeddings")
  if len(gallery_product_ids) != gallery.shape[0]:
    raise ValueError(f"gallery_product_ids: {len(gallery_product_ids)} ids for "
                     f"{gallery.shape[0]} gallery embeddings")
  if gallery.shape[0] == 0:
    raise ValueError("gallery embeddings: the gallery is empty")
  query_codes, gallery_codes, correct_indices = _encode_products(
      query_product_ids, gallery_product_ids)
  included = query_codes >= 0
  num_excluded = int((~included).sum())
  queries, query_codes, correct_indices = (
      queries[included], query_codes[included], correct_indices[included])
  if queries.shape[0] == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.float64), num_excluded
  query_block, gallery_block = exact.block_sizes(
      queries.shape[0], gallery.shape[0], query_block, gallery_block)
  # The count compares [query_block, gallery_block, M] scores at once: shrink
  # the gallery block when products have many gallery items.
  gallery_block = max(1, min(gallery_block,
                             _MAX_COMPARISONS // (query_block * correct_indices.shape[1])))
  correct_scores, wrong_counts = _wrong_items_at_or_above(
      jnp.asarray(queries), jnp.asarray(query_codes), jnp.asarray(correct_indices),
      jnp.asarray(gallery), jnp.asarray(gallery_codes),
      query_block=query_block, gallery_block=gallery_block)
  correct_scores = np.asarray(correct_scores)
  wrong_counts = np.asarray(wrong_counts).astype(np.int64)
  valid = correct_indices >= 0

  # Position of each correct item among the query's correct items.
  slots = np.arange(correct_indices.shape[1])
  higher = correct_scores[:, None, :] > correct_scores[:, :, None]
  tied_before = ((correct_scores[:, None, :] == correct_scores[:, :, None])
                 & (slots[None, None, :] <= slots[None, :, None]))
  position_among_correct = np.sum((higher | tied_before) & valid[:, None, :], axis=2)
  item_rank = wrong_counts + position_among_correct
  precision = np.where(valid, position_among_correct / np.maximum(item_rank, 1), 0.0)
  # Summed in sorted order, so that the value does not depend on the gallery's row order
  # (floating-point sums depend on their order; tools that hold the rows in another
  # order must agree to the last bit).
  average_precision = np.sort(precision, axis=1).sum(axis=1) / valid.sum(axis=1)
  rank = 1 + np.where(valid, wrong_counts, np.iinfo(np.int64).max).min(axis=1)
  return rank, average_precision, num_excluded


def retrieval_metrics(query_embeddings, query_product_ids, gallery_embeddings,
                      gallery_product_ids, ks: Sequence[int] = DEFAULT_KS, *,
                      query_block: int = 128, gallery_block: int = 2048) -> dict[str, Any]:
  """Exact retrieval metrics with pessimistic ties.

  Gallery items of the query's product are "correct", all others "wrong".
  Ranking of the gallery for one query: by score, descending; on equal scores
  wrong items come before correct ones (ties count against the query), and
  correct items among themselves by gallery index (this order does not change
  any metric below).

  * rank of a query = 1 + #(wrong items with score >= the best correct score),
    i.e. the position of its first correct item.
  * R@K = share of queries with rank <= K. median_rank = median of the ranks.
  * mAP = mean over queries of AP = mean over the query's correct items j of
    c_j / r_j, where r_j is j's position in the ranking above
    (= #wrong with score >= s_j + c_j) and c_j its position among the correct
    items (= #correct with score > s_j + #correct with score == s_j and index
    <= j's).

  Queries whose product has no gallery item are excluded (counted in
  `num_excluded_queries`). Memory is bounded by [query_block, gallery_block, M]
  comparisons (M: most gallery items of one product; the gallery block shrinks
  to keep this under `_MAX_COMPARISONS`).

  Args:
    query_embeddings [Q, D], query_product_ids [Q], gallery_embeddings [G, D],
    gallery_product_ids [G]; ks: the K of each R@K.

  Returns:
    {'R@K' for K in ks, 'median_rank', 'mAP', 'num_queries',
     'num_excluded_queries'}; metrics are NaN when no query is included.
  """
  rank, average_precision, num_excluded = _query_rankings(
      query_embeddings, query_product_ids, gallery_embeddings, gallery_product_ids,
      query_block, gallery_block)
  empty = rank.size == 0
  metrics = {f"R@{k}": float("nan") if empty else float(np.mean(rank <= k)) for k in ks}
  metrics["median_rank"] = float("nan") if empty else float(np.median(rank))
  # Sorted first: the mean does not depend on the order of the queries.
  metrics["mAP"] = float("nan") if empty else float(np.mean(np.sort(average_precision)))
  metrics["num_queries"] = int(rank.size)
  metrics["num_excluded_queries"] = num_excluded
  return metrics


def recall_at_k_from_topk(topk_indices, query_product_ids, gallery_product_ids,
                          ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
  """R@K from a top-k list (the ScaNN path), without exact ranks.

  A query hits at K when one of its first K retrieved items (index -1: none)
  shows its product. Ties are resolved by the search's order, not
  pessimistically, and no median rank or mAP is available from a top-k list:
  those come from `retrieval_metrics` (exact path) only. R@K for K larger than
  the list width uses the whole list.

  Args:
    topk_indices [Q, k] gallery indices; query_product_ids [Q];
    gallery_product_ids [G].

  Returns:
    {'R@K' for K in ks, 'num_queries', 'num_excluded_queries'}.
  """
  topk_indices = np.asarray(topk_indices)
  query_product_ids = np.asarray(query_product_ids)
  gallery_product_ids = np.asarray(gallery_product_ids)
  if topk_indices.ndim != 2 or topk_indices.shape[0] != len(query_product_ids):
    raise ValueError(f"topk_indices: expected shape [{len(query_product_ids)}, k], "
                     f"got {topk_indices.shape}")
  if topk_indices.size and topk_indices.max() >= len(gallery_product_ids):
    raise ValueError(f"topk_indices: index {topk_indices.max()} outside the gallery "
                     f"of {len(gallery_product_ids)} items")
  if len(gallery_product_ids) == 0:
    raise ValueError("gallery_product_ids: the gallery is empty")
  included = np.isin(query_product_ids, gallery_product_ids)
  retrieved = gallery_product_ids[np.maximum(topk_indices, 0)]
  hits = (retrieved == query_product_ids[:, None]) & (topk_indices >= 0)
  hits = hits[included]
  first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.iinfo(np.int64).max)
  empty = first_hit.size == 0
  metrics = {f"R@{k}": float("nan") if empty else float(np.mean(first_hit <= k)) for k in ks}
  metrics["num_queries"] = int(included.sum())
  metrics["num_excluded_queries"] = int((~included).sum())
  return metrics


def chance_recall_at_1(query_product_ids, gallery_product_ids) -> float:
  """Expected R@1 of a uniformly random ranking: mean over included queries
  of (#gallery items of the query's product) / G."""
  gallery_product_ids = np.asarray(gallery_product_ids)
  products, counts = np.unique(gallery_product_ids, return_counts=True)
  count_by_product = dict(zip(products.tolist(), counts.tolist()))
  correct = np.array([count_by_product.get(p, 0) for p in np.asarray(query_product_ids).tolist()])
  correct = correct[correct > 0]
  if correct.size == 0 or gallery_product_ids.size == 0:
    return float("nan")
  return float(np.mean(correct / gallery_product_ids.size))


def one_shot_prototypes(gallery_ids, gallery_product_ids, seed: int, draw: int
                        ) -> np.ndarray:
  """One gallery index per product (sorted product order), drawn uniformly among that
  product's items taken in id order; deterministic in (seed, draw). -> [P] int.

  Defined on ids, not on row positions: the same gallery in any row order gets the same
  prototypes (as ids), so every tool that scores one set of embeddings (evaluate,
  compare on an export or on release files) gets the same one-shot accuracy.
  """
  gallery_ids = np.asarray(gallery_ids).astype(str)
  products, codes = np.unique(np.asarray(gallery_product_ids), return_inverse=True)
  codes = codes.reshape(-1)
  if len(gallery_ids) != len(codes):
    raise ValueError(f"{len(gallery_ids)} gallery ids for {len(codes)} gallery product ids")
  order = np.lexsort((gallery_ids, codes))  # by product, then by id
  counts = np.bincount(codes, minlength=len(products))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  rng = np.random.default_rng([seed, draw])
  picks = np.floor(rng.random(len(products)) * counts).astype(np.int64)
  return order[starts + np.minimum(picks, counts - 1)]


def one_shot_accuracy(query_embeddings, query_product_ids, gallery_embeddings,
                      gallery_product_ids, gallery_ids, draws: int = 5, seed: int = 0, *,
                      query_block: int = 128, gallery_block: int = 2048) -> dict[str, Any]:
  """One-shot classification against one prototype per gallery product.

  Per draw, every product with gallery items gets one of them as prototype
  (`one_shot_prototypes`, chosen by id); a query (whose product has a prototype) is correct
  when its own prototype scores strictly higher than every other prototype
  (a tie counts as wrong). Accuracy and its std (population) over draws.

  Returns:
    {'accuracy', 'std', 'num_queries', 'num_classes', 'num_excluded_queries'}.
  """
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  gallery_embeddings = check_embeddings("gallery embeddings", gallery_embeddings)
  gallery_product_ids = np.asarray(gallery_product_ids)
  if len(gallery_product_ids) != gallery_embeddings.shape[0]:
    raise ValueError(f"gallery_product_ids: {len(gallery_product_ids)} ids for "
                     f"{gallery_embeddings.shape[0]} gallery embeddings")
  accuracies = []
  for draw in range(draws):
    prototypes = one_shot_prototypes(gallery_ids, gallery_product_ids, seed, draw)
    rank, _, num_excluded = _query_rankings(
        query_embeddings, query_product_ids, gallery_embeddings[prototypes],
        gallery_product_ids[prototypes], query_block, gallery_block)
    accuracies.append(float(np.mean(rank == 1)) if rank.size else float("nan"))
  return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
          "num_queries": int(rank.size), "num_classes": int(len(np.unique(gallery_product_ids))),
          "num_excluded_queries": num_excluded}
