"""Nearest-neighbour search and cross-domain retrieval metrics.

Embeddings are L2-normalised, so the inner product used everywhere here is the
cosine similarity. Two search back-ends:

* `exact_search`: blocked brute force in JAX. Loops over gallery blocks keeping a
  running top-k per query block, so at most `[query_block, gallery_block]` scores
  exist at once.
* ScaNN (`build_scann_index`, `scann_search`): a partitioning tree, anisotropic
  quantisation (AH) and exact re-ordering of the best candidates.

Metrics (`retrieval_metrics`, `one_shot_accuracy`) are exact: they count, for
every correct gallery item of a query, the wrong items scoring at or above it over
the whole gallery (blocked, never the full `[Q, G]` matrix). Ties are resolved
pessimistically: a wrong item with the same score as a correct one ranks first.

`evaluate_directions` runs all of it for the six cross-domain directions.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DOMAINS = ("page", "video", "live")
DIRECTIONS = (
    ("page", "video"),
    ("video", "page"),
    ("page", "live"),
    ("live", "page"),
    ("video", "live"),
    ("live", "video"),
)
DEFAULT_KS = (1, 5, 10)
# Below this many gallery items a ScaNN index skips the partitioning tree and
# scores every item (exactly); the tree only pays off for larger galleries.
SCANN_TREE_MIN_GALLERY = 2048
# Share of the tree's leaves searched per query when not set in the config.
SCANN_LEAVES_TO_SEARCH_FRACTION = 0.25
SCANN_MIN_LEAVES_TO_SEARCH = 16
SCANN_TRAINING_SAMPLE_SIZE = 250_000
RECALL_CHECK_K = 10
RECALL_CHECK_SEED = 0
ONE_SHOT_SEED = 0

_DOT_PRECISION = jax.lax.Precision.HIGHEST
# Most score comparisons held at once by the metric counts (~128 MiB of bools).
_MAX_COMPARISONS = 1 << 27


def direction_name(query_domain: str, gallery_domain: str) -> str:
  return f"{query_domain}_to_{gallery_domain}"


# ----------------------------------------------------------------------------
# Blocking helpers.


def _pad_to_blocks(x: jax.Array, block: int, pad_value=0) -> jax.Array:
  """[N, ...] -> [ceil(N / block), block, ...], padding the last block."""
  num_blocks = -(-x.shape[0] // block)
  padding = [(0, num_blocks * block - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  x = jnp.pad(x, padding, constant_values=pad_value)
  return x.reshape((num_blocks, block) + x.shape[1:])


def _block_sizes(num_queries: int, num_gallery: int, query_block: int,
                 gallery_block: int) -> tuple[int, int]:
  if query_block < 1 or gallery_block < 1:
    raise ValueError(
        f"block sizes must be positive, got query_block={query_block}, "
        f"gallery_block={gallery_block}")
  return (max(1, min(query_block, num_queries)),
          max(1, min(gallery_block, num_gallery)))


def _check_embeddings(name: str, embeddings, dim: int | None = None) -> np.ndarray:
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


# ----------------------------------------------------------------------------
# Exact search.


@functools.partial(jax.jit, static_argnames=("k", "query_block", "gallery_block"))
def _blocked_top_k(queries, gallery, *, k, query_block, gallery_block):
  num_gallery = gallery.shape[0]
  query_blocks = _pad_to_blocks(queries, query_block)
  gallery_blocks = _pad_to_blocks(gallery, gallery_block)
  block_offsets = jnp.arange(gallery_blocks.shape[0], dtype=jnp.int32) * gallery_block
  block_k = min(k, gallery_block)

  def search_query_block(query_block_embeddings):
    def merge_gallery_block(best, block):
      best_scores, best_indices = best
      gallery_block_embeddings, offset = block
      scores = jnp.matmul(query_block_embeddings, gallery_block_embeddings.T,
                          precision=_DOT_PRECISION)
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
  queries = _check_embeddings("queries", queries)
  gallery = _check_embeddings("gallery", gallery, dim=queries.shape[1])
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (the gallery size)")
  if queries.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  query_block, gallery_block = _block_sizes(
      queries.shape[0], gallery.shape[0], query_block, gallery_block)
  scores, indices = _blocked_top_k(
      jnp.asarray(queries), jnp.asarray(gallery), k=k, query_block=query_block,
      gallery_block=gallery_block)
  return np.asarray(scores), np.asarray(indices)


# ----------------------------------------------------------------------------
# ScaNN.


def _eval_field(eval_config, name: str, default):
  value = eval_config.get(name, default) if hasattr(eval_config, "get") else default
  return default if value is None else value


def scann_parameters(num_gallery: int, k: int, eval_config) -> dict[str, int]:
  """ScaNN parameters for a gallery of `num_gallery` items (0 leaves: no tree).

  Config fields (0 = chosen here): `scann_num_leaves` (default ~sqrt(G)),
  `scann_num_leaves_to_search` (default 25% of the leaves, at least 16:
  evaluation favours recall over speed),
  `scann_reorder` (candidates re-scored exactly; default 100, at least k).
  """
  num_leaves = int(_eval_field(eval_config, "scann_num_leaves", 0))
  leaves_to_search = int(_eval_field(eval_config, "scann_num_leaves_to_search", 0))
  reorder = int(_eval_field(eval_config, "scann_reorder", 0))
  if num_leaves <= 0:
    num_leaves = 0 if num_gallery < SCANN_TREE_MIN_GALLERY else int(round(math.sqrt(num_gallery)))
  if num_leaves and leaves_to_search <= 0:
    leaves_to_search = max(SCANN_MIN_LEAVES_TO_SEARCH,
                           math.ceil(num_leaves * SCANN_LEAVES_TO_SEARCH_FRACTION))
  leaves_to_search = min(leaves_to_search, num_leaves)
  reorder = max(reorder if reorder > 0 else 100, k)
  return {"num_leaves": num_leaves, "leaves_to_search": leaves_to_search,
          "reorder": reorder}


def build_scann_index(gallery, eval_config, k: int = RECALL_CHECK_K):
  """Builds a ScaNN dot-product searcher over gallery [G, D].

  Galleries under `SCANN_TREE_MIN_GALLERY` items are scored by brute force;
  larger ones use a tree (`scann_parameters`), AH with 2 dimensions per block
  and exact re-ordering. `k` is the searcher's default neighbour count.
  """
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

  gallery = _check_embeddings("gallery", gallery)
  if gallery.shape[0] == 0:
    raise ValueError("gallery: cannot build a ScaNN index over an empty gallery")
  params = scann_parameters(gallery.shape[0], k, eval_config)
  builder = scann_ops_pybind.builder(gallery, min(k, gallery.shape[0]), "dot_product")
  if params["num_leaves"] == 0:
    builder = builder.score_brute_force()
  else:
    builder = builder.tree(
        num_leaves=params["num_leaves"],
        num_leaves_to_search=params["leaves_to_search"],
        training_sample_size=min(gallery.shape[0], SCANN_TRAINING_SAMPLE_SIZE))
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2)
    builder = builder.reorder(params["reorder"])
  return builder.build()


def scann_search(searcher, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k of queries [Q, D] -> scores [Q, k] float32, indices [Q, k] int32.

  Where the searcher returns fewer than k neighbours the rows are padded with
  score -inf and index -1.
  """
  queries = _check_embeddings("queries", queries)
  if queries.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  indices, scores = searcher.search_batched_parallel(queries, final_num_neighbors=k)
  indices = np.asarray(indices, np.int64)
  scores = np.asarray(scores, np.float32)
  # ScaNN fills the slots beyond the gallery size with NaN scores and index 0.
  missing_neighbour = np.isnan(scores)
  indices = np.where(missing_neighbour, -1, indices)
  scores = np.where(missing_neighbour, -np.inf, scores).astype(np.float32)
  if indices.shape[1] < k:
    missing = k - indices.shape[1]
    indices = np.pad(indices, ((0, 0), (0, missing)), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
  return scores, indices.astype(np.int32)


def save_scann_index(searcher, directory: str) -> None:
  """Writes the searcher's assets into `directory` (created if needed)."""
  os.makedirs(directory, exist_ok=True)
  searcher.serialize(os.path.abspath(directory))


def load_scann_index(directory: str):
  """Reads a searcher written by `save_scann_index`."""
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  assets_path = os.path.join(directory, "scann_assets.pbtxt")
  if not os.path.isfile(assets_path):
    raise FileNotFoundError(f"{directory}: no ScaNN index (scann_assets.pbtxt missing)")
  # ScaNN records absolute asset paths when it serialises; point them at this directory
  # so that an index folder can be moved or copied to another machine.
  with open(assets_path, encoding="utf-8") as f:
    assets = re.sub(
        r'asset_path:\s*"([^"]*)"',
        lambda m: f'asset_path: "{os.path.join(directory, os.path.basename(m.group(1)))}"',
        f.read())
  docids_path = os.path.join(directory, "scann_docids.pkl")
  docids = None
  if os.path.isfile(docids_path):
    with open(docids_path, "rb") as f:
      docids = pickle.load(f)
  return scann_ops_pybind.ScannSearcher(
      scann_ops_pybind.scann_pybind.ScannNumpy(directory, assets), docids)


def recall_against(reference_indices: np.ndarray, indices: np.ndarray) -> float:
  """Mean share of each reference top-k row found in the same row of `indices`."""
  reference_indices = np.asarray(reference_indices)
  indices = np.asarray(indices)
  if reference_indices.size == 0:
    return float("nan")
  found = [np.isin(ref[ref >= 0], row).mean() for ref, row in zip(reference_indices, indices)]
  return float(np.mean(found))


def choose_search(num_gallery: int, eval_config) -> str:
  """'exact' or 'scann' from `eval_config.search` (auto: by gallery size)."""
  mode = _eval_field(eval_config, "search", "auto")
  if mode == "auto":
    min_gallery = int(_eval_field(eval_config, "scann_min_gallery", 20000))
    return "exact" if num_gallery < min_gallery else "scann"
  if mode not in ("exact", "scann"):
    raise ValueError(f"eval.search must be auto, exact or scann, got {mode!r}")
  return mode


def search(queries, gallery, k: int, eval_config) -> tuple[np.ndarray, np.ndarray, dict]:
  """Top-k search by exact or ScaNN search, as `eval_config.search` says.

  Args:
    queries: [Q, D]; gallery: [G, D]. k is capped at G.
    eval_config: `config.eval` (fields search, scann_min_gallery, scann_*,
      recall_check_queries).

  Returns:
    scores [Q, k'], indices [Q, k'] (k' = min(k, G)) and info:
    {'search': 'exact' | 'scann'} plus, for ScaNN, its parameters and
    `recall_at_10_vs_exact`, the recall@10 of ScaNN against exact search on a
    seeded sample of `recall_check_queries` queries.
  """
  queries = _check_embeddings("queries", queries)
  gallery = _check_embeddings("gallery", gallery, dim=queries.shape[1])
  if gallery.shape[0] == 0:
    raise ValueError("gallery: cannot search an empty gallery")
  k = min(k, gallery.shape[0])
  mode = choose_search(gallery.shape[0], eval_config)
  if mode == "exact":
    scores, indices = exact_search(queries, gallery, k)
    return scores, indices, {"search": "exact"}
  searcher = build_scann_index(gallery, eval_config, k=k)
  scores, indices = scann_search(searcher, queries, k)
  info = {"search": "scann", **scann_parameters(gallery.shape[0], k, eval_config)}
  info["recall_at_10_vs_exact"] = _scann_recall_check(
      searcher, queries, gallery, eval_config)
  return scores, indices, info


def _scann_recall_check(searcher, queries, gallery, eval_config) -> float:
  num_check = min(int(_eval_field(eval_config, "recall_check_queries", 1000)),
                  queries.shape[0])
  if num_check <= 0:
    return float("nan")
  rng = np.random.default_rng(RECALL_CHECK_SEED)
  sample = np.sort(rng.choice(queries.shape[0], size=num_check, replace=False))
  check_k = min(RECALL_CHECK_K, gallery.shape[0])
  _, exact_indices = exact_search(queries[sample], gallery, check_k)
  _, scann_indices = scann_search(searcher, queries[sample], check_k)
  return recall_against(exact_indices, scann_indices)


# ----------------------------------------------------------------------------
# Exact metrics.


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
  gallery_blocks = _pad_to_blocks(gallery, gallery_block)
  gallery_code_blocks = _pad_to_blocks(gallery_codes, gallery_block, pad_value=-1)
  block_offsets = jnp.arange(gallery_blocks.shape[0], dtype=jnp.int32) * gallery_block
  gallery_xs = (gallery_blocks, gallery_code_blocks, block_offsets)

  def block_scores(query_block_embeddings, gallery_block_embeddings):
    # The same jitted product in both passes, so a correct item's score is
    # bit-identical to the score it is compared against.
    return jnp.matmul(query_block_embeddings, gallery_block_embeddings.T,
                      precision=_DOT_PRECISION)

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

  xs = (_pad_to_blocks(queries, query_block),
        _pad_to_blocks(query_codes, query_block, pad_value=-1),
        _pad_to_blocks(correct_indices, query_block, pad_value=-1))
  correct_scores, counts = jax.lax.map(per_query_block, xs)
  num_queries = queries.shape[0]
  num_slots = correct_indices.shape[1]
  return (correct_scores.reshape(-1, num_slots)[:num_queries],
          counts.reshape(-1, num_slots)[:num_queries])


def _query_rankings(query_embeddings, query_product_ids, gallery_embeddings,
                    gallery_product_ids, query_block, gallery_block):
  """Per included query: rank [Qi] and average precision [Qi]; excluded count."""
  queries = _check_embeddings("query embeddings", query_embeddings)
  gallery = _check_embeddings("gallery embeddings", gallery_embeddings, dim=queries.shape[1])
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
  query_block, gallery_block = _block_sizes(
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
  average_precision = precision.sum(axis=1) / valid.sum(axis=1)
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
  metrics["mAP"] = float("nan") if empty else float(np.mean(average_precision))
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


def one_shot_prototypes(gallery_product_ids, seed: int, draw: int) -> np.ndarray:
  """One gallery index per product (sorted product order), drawn uniformly
  among that product's items; deterministic in (seed, draw). -> [P] int."""
  products, codes = np.unique(np.asarray(gallery_product_ids), return_inverse=True)
  codes = codes.reshape(-1)
  order = np.argsort(codes, kind="stable")
  counts = np.bincount(codes, minlength=len(products))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  rng = np.random.default_rng([seed, draw])
  picks = np.floor(rng.random(len(products)) * counts).astype(np.int64)
  return order[starts + np.minimum(picks, counts - 1)]


def one_shot_accuracy(query_embeddings, query_product_ids, gallery_embeddings,
                      gallery_product_ids, draws: int = 5, seed: int = 0, *,
                      query_block: int = 128, gallery_block: int = 2048) -> dict[str, Any]:
  """One-shot classification against one prototype per gallery product.

  Per draw, every product with gallery items gets one of them as prototype
  (`one_shot_prototypes`); a query (whose product has a prototype) is correct
  when its own prototype scores strictly higher than every other prototype
  (a tie counts as wrong). Accuracy and its std (population) over draws.

  Returns:
    {'accuracy', 'std', 'num_queries', 'num_classes', 'num_excluded_queries'}.
  """
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  gallery_embeddings = _check_embeddings("gallery embeddings", gallery_embeddings)
  gallery_product_ids = np.asarray(gallery_product_ids)
  if len(gallery_product_ids) != gallery_embeddings.shape[0]:
    raise ValueError(f"gallery_product_ids: {len(gallery_product_ids)} ids for "
                     f"{gallery_embeddings.shape[0]} gallery embeddings")
  accuracies = []
  for draw in range(draws):
    prototypes = one_shot_prototypes(gallery_product_ids, seed, draw)
    rank, _, num_excluded = _query_rankings(
        query_embeddings, query_product_ids, gallery_embeddings[prototypes],
        gallery_product_ids[prototypes], query_block, gallery_block)
    accuracies.append(float(np.mean(rank == 1)) if rank.size else float("nan"))
  return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
          "num_queries": int(rank.size), "num_classes": int(len(np.unique(gallery_product_ids))),
          "num_excluded_queries": num_excluded}


# ----------------------------------------------------------------------------
# The six directions.


def _check_domain(domain: str, entry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  try:
    ids, product_ids, embeddings = entry
  except (TypeError, ValueError) as error:
    raise ValueError(f"{domain}: expected (ids, product_ids, embeddings)") from error
  embeddings = _check_embeddings(f"{domain} embeddings", embeddings)
  ids, product_ids = np.asarray(ids), np.asarray(product_ids)
  if embeddings.shape[0] == 0:
    raise ValueError(f"{domain}: no embeddings (empty domain, so an empty gallery)")
  if len(ids) != embeddings.shape[0] or len(product_ids) != embeddings.shape[0]:
    raise ValueError(f"{domain}: {len(ids)} ids, {len(product_ids)} product ids and "
                     f"{embeddings.shape[0]} embeddings differ in length")
  return ids, product_ids, embeddings


def evaluate_direction(query, gallery, eval_config, ks: Sequence[int] = DEFAULT_KS
                       ) -> dict[str, Any]:
  """Metrics for one direction; query/gallery are (ids, product_ids, embeddings)."""
  _, query_products, query_embeddings = query
  _, gallery_products, gallery_embeddings = gallery
  mode = choose_search(gallery_embeddings.shape[0], eval_config)
  if mode == "exact":
    metrics = retrieval_metrics(query_embeddings, query_products, gallery_embeddings,
                                gallery_products, ks)
  else:
    _, indices, info = search(query_embeddings, gallery_embeddings, max(ks), eval_config)
    metrics = recall_at_k_from_topk(indices, query_products, gallery_products, ks)
    metrics.update({"median_rank": None, "mAP": None,
                    "scann_recall@10_vs_exact": info["recall_at_10_vs_exact"]})
  one_shot = one_shot_accuracy(
      query_embeddings, query_products, gallery_embeddings, gallery_products,
      draws=int(_eval_field(eval_config, "one_shot_draws", 5)), seed=ONE_SHOT_SEED)
  metrics.update({
      "one_shot_accuracy": one_shot["accuracy"],
      "one_shot_std": one_shot["std"],
      "one_shot_num_classes": one_shot["num_classes"],
      "chance_R@1": chance_recall_at_1(query_products, gallery_products),
      "num_gallery": int(gallery_embeddings.shape[0]),
      "search": mode,
  })
  return metrics


def evaluate_directions(embeddings_by_domain: Mapping[str, tuple], eval_config,
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
  """Cross-domain retrieval and one-shot metrics for the six directions.

  Args:
    embeddings_by_domain: domain ('page' | 'video' | 'live') ->
      (ids [N], product_ids [N], embeddings [N, D]). A missing domain marks its
      directions {'skipped': 'no <domain> embeddings'}.
    eval_config: `config.eval`.

  Returns:
    {direction: metrics (see `evaluate_direction`) or {'skipped': reason},
     'chance_R@1': mean over evaluated directions, 'search': 'scann' if any
     direction used ScaNN else 'exact', and with ScaNN
     'scann_recall@10_vs_exact' (mean over its directions)}.

  Raises:
    ValueError naming the domain for an empty domain, NaN/Inf embeddings,
    mismatched lengths or embedding dimensions, or an unknown domain.
  """
  unknown = sorted(set(embeddings_by_domain) - set(DOMAINS))
  if unknown:
    raise ValueError(f"unknown domains {unknown}; expected some of {DOMAINS}")
  domains = {domain: _check_domain(domain, entry)
             for domain, entry in embeddings_by_domain.items()}
  dims = {domain: entry[2].shape[1] for domain, entry in domains.items()}
  if len(set(dims.values())) > 1:
    raise ValueError(f"embedding dimensions differ between domains: {dims}")

  results: dict[str, Any] = {}
  for query_domain, gallery_domain in DIRECTIONS:
    name = direction_name(query_domain, gallery_domain)
    missing = [d for d in (query_domain, gallery_domain) if d not in domains]
    if missing:
      results[name] = {"skipped": f"no {missing[0]} embeddings"}
      continue
    results[name] = evaluate_direction(domains[query_domain], domains[gallery_domain],
                                       eval_config, ks)
  evaluated = [m for m in results.values() if "skipped" not in m]
  results["chance_R@1"] = (float(np.mean([m["chance_R@1"] for m in evaluated]))
                           if evaluated else float("nan"))
  scann_recalls = [m["scann_recall@10_vs_exact"] for m in evaluated if m["search"] == "scann"]
  results["search"] = "scann" if scann_recalls else "exact"
  if scann_recalls:
    results["scann_recall@10_vs_exact"] = float(np.mean(scann_recalls))
  return results
