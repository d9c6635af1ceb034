"""Cross-domain retrieval and one-shot metrics for every direction of the domain registry.

A direction (`cope_jax.base.domains.DIRECTIONS`) searches one domain's gallery with
another domain's queries. Small galleries are ranked exactly (`metrics.retrieval_metrics`:
R@K, median rank, mAP); from `config.eval.index_min_gallery` items on (search "auto")
an index of kind `config.eval.index` returns the top-k, tuned to
`config.eval.target_recall`, and R@K comes from its top-k list, with the index's
recall@10 against exact search on held-out queries alongside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cope_jax.search import exact
from cope_jax.search import index as search_index
from cope_jax.search import metrics
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.search.embeddings import check_embeddings
from cope_jax.base import domains

ONE_SHOT_SEED = 0
RECALL_K = 10  # an index's recall is tuned and reported at recall@10 against exact search


@dataclasses.dataclass(frozen=True)
class ExactSearch:
  """The evaluation settings of exact ranking: what the directions read of `config.eval`
  when nothing is searched through an index (`cope_jax.compare` scores both sides so)."""
  one_shot_draws: int = 5
  search: str = "exact"


def choose_search(num_gallery: int, eval_config) -> str:
  """'exact' or an index kind, from `eval_config.search`.

  "auto": exact below `eval_config.index_min_gallery` items, else `eval_config.index`
  (`approx_topk` on TPU: `index.auto_index_kind`).
  """
  mode = eval_config.search
  if mode == "auto":
    mode = ("exact" if num_gallery < eval_config.index_min_gallery
            else search_index.auto_index_kind(eval_config))
  if mode != "exact" and mode not in search_index.INDEX_KINDS:
    raise ValueError(f"config.eval.search must be auto, exact or an index kind "
                     f"({', '.join(search_index.INDEX_KINDS)}), got {mode!r}")
  return mode


def search(queries, gallery, k: int, eval_config) -> tuple[np.ndarray, np.ndarray, dict]:
  """Top-k search, exact or through an index, as `eval_config.search` says.

  Args:
    queries: [Q, D]; gallery: [G, D]. k is capped at G.
    eval_config: `config.eval`.

  Returns:
    scores [Q, k'], indices [Q, k'] (k' = min(k, G)) and {'search': 'exact' | kind}
    plus, for an index, 'index': what `index.build_index` reports (parameters,
    tuning, recall against exact search).
  """
  queries = check_embeddings("queries", queries)
  gallery = check_embeddings("gallery", gallery, dim=queries.shape[1])
  if gallery.shape[0] == 0:
    raise ValueError("gallery: cannot search an empty gallery")
  k = min(k, gallery.shape[0])
  mode = choose_search(gallery.shape[0], eval_config)
  if mode == "exact":
    scores, indices = exact.exact_search(queries, gallery, k)
    return scores, indices, {"search": "exact"}
  index, info = search_index.build_index(mode, gallery, eval_config, RECALL_K, queries=queries)
  scores, indices = index.search(queries, k)
  return scores, indices, {"search": mode, "index": info}


def retrieval_direction(query: DomainEmbeddings, gallery: DomainEmbeddings, eval_config,
                        ks: Sequence[int] = metrics.DEFAULT_KS) -> dict[str, Any]:
  """Retrieval metrics of one direction (query domain -> gallery domain).

  Returns:
    R@K for K in ks, 'median_rank', 'mAP' (None from an index), 'num_queries',
    'num_excluded_queries', 'chance_R@1', 'num_gallery', 'search' and, from an index of
    kind KIND, 'KIND_recall@10_vs_exact' and 'index' (its parameters and tuning).
  """
  mode = choose_search(len(gallery), eval_config)
  if mode == "exact":
    result = metrics.retrieval_metrics(query.embeddings, query.product_ids,
                                       gallery.embeddings, gallery.product_ids, ks)
  else:
    _, indices, info = search(query.embeddings, gallery.embeddings, max(ks), eval_config)
    result = metrics.recall_at_k_from_topk(indices, query.product_ids, gallery.product_ids, ks)
    result.update({"median_rank": None, "mAP": None,
                   f"{mode}_recall@{RECALL_K}_vs_exact": info["index"].get("recall_vs_exact"),
                   "index": info["index"]})
  result.update({
      "chance_R@1": metrics.chance_recall_at_1(query.product_ids, gallery.product_ids),
      "num_gallery": len(gallery),
      "search": mode,
  })
  return result


def one_shot_direction(query: DomainEmbeddings, gallery: DomainEmbeddings, eval_config
                       ) -> dict[str, Any]:
  """One-shot classification of one direction: 'one_shot_accuracy', 'one_shot_std',
  'one_shot_num_classes' (prototypes by id, `metrics.one_shot_prototypes`)."""
  one_shot = metrics.one_shot_accuracy(
      query.embeddings, query.product_ids, gallery.embeddings, gallery.product_ids,
      gallery.ids, draws=int(eval_config.one_shot_draws), seed=ONE_SHOT_SEED)
  return {"one_shot_accuracy": one_shot["accuracy"], "one_shot_std": one_shot["std"],
          "one_shot_num_classes": one_shot["num_classes"]}


def evaluate_direction(query: DomainEmbeddings, gallery: DomainEmbeddings, eval_config,
                       ks: Sequence[int] = metrics.DEFAULT_KS) -> dict[str, Any]:
  """Retrieval and one-shot metrics of one direction (`retrieval_direction` and
  `one_shot_direction` together)."""
  return {**retrieval_direction(query, gallery, eval_config, ks),
          **one_shot_direction(query, gallery, eval_config)}


def checked_domains(embeddings_by_domain: Mapping[str, DomainEmbeddings]
                    ) -> dict[str, DomainEmbeddings]:
  """The domains' embeddings, checked; ValueError naming the domain for an empty domain,
  NaN/Inf embeddings, mismatched lengths or embedding dimensions, or an unknown domain."""
  unknown = sorted(set(embeddings_by_domain) - set(domains.NAMES))
  if unknown:
    raise ValueError(f"unknown domains {unknown}; expected some of {domains.NAMES}")
  checked = {}
  for name, entry in embeddings_by_domain.items():
    if not isinstance(entry, DomainEmbeddings):
      raise ValueError(f"{name}: expected DomainEmbeddings, got {type(entry).__name__}")
    if entry.domain != name:
      raise ValueError(f"{name}: holds the embeddings of domain {entry.domain!r}")
    checked[name] = entry.checked()
  dims = {name: entry.embeddings.shape[1] for name, entry in checked.items()}
  if len(set(dims.values())) > 1:
    raise ValueError(f"embedding dimensions differ between domains: {dims}")
  return checked


def per_direction(embeddings_by_domain: Mapping[str, DomainEmbeddings],
                  direction_fn) -> dict[str, Any]:
  """{direction name: direction_fn(query, gallery)} over every direction, or
  {'skipped': 'no <domain> embeddings'} where a domain is missing."""
  checked = checked_domains(embeddings_by_domain)
  results: dict[str, Any] = {}
  for query_domain, gallery_domain in domains.DIRECTIONS:
    name = domains.direction_name(query_domain, gallery_domain)
    missing = [d for d in (query_domain, gallery_domain) if d not in checked]
    if missing:
      results[name] = {"skipped": f"no {missing[0]} embeddings"}
      continue
    results[name] = direction_fn(checked[query_domain], checked[gallery_domain])
  return results


def retrieval_directions(embeddings_by_domain: Mapping[str, DomainEmbeddings], eval_config,
                         ks: Sequence[int] = metrics.DEFAULT_KS) -> dict[str, Any]:
  """`retrieval_direction` for every direction, plus 'chance_R@1' (mean over evaluated
  directions), 'search' (an index kind if any direction used one, else 'exact') and,
  with an index of kind KIND, 'KIND_recall@10_vs_exact' (mean over its directions)."""
  results = per_direction(embeddings_by_domain, lambda query, gallery: retrieval_direction(
      query, gallery, eval_config, ks))
  evaluated = [m for m in results.values() if "skipped" not in m]
  results["chance_R@1"] = (float(np.mean([m["chance_R@1"] for m in evaluated]))
                           if evaluated else float("nan"))
  index_kinds = sorted({m["search"] for m in evaluated} - {"exact"})
  results["search"] = index_kinds[0] if index_kinds else "exact"
  for kind in index_kinds:
    key = f"{kind}_recall@{RECALL_K}_vs_exact"
    results[key] = float(np.mean([m[key] for m in evaluated if m["search"] == kind]))
  return results


def one_shot_directions(embeddings_by_domain: Mapping[str, DomainEmbeddings], eval_config
                        ) -> dict[str, Any]:
  """`one_shot_direction` for every direction."""
  return per_direction(embeddings_by_domain, lambda query, gallery: one_shot_direction(
      query, gallery, eval_config))


def merge_metrics(*parts: Mapping[str, Any]) -> dict[str, Any]:
  """Metric dicts merged key by key, one level deep (a direction's entries from several
  parts in one dict); a key two parts set to different values is an error."""
  merged: dict[str, Any] = {}
  for part in parts:
    for key, value in part.items():
      if key in merged and isinstance(merged[key], Mapping) and isinstance(value, Mapping):
        clashes = sorted(k for k in set(merged[key]) & set(value) if merged[key][k] != value[k])
        if clashes:
          raise ValueError(f"metrics {key}: {clashes} set differently by two evaluators")
        merged[key] = {**merged[key], **value}
      elif key in merged and merged[key] != value:
        raise ValueError(f"metric {key!r} set differently by two evaluators")
      else:
        merged[key] = value
  return merged


def evaluate_directions(embeddings_by_domain: Mapping[str, DomainEmbeddings], eval_config,
                        ks: Sequence[int] = metrics.DEFAULT_KS) -> dict[str, Any]:
  """Cross-domain retrieval and one-shot metrics for every direction.

  Args:
    embeddings_by_domain: domain name -> its `DomainEmbeddings`. A missing domain
      marks its directions {'skipped': 'no <domain> embeddings'}.
    eval_config: `config.eval`.

  Returns:
    `retrieval_directions` and `one_shot_directions` merged: per direction the metrics
    of `evaluate_direction`, and the top-level 'chance_R@1', 'search' (and recall).

  Raises:
    ValueError naming the domain for an empty domain, NaN/Inf embeddings,
    mismatched lengths or embedding dimensions, or an unknown domain.
  """
  return merge_metrics(retrieval_directions(embeddings_by_domain, eval_config, ks),
                       one_shot_directions(embeddings_by_domain, eval_config))
