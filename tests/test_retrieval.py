"""Tests for cope_jax.retrieval: search back-ends and metrics.

Metric references are brute-force NumPy written here from the definitions: they
sort the whole gallery per query and walk the ranking. Tie tests use embeddings
with small integer entries, whose inner products are exact in float32 whatever
the summation order, so ties are real ties in every implementation.
"""

import os
import math

import ml_collections
import numpy as np
import pytest

from cope_jax import retrieval


# ---------------------------------------------------------------------------
# Data and references.


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
  config = ml_collections.ConfigDict({
      "search": "auto", "scann_min_gallery": 20000, "scann_num_leaves": 0,
      "scann_num_leaves_to_search": 0, "scann_reorder": 100,
      "recall_check_queries": 200, "one_shot_draws": 3})
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


# ---------------------------------------------------------------------------
# Exact search.


def test_exact_search_matches_numpy_stable_argsort_with_ties():
  rng = np.random.default_rng(0)
  queries, gallery = integer_embeddings(rng, 30), integer_embeddings(rng, 70)
  scores, indices = retrieval.exact_search(queries, gallery, k=12, query_block=7,
                                           gallery_block=9)
  full = queries @ gallery.T
  expected = np.argsort(-full, axis=1, kind="stable")[:, :12]  # ties: lower index first
  assert scores.dtype == np.float32 and indices.dtype == np.int32
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(scores, np.take_along_axis(full, expected, axis=1))


@pytest.mark.parametrize("query_block,gallery_block", [(1, 1), (5, 13), (64, 300), (100, 4)])
def test_blocked_exact_search_equals_unblocked(query_block, gallery_block):
  rng = np.random.default_rng(1)
  queries, gallery = unit_embeddings(rng, 37), unit_embeddings(rng, 211)
  unblocked = retrieval.exact_search(queries, gallery, k=10, query_block=10_000,
                                     gallery_block=10_000)
  blocked = retrieval.exact_search(queries, gallery, k=10, query_block=query_block,
                                   gallery_block=gallery_block)
  np.testing.assert_array_equal(blocked[1], unblocked[1])
  np.testing.assert_allclose(blocked[0], unblocked[0], rtol=0, atol=1e-6)


