"""One-shot classification in every direction: one gallery item per product is its
prototype (chosen by id, `config.eval.one_shot_draws` draws), queries are classified to
the nearest prototype.

  config.evals.one_shot = dict(type="one_shot", every=0)

Writes, per direction, `one_shot_accuracy`, `one_shot_std` and `one_shot_num_classes`.
"""

from __future__ import annotations

from typing import Any

from cope_jax.search import directions


class Evaluator:

  def __init__(self, name: str, entry, eval_config):
    del name, entry  # no fields of its own beside type and every
    self._eval_config = eval_config

  def run(self, embeddings) -> dict[str, Any]:
    return directions.one_shot_directions(embeddings.all(), self._eval_config)
