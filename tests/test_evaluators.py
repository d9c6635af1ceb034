"""cope_jax.evaluators: evaluators built from `config.evals`, sharing one set of embeddings.

The end-to-end path (an evaluator added by one file and one config entry, run by the
trainer on its own schedule and by `cope_jax.evaluate`) is in tests/test_train.py; the
metrics' equality with compare's in tests/test_evaluate_compare_agree.py.

`python -m tests.test_evaluators KIND...` prints the default evaluators' metrics of
`clustered_domain_embeddings` with each search kind (JSON): the rerun, in a process of
its own, that the reproducibility test compares with.
"""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from cope_jax import evaluators
from cope_jax.base import result_files
from cope_jax.search import directions
from cope_jax.search import scann_index
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_KINDS = ("exact", "scann", "faiss_hnsw", "approx_topk")


def random_embeddings(seed=0, per_domain=12, products=4):
  rng = np.random.default_rng(seed)
  result = {}
  for domain in domains.NAMES:
    values = rng.normal(size=(per_domain, 8)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    result[domain] = DomainEmbeddings(
        domain, np.array([f"{domain}{i}" for i in range(per_domain)], object),
        np.array([f"p{i % products}" for i in range(per_domain)], object), values)
  return result


def clustered_domain_embeddings(domain_names=domains.NAMES[:2],
                                per_domain=scann_index.TREE_MIN_GALLERY + 100, products=400,
                                dim=32, seed=0):
  """Each domain's items [per_domain, dim] around their product's centre (unit rows),
  each product in every domain: retrieval that finds much, but not all."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(products, dim))
  result = {}
  for domain in domain_names:
    product = rng.integers(0, products, per_domain)
    values = centres[product] + 0.9 * rng.normal(size=(per_domain, dim))
    values = (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)
    result[domain] = DomainEmbeddings(
        domain, np.array([f"{domain}{i}" for i in range(per_domain)], object),
        np.array([f"p{i}" for i in product], object), values)
  return result


def search_kind_metrics(kind: str) -> dict:
  """The default evaluators' metrics of `clustered_domain_embeddings` (two domains: two
  directions) searched with `kind` (every gallery through the index)."""
  config = tiny_configs.training_config("unused", "unused")
  config.eval.update({"search": kind, "index_min_gallery": 0, "tune_queries": 200,
                      "recall_check_queries": 200, "one_shot_draws": 2,
                      "hnsw_m": 16, "hnsw_ef_construction": 64})
  data = clustered_domain_embeddings()
  source = evaluators.EmbeddingSource(data.get, domains.NAMES)
  return evaluators.run(evaluators.build(config), source)


@pytest.fixture(scope="module")
def rerun_metrics():
  """Each search kind's metrics as a separate process computes them: kind -> JSON."""
  kinds = [kind for kind in SEARCH_KINDS
           if kind != "faiss_hnsw" or importlib.util.find_spec("faiss")]
  result = subprocess.run([sys.executable, "-m", "tests.test_evaluators", *kinds],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", SEARCH_KINDS)
@pytest.mark.slow
def test_metrics_are_bit_identical_on_a_rerun(kind, rerun_metrics):
  """The retrieval and one-shot metrics of one set of embeddings, serialised as
  metrics.json is, are the same bytes in this process and in another one, for every
  search kind; ScaNN's galleries are large enough for a tree, tuned to the target."""
  if kind == "faiss_hnsw":
    pytest.importorskip("faiss")
  metrics = search_kind_metrics(kind)
  assert result_files.dumps(metrics, sort_keys=True) == rerun_metrics[kind]
  assert metrics["search"] == kind
  evaluated = [m for m in metrics.values() if isinstance(m, dict) and "R@10" in m]
  assert len(evaluated) == 2
  assert all(0.0 < m["R@10"] < 1.0 and "one_shot_accuracy" in m for m in evaluated)
  if kind == "scann":
    assert all(m["index"]["parameters"]["num_leaves"] > 0 and m["index"]["tuned"]
               for m in evaluated)


def test_default_evaluators_give_the_metrics_of_evaluate_directions():
  config = tiny_configs.training_config("unused", "unused")
  built = evaluators.build(config)
  assert [e.name for e in built] == list(config.evals)
  data = random_embeddings()
  calls = []

  def embed_domain(domain):
    calls.append(domain)
    return data[domain]

  source = evaluators.EmbeddingSource(embed_domain, domains.NAMES)
  metrics = evaluators.run(built, source)
  assert metrics == directions.evaluate_directions(data, config.eval)
  assert sorted(calls) == sorted(domains.NAMES)  # each domain embedded once, shared


def test_only_the_named_evaluators_run():
  config = tiny_configs.training_config("unused", "unused")
  source = evaluators.EmbeddingSource(random_embeddings().get, domains.NAMES)
  metrics = evaluators.run(evaluators.build(config), source, names=["one_shot"])
  first = metrics[domains.DIRECTION_NAMES[0]]
  assert "one_shot_accuracy" in first and "R@1" not in first
  config.evals.retrieval.every = 3
  assert evaluators.due(config, 6) == ["retrieval"] and evaluators.due(config, 4) == []


@pytest.mark.parametrize("entry, message", [
    ({"every": 1}, "'type' field"),
    ({"type": "no_such_evaluator"}, r"config.evals.broken.type='no_such_evaluator': no module"),
    ({"type": "cope_jax.testing.tiny_configs"}, "defines no Evaluator"),
    ({"type": "retrieval", "every": -1}, r"config.evals.broken.every must be >= 0"),
])
def test_a_bad_entry_is_named(entry, message):
  config = tiny_configs.training_config("unused", "unused")
  config.evals.broken = ml_collections.ConfigDict(entry)
  with pytest.raises(ValueError, match=message):
    evaluators.build(config)


def test_two_evaluators_disagreeing_on_a_metric_is_an_error():
  with pytest.raises(ValueError, match="set differently"):
    directions.merge_metrics({"page_to_video": {"R@1": 0.5}}, {"page_to_video": {"R@1": 0.4}})
  merged = directions.merge_metrics({"page_to_video": {"R@1": 0.5}},
                                    {"page_to_video": {"one_shot_accuracy": 0.2}, "x": 1})
  assert merged == {"page_to_video": {"R@1": 0.5, "one_shot_accuracy": 0.2}, "x": 1}


if __name__ == "__main__":
  print(json.dumps({kind: result_files.dumps(search_kind_metrics(kind), sort_keys=True)
                    for kind in sys.argv[1:]}))
