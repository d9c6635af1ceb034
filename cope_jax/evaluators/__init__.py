"""Evaluators built from the config, as big_vision builds its evaluators.

  config.evals.<name> = ml_collections.ConfigDict({"type": TYPE, "every": N, ...})

TYPE names the module that defines the evaluator: a module of this package
(`retrieval`, `one_shot`) or a full module path (`my_project.evaluators.per_category`).
The module defines `Evaluator(name, entry, eval_config)`, constructed from the entry (its
own fields beside `type` and `every`) and the shared evaluation settings `config.eval`
(batch size, search kind, index, draws, ...), with one method

  run(embeddings: EmbeddingSource) -> dict    metrics merged into metrics.json

An evaluator is handed the embeddings of the evaluation split (computed once per
checkpoint and shared by every evaluator) and never sees the trainer, the model or the
data pipeline. `every`: steps between runs during training (0: only when
`python -m cope_jax.evaluate` runs, and after training). Adding an evaluator is one new
module and one config entry: nothing here or in the trainer names it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ml_collections

from cope_jax.search import directions
from cope_jax.search.embeddings import DomainEmbeddings

# Fields of a `config.evals` entry that every evaluator has; the rest are its own.
COMMON_FIELDS = ("type", "every")


class EmbeddingSource:
  """The evaluation split's embeddings, per domain, computed on first use and kept.

  `embed_domain(domain) -> DomainEmbeddings | None` (None: the split has no records of
  that domain) is the embedding function; evaluators read through `get` and `all`.
  """

  def __init__(self, embed_domain: Callable[[str], DomainEmbeddings | None],
               domain_names: Sequence[str]):
    self._embed_domain = embed_domain
    self._domain_names = tuple(domain_names)
    self._cache: dict[str, DomainEmbeddings | None] = {}

  def get(self, domain: str) -> DomainEmbeddings | None:
    if domain not in self._cache:
      self._cache[domain] = self._embed_domain(domain)
    return self._cache[domain]

  def all(self) -> dict[str, DomainEmbeddings]:
    """Every domain that has records: name -> embeddings."""
    found = {name: self.get(name) for name in self._domain_names}
    return {name: value for name, value in found.items() if value is not None}

  def computed(self) -> dict[str, DomainEmbeddings]:
    """The domains embedded so far (for the report)."""
    return {name: value for name, value in self._cache.items() if value is not None}


class Evaluator(Protocol):
  """What a module's `Evaluator(name, entry, eval_config)` constructs."""

  def run(self, embeddings: EmbeddingSource) -> dict[str, Any]:
    ...


class DirectionsEvaluator:
  """An evaluator computing a metric per retrieval direction from every domain's
  embeddings and the shared settings: `directions_fn(embeddings_by_domain, eval_config)`
  (a function of `cope_jax.search.directions`). It has no fields of its own."""
  directions_fn: Callable[..., dict[str, Any]]

  def __init__(self, name: str, entry, eval_config):
    del name, entry
    self._eval_config = eval_config

  def run(self, embeddings: EmbeddingSource) -> dict[str, Any]:
    return self.directions_fn(embeddings.all(), self._eval_config)


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """An evaluator and its schedule, as built from its config entry."""
  name: str
  every: int
  evaluator: Any


def module_name(evaluator_type: str) -> str:
  """'retrieval' -> 'cope_jax.evaluators.retrieval'; a dotted path stays as it is."""
  return evaluator_type if "." in evaluator_type else f"{__name__}.{evaluator_type}"


def build(config: ml_collections.ConfigDict) -> list[Scheduled]:
  """The evaluators of `config.evals`, in the config's order. ValueError naming the entry
  for a missing `type`, a module that cannot be imported or one without `Evaluator`."""
  built = []
  for name, entry in config.evals.items():
    where = f"config.evals.{name}"
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)) or "type" not in entry:
      raise ValueError(f"{where}: expected a dict with a 'type' field (the evaluator's "
                       "module), e.g. dict(type='retrieval', every=0)")
    try:
      module = importlib.import_module(module_name(entry["type"]))
    except ModuleNotFoundError as error:
      raise ValueError(f"{where}.type={entry['type']!r}: no module "
                       f"{module_name(entry['type'])!r} ({error})") from None
    if not hasattr(module, "Evaluator"):
      raise ValueError(f"{where}.type={entry['type']!r}: module {module.__name__} defines "
                       "no Evaluator")
    every = int(entry.get("every", 0))
    if every < 0:
      raise ValueError(f"{where}.every must be >= 0 (0: not during training), got {every}")
    built.append(Scheduled(name, every, module.Evaluator(name, entry, config.eval)))
  return built


def due(config: ml_collections.ConfigDict, step: int) -> list[str]:
  """Names of the evaluators whose `every` divides `step` (read from the config alone:
  the trainer schedules evaluation without importing an evaluator)."""
  return [name for name, entry in config.evals.items()
          if int(entry.get("every", 0)) and step % int(entry["every"]) == 0]


def run(evaluators: Sequence[Scheduled], embeddings: EmbeddingSource,
        names: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the evaluators (those named in `names`, default all) on one set of embeddings
  and merges their metrics (a direction's entries from several evaluators in one dict)."""
  chosen = [e for e in evaluators if names is None or e.name in names]
  return directions.merge_metrics(*(e.evaluator.run(embeddings) for e in chosen))