def test_exact_search_rejects_bad_input():
  rng = np.random.default_rng(2)
  queries, gallery = unit_embeddings(rng, 3), unit_embeddings(rng, 5)
  with pytest.raises(ValueError, match="k=6"):
    retrieval.exact_search(queries, gallery, k=6)
  with pytest.raises(ValueError, match="dimension"):
    retrieval.exact_search(queries[:, :8], gallery, k=2)
  bad = gallery.copy()
  bad[3, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf.*row 3"):
    retrieval.exact_search(queries, bad, k=2)


# ---------------------------------------------------------------------------
# Metrics.


@pytest.mark.parametrize("blocks", [(128, 2048), (3, 7)])
def test_retrieval_metrics_match_brute_force_with_ties_and_missing_products(blocks):
  queries, query_products, gallery, gallery_products = tied_retrieval_data()
  ks = (1, 5, 10)
  metrics = retrieval.retrieval_metrics(queries, query_products, gallery, gallery_products,
                                        ks, query_block=blocks[0], gallery_block=blocks[1])
  expected = reference_metrics(queries, query_products, gallery, gallery_products, ks)
  assert expected["num_excluded_queries"] > 0  # the data really has missing products
  assert metrics["num_queries"] == expected["num_queries"]
  assert metrics["num_excluded_queries"] == expected["num_excluded_queries"]
  for key in ("R@1", "R@5", "R@10", "median_rank", "mAP"):
    assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key


def test_retrieval_metrics_ties_count_against_the_query():
  gallery = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
  gallery_products = np.array(["wrong", "right", "other", "right"])
  metrics = retrieval.retrieval_metrics(np.array([[1, 0]], np.float32), ["right"],
                                        gallery, gallery_products, ks=(1, 2))
  # Ranking: wrong (tie, goes first), right, right, other.
  assert metrics["R@1"] == 0.0 and metrics["R@2"] == 1.0
  assert metrics["median_rank"] == 2.0
  assert metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_retrieval_metrics_perfect_embeddings():
  rng = np.random.default_rng(3)
  centers = unit_embeddings(rng, 6, dim=8)
  products = np.repeat(np.arange(6), 4).astype(str)
  metrics = retrieval.retrieval_metrics(centers[np.repeat(np.arange(6), 2)],
                                        np.repeat(np.arange(6), 2).astype(str),
                                        centers[np.repeat(np.arange(6), 4)], products)
  assert metrics["R@1"] == 1.0 and metrics["median_rank"] == 1.0
  # All four correct items tie with each other and beat every wrong one.
  assert metrics["mAP"] == 1.0


def test_recall_from_topk_equals_exact_recall_without_ties():
  rng = np.random.default_rng(4)
  queries, gallery = unit_embeddings(rng, 50), unit_embeddings(rng, 120)
  query_products = rng.integers(0, 25, 50).astype(str)
  gallery_products = rng.integers(0, 20, 120).astype(str)
  _, indices = retrieval.exact_search(queries, gallery, k=10)
  from_topk = retrieval.recall_at_k_from_topk(indices, query_products, gallery_products)
  exact = retrieval.retrieval_metrics(queries, query_products, gallery, gallery_products)
  for key in ("R@1", "R@5", "R@10", "num_queries", "num_excluded_queries"):
    assert from_topk[key] == pytest.approx(exact[key]), key
  assert "median_rank" not in from_topk


def test_recall_from_topk_treats_minus_one_as_a_miss():
  metrics = retrieval.recall_at_k_from_topk(
      np.array([[-1, 1], [0, -1], [2, 2]]), ["a", "a", "z"], np.array(["b", "a", "c"]),
      ks=(1, 2))
  assert metrics["num_queries"] == 2 and metrics["num_excluded_queries"] == 1
  assert metrics["R@1"] == 0.0 and metrics["R@2"] == 0.5


def test_one_shot_accuracy_matches_brute_force():
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=5)
  result = retrieval.one_shot_accuracy(queries, query_products, gallery, gallery_products,
                                       draws=4, seed=7, query_block=4, gallery_block=3)
  accuracies = []
  for draw in range(4):
    prototypes = retrieval.one_shot_prototypes(gallery_products, seed=7, draw=draw)
    prototype_products = gallery_products[prototypes]
    assert sorted(prototype_products) == sorted(set(gallery_products))  # one per product
    correct = 0
    included = [i for i, p in enumerate(query_products) if p in set(prototype_products)]
    for i in included:
      scores = gallery[prototypes] @ queries[i]
      own = scores[prototype_products == query_products[i]][0]
      others = scores[prototype_products != query_products[i]]
      correct += bool(np.all(own > others))  # a tie is a miss
    accuracies.append(correct / len(included))
  assert result["accuracy"] == pytest.approx(np.mean(accuracies))
  assert result["std"] == pytest.approx(np.std(accuracies))
  assert result["num_classes"] == len(set(gallery_products))
  assert result["num_queries"] + result["num_excluded_queries"] == len(queries)
  again = retrieval.one_shot_accuracy(queries, query_products, gallery, gallery_products,
                                      draws=4, seed=7)
  assert again == result


def test_one_shot_prototypes_depend_on_draw():
  products = np.repeat(np.arange(50), 5).astype(str)
  first = retrieval.one_shot_prototypes(products, seed=0, draw=0)
  second = retrieval.one_shot_prototypes(products, seed=0, draw=1)
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(first, retrieval.one_shot_prototypes(products, 0, 0))


def test_chance_recall_at_1():
  chance = retrieval.chance_recall_at_1(["a", "b", "x"], ["a", "a", "b", "c"])
  assert chance == pytest.approx((2 / 4 + 1 / 4) / 2)


