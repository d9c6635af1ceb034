"""One checkpoint, one set of numbers: `evaluate` and `compare` score the same embeddings the
same way.

A tiny model is trained; `cope_jax.evaluate` writes metrics.json; the same checkpoint is
exported (Parquet, and the release's text format) and `cope_jax.compare --reference` scores
each export. Every retrieval and one-shot metric of every direction must be equal, exactly
(no tolerance): the export holds the embeddings evaluate scored, bit for bit (rows already
of unit length are not normalised again), and one-shot prototypes are chosen by id, so row
order does not matter. The index kinds of the one index table are accepted by the config
check: `eval.search=faiss_hnsw` evaluates end to end.
"""

import json
import os

import pytest

from cope_jax import compare
from cope_jax import config_checks
from cope_jax import evaluate
from cope_jax import export
from cope_jax import train
from cope_jax.search import index as search_index
from cope_jax.base import domains
from cope_jax.testing import tiny_configs

pytestmark = pytest.mark.slow  # every test here needs a model trained or exported first

# The metrics metrics.json and compare.json both report per direction.
SHARED_METRICS = ("R@1", "R@5", "R@10", "median_rank", "mAP", "one_shot_accuracy")


@pytest.fixture(scope="module")
def trained(tiny_prepared_dir, tiny_rope_dir, tmp_path_factory):
  """(config, workdir, metrics.json) of a tiny model trained for 2 steps, then evaluated."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir, num_steps=2)
  train.train_and_evaluate(config, workdir)
  evaluate.run(config, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    return config, workdir, json.load(f)


@pytest.mark.parametrize("output_format", export.FORMATS)
def test_compare_on_the_export_equals_evaluate_exactly(trained, tiny_rope_dir, tmp_path,
                                                       output_format):
  config, workdir, evaluated = trained
  out = str(tmp_path / "export")
  export.export_embeddings(config, workdir, out, split=config.data.eval_split,
                           output_format=output_format)
  compare.compare(out, tiny_rope_dir, config.data.eval_split, out_dir=str(tmp_path / "cmp"))
  with open(tmp_path / "cmp" / compare.JSON_FILE) as f:
    compared = json.load(f)["metrics"]["reference"]
  checked = 0
  for direction in domains.DIRECTION_NAMES:
    assert "skipped" not in evaluated[direction], direction
    for metric in SHARED_METRICS:
      assert compared[direction][metric] == evaluated[direction][metric], (direction, metric)
      checked += 1
  assert checked == len(domains.DIRECTION_NAMES) * len(SHARED_METRICS)
  # Not vacuous: the model ranks some queries right and some wrong.
  recalls = [evaluated[direction]["R@1"] for direction in domains.DIRECTION_NAMES]
  assert any(0.0 < value < 1.0 for value in recalls), recalls


def test_every_index_kind_passes_the_config_check():
  config = tiny_configs.training_config("unused", "unused")
  for kind in ("auto", "exact", *search_index.INDEX_KINDS):
    config.eval.search = kind
    config_checks.check_config(config, need_data=False)
  config.eval.search = "annoy"
  with pytest.raises(config_checks.ConfigError, match="eval.search"):
    config_checks.check_config(config, need_data=False)


def test_faiss_hnsw_search_evaluates_end_to_end(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.eval.search = "faiss_hnsw"  # as --config.eval.search=faiss_hnsw
  config_checks.check_config(config)
  metrics = evaluate.run(config, workdir)
  assert metrics["search"] == "faiss_hnsw"
  for direction in domains.DIRECTION_NAMES:
    assert metrics[direction]["search"] == "faiss_hnsw"
    assert 0.0 <= metrics[direction]["R@1"] <= metrics[direction]["R@10"] <= 1.0
  assert 0.0 <= metrics["faiss_hnsw_recall@10_vs_exact"] <= 1.0
