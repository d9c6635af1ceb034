"""Cross-domain retrieval in every direction: R@K, median rank, mAP, chance level, and the
index's recall against exact search when one is used (`config.eval.search`).

  config.evals.retrieval = dict(type="retrieval", every=0)

Writes, per direction (`page_to_video`, ...), the metrics of
`search.directions.retrieval_direction`, and at the top level `chance_R@1`, `search` and,
with an index, `<kind>_recall@10_vs_exact`.
"""

from cope_jax import evaluators
from cope_jax.search import directions


class Evaluator(evaluators.DirectionsEvaluator):
  directions_fn = staticmethod(directions.retrieval_directions)