# ---------------------------------------------------------------------------
# ScaNN.


def clustered_search_data(seed=0, num_gallery=4000, num_queries=300, dim=64):
  rng = np.random.default_rng(seed)
  centers = unit_embeddings(rng, 100, dim)
  return (clustered_embeddings(rng, centers, num_queries, 0.6),
          clustered_embeddings(rng, centers, num_gallery, 0.6))


def test_scann_recall_against_exact_at_default_parameters():
  queries, gallery = clustered_search_data()
  config = eval_config()
  assert retrieval.scann_parameters(len(gallery), 10, config)["num_leaves"] > 0  # tree used
  searcher = retrieval.build_scann_index(gallery, config)
  _, scann_indices = retrieval.scann_search(searcher, queries, 10)
  _, exact_indices = retrieval.exact_search(queries, gallery, 10)
  assert retrieval.recall_against(exact_indices, scann_indices) >= 0.98


def test_scann_index_save_load_gives_identical_results(tmp_path):
  queries, gallery = clustered_search_data(seed=1, num_gallery=3000, num_queries=50)
  searcher = retrieval.build_scann_index(gallery, eval_config())
  retrieval.save_scann_index(searcher, str(tmp_path / "index"))
  # A saved index still loads after its folder is moved (asset paths are re-rooted).
  os.rename(tmp_path / "index", tmp_path / "moved_index")
  loaded = retrieval.load_scann_index(str(tmp_path / "moved_index"))
  before = retrieval.scann_search(searcher, queries, 10)
  after = retrieval.scann_search(loaded, queries, 10)
  np.testing.assert_array_equal(after[1], before[1])
  np.testing.assert_array_equal(after[0], before[0])
  with pytest.raises(FileNotFoundError, match="no ScaNN index"):
    retrieval.load_scann_index(str(tmp_path))


def test_small_gallery_scann_is_exact_and_pads_short_results():
  rng = np.random.default_rng(6)
  queries, gallery = unit_embeddings(rng, 20), unit_embeddings(rng, 7)
  searcher = retrieval.build_scann_index(gallery, eval_config())
  scores, indices = retrieval.scann_search(searcher, queries, 5)
  exact_scores, exact_indices = retrieval.exact_search(queries, gallery, 5)
  np.testing.assert_array_equal(indices, exact_indices)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


def test_search_picks_backend_and_reports_recall():
  queries, gallery = clustered_search_data(seed=2, num_gallery=2500, num_queries=100)
  _, indices, info = retrieval.search(queries, gallery, 10, eval_config())
  assert info == {"search": "exact"}
  np.testing.assert_array_equal(indices, retrieval.exact_search(queries, gallery, 10)[1])
  _, indices, info = retrieval.search(queries, gallery, 10,
                                      eval_config(scann_min_gallery=1000, recall_check_queries=50))
  assert info["search"] == "scann" and indices.shape == (100, 10)
  assert 0.9 <= info["recall_at_10_vs_exact"] <= 1.0
  with pytest.raises(ValueError, match="eval.search"):
    retrieval.search(queries, gallery, 10, eval_config(search="faiss"))


# ---------------------------------------------------------------------------
# The six directions.


def domain_embeddings(seed=8):
  rng = np.random.default_rng(seed)
  result = {}
  for domain, count in (("page", 30), ("video", 40), ("live", 25)):
    products = rng.integers(0, 12, count).astype(str)
    ids = np.array([f"{domain}{i}" for i in range(count)])
    result[domain] = (ids, products, unit_embeddings(rng, count, dim=8))
  return result


