"""Tunes an index's search-time settings to reach a recall target against exact search.

The recall is recall@k against exact search (`metrics.recall_against`) on a sample of
held-out queries. Settings come from the index's grid (`Index.tuning_grid`): rows from
the most to the least thorough value of one setting (ScaNN: the reorder size), each row
ascending in the other (ScaNN: leaves to search; HNSW has one row of ef_search).

Recall grows along both axes, so the least value reaching the target in a row is at or
beyond the one of the row before: a staircase walk measures about rows + columns
settings, not their product. Of the settings found on that frontier the cheapest by the
index's cost model (`Index.search_cost`) is chosen. ScaNN's own autopilot picks a tree
from the gallery's shape alone, not from a recall target, so the sweep does the choosing.

A setting reaches the target when its mean recall on the tuning queries minus one
standard error of that mean is at least the target: picking the cheapest of many
noisy estimates would otherwise favour settings whose recall was overestimated, and
fall short of the target on other queries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import numpy as np

from cope_jax.search import metrics


@dataclasses.dataclass(frozen=True)
class Trial:
  settings: dict[str, int]
  recall: float  # mean recall@k over the tuning queries
  standard_error: float  # of that mean
  cost: float

  def reaches(self, target_recall: float) -> bool:
    return self.recall - self.standard_error >= target_recall


@dataclasses.dataclass(frozen=True)
class TuningResult:
  settings: dict[str, int]  # the chosen search settings
  recall: float  # their recall@k on the tuning queries
  reached: bool  # False: no setting reached the target; the most thorough one is chosen
  trials: tuple[Trial, ...]  # every setting measured, in order


def drop_own_rows(indices: np.ndarray, own_rows: np.ndarray, k: int) -> np.ndarray:
  """indices [Q, k+1] of queries that are gallery rows `own_rows` [Q] -> [Q, k]
  without each query's own row (or without the last column where it is absent)."""
  is_own = indices == np.asarray(own_rows)[:, None]
  order = np.argsort(is_own, axis=1, kind="stable")  # own row last, others in order
  return np.take_along_axis(indices, order, axis=1)[:, :k]


def tune_to_recall(index, queries: np.ndarray, exact_indices: np.ndarray,
                   target_recall: float, k: int, free: frozenset[str],
                   own_rows: np.ndarray | None = None) -> tuple[Any, TuningResult]:
  """The cheapest search settings of `index` reaching `target_recall`.

  Args:
    index: a built `Index`.
    queries: [Q, D] tuning queries.
    exact_indices: [Q, k] their exact top-k (without their own rows, see `own_rows`).
    target_recall: recall@k to reach, in (0, 1].
    k: neighbours compared.
    free: names of the settings to tune; the others keep the index's values.
    own_rows: [Q] when the queries are rows of the gallery: each query's own row,
      left out of its neighbours.

  Returns:
    The index with the chosen settings, and the tuning record.
  """
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
  trials: list[Trial] = []
  cache: dict[tuple, tuple[Any, Trial]] = {}

  def measure(settings):
    key = tuple(sorted(settings.items()))
    if key not in cache:
      candidate = index.with_search_parameters(**settings)
      if own_rows is None:
        found = candidate.search(queries, k)[1]
      else:
        found = drop_own_rows(candidate.search(queries, k + 1)[1], own_rows, k)
      recalls = metrics.recall_per_query(exact_indices, found)
      trial = Trial(dict(settings), float(np.mean(recalls)),
                    float(np.std(recalls) / np.sqrt(len(recalls))), candidate.search_cost())
      trials.append(trial)
      cache[key] = candidate, trial
    return cache[key]

  grid = index.tuning_grid(k, free)
  frontier = []
  position = 0
  for row in grid:
    while position < len(row):
      candidate, trial = measure(row[position])
      if trial.reaches(target_recall):
        frontier.append((trial.cost, candidate, trial))
        break
      position += 1
    else:
      break  # no setting of this row reaches the target: less thorough rows neither
  if frontier:
    _, chosen, trial = min(frontier, key=lambda entry: entry[0])
    reached = True
  else:
    chosen, trial = measure(grid[0][-1])
    reached = False
    logging.warning("no search setting reaches recall@%d %.4f (best %.4f at %s)", k,
                    target_recall, trial.recall, trial.settings)
  return chosen, TuningResult(settings=trial.settings, recall=trial.recall, reached=reached,
                              trials=tuple(trials))
