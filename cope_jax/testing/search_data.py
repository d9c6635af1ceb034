"""Search data (clustered unit embeddings, tied scores) and NumPy references, for the
search tests and the search benchmarks.

Metric references are brute-force NumPy written here from the definitions: they sort
the whole gallery per query and walk the ranking. Tie data uses embeddings with small
integer entries, whose inner products are exact in float32 whatever the summation
order, so ties are real ties in every implementation.
"""

import math

import numpy as np

from configs import synthetic_tiny


def integer_embeddings(rng, num, dim=4):
  """[num, dim] float32 with entries in {-1, 0, 1}: many exactly tied scores."""
  return rng.integers(-1, 2, size=(num, dim)).astype(np.float32)


def unit_embeddings(rng, num, dim=16):
  x = rng.normal(size=(num, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_embeddings(rng, centers, num, noise):
  """Unit vectors around random cluster centres; noise is the noise norm."""
  dim = centers.shape[1]
  x = centers[rng.integers(0, len(centers), num)]
  x = x + noise / math.sqrt(dim) * rng.normal(size=(num, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_ranking(scores, correct):
  """Gallery order for one query: score desc, wrong before correct, index asc."""
  return np.lexsort((np.arange(len(scores)), correct.astype(int), -scores.astype(np.float64)))


def reference_metrics(queries, query_products, gallery, gallery_products, ks):
  ranks, average_precisions, excluded = [], [], 0
  for query, product in zip(queries, query_products):
    correct = gallery_products == product
    if not correct.any():
      excluded += 1
      continue
    scores = gallery.astype(np.float64) @ query.astype(np.float64)
    order = reference_ranking(scores, correct)
    correct_in_order = correct[order]
    positions = np.flatnonzero(correct_in_order) + 1  # 1-based ranking positions
    ranks.append(positions[0])
    average_precisions.append(np.mean(np.arange(1, len(positions) + 1) / positions))
  ranks = np.array(ranks)
  metrics = {f"R@{k}": np.mean(ranks <= k) for k in ks}
  metrics.update(median_rank=np.median(ranks), mAP=np.mean(average_precisions),
                 num_queries=len(ranks), num_excluded_queries=excluded)
  return metrics


def eval_config(**overrides):
  """The default run's `config.eval` with smaller samples, and `overrides`."""
  config = synthetic_tiny.get_config().eval
  config.update({"tune_queries": 200, "recall_check_queries": 200, "one_shot_draws": 3})
  config.update(overrides)
  return config


def tied_retrieval_data(seed=0):
  rng = np.random.default_rng(seed)
  queries = integer_embeddings(rng, 40)
  gallery = integer_embeddings(rng, 90)
  # Products p0..p14 in the gallery; queries also ask for p15..p17 (absent).
  gallery_products = np.array([f"p{i}" for i in rng.integers(0, 15, 90)])
  query_products = np.array([f"p{i}" for i in rng.integers(0, 18, 40)])
  # Exact duplicates of correct items under another product: guaranteed ties.
  gallery[5] = gallery[6]
  gallery_products[5], gallery_products[6] = "p1", "p2"
  return queries, query_products, gallery, gallery_products



def clustered_search_data(seed=0, num_gallery=4000, num_queries=300, dim=64, num_held_out=0):
  """queries [num_queries, dim], gallery [num_gallery, dim] around 100 shared centres,
  and with `num_held_out` > 0 also held-out queries [num_held_out, dim] from the same
  centres (drawn last: the queries and gallery do not depend on num_held_out)."""
  rng = np.random.default_rng(seed)
  centers = unit_embeddings(rng, 100, dim)
  queries = clustered_embeddings(rng, centers, num_queries, 0.6)
  gallery = clustered_embeddings(rng, centers, num_gallery, 0.6)
  if not num_held_out:
    return queries, gallery
  return queries, gallery, clustered_embeddings(rng, centers, num_held_out, 0.6)
