r"""Compares the embeddings of two runs, or evaluates one: `python -m cope_jax.compare`.

  python -m cope_jax.compare --reference DIR --rope_dir ROPE_DIR --split test \
      [--candidate DIR] [--out OUT] [--one_shot_draws 5]

Each side is a folder in either format, detected from its files:

  release   the PyTorch release's `infer.py` output: `{rank}_item`, `{rank}_photo`,
            `{rank}_live` text files (`cope_jax.release_format`), or this project's
            `cope_jax.export --format release`
  export    this project's `cope_jax.export` folder: `manifest.json` + Parquet files

Ids are mapped to products through the pair files of `--split` in ROPE_DIR (nothing
else there is read). Copies of one id with the same embedding (the release's
`DistributedSampler` pads by repeating items, across rank files or within one) are
dropped; copies that differ stop the comparison with an error listing them. Ids that
no pair file names are left out and counted.

Both sides are evaluated on the ids they both embed (per domain, in id order; ids on
one side only are counted and listed), with the project's own search code (`cope_jax.search`):
exact ranking with pessimistic ties, the six directions' R@K, median rank, mAP and
one-shot accuracy. With the same ids on both sides, the two runs are also compared item
by item: the cosine between the two embeddings of each id, and the overlap of the two
sides' top-10 lists per direction. With only --reference, that side alone is
evaluated on all its ids. Written into OUT (default `./compare`):

  compare.json      inputs, id counts, both sides' metrics, differences (candidate -
                    reference), cosine distribution, top-10 overlap, R@K curves
                    (strict JSON: an undefined value is null)
  compare.md        the same as tables
  recall_at_k.png   R@K for K = 1..50, one panel per direction, both sides
"""

from __future__ import annotations

from absl import flags
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cope_jax import compare_report
from cope_jax import export_format
from cope_jax import release_format
from cope_jax.base import result_files
from cope_jax import run_record
from cope_jax.search import directions
from cope_jax.search import exact
from cope_jax.search import metrics as search_metrics
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.base import domains
from data_pipelines import rope_format

from cope_jax.compare_report import CANDIDATE, EXAMPLES, JSON_FILE, MARKDOWN_FILE
from cope_jax.compare_report import OVERLAP_K, PLOT_FILE, REFERENCE, TABLE_METRICS
from cope_jax.base import command_line

RELEASE, EXPORT = "release", "export"
DEFAULT_OUT = "compare"
CURVE_MAX_K = 50  # the R@K curves run over K = 1..CURVE_MAX_K
TABLE_KS = search_metrics.DEFAULT_KS


class CompareInputError(ValueError):
  """An input folder that cannot be compared (the message names the file and the cause)."""


# ----------------------------------------------------------------------------
# Reading a side.


@dataclasses.dataclass(frozen=True)
class DomainRows:
  """One domain of one side, each id once: ids [N] str, embeddings [N, D] float32 as
  read, product_ids [N] str (through the pair files)."""
  ids: np.ndarray
  embeddings: np.ndarray
  product_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def select(self, ids: Sequence[str]) -> DomainRows:
    """The rows of `ids` (all present), in that order."""
    position = {item_id: i for i, item_id in enumerate(self.ids)}
    rows = np.fromiter((position[i] for i in ids), np.int64, count=len(ids))
    return DomainRows(self.ids[rows], self.embeddings[rows], self.product_ids[rows])


@dataclasses.dataclass(frozen=True)
class Side:
  """One side: its folder, detected format, rows per domain and what reading found."""
  label: str
  path: str
  format: str
  dim: int
  domains: dict[str, DomainRows]
  summary: dict[str, Any]  # per domain: rows read, duplicates dropped, unpaired ids