def test_evaluate_directions_reports_every_direction():
  embeddings = domain_embeddings()
  results = retrieval.evaluate_directions(embeddings, eval_config())
  assert results["search"] == "exact" and "scann_recall@10_vs_exact" not in results
  for query_domain, gallery_domain in retrieval.DIRECTIONS:
    metrics = results[f"{query_domain}_to_{gallery_domain}"]
    _, query_products, query_embeddings = embeddings[query_domain]
    _, gallery_products, gallery_embeddings = embeddings[gallery_domain]
    expected = reference_metrics(query_embeddings, query_products, gallery_embeddings,
                                 gallery_products, (1, 5, 10))
    for key in ("R@1", "R@5", "R@10", "median_rank", "mAP"):
      assert metrics[key] == pytest.approx(expected[key], abs=1e-9)
    assert metrics["chance_R@1"] == pytest.approx(
        retrieval.chance_recall_at_1(query_products, gallery_products))
    assert 0.0 <= metrics["one_shot_accuracy"] <= 1.0
  chances = [results[retrieval.direction_name(*d)]["chance_R@1"] for d in retrieval.DIRECTIONS]
  assert results["chance_R@1"] == pytest.approx(np.mean(chances))


def test_evaluate_directions_with_scann():
  embeddings = domain_embeddings()
  results = retrieval.evaluate_directions(embeddings, eval_config(search="scann"))
  assert results["search"] == "scann"
  assert results["scann_recall@10_vs_exact"] == pytest.approx(1.0)  # tiny: brute force
  assert results["page_to_video"]["median_rank"] is None


def test_evaluate_directions_marks_missing_domain_skipped():
  embeddings = domain_embeddings()
  del embeddings["video"]
  results = retrieval.evaluate_directions(embeddings, eval_config())
  for name in ("page_to_video", "video_to_page", "video_to_live", "live_to_video"):
    assert results[name] == {"skipped": "no video embeddings"}
  assert "R@1" in results["page_to_live"] and "R@1" in results["live_to_page"]


@pytest.mark.parametrize("problem,message", [
    ("nan", "live embeddings: 1 embeddings contain NaN or Inf"),
    ("inf", "live embeddings: 1 embeddings contain NaN or Inf"),
    ("empty", "live: no embeddings"),
    ("dimension", "embedding dimensions differ"),
    ("length", "live: 25 ids, 24 product ids"),
])
def test_evaluate_directions_rejects_bad_input(problem, message):
  embeddings = domain_embeddings()
  ids, products, vectors = embeddings["live"]
  vectors = vectors.copy()
  if problem == "nan":
    vectors[3, 2] = np.nan
  elif problem == "inf":
    vectors[0, 0] = np.inf
  elif problem == "empty":
    ids, products, vectors = ids[:0], products[:0], vectors[:0]
  elif problem == "dimension":
    vectors = vectors[:, :4]
  elif problem == "length":
    products = products[:-1]
  embeddings["live"] = (ids, products, vectors)
  with pytest.raises(ValueError, match=message):
    retrieval.evaluate_directions(embeddings, eval_config())


def test_scann_search_marks_neighbours_beyond_the_gallery():
  rng = np.random.default_rng(9)
  queries, gallery = unit_embeddings(rng, 4), unit_embeddings(rng, 3)
  searcher = retrieval.build_scann_index(gallery, eval_config(), k=5)
  scores, indices = retrieval.scann_search(searcher, queries, 5)
  np.testing.assert_array_equal(indices[:, 3:], -1)
  assert np.all(scores[:, 3:] == -np.inf)
  np.testing.assert_array_equal(np.sort(indices[:, :3], axis=1), [[0, 1, 2]] * 4)


def test_retrieval_metrics_with_many_items_per_product_uses_small_blocks(monkeypatch):
  monkeypatch.setattr(retrieval, "_MAX_COMPARISONS", 64)
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=10)
  metrics = retrieval.retrieval_metrics(queries, query_products, gallery, gallery_products)
  expected = reference_metrics(queries, query_products, gallery, gallery_products, (1, 5, 10))
  for key in ("R@1", "R@10", "median_rank", "mAP"):
    assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
