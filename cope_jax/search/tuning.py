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

A setting reaches the target when a lower bound of its recall does: the mean recall
over the tuning queries with one more query counted as finding none of its neighbours,
less two standard errors of the mean. Picking the cheapest of many noisy estimates
favours settings whose recall was overestimated; and recall is heavy-tailed (most
queries find all their neighbours, a few find almost none), so a small sample without
those few has too small a standard error: the extra failing query makes such a sample
count for less. Measured on 80 clustered galleries of 4000 items, tuned on 150
queries and checked on 150 others (`benchmarks/search_reproducibility.py --part
tuning`), the held-out recall fell short of the target for 3 galleries at target 0.95
and 1 at 0.98 (worst 0.940 and 0.971), against 12 and 11 (worst 0.927 and 0.959) with
the mean less one standard error as the bound; the chosen settings read 16% and 19%
more bytes per query. The recall check (`index.tune_index`) reports what it measures
on its held-out queries, and by how much that falls short of the target.

The walk is deterministic: one built index, one set of queries and one target always
choose the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import numpy as np

from cope_jax.search import metrics


@dataclasses.dataclass(frozen=True)
class RecallBound:
  """The lower bound of a setting's recall that must reach the target: the mean over
  the tuning queries with `unseen_failing_queries` more queries counted as finding none
  of their neighbours, less `standard_errors` standard errors of the mean."""
  standard_errors: float = 2.0
  unseen_failing_queries: int = 1

  def __call__(self, per_query_recall: np.ndarray) -> float:
    """per_query_recall [Q] -> the bound."""
    num_queries = len(per_query_recall)
    pessimistic_mean = np.sum(per_query_recall) / (num_queries + self.unseen_failing_queries)
    standard_error = np.std(per_query_recall) / np.sqrt(num_queries)
    return float(pessimistic_mean - self.standard_errors * standard_error)


@dataclasses.dataclass(frozen=True)
class Trial:
  settings: dict[str, int]
  recall: float  # mean recall@k over the tuning queries
  standard_error: float  # of that mean
  recall_bound: float  # the lower bound compared with the target (`RecallBound`)
  cost: float

  def reaches(self, target_recall: float) -> bool:
    return self.recall_bound >= target_recall


@dataclasses.dataclass(frozen=True)
class TuningResult:
  settings: dict[str, int]  # the chosen search settings
  recall: float  # their recall@k on the tuning queries
  recall_bound: float  # its lower bound compared with the target (`RecallBound`)
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
                   own_rows: np.ndarray | None = None,
                   bound: RecallBound = RecallBound()) -> tuple[Any, TuningResult]:
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
    bound: the lower bound of a setting's recall that must reach the target.

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
                    float(np.std(recalls) / np.sqrt(len(recalls))), bound(recalls),
                    candidate.search_cost())
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
  return chosen, TuningResult(settings=trial.settings, recall=trial.recall,
                              recall_bound=trial.recall_bound, reached=reached,
                              trials=tuple(trials))