def detect_format(folder: str) -> str:
  """RELEASE or EXPORT, from the folder's files; CompareInputError naming what was found."""
  if not os.path.exists(folder):
    raise FileNotFoundError(f"{folder}: no such folder")
  if not os.path.isdir(folder):
    raise CompareInputError(f"{folder}: a file, expected a folder of embeddings")
  names = sorted(os.listdir(folder))
  expected = ("expected the release's embedding files ({rank}_item, {rank}_photo, "
              "{rank}_live) or a cope_jax.export folder (manifest.json + Parquet files)")
  if not names:
    raise CompareInputError(f"{folder}: empty folder; {expected}")
  has_release = bool(release_format.release_files(folder))
  has_export = export_format.MANIFEST_FILE in names
  if has_release and has_export:
    raise CompareInputError(
        f"{folder}: holds both release embedding files and an export manifest.json; "
        "pass a folder holding one of them")
  if has_release:
    return RELEASE
  if has_export:
    return EXPORT
  parquet = [name for name in names if name.endswith(".parquet")]
  hint = (f" ({len(parquet)} Parquet files but no {export_format.MANIFEST_FILE}: an unfinished export?)"
          if parquet else "")
  shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
  raise CompareInputError(f"{folder}: found {shown}{hint}; {expected}")


@dataclasses.dataclass
class _RawRows:
  """One domain's rows as read, duplicates included: ids [N], values [N, D] (float64
  for release files: the written decimals), extras [N, E] compared with the values
  (release times), product ids [N] or None, where [N] ('file, line n')."""
  ids: np.ndarray
  values: np.ndarray
  extras: np.ndarray | None
  product_ids: np.ndarray | None
  where: np.ndarray


def _read_release(folder: str) -> dict[str, _RawRows]:
  rows = release_format.read_folder(folder)
  return {domain: _RawRows(r.ids, r.embeddings, r.times, None,
                           np.array([f"{f}, line {n}" for f, n in zip(r.files, r.lines)],
                                    object))
          for domain, r in rows.items()}


def _read_export(folder: str) -> dict[str, _RawRows]:
  """The Parquet files an export's manifest lists, checked row by row
  (`export_format.read_checked`)."""
  try:
    checked = export_format.read_checked(folder)
  except export_format.ExportFormatError as error:
    raise CompareInputError(str(error)) from None
  return {domain: _RawRows(rows.ids, rows.embeddings, None, rows.product_ids, rows.where)
          for domain, rows in checked.items()}


def _deduplicate(domain: str, raw: _RawRows) -> tuple[np.ndarray, int, list[str]]:
  """Rows to keep (first copy of each id), identical copies dropped, conflicts described."""
  first: dict[str, int] = {}
  keep, dropped, conflicts = [], 0, []
  for row, item_id in enumerate(raw.ids):
    original = first.setdefault(item_id, row)
    if original == row:
      keep.append(row)
      continue
    same = np.array_equal(raw.values[row], raw.values[original]) and (
        raw.extras is None or np.array_equal(raw.extras[row], raw.extras[original]))
    if same:
      dropped += 1
    else:
      what = ("start/end times" if np.array_equal(raw.values[row], raw.values[original])
              else "embeddings")
      conflicts.append(f"{domain} {item_id} ({raw.where[original]} vs {raw.where[row]}: "
                       f"different {what})")
  return np.asarray(keep, np.int64), dropped, conflicts


