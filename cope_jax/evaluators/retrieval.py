"""Cross-domain retrieval in every direction: R@K, median rank, mAP, chance level, and the
index's recall against exact search when one is used (`config.eval.search`).

  config.evals.retrieval = dict(type="retrieval", every=0)

Writes, per direction (`page_to_video`, ...), the metrics of
`search.directions.retrieval_direction`, and at the top level `chance_R@1`, `search` and,
with an index, `<kind>_recall@10_vs_exact`.
"""

from __future__ import annotations

from typing import Any

from cope_jax.search import directions


class Evaluator:

  def __init__(self, name: str, entry, eval_config):
    del name, entry  # no fields of its own beside type and every
    self._eval_config = eval_config

  def run(self, embeddings) -> dict[str, Any]:
    return directions.retrieval_directions(embeddings.all(), self._eval_config)
