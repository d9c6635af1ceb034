"""Tests for the search indices: ScaNN and faiss HNSW behind the `Index` protocol, their
folders, and the tuning to a recall target. Recall is checked against a NumPy
brute-force top-k written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cope_jax.search import approx_topk
from cope_jax.search import directions
from cope_jax.search import exact
from cope_jax.search import faiss_index
from cope_jax.search import index as search_index
from cope_jax.search import metrics
from cope_jax.search import scann_index
from cope_jax.search import tuning
from cope_jax.testing.search_data import clustered_search_data
from cope_jax.testing.search_data import eval_config
from cope_jax.testing.search_data import integer_embeddings
from cope_jax.testing.search_data import unit_embeddings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("scann", "faiss_hnsw")
# A tuned index's recall on all queries may fall this far below the target reached on
# the (smaller) tuning sample.
GENERALISATION_SLACK = 0.01


def numpy_top_k(queries, gallery, k):
  """Exact top-k indices [Q, k] by float64 inner product (ties: lower index first)."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def numpy_recall(reference, found):
  return float(np.mean([np.isin(ref, row).mean() for ref, row in zip(reference, found)]))


# ---------------------------------------------------------------------------
# Both kinds through the protocol.


@pytest.mark.parametrize("kind", KINDS)
def test_tuned_index_reaches_the_target_recall(kind):
  queries, gallery = clustered_search_data()
  index, info = search_index.build_index(kind, gallery, eval_config(), 10, queries=queries)
  assert info["kind"] == kind and info["tuned"] and info["reached_target"]
  assert info["tuning_recall"] >= 0.98
  assert info["tuning_queries"] == info["recall_queries"] == 150  # 300 queries shared out
  _, found = index.search(queries, 10)
  assert found.shape == (300, 10) and found.dtype == np.int32
  recall = numpy_recall(numpy_top_k(queries, gallery, 10), found)
  assert recall >= 0.98 - GENERALISATION_SLACK
  if kind == "scann":
    assert 0 < info["parameters"]["leaves_to_search"] < info["parameters"]["num_leaves"]


def test_tuned_scann_index_is_the_same_every_build_and_meets_the_target_held_out():
  """Five builds over one gallery: the same tree, settings, tuning record and search
  results each time; the target is met on queries that took no part in the tuning."""
  queries, gallery, held_out = clustered_search_data(num_held_out=300)
  config = eval_config()
  builds = [search_index.build_index("scann", gallery, config, 10, queries=queries)
            for _ in range(5)]
  first_index, first_info = builds[0]
  assert first_info["tuned"] and first_info["parameters"]["num_leaves"] > 0  # a tree
  first_found = first_index.search(held_out, 10)
  for index, info in builds[1:]:
    assert info == first_info
    found = index.search(held_out, 10)
    np.testing.assert_array_equal(found[1], first_found[1])
    np.testing.assert_array_equal(found[0], first_found[0])
  # The recall check's own held-out queries (half of `queries`, not tuned on) ...
  assert first_info["met_target"] and first_info["recall_shortfall"] == 0.0
  assert first_info["recall_vs_exact"] >= config.target_recall
  # ... and queries the build never saw.
  held_out_recall = numpy_recall(numpy_top_k(held_out, gallery, 10), first_found[1])
  assert held_out_recall >= config.target_recall