def read_side(label: str, folder: str, pairs: Mapping[str, Mapping[str, str]]) -> Side:
  """Reads, deduplicates and maps to products one side (see the module docstring).

  Args:
    label: REFERENCE or CANDIDATE (for messages).
    folder: the side's folder.
    pairs: domain -> (item id -> product id) from the ROPE pair files.

  Raises:
    FileNotFoundError, CompareInputError, release_format.ReleaseFormatError, naming
    the file (and line) at fault.
  """
  kind = detect_format(folder)
  raw_by_domain = _read_release(folder) if kind == RELEASE else _read_export(folder)
  dims = {raw.values.shape[1] for raw in raw_by_domain.values() if len(raw.ids)}
  if not dims:
    raise CompareInputError(f"{folder}: its {kind} files hold no embedding")
  dim = dims.pop()

  conflicts, summary, rows_by_domain = [], {}, {}
  for domain, raw in raw_by_domain.items():
    keep, dropped, domain_conflicts = _deduplicate(domain, raw)
    conflicts += domain_conflicts
    ids = raw.ids[keep]
    products = np.array([pairs[domain].get(item_id) for item_id in ids], object)
    paired = np.array([p is not None for p in products], bool)
    if raw.product_ids is not None:
      stated = raw.product_ids[keep]
      differs = np.flatnonzero(paired & (stated != products))
      if differs.size:
        row = keep[differs[0]]
        raise CompareInputError(
            f"{raw.where[row]}: {domain} {ids[differs[0]]} belongs to product "
            f"{stated[differs[0]]} in the export but to {products[differs[0]]} in the "
            f"ROPE pair file ({differs.size} such ids): another dataset or split?")
    unpaired = ids[~paired]
    summary[domain] = {"rows_read": int(len(raw.ids)), "duplicates_dropped": dropped,
                       "unique_ids": int(len(ids)), "unpaired_ids": int(unpaired.size),
                       "unpaired_examples": [str(i) for i in unpaired[:EXAMPLES]]}
    if paired.any():  # in id order: the metrics do not depend on how files were sharded
      order = np.argsort(ids[paired], kind="stable")
      rows_by_domain[domain] = DomainRows(
          ids[paired][order], raw.values[keep][paired][order].astype(np.float32),
          products[paired][order])
  if conflicts:
    raise CompareInputError(
        f"{folder}: {len(conflicts)} {'id has' if len(conflicts) == 1 else 'ids have'} "
        "copies that differ (the release's padded "
        f"repeats are identical copies): " + "; ".join(conflicts[:EXAMPLES])
        + ("; ..." if len(conflicts) > EXAMPLES else ""))
  if not rows_by_domain:
    total = sum(s["unique_ids"] for s in summary.values())
    examples = [e for s in summary.values() for e in s["unpaired_examples"]][:EXAMPLES]
    raise CompareInputError(
        f"{folder}: none of its {total} ids is named by the ROPE pair files of this split "
        f"(e.g. {', '.join(examples)}): another --split or --rope_dir?")
  return Side(label, folder, kind, dim, rows_by_domain, summary)


def read_pairs(rope_dir: str, split: str) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
  """domain -> (item id -> product id) of `split`; problems found per pair file."""
  pairs, problems = {}, {}
  for domain in domains.NAMES:
    pairs[domain], found = rope_format.read_pairs(rope_dir, split, domain)
    problems[domain] = len(found)
  return pairs, problems


# ----------------------------------------------------------------------------
# Evaluating and comparing.


def normalised(embeddings: np.ndarray, label: str, domain: str, ids: np.ndarray) -> np.ndarray:
  """[N, D] -> float32 rows of unit L2 norm (`export_format.normalise_rows`: a row already
  of unit length is kept as it is, so an export is scored exactly as evaluate scored it)."""
  values = np.asarray(embeddings)
  zero = np.flatnonzero(~np.any(values != 0, axis=1))
  if zero.size:
    raise CompareInputError(f"{label}: {domain} {ids[zero[0]]} has an all-zero embedding")
  return export_format.normalise_rows(values, f"{label} {domain} embeddings")


def _domain_embeddings(label: str, rows: Mapping[str, DomainRows]) -> dict[str, DomainEmbeddings]:
  return {domain: DomainEmbeddings(domain, r.ids, r.product_ids,
                                   normalised(r.embeddings, label, domain, r.ids))
          for domain, r in rows.items()}


def evaluate(embeddings: Mapping[str, DomainEmbeddings], one_shot_draws: int
             ) -> tuple[dict[str, Any], dict[str, list[float]]]:
  """The six directions' metrics (`directions.evaluate_directions`, exact) and the R@K
  curve of each evaluated direction (K = 1..CURVE_MAX_K)."""
  ks = tuple(range(1, CURVE_MAX_K + 1))
  # Both sides ranked exactly, without an index's error.
  results = directions.evaluate_directions(
      embeddings, directions.ExactSearch(one_shot_draws=int(one_shot_draws)), ks)
  curves = {}
  for name in domains.DIRECTION_NAMES:
    entry = results[name]
    if "skipped" in entry:
      continue
    curves[name] = [entry[f"R@{k}"] for k in ks]
    for k in ks:
      if k not in TABLE_KS:
        del entry[f"R@{k}"]
  return results, curves


