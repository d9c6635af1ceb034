"""An evaluator written outside the library, as a user would add one: this file and one
config entry, nothing in the trainer or in `cope_jax.evaluators`.

  config.evals.video_spread = dict(type="tests.example_evaluator", every=2, domain="video")

It reports how spread out one domain's embeddings are: the mean cosine between each
embedding and the domain's mean direction (1: all the same; near 0: spread out).
"""

import numpy as np


class Evaluator:

  def __init__(self, name, entry, eval_config):
    del eval_config  # needs none of the shared settings
    self._name = name
    self._domain = entry["domain"]

  def run(self, embeddings):
    values = embeddings.get(self._domain).embeddings.astype(np.float64)
    mean = values.mean(axis=0)
    mean /= np.linalg.norm(mean)
    return {self._name: {"domain": self._domain, "count": int(len(values)),
                         "mean_cosine_to_centre": float(np.mean(values @ mean))}}
