"""The files `cope_jax.compare` writes: compare.json, compare.md and the R@K plot.

  write(out_dir, result)        all three, each written whole (`cope_jax.base.result_files`)
  markdown(result)              compare.md from the compare.json dict
  retrieval_section(result)     its retrieval table, also printed on the console

Labels and number formats are the evaluation report's (`cope_jax.report`), so the two
tables read alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cope_jax import eval_report
from cope_jax.base import result_files
from cope_jax.base import domains

REFERENCE, CANDIDATE = "reference", "candidate"
JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "compare.json", "compare.md", "recall_at_k.png"
OVERLAP_K = 10  # top-k lists compared between the sides
EXAMPLES = 5  # ids named in errors and reports
# metric key -> (column title, percentage?) of the side-by-side table.
TABLE_METRICS = (("R@1", "R@1", True), ("R@5", "R@5", True), ("R@10", "R@10", True),
                 ("median_rank", "median rank", False), ("mAP", "mAP", True),
                 ("one_shot_accuracy", "one-shot acc.", True))


def write(out_dir: str, result: Mapping[str, Any]) -> None:
  """compare.json (strict JSON), compare.md and the plot into `out_dir`, each swapped in
  whole; compare.json, the one a downstream job reads, last."""
  os.makedirs(out_dir, exist_ok=True)
  plot_recall_curves(result["recall_at_k"], os.path.join(out_dir, PLOT_FILE))
  result_files.write_text(os.path.join(out_dir, MARKDOWN_FILE), markdown(result))
  result_files.write_json(os.path.join(out_dir, JSON_FILE), result)


def _label(name: str) -> str:
  """A direction's name (domains.DIRECTION_NAMES) as the report labels it."""
  query, gallery = next((q, g) for q, g in domains.DIRECTIONS
                        if domains.direction_name(q, g) == name)
  return domains.direction_label(query, gallery)


def _value(value, percent: bool) -> str:
  return eval_report.format_value(value, eval_report.PERCENT if percent else eval_report.NUMBER)


def _difference(value, percent: bool) -> str:
  text = _value(value, percent)
  if text == _value(None, percent):
    return text
  return f"{100 * value:+.1f}" if percent else f"{value:+g}"


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|")


def markdown(result: Mapping[str, Any]) -> str:
  """compare.md from the compare.json dict."""
  sides = result["sides"]
  has_candidate = CANDIDATE in sides
  title = "reference vs candidate" if has_candidate else "reference"
  out = [f"# Embedding comparison: {title}", "",
         f"Split `{result['split']}` of `{result['rope_dir']}` (ids mapped to products by its "
         f"pair files); exact search, pessimistic ties; one-shot accuracy over "
         f"{result['one_shot_draws']} draws. Percentages; a difference is candidate minus "
         "reference, in points.", "", "## Inputs", "",
         "| side | folder | format | dim | " + " | ".join(domains.NAMES) + " |",
         "|---|---|---|---:|" + "---:|" * len(domains.NAMES)]
  for label, side in sides.items():
    cells = []
    for domain in domains.NAMES:
      entry = side["domains"].get(domain)
      cells.append("–" if entry is None else
                   f"{entry['unique_ids']} ids ({entry['duplicates_dropped']} repeats dropped, "
                   f"{entry['unpaired_ids']} unpaired)")
    out.append(f"| {label} | `{_cell(side['path'])}` | {side['format']} | {side['dim']} | "
               + " | ".join(cells) + " |")
  unpaired = [f"{label} {domain}: {', '.join(entry['unpaired_examples'])}"
              for label, side in sides.items() for domain, entry in side["domains"].items()
              if entry["unpaired_examples"]]
  if unpaired:
    out += ["", "Ids no pair file names (left out), e.g. " + "; ".join(unpaired) + "."]

  if has_candidate:
    out += ["", "## Ids", "", "Both sides are evaluated on the ids they both embed.", "",
            "| domain | reference | candidate | both | reference only | candidate only |",
            "|---|---:|---:|---:|---:|---:|"]
    for domain, entry in result["ids"].items():
      out.append(f"| {domain} | {entry[REFERENCE]} | {entry[CANDIDATE]} | {entry['both']} | "
                 f"{entry['reference_only']} | {entry['candidate_only']} |")
    for domain, entry in result["ids"].items():
      for label in (REFERENCE, CANDIDATE):
        if entry[f"{label}_only_examples"]:
          out.append(f"\nOnly in the {label}, {domain}: "
                     f"{', '.join(entry[f'{label}_only_examples'])}"
                     + (", ..." if entry[f"{label}_only"] > EXAMPLES else ""))

  out += ["", *retrieval_section(result)]

  if has_candidate:
    out += ["", "## Agreement item by item", "", "### Cosine between the two embeddings of "
            "each id", ""]
    cosine = result["cosine"]
    if "skipped" in cosine:
      out.append(f"Not computed: {cosine['skipped']}.")
    else:
      out += ["| domain | ids | identical bit for bit | min | 1st percentile | median |",
              "|---|---:|---:|---:|---:|---:|"]
      for domain, entry in cosine.items():
        out.append(f"| {domain} | {entry['count']} | {entry['identical']} | "
                   f"{entry['min']:.6f} | {entry['p1']:.6f} | {entry['median']:.6f} |")
    out += ["", f"### Top-{OVERLAP_K} overlap", "",
            f"Per query, the share of the reference's top-{OVERLAP_K} gallery items that "
            f"the candidate's top-{OVERLAP_K} also holds (exact search).", "",
            "| direction | queries | mean | min | queries with the same items |",
            "|---|---:|---:|---:|---:|"]
    for name, entry in result["top10_overlap"].items():
      out.append(f"| {_label(name)} | {entry['queries']} | {entry['mean']:.3f} | "
                 f"{entry['min']:.3f} | {100 * entry['same_items']:.1f}% |")
  out += ["", f"![R@K per direction]({PLOT_FILE})", ""]
  return "\n".join(out)


