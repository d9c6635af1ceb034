"""cope_jax.evaluators: evaluators built from `config.evals`, sharing one set of embeddings.

The end-to-end path (an evaluator added by one file and one config entry, run by the
trainer on its own schedule and by `cope_jax.evaluate`) is in tests/test_train.py; the
metrics' equality with compare's in tests/test_evaluate_compare_agree.py.
"""

import ml_collections
import numpy as np
import pytest

from cope_jax import evaluators
from cope_jax.search import directions
from cope_jax.search.embeddings import DomainEmbeddings
from data_pipelines import domains
from tests import tiny_configs


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
    ({"type": "tests.tiny_configs"}, "defines no Evaluator"),
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
