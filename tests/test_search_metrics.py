"""Tests for cope_jax.search.exact and cope_jax.search.metrics against NumPy references
(`cope_jax/testing/search_data.py`)."""

import numpy as np
import pytest

from cope_jax.search import exact
from cope_jax.search import metrics as search_metrics
from cope_jax.testing.search_data import integer_embeddings
from cope_jax.testing.search_data import reference_metrics
from cope_jax.testing.search_data import tied_retrieval_data
from cope_jax.testing.search_data import unit_embeddings


# ---------------------------------------------------------------------------
# Exact search.


def test_exact_search_matches_numpy_stable_argsort_with_ties():
  rng = np.random.default_rng(0)
  queries, gallery = integer_embeddings(rng, 30), integer_embeddings(rng, 70)
  scores, indices = exact.exact_search(queries, gallery, k=12, query_block=7,
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
  unblocked = exact.exact_search(queries, gallery, k=10, query_block=10_000,
                                     gallery_block=10_000)
  blocked = exact.exact_search(queries, gallery, k=10, query_block=query_block,
                                   gallery_block=gallery_block)
  np.testing.assert_array_equal(blocked[1], unblocked[1])
  np.testing.assert_allclose(blocked[0], unblocked[0], rtol=0, atol=1e-6)


def test_exact_search_rejects_bad_input():
  rng = np.random.default_rng(2)
  queries, gallery = unit_embeddings(rng, 3), unit_embeddings(rng, 5)
  with pytest.raises(ValueError, match="k=6"):
    exact.exact_search(queries, gallery, k=6)
  with pytest.raises(ValueError, match="dimension"):
    exact.exact_search(queries[:, :8], gallery, k=2)
  bad = gallery.copy()
  bad[3, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf.*row 3"):
    exact.exact_search(queries, bad, k=2)


# ---------------------------------------------------------------------------
# Metrics.


@pytest.mark.parametrize("blocks", [(128, 2048), (3, 7)])
def test_retrieval_metrics_match_brute_force_with_ties_and_missing_products(blocks):
  queries, query_products, gallery, gallery_products = tied_retrieval_data()
  ks = (1, 5, 10)
  metrics = search_metrics.retrieval_metrics(queries, query_products, gallery, gallery_products,
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
  metrics = search_metrics.retrieval_metrics(np.array([[1, 0]], np.float32), ["right"],
                                        gallery, gallery_products, ks=(1, 2))
  # Ranking: wrong (tie, goes first), right, right, other.
  assert metrics["R@1"] == 0.0 and metrics["R@2"] == 1.0
  assert metrics["median_rank"] == 2.0
  assert metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_retrieval_metrics_perfect_embeddings():
  rng = np.random.default_rng(3)
  centers = unit_embeddings(rng, 6, dim=8)
  products = np.repeat(np.arange(6), 4).astype(str)
  metrics = search_metrics.retrieval_metrics(centers[np.repeat(np.arange(6), 2)],
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
  _, indices = exact.exact_search(queries, gallery, k=10)
  from_topk = search_metrics.recall_at_k_from_topk(indices, query_products, gallery_products)
  ranked = search_metrics.retrieval_metrics(queries, query_products, gallery, gallery_products)
  for key in ("R@1", "R@5", "R@10", "num_queries", "num_excluded_queries"):
    assert from_topk[key] == pytest.approx(ranked[key]), key
  assert "median_rank" not in from_topk


def test_recall_from_topk_treats_minus_one_as_a_miss():
  metrics = search_metrics.recall_at_k_from_topk(
      np.array([[-1, 1], [0, -1], [2, 2]]), ["a", "a", "z"], np.array(["b", "a", "c"]),
      ks=(1, 2))
  assert metrics["num_queries"] == 2 and metrics["num_excluded_queries"] == 1
  assert metrics["R@1"] == 0.0 and metrics["R@2"] == 0.5


def gallery_ids_of(gallery_products, seed=0):
  """Distinct ids in an order unrelated to the rows."""
  return np.random.default_rng(seed).permutation(len(gallery_products)).astype(str)


def test_one_shot_accuracy_matches_brute_force():
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=5)
  gallery_ids = gallery_ids_of(gallery_products)
  result = search_metrics.one_shot_accuracy(queries, query_products, gallery, gallery_products,
                                            gallery_ids, draws=4, seed=7, query_block=4,
                                            gallery_block=3)
  accuracies = []
  for draw in range(4):
    prototypes = search_metrics.one_shot_prototypes(gallery_ids, gallery_products, seed=7,
                                                    draw=draw)
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
  again = search_metrics.one_shot_accuracy(queries, query_products, gallery, gallery_products,
                                           gallery_ids, draws=4, seed=7)
  assert again == result


def test_one_shot_prototypes_depend_on_draw():
  products = np.repeat(np.arange(50), 5).astype(str)
  ids = gallery_ids_of(products)
  first = search_metrics.one_shot_prototypes(ids, products, seed=0, draw=0)
  second = search_metrics.one_shot_prototypes(ids, products, seed=0, draw=1)
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(first, search_metrics.one_shot_prototypes(ids, products, 0, 0))


def test_one_shot_prototypes_and_accuracy_do_not_depend_on_row_order():
  """The rule is defined on ids: shuffling the gallery's rows changes nothing."""
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=6)
  ids = gallery_ids_of(gallery_products, seed=1)
  shuffle = np.random.default_rng(2).permutation(len(ids))
  for draw in range(3):
    before = search_metrics.one_shot_prototypes(ids, gallery_products, 3, draw)
    after = search_metrics.one_shot_prototypes(ids[shuffle], gallery_products[shuffle], 3,
                                               draw)
    assert sorted(ids[before]) == sorted(ids[shuffle][after])
  in_order = search_metrics.one_shot_accuracy(queries, query_products, gallery,
                                              gallery_products, ids, draws=3)
  shuffled = search_metrics.one_shot_accuracy(queries, query_products, gallery[shuffle],
                                              gallery_products[shuffle], ids[shuffle], draws=3)
  assert in_order == shuffled


def test_chance_recall_at_1():
  chance = search_metrics.chance_recall_at_1(["a", "b", "x"], ["a", "a", "b", "c"])
  assert chance == pytest.approx((2 / 4 + 1 / 4) / 2)



def test_retrieval_metrics_with_many_items_per_product_uses_small_blocks(monkeypatch):
  monkeypatch.setattr(search_metrics, "_MAX_COMPARISONS", 64)
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=10)
  metrics = search_metrics.retrieval_metrics(queries, query_products, gallery, gallery_products)
  expected = reference_metrics(queries, query_products, gallery, gallery_products, (1, 5, 10))
  for key in ("R@1", "R@10", "median_rank", "mAP"):
    assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key


def test_recall_per_query_and_recall_against():
  reference = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
  found = np.array([[3, 2, 0], [5, 6, 4], [0, 0, 0]])
  np.testing.assert_allclose(search_metrics.recall_per_query(reference, found), [2 / 3, 1, 0])
  assert search_metrics.recall_against(reference, found) == pytest.approx((2 / 3 + 1) / 3)


def test_retrieval_metrics_do_not_depend_on_row_order_to_the_last_bit():
  """Tools that hold one set of embeddings in different row orders (evaluate in record
  order, compare in id order) must report identical values, mAP's float sums included."""
  queries, query_products, gallery, gallery_products = tied_retrieval_data(seed=8)
  rng = np.random.default_rng(3)
  query_order = rng.permutation(len(queries))
  gallery_order = rng.permutation(len(gallery))
  in_order = search_metrics.retrieval_metrics(queries, query_products, gallery,
                                              gallery_products)
  shuffled = search_metrics.retrieval_metrics(
      queries[query_order], query_products[query_order], gallery[gallery_order],
      gallery_products[gallery_order])
  assert in_order == shuffled