def retrieval_section(result: Mapping[str, Any]) -> list[str]:
  """The "Retrieval metrics" section of compare.md (also the console summary), as lines."""
  has_candidate = CANDIDATE in result["sides"]
  out = ["## Retrieval metrics", ""]
  metrics = result["metrics"]
  if has_candidate:
    out += ["Each cell: reference / candidate (difference).", "",
            "| direction | " + " | ".join(t for _, t, _ in TABLE_METRICS) + " |",
            "|---|" + "---:|" * len(TABLE_METRICS)]
  else:
    out += ["| direction | " + " | ".join(t for _, t, _ in TABLE_METRICS) + " |",
            "|---|" + "---:|" * len(TABLE_METRICS)]
  for name in domains.DIRECTION_NAMES:
    reference = metrics[REFERENCE].get(name, {})
    if "skipped" in reference:
      out.append(f"| {_label(name)} | skipped: {_cell(reference['skipped'])} |"
                 + " |" * (len(TABLE_METRICS) - 1))
      continue
    cells = []
    for key, _, percent in TABLE_METRICS:
      if has_candidate:
        candidate = metrics[CANDIDATE][name]
        difference = result["differences"][name][key]
        cells.append(f"{_value(reference.get(key), percent)} / "
                     f"{_value(candidate.get(key), percent)} "
                     f"({_difference(difference, percent)})")
      else:
        cells.append(_value(reference.get(key), percent))
    out.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
  return out


def plot_recall_curves(curves: Mapping[str, Any], path: str) -> None:
  """One panel per direction: R@K (%) against K, a line per side."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  ks = np.asarray(curves["ks"])
  columns = 3
  rows = -(-len(domains.DIRECTION_NAMES) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
  styles = {REFERENCE: {"color": "tab:blue", "linestyle": "-"},
            CANDIDATE: {"color": "tab:orange", "linestyle": "--"}}
  try:
    for panel, name in zip(axes.flat, domains.DIRECTION_NAMES):
      plotted = False
      for label in (REFERENCE, CANDIDATE):
        values = curves.get(label, {}).get(name)
        if values is None:
          continue
        panel.plot(ks, [np.nan if v is None else 100 * v for v in values], label=label,
                   **styles[label])
        plotted = True
      panel.set_title(_label(name))
      panel.set_xlabel("K")
      panel.set_ylabel("R@K (%)")
      panel.set_ylim(0, 100)
      panel.grid(alpha=0.3)
      if plotted:
        panel.legend(loc="lower right", fontsize="small")
      else:
        panel.text(0.5, 0.5, "not evaluated", ha="center", va="center",
                   transform=panel.transAxes)
    figure.suptitle("Recall at K, exact search")
  except BaseException:
    plt.close(figure)
    raise
  eval_report.save_figure(figure, path)
