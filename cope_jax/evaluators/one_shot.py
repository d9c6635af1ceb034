"""One-shot classification in every direction: one gallery item per product is its
prototype (chosen by id, `config.eval.one_shot_draws` draws), queries are classified to
the nearest prototype.

  config.evals.one_shot = dict(type="one_shot", every=0)

Writes, per direction, `one_shot_accuracy`, `one_shot_std` and `one_shot_num_classes`.
"""

from cope_jax import evaluators
from cope_jax.search import directions


class Evaluator(evaluators.DirectionsEvaluator):
  directions_fn = staticmethod(directions.one_shot_directions)
