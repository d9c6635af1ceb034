"""Tests for cope_jax.search.directions: the metrics of every retrieval direction."""

import dataclasses

import numpy as np
import pytest

from cope_jax.search import directions
from cope_jax.search import exact
from cope_jax.search import metrics
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.base import domains
from cope_jax.testing.search_data import clustered_search_data
from cope_jax.testing.search_data import eval_config
from cope_jax.testing.search_data import reference_metrics
from cope_jax.testing.search_data import unit_embeddings


def domain_embeddings(seed=8):
  rng = np.random.default_rng(seed)
  result = {}
  for domain, count in zip(domains.NAMES, (30, 40, 25)):
    products = rng.integers(0, 12, count).astype(str)
    ids = np.array([f"{domain}{i}" for i in range(count)])
    result[domain] = DomainEmbeddings(domain, ids, products, unit_embeddings(rng, count, dim=8))
  return result


def test_search_picks_backend_and_reports_recall():
  queries, gallery = clustered_search_data(seed=2, num_gallery=2500, num_queries=100)
  _, indices, info = directions.search(queries, gallery, 10, eval_config())
  assert info == {"search": "exact"}
  np.testing.assert_array_equal(indices, exact.exact_search(queries, gallery, 10)[1])
  _, indices, info = directions.search(queries, gallery, 10,
                                       eval_config(index_min_gallery=1000))
  assert info["search"] == "scann" and indices.shape == (100, 10)
  assert info["index"]["tuned"] and info["index"]["target_recall"] == 0.98
  assert 0.9 <= info["index"]["recall_vs_exact"] <= 1.0
  _, _, info = directions.search(queries, gallery, 10, eval_config(search="faiss_hnsw"))
  assert info["search"] == "faiss_hnsw" and info["index"]["recall_vs_exact"] >= 0.9
  with pytest.raises(ValueError, match="config.eval.search"):
    directions.search(queries, gallery, 10, eval_config(search="faiss"))


def test_evaluate_directions_reports_every_direction():
  embeddings = domain_embeddings()
  results = directions.evaluate_directions(embeddings, eval_config())
  assert results["search"] == "exact" and "scann_recall@10_vs_exact" not in results
  for query_domain, gallery_domain in domains.DIRECTIONS:
    result = results[f"{query_domain}_to_{gallery_domain}"]
    query, gallery = embeddings[query_domain], embeddings[gallery_domain]
    expected = reference_metrics(query.embeddings, query.product_ids, gallery.embeddings,
                                 gallery.product_ids, (1, 5, 10))
    for key in ("R@1", "R@5", "R@10", "median_rank", "mAP"):
      assert result[key] == pytest.approx(expected[key], abs=1e-9)
    assert result["chance_R@1"] == pytest.approx(
        metrics.chance_recall_at_1(query.product_ids, gallery.product_ids))
    assert 0.0 <= result["one_shot_accuracy"] <= 1.0
    assert result["search"] == "exact" and result["num_gallery"] == len(gallery)
  chances = [results[name]["chance_R@1"] for name in domains.DIRECTION_NAMES]
  assert results["chance_R@1"] == pytest.approx(np.mean(chances))
  assert set(results) == set(domains.DIRECTION_NAMES) | {"chance_R@1", "search"}


def test_evaluate_directions_with_scann_records_its_parameters():
  embeddings = domain_embeddings()
  results = directions.evaluate_directions(embeddings, eval_config(search="scann"))
  assert results["search"] == "scann"
  assert results["scann_recall@10_vs_exact"] == pytest.approx(1.0)  # tiny: brute force
  page_to_video = results["page_to_video"]
  assert page_to_video["median_rank"] is None and page_to_video["search"] == "scann"
  assert page_to_video["index"]["kind"] == "scann"
  assert page_to_video["index"]["parameters"]["num_leaves"] == 0
  # Brute force: the top-k equals exact search, so R@K equals the exact ranking's.
  exact_results = directions.evaluate_directions(embeddings, eval_config())
  for name in domains.DIRECTION_NAMES:
    for key in ("R@1", "R@5", "R@10", "one_shot_accuracy", "chance_R@1"):
      assert results[name][key] == pytest.approx(exact_results[name][key]), (name, key)


def test_evaluate_directions_marks_missing_domain_skipped():
  embeddings = domain_embeddings()
  del embeddings["video"]
  results = directions.evaluate_directions(embeddings, eval_config())
  for name in ("page_to_video", "video_to_page", "video_to_live", "live_to_video"):
    assert results[name] == {"skipped": "no video embeddings"}
  assert "R@1" in results["page_to_live"] and "R@1" in results["live_to_page"]


@pytest.mark.parametrize("problem,message", [
    ("nan", "live embeddings: 1 embeddings contain NaN or Inf"),
    ("inf", "live embeddings: 1 embeddings contain NaN or Inf"),
    ("empty", "live: no embeddings"),
    ("dimension", "embedding dimensions differ"),
    ("length", "live: 25 ids, 24 product ids"),
    ("tuple", "live: expected DomainEmbeddings, got tuple"),
    ("domain", "live: holds the embeddings of domain 'page'"),
    ("unknown", "unknown domains \\['audio'\\]"),
])
def test_evaluate_directions_rejects_bad_input(problem, message):
  embeddings = domain_embeddings()
  live = embeddings["live"]
  vectors = live.embeddings.copy()
  if problem == "nan":
    vectors[3, 2] = np.nan
    live = dataclasses.replace(live, embeddings=vectors)
  elif problem == "inf":
    vectors[0, 0] = np.inf
    live = dataclasses.replace(live, embeddings=vectors)
  elif problem == "empty":
    live = DomainEmbeddings("live", live.ids[:0], live.product_ids[:0], vectors[:0])
  elif problem == "dimension":
    live = dataclasses.replace(live, embeddings=vectors[:, :4])
  elif problem == "length":
    live = dataclasses.replace(live, product_ids=live.product_ids[:-1])
  elif problem == "tuple":
    live = (live.ids, live.product_ids, live.embeddings)
  elif problem == "domain":
    live = dataclasses.replace(live, domain="page")
  elif problem == "unknown":
    embeddings["audio"] = dataclasses.replace(live, domain="audio")
  embeddings["live"] = live
  with pytest.raises(ValueError, match=message):
    directions.evaluate_directions(embeddings, eval_config())