def test_a_missed_target_says_by_how_much():
  queries, gallery = clustered_search_data(num_gallery=3000, num_queries=100)
  # Every query checks the recall; hand-set settings searching one leaf miss the target.
  config = eval_config(tune_queries=0, recall_check_queries=100,
                       scann_num_leaves_to_search=1, scann_reorder=10)
  index, info = search_index.build_index("scann", gallery, config, 10, queries=queries)
  assert not info["tuned"] and info["recall_queries"] == 100
  recall = numpy_recall(numpy_top_k(queries, gallery, 10), index.search(queries, 10)[1])
  assert recall < 0.9
  assert info["recall_vs_exact"] == pytest.approx(recall, abs=0.01)
  assert not info["met_target"]
  assert info["recall_shortfall"] == pytest.approx(0.98 - info["recall_vs_exact"], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_index_folder_round_trip_survives_a_move(kind, tmp_path):
  queries, gallery = clustered_search_data(seed=1, num_gallery=3000, num_queries=50)
  index, _ = search_index.build_index(kind, gallery, eval_config(), 10, queries=queries)
  search_index.save_index(index, str(tmp_path / "index"))
  # Asset paths are relative: the folder can be moved or copied.
  os.rename(tmp_path / "index", tmp_path / "moved")
  loaded = search_index.load_index(str(tmp_path / "moved"))
  assert type(loaded) is type(index) and loaded.parameters == index.parameters
  assert (len(loaded), loaded.dim) == (3000, 64)
  record = json.loads((tmp_path / "moved" / search_index.INDEX_FILE).read_text())
  assert record["kind"] == kind and record["parameters"] == search_index.describe(
      index)["parameters"]
  before, after = index.search(queries, 10), loaded.search(queries, 10)
  np.testing.assert_array_equal(after[1], before[1])
  np.testing.assert_array_equal(after[0], before[0])


def test_unknown_kind_is_refused():
  gallery = unit_embeddings(np.random.default_rng(0), 10)
  with pytest.raises(ValueError, match="unknown index kind 'annoy'.*scann, faiss_hnsw"):
    search_index.build_index("annoy", gallery, eval_config(), 5)


def test_load_index_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="index.json missing"):
    search_index.load_index(str(tmp_path))
  (tmp_path / search_index.INDEX_FILE).write_text(
      json.dumps({"kind": "annoy", "parameters": {}, "size": 1, "dim": 2}))
  with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
    search_index.load_index(str(tmp_path))
  (tmp_path / search_index.INDEX_FILE).write_text(
      json.dumps({"kind": "scann", "parameters": {"leaves": 3}, "size": 1, "dim": 2}))
  with pytest.raises(ValueError, match="do not fit scann"):
    search_index.load_index(str(tmp_path))
  (tmp_path / search_index.INDEX_FILE).write_text(json.dumps(
      {"kind": "scann", "parameters": {"num_leaves": 0, "leaves_to_search": 0, "reorder": 0,
                                       "training_sample_size": 0, "soar_lambda": 0.0},
       "size": 1, "dim": 2}))
  with pytest.raises(FileNotFoundError, match="no ScaNN index"):
    search_index.load_index(str(tmp_path))


def test_missing_faiss_gives_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
  gallery = unit_embeddings(np.random.default_rng(0), 50)
  with pytest.raises(ImportError, match="faiss_hnsw.*requirements-search.txt"):
    search_index.build_index("faiss_hnsw", gallery, eval_config(), 5)
  # ScaNN does not need it.
  index, _ = search_index.build_index("scann", gallery, eval_config(), 5)
  assert len(index) == 50


def test_faiss_is_imported_only_when_selected():
  code = ("import sys; from cope_jax.search import index, directions; "
          "from cope_jax import export, evaluate; "
          "assert 'faiss' not in sys.modules, 'faiss imported'; "
          "assert 'scann' not in sys.modules, 'scann imported'")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------
# Tuning.


def test_lower_target_picks_a_cheaper_setting():
  queries, gallery = clustered_search_data()
  reference = numpy_top_k(queries, gallery, 10)
  chosen = {}
  for target in (0.98, 0.8):
    index, info = search_index.build_index(
        "scann", gallery, eval_config(target_recall=target), 10, queries=queries)
    assert info["reached_target"] and info["tuning_recall"] >= target
    recall = numpy_recall(reference, index.search(queries, 10)[1])
    assert recall >= target - GENERALISATION_SLACK
    chosen[target] = (index.search_cost(), index.parameters, recall)
  assert chosen[0.8][0] < chosen[0.98][0]
  assert chosen[0.8][1].leaves_to_search <= chosen[0.98][1].leaves_to_search
  assert chosen[0.8][2] < chosen[0.98][2]


def test_tuning_walks_a_staircase_not_the_whole_grid():
  queries, gallery = clustered_search_data()
  index = scann_index.ScannIndex.build(
      gallery, scann_index.ScannIndex.parameters_from_config(eval_config(), len(gallery))[0])
  free = frozenset({"leaves_to_search", "reorder"})
  grid = index.tuning_grid(10, free)
  exact_indices = exact.exact_search(queries, gallery, 10)[1]
  tuned, result = tuning.tune_to_recall(index, queries, exact_indices, 0.95, 10, free)
  assert len(result.trials) <= len(grid) + len(grid[0])
  assert result.reached and result.recall >= 0.95
  assert tuned.parameters.leaves_to_search == result.settings["leaves_to_search"]
  # Every measured setting cheaper than the chosen one misses the target.
  chosen_cost = tuned.search_cost()
  assert all(not t.reaches(0.95) for t in result.trials if t.cost < chosen_cost)
  # Reaching means that the mean recall over the queries plus one that finds none of
  # its neighbours, less two standard errors of the mean, reaches the target.
  chosen = next(t for t in result.trials if t.settings == result.settings)
  per_query = metrics.recall_per_query(exact_indices, tuned.search(queries, 10)[1])
  assert chosen.recall == pytest.approx(per_query.mean())
  assert chosen.standard_error == pytest.approx(per_query.std() / np.sqrt(len(queries)))
  bound = np.append(per_query, 0.0).mean() - 2 * per_query.std() / np.sqrt(len(queries))
  assert chosen.recall_bound == pytest.approx(bound)
  assert result.recall_bound == chosen.recall_bound >= 0.95