def differences(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict:
  """direction -> metric -> candidate - reference (None where either is undefined)."""
  result = {}
  for name in domains.DIRECTION_NAMES:
    ref, cand = reference.get(name, {}), candidate.get(name, {})
    if "skipped" in ref or "skipped" in cand:
      continue
    result[name] = {key: (None if _undefined(ref.get(key)) or _undefined(cand.get(key))
                          else float(cand[key]) - float(ref[key]))
                    for key, _, _ in TABLE_METRICS}
  return result


def _undefined(value) -> bool:
  return value is None or not math.isfinite(float(value))


def cosine_statistics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
  """Per-row cosine of two [N, D] arrays (float64): count, rows identical bit for bit,
  min, 1st percentile, median, mean."""
  a = np.asarray(reference, np.float64)
  b = np.asarray(candidate, np.float64)
  cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  identical = np.all(np.asarray(reference) == np.asarray(candidate), axis=1)
  cosine = np.where(identical, 1.0, cosine)  # the same vector: 1 exactly, not 1 - 1 ulp
  return {"count": int(cosine.size), "identical": int(identical.sum()),
          "min": float(cosine.min()), "p1": float(np.percentile(cosine, 1)),
          "median": float(np.median(cosine)), "mean": float(cosine.mean())}


def topk_overlap(reference: Mapping[str, DomainEmbeddings],
                 candidate: Mapping[str, DomainEmbeddings], k: int = OVERLAP_K) -> dict:
  """direction -> overlap of the two sides' exact top-k gallery lists per query.

  Both sides hold the same ids in the same order. Per query the overlap is
  |top-k(reference) ∩ top-k(candidate)| / k' (k' = min(k, gallery size)); reported
  as mean, min and the share of queries whose two lists hold the same items.
  """
  result = {}
  for (query, gallery), name in zip(domains.DIRECTIONS, domains.DIRECTION_NAMES):
    if query not in reference or gallery not in reference:
      continue
    width = min(k, len(reference[gallery]))
    _, ref_top = exact.exact_search(reference[query].embeddings,
                                    reference[gallery].embeddings, width)
    _, cand_top = exact.exact_search(candidate[query].embeddings,
                                     candidate[gallery].embeddings, width)
    shared = (ref_top[:, :, None] == cand_top[:, None, :]).any(axis=2).sum(axis=1) / width
    result[name] = {"k": width, "queries": int(shared.size), "mean": float(shared.mean()),
                    "min": float(shared.min()), "same_items": float(np.mean(shared == 1.0))}
  return result


def _side_provenance(side: Side) -> dict[str, Any] | None:
  """Where an export side's rows come from (its manifest: checkpoint step, config digest,
  prepared data, code); None for the release's files, which do not say."""
  if side.format != EXPORT:
    return None
  manifest = export_format.read_manifest_fields(side.path)
  return {"checkpoint_step": manifest.get("checkpoint_step"),
          "checkpoint": manifest.get("checkpoint"),
          "config_digest": manifest.get("config_hash"),
          "prepared_data": manifest.get("prepared_data"), "code": manifest.get("code")}


def compare(reference_dir: str, rope_dir: str, split: str, candidate_dir: str | None = None,
            out_dir: str = DEFAULT_OUT, one_shot_draws: int = 5) -> dict[str, Any]:
  """Reads, evaluates and compares; writes compare.json, compare.md and the plot.

  Returns:
    The dict written to compare.json (NaN and Inf written as null).
  """
  pairs, pair_problems = read_pairs(rope_dir, split)
  sides = [read_side(REFERENCE, reference_dir, pairs)]
  if candidate_dir:
    sides.append(read_side(CANDIDATE, candidate_dir, pairs))

  ids_report, evaluated = {}, {side.label: {} for side in sides}
  for domain in domains.NAMES:
    present = [side for side in sides if domain in side.domains]
    if not present:
      continue
    if len(sides) == 1:
      evaluated[REFERENCE][domain] = sides[0].domains[domain]
      continue
    reference_ids = sides[0].domains[domain].ids if domain in sides[0].domains else []
    candidate_ids = sides[1].domains[domain].ids if domain in sides[1].domains else []
    candidate_set, reference_set = set(candidate_ids), set(reference_ids)
    both = [i for i in reference_ids if i in candidate_set]
    only_reference = [i for i in reference_ids if i not in candidate_set]
    only_candidate = [i for i in candidate_ids if i not in reference_set]
    ids_report[domain] = {
        REFERENCE: len(reference_ids), CANDIDATE: len(candidate_ids), "both": len(both),
        "reference_only": len(only_reference), "candidate_only": len(only_candidate),
        "reference_only_examples": [str(i) for i in only_reference[:EXAMPLES]],
        "candidate_only_examples": [str(i) for i in only_candidate[:EXAMPLES]]}
    if both:
      for side in sides:
        evaluated[side.label][domain] = side.domains[domain].select(both)

  embeddings = {label: _domain_embeddings(label, rows) for label, rows in evaluated.items()}
  metrics, curves = {}, {}
  for label in embeddings:
    metrics[label], curves[label] = evaluate(embeddings[label], one_shot_draws)

  result: dict[str, Any] = {
      "split": split, "rope_dir": rope_dir, "search": "exact",
      "one_shot_draws": int(one_shot_draws),
      "pair_file_problems": pair_problems,
      "sides": {side.label: {"path": side.path, "format": side.format, "dim": side.dim,
                             "domains": side.summary, "provenance": _side_provenance(side)}
                for side in sides},
      "code": run_record.code_version(),
      "evaluated_ids": {domain: len(rows) for domain, rows in evaluated[REFERENCE].items()},
      "metrics": metrics,
      "recall_at_k": {"ks": list(range(1, CURVE_MAX_K + 1)), **curves},
  }
  if candidate_dir:
    reference, candidate = sides
    result["ids"] = ids_report
    result["differences"] = differences(metrics[REFERENCE], metrics[CANDIDATE])
    if reference.dim != candidate.dim:
      result["cosine"] = {"skipped": f"embedding dimensions differ: reference "
                                     f"{reference.dim}, candidate {candidate.dim}"}
    else:
      cosine = {domain: cosine_statistics(evaluated[REFERENCE][domain].embeddings,
                                          evaluated[CANDIDATE][domain].embeddings)
                for domain in evaluated[REFERENCE]}
      if cosine:
        cosine["all"] = cosine_statistics(
            np.concatenate([evaluated[REFERENCE][d].embeddings for d in cosine]),
            np.concatenate([evaluated[CANDIDATE][d].embeddings for d in cosine]))
      result["cosine"] = cosine
    result["top10_overlap"] = topk_overlap(embeddings[REFERENCE], embeddings[CANDIDATE])

  result["files"] = {"json": JSON_FILE, "markdown": MARKDOWN_FILE, "plot": PLOT_FILE}
  result = result_files.strict(result)
  compare_report.write(out_dir, result)
  return result


# ----------------------------------------------------------------------------
# Command line.


def _define_flags(flag_values) -> None:

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("reference", None, "folder of the reference embeddings (release "
                      "format or export)", **define)
  flags.DEFINE_string("candidate", None, "folder of the embeddings compared with the "
                      "reference", **define)
  flags.DEFINE_string("rope_dir", None, "ROPE folder whose pair files map ids to products",
                      **define)
  flags.DEFINE_string("split", "test", "ROPE split of the ids", **define)
  flags.DEFINE_string("out", DEFAULT_OUT, "output folder", **define)
  flags.DEFINE_integer("one_shot_draws", 5, "prototype draws of the one-shot accuracy",
                       **define)


def _main(args) -> None:
  result = compare(args.reference, args.rope_dir, args.split, args.candidate, args.out,
                   args.one_shot_draws)
  print("\n".join(compare_report.retrieval_section(result)).strip())
  print(f"\nwrote {os.path.join(args.out, JSON_FILE)}, {MARKDOWN_FILE} and {PLOT_FILE}")


def main(argv: Sequence[str] | None = None) -> None:
  """The command line (`argv`: the arguments after the program name)."""

  command = command_line.Command(
      "python -m cope_jax.compare",
      "Evaluates one run's embeddings, or compares two runs' (the release's infer.py output "
      "or a cope_jax.export folder), on one ROPE split.",
      define_flags=_define_flags, required=("reference", "rope_dir"))
  command_line.run(command, _main, argv)


if __name__ == "__main__":
  main()