def test_unreachable_target_keeps_the_most_thorough_setting():
  queries, gallery = clustered_search_data(num_gallery=3000, num_queries=100)
  config = eval_config(scann_num_leaves_to_search=1)  # one leaf: recall stays low
  index, info = search_index.build_index("scann", gallery, config, 10, queries=queries)
  assert info["tuned"] and not info["reached_target"] and info["tuning_recall"] < 0.98
  assert index.parameters.leaves_to_search == 1
  assert index.parameters.reorder == 10 * 64  # the most thorough reorder of the grid


def test_soar_index_reaches_the_target_and_round_trips(tmp_path):
  queries, gallery = clustered_search_data(num_gallery=3000, num_queries=100)
  index, info = search_index.build_index("scann", gallery, eval_config(scann_soar_lambda=1.5),
                                         10, queries=queries)
  assert info["parameters"]["soar_lambda"] == 1.5 and info["reached_target"]
  assert numpy_recall(numpy_top_k(queries, gallery, 10),
                      index.search(queries, 10)[1]) >= 0.98 - GENERALISATION_SLACK
  search_index.save_index(index, str(tmp_path / "soar"))
  loaded = search_index.load_index(str(tmp_path / "soar"))
  assert loaded.parameters == index.parameters
  np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


def test_hand_set_parameters_skip_tuning():
  queries, gallery = clustered_search_data(num_gallery=3000, num_queries=100)
  config = eval_config(scann_num_leaves=40, scann_num_leaves_to_search=7, scann_reorder=30)
  index, info = search_index.build_index("scann", gallery, config, 10, queries=queries)
  assert not info["tuned"] and "tuning_recall" not in info
  assert (index.parameters.num_leaves, index.parameters.leaves_to_search,
          index.parameters.reorder) == (40, 7, 30)
  _, found = index.search(queries, 10)
  assert info["recall_vs_exact"] == pytest.approx(
      numpy_recall(numpy_top_k(queries, gallery, 10), found), abs=0.05)
  hnsw, info = search_index.build_index("faiss_hnsw", gallery, eval_config(hnsw_ef_search=40),
                                        10, queries=queries)
  assert not info["tuned"] and hnsw.parameters.ef_search == 40


def test_gallery_rows_as_held_out_queries_leave_their_own_row_out():
  _, gallery = clustered_search_data(num_gallery=3000)
  index, info = search_index.build_index("scann", gallery, eval_config(), 10)
  assert info["query_source"].startswith("gallery rows") and info["reached_target"]
  # Independently: rows as queries, own row removed from both top-10 lists.
  rows = np.arange(0, 3000, 7)
  reference = numpy_top_k(gallery[rows], gallery, 11)
  reference = np.array([[i for i in ref if i != row][:10] for ref, row in zip(reference, rows)])
  found = index.search(gallery[rows], 11)[1]
  found = np.array([[i for i in f if i != row][:10] for f, row in zip(found, rows)])
  assert numpy_recall(reference, found) >= 0.98 - GENERALISATION_SLACK


def test_drop_own_rows():
  indices = np.array([[4, 1, 2], [0, 5, 3], [7, 8, 9]])
  np.testing.assert_array_equal(tuning.drop_own_rows(indices, np.array([4, 5, 1]), 2),
                                [[1, 2], [0, 3], [7, 8]])


# ---------------------------------------------------------------------------
# ScaNN details.


def test_small_gallery_scann_is_exact_and_pads_short_results():
  rng = np.random.default_rng(6)
  queries, gallery = unit_embeddings(rng, 20), unit_embeddings(rng, 7)
  index, info = search_index.build_index("scann", gallery, eval_config(), 10, queries=queries)
  assert index.parameters.num_leaves == 0 and not info["tuned"]
  assert info["recall_vs_exact"] == 1.0
  scores, indices = index.search(queries, 5)
  exact_scores, exact_indices = exact.exact_search(queries, gallery, 5)
  np.testing.assert_array_equal(indices, exact_indices)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


def test_scann_search_marks_neighbours_beyond_the_gallery():
  rng = np.random.default_rng(9)
  queries, gallery = unit_embeddings(rng, 4), unit_embeddings(rng, 3)
  index, _ = search_index.build_index("scann", gallery, eval_config(), 5)
  scores, indices = index.search(queries, 5)
  np.testing.assert_array_equal(indices[:, 3:], -1)
  assert np.all(scores[:, 3:] == -np.inf)
  np.testing.assert_array_equal(np.sort(indices[:, :3], axis=1), [[0, 1, 2]] * 4)


def test_scann_tree_threshold_and_leaves():
  config = eval_config()
  small, free = scann_index.ScannIndex.parameters_from_config(
      config, scann_index.TREE_MIN_GALLERY - 1)
  assert small.num_leaves == 0 and not free
  large, free = scann_index.ScannIndex.parameters_from_config(config, 1_000_000)
  assert large.num_leaves == 2000 and free == {"leaves_to_search", "reorder"}
  assert large.training_sample_size == scann_index.TRAINING_SAMPLE_SIZE


def test_hnsw_returns_minus_one_beyond_the_gallery():
  rng = np.random.default_rng(9)
  queries, gallery = unit_embeddings(rng, 4), unit_embeddings(rng, 3)
  index, _ = search_index.build_index("faiss_hnsw", gallery, eval_config(), 5)
  scores, indices = index.search(queries, 5)
  np.testing.assert_array_equal(indices[:, 3:], -1)
  assert np.all(scores[:, 3:] == -np.inf)
  np.testing.assert_array_equal(indices[:, :3], exact.exact_search(queries, gallery, 3)[1])
  assert metrics.recall_against(exact.exact_search(queries, gallery, 3)[1], indices) == 1.0
  assert faiss_index.KIND in search_index.INDEX_KINDS


# ---------------------------------------------------------------------------
# approx_topk: jax.lax.approx_max_k over the gallery split across the devices.

@pytest.mark.parametrize("k", [1, 10, 200])
def test_approx_topk_equals_exact_search_on_cpu(k):
  """On CPU approx_max_k is exact, so the sharded search returns exact search's lists
  (k=200 is more than one device's 126 rows)."""
  rng = np.random.default_rng(k)
  gallery, queries = unit_embeddings(rng, 1003), unit_embeddings(rng, 70)
  index = approx_topk.ApproxTopKIndex.build(
      gallery, approx_topk.ApproxTopKParameters(recall_target=0.9))
  assert len(index.gallery.sharding.device_set) == 8  # the fake CPU devices of conftest
  assert index.gallery.shape == (1008, 16)  # padded to a multiple of 8, padding masked
  scores, found = index.search(queries, k)
  exact_scores, exact_found = exact.exact_search(queries, gallery, k)
  np.testing.assert_array_equal(found, exact_found)
  np.testing.assert_array_equal(found, numpy_top_k(queries, gallery, k))
  np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-6)
  assert found.dtype == np.int32 and scores.dtype == np.float32


def test_approx_topk_keeps_exact_search_tie_order():
  rng = np.random.default_rng(0)
  gallery, queries = integer_embeddings(rng, 301), integer_embeddings(rng, 40)
  index = approx_topk.ApproxTopKIndex.build(
      gallery, approx_topk.ApproxTopKParameters(recall_target=0.95))
  np.testing.assert_array_equal(index.search(queries, 25)[1],
                                exact.exact_search(queries, gallery, 25)[1])


def test_approx_topk_through_the_index_table(tmp_path):
  rng = np.random.default_rng(1)
  gallery, queries = unit_embeddings(rng, 500), unit_embeddings(rng, 60)
  config = eval_config(search="approx_topk", target_recall=0.9)
  index, info = search_index.build_index("approx_topk", gallery, config, 10, queries=queries)
  assert info["kind"] == "approx_topk" and not info["tuned"]
  assert info["parameters"] == {"recall_target": 0.9}  # the config's target, as passed
  assert info["recall_vs_exact"] == 1.0
  search_index.save_index(index, str(tmp_path / "index"))
  loaded = search_index.load_index(str(tmp_path / "index"))
  np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
  _, _, search_info = directions.search(queries, gallery, 10, config)
  assert search_info["search"] == "approx_topk"


def test_auto_search_takes_approx_topk_on_tpu_only():
  config = eval_config(search="auto", index="scann", index_min_gallery=100)
  assert search_index.auto_index_kind(config, "tpu") == "approx_topk"
  assert search_index.auto_index_kind(config, "cpu") == "scann"
  assert search_index.auto_index_kind(config, "gpu") == "scann"
  assert directions.choose_search(1000, config) == "scann"  # this run's backend is the CPU
  assert directions.choose_search(10, config) == "exact"
