"""The human-readable evaluation report written next to `metrics.json`.

`write_report` turns the metrics and the embeddings of one evaluation into

  report.md             title, checkpoint, item counts, search kind, the results table
  recall_curves.png     R@K for K = 1..50 per direction (exact search, sampled queries)
  training_curves.png   loss, per-term losses and learning rates of the training log
  examples.html         example queries with their top-5 results as thumbnails
                        (`cope_jax.report_examples`)

Each artefact is made independently: a failure to make one (a missing image, a plotting
error) is logged and listed in report.md, not raised, so it cannot cost the metrics the
evaluator has already written. A failure to write one (a full disk) is raised
(`result_files.ResultWriteError`, naming the file): the evaluator then keeps the previous
complete report instead of swapping in a partial one.

`rewrite_report` (re)writes a workdir's report from its eval/metrics.json and training
log: the command `python -m cope_jax.report --workdir DIR` (`cope_jax/report.py`).
"""

from __future__ import annotations

import json
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from cope_jax.base import workdir as workdir_layout
from cope_jax import embed
from cope_jax import metrics_writer
from cope_jax import report_examples
from cope_jax.base import result_files
from cope_jax.search import exact
from cope_jax.search import metrics as search_metrics
from cope_jax.base import domains
from data_pipelines import prepare

REPORT_FILE = workdir_layout.REPORT_FILE
RECALL_CURVES_FILE = "recall_curves.png"
TRAINING_CURVES_FILE = "training_curves.png"
EXAMPLES_FILE = "examples.html"

RECALL_CURVE_MAX_K = 50
RECALL_CURVE_MAX_QUERIES = 2000  # queries sampled per direction for the curves
RECALL_CURVE_SEED = 0

# metrics.json key -> (column title, formatter); percentages get one decimal.
PERCENT = "percent"
NUMBER = "number"
TABLE_COLUMNS = (
    ("R@1", "R@1", PERCENT),
    ("R@5", "R@5", PERCENT),
    ("R@10", "R@10", PERCENT),
    ("median_rank", "median rank", NUMBER),
    ("mAP", "mAP", PERCENT),
    ("one_shot_accuracy", "one-shot acc.", PERCENT),
    ("chance_R@1", "chance R@1", PERCENT),
)
_MISSING = "–"


def _direction_names() -> list[tuple[str, str, str]]:
  """[(name, query domain, gallery domain)] in the paper's order."""
  return [(domains.direction_name(q, g), q, g) for q, g in domains.DIRECTIONS]


def format_value(value: Any, kind: str) -> str:
  if value is None or isinstance(value, str):
    return _MISSING
  value = float(value)
  if not math.isfinite(value):
    return _MISSING
  if kind == PERCENT:
    return f"{100.0 * value:.1f}"
  return f"{value:g}"


# ----------------------------------------------------------------------------
# The table.


def search_line(metrics: Mapping[str, Any]) -> str:
  """'search: exact', or for an index its recall@10 against exact search and why median
  rank and mAP are not shown (an index returns the top 10 only)."""
  search = metrics.get("search", "exact")
  line = f"search: {search}"
  index_recall = metrics.get(f"{search}_recall@10_vs_exact")  # any index kind
  if index_recall is not None:
    line += (f" (recall@10 against exact search: {100.0 * index_recall:.1f}%; median rank "
             "and mAP need the whole ranking: exact search only)")
  return line


def summary_table(metrics: Mapping[str, Any]) -> str:
  """A Markdown table of the six directions, in the layout of the paper's tables.

  Args:
    metrics: the dict of metrics.json: per direction name (`page_to_video`, ...) a
      dict with the keys of `TABLE_COLUMNS`, or `{"skipped": reason}`; absent
      directions are shown as not evaluated.

  Returns:
    Markdown text: a header row, a separator row and one row per direction.
    R@K, mAP, one-shot accuracy and chance R@1 are percentages with one decimal;
    a missing or undefined value (e.g. median rank under ScaNN) is shown as "–".
  """
  header = "| direction | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
  separator = "|---|" + "---:|" * len(TABLE_COLUMNS)
  rows = [header, separator]
  for name, query_domain, gallery_domain in _direction_names():
    label = domains.direction_label(query_domain, gallery_domain)
    entry = metrics.get(name)
    if not isinstance(entry, Mapping) or "skipped" in entry:
      reason = entry.get("skipped") if isinstance(entry, Mapping) else "not evaluated"
      reason = html.escape(str(reason)).replace("|", "\\|")
      cells = [f"skipped: {reason}"] + [""] * (len(TABLE_COLUMNS) - 1)
    else:
      cells = [format_value(entry.get(key), kind) for key, _, kind in TABLE_COLUMNS]
    rows.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


# ----------------------------------------------------------------------------
# Recall curves.


def recall_curve(query: embed.DomainEmbeddings, gallery: embed.DomainEmbeddings,
                 max_k: int = RECALL_CURVE_MAX_K, max_queries: int = RECALL_CURVE_MAX_QUERIES,
                 seed: int = RECALL_CURVE_SEED) -> np.ndarray:
  """R@K for K = 1..max_k of one direction by exact search.

  At most `max_queries` queries are used, sampled without replacement with `seed`,
  so the cost stays bounded for large evaluations. Queries whose product has no
  gallery item are left out. Equal scores are ordered by gallery index.

  Returns:
    [max_k] float64; K beyond the gallery size repeat the R@G value; NaN where no
    query was usable.
  """
  num_queries = len(query)
  selected = np.arange(num_queries)
  if num_queries > max_queries:
    rng = np.random.default_rng(seed)
    selected = np.sort(rng.choice(num_queries, size=max_queries, replace=False))
  if selected.size == 0 or len(gallery) == 0:
    return np.full(max_k, np.nan)
  k = min(max_k, len(gallery))
  _, indices = exact.exact_search(query.embeddings[selected], gallery.embeddings, k)
  recall = search_metrics.recall_at_k_from_topk(indices, query.product_ids[selected],
                                           gallery.product_ids, ks=range(1, max_k + 1))
  return np.array([recall[f"R@{i}"] for i in range(1, max_k + 1)], np.float64)


def plot_recall_curves(curves: Mapping[str, np.ndarray], path: str) -> None:
  """Writes one line per direction: R@K (%) against K. curves: name -> [max_k]."""
  figure, axes = new_figure()
  for name, curve in curves.items():
    axes.plot(np.arange(1, len(curve) + 1), 100.0 * curve, label=name.replace("_to_", " → "))
  axes.set_xlabel("K")
  axes.set_ylabel("R@K (%)")
  axes.set_ylim(0, 100)
  axes.set_title("Cross-domain retrieval: recall at K (exact search)")
  axes.grid(alpha=0.3)
  if curves:
    axes.legend(loc="lower right", fontsize="small")
  save_figure(figure, path)


# ----------------------------------------------------------------------------
# Training curves.


def _series(records: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
  steps, values = zip(*points) if points else ((), ())
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def training_curve_keys(records: Sequence[Mapping[str, float]]) -> dict[str, list[str]]:
  """The logged keys to plot: {"loss": [...], "terms": [...], "lr": [...]}.

  "terms" is every `loss/<term>` key found in the log, whatever terms the run used.
  """
  keys = set().union(*(r.keys() for r in records)) if records else set()
  return {
      "loss": [k for k in ("loss",) if k in keys],
      "terms": sorted(k for k in keys if k.startswith("loss/")),
      "lr": sorted(k for k in keys if k.startswith("lr/")),
  }


def plot_training_curves(records: Sequence[Mapping[str, float]], path: str) -> None:
  """Two panels over steps: total and per-term losses; learning rate per group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = training_curve_keys(records)
  figure, (loss_axes, lr_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
  for key in keys["loss"]:
    loss_axes.plot(*_series(records, key), label=key, color="black", linewidth=2)
  for key in keys["terms"]:
    loss_axes.plot(*_series(records, key), label=key, linewidth=1)
  loss_axes.set_xlabel("step")
  loss_axes.set_ylabel("loss")
  loss_axes.set_title("Training loss")
  loss_axes.grid(alpha=0.3)
  loss_axes.legend(fontsize="x-small")
  for key in keys["lr"]:
    lr_axes.plot(*_series(records, key), label=key[len("lr/"):])
  lr_axes.set_xlabel("step")
  lr_axes.set_ylabel("learning rate")
  lr_axes.set_title("Learning rate per parameter group")
  lr_axes.grid(alpha=0.3)
  if keys["lr"]:
    lr_axes.legend(fontsize="small")
  save_figure(figure, path)


def new_figure():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(figsize=(7, 4.5))


def save_figure(figure, path: str) -> None:
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  try:
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, dpi=110, format="png")
  finally:
    plt.close(figure)
  result_files.write_bytes(path, image.getvalue())


# ----------------------------------------------------------------------------
# The report.


def _markdown_report(metrics: Mapping[str, Any], config: ml_collections.ConfigDict | None,
                     artefacts: Mapping[str, str | None], notes: Sequence[str],
                     problems: Sequence[str]) -> str:
  lines = ["# COPE cross-domain retrieval report", ""]
  step = metrics.get("checkpoint_step")
  source = metrics.get("checkpoint")
  lines.append(f"- checkpoint: step {step}" + (f" (`{source}`)" if source else ""))
  if config is not None:
    lines.append(f"- split: `{metrics.get('split', config.data.eval_split)}` of "
                 f"`{config.data.prepared_dir}`")
  else:
    lines.append(f"- split: `{metrics.get('split')}`")
  prepared = metrics.get("prepared_data")
  if prepared:
    lines.append(f"- prepared data: `{prepared.get('name')}/{prepared.get('config')}` "
                 f"{prepared.get('version')} (fingerprint "
                 f"`{str(prepared.get('fingerprint'))[:12]}`)")
  code = metrics.get("code") or {}
  if metrics.get("config_digest"):
    commit = code.get("git_commit")
    lines.append(f"- config digest `{metrics['config_digest'][:12]}`; code "
                 f"{code.get('version')}" + (f" at `{commit[:12]}`" if commit else "")
                 + (" (with local changes)" if code.get("git_dirty") else ""))
  num_items = metrics.get("num_items") or {}
  if num_items:
    lines.append("- items: " + ", ".join(f"{count} {domain}s"
                                         for domain, count in num_items.items()))
  lines += [f"- {search_line(metrics)}", "", "## Results (%)", "", summary_table(metrics),
            ""]
  lines.append("R@K, mAP and accuracies in percent; chance R@1: the R@1 of a random "
               "ranking of the same gallery.")
  lines += ["", "## Figures and examples", ""]
  if artefacts.get("recall_curves"):
    lines += [f"![recall at K]({RECALL_CURVES_FILE})", ""]
  if artefacts.get("training_curves"):
    lines += [f"![training curves]({TRAINING_CURVES_FILE})", ""]
  if artefacts.get("examples"):
    lines += [f"Example queries with their top-{report_examples.EXAMPLES_TOP_K} results: "
              f"[{EXAMPLES_FILE}]({EXAMPLES_FILE})", ""]
  lines += [f"- {note}" for note in notes]
  if notes:
    lines.append("")
  if problems:
    lines += ["## Problems while writing this report", ""]
    lines += [f"- {problem}" for problem in problems]
    lines.append("")
  return "\n".join(lines)


def write_report(eval_dir: str, metrics: Mapping[str, Any],
                 embeddings: Mapping[str, embed.DomainEmbeddings],
                 config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Writes report.md, recall_curves.png, training_curves.png and examples.html.

  Args:
    eval_dir: output folder (created if needed).
    metrics: the metrics.json dict.
    embeddings: domain -> the gathered embeddings the metrics came from.
    config: the run config (`data.prepared_dir`, `data.eval_split`,
      `eval.report_examples` are read).
    workdir: the training directory (its metrics.jsonl feeds the training curves).

  Returns:
    The paths written. Failures of the figures or the examples page are logged and
    listed in report.md instead of raised.
  """
  os.makedirs(eval_dir, exist_ok=True)
  written: list[str] = []
  problems: list[str] = []
  notes: list[str] = []
  artefacts: dict[str, str | None] = {}

  def attempt(key: str, description: str, make):
    try:
      path = make()
    except result_files.ResultWriteError:
      raise  # the disk, not the artefact: no report rather than a partial one
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("report: could not write the %s", description)
      problems.append(f"{description}: {type(error).__name__}: {error}")
      path = None
    artefacts[key] = path
    if path:
      written.append(path)

  attempt("recall_curves", "recall curves", lambda: _write_recall_curves(eval_dir, embeddings))
  attempt("training_curves", "training curves",
          lambda: _write_training_curves(eval_dir, workdir, notes))
  attempt("examples", "example page", lambda: _write_examples(eval_dir, embeddings, config))

  report_path = os.path.join(eval_dir, REPORT_FILE)
  result_files.write_text(report_path, _markdown_report(metrics, config, artefacts, notes,
                                                        problems))
  return [report_path] + written


def _write_recall_curves(eval_dir: str, embeddings: Mapping[str, embed.DomainEmbeddings]
                         ) -> str:
  curves = {name: recall_curve(embeddings[q], embeddings[g])
            for name, q, g in _direction_names() if q in embeddings and g in embeddings}
  path = os.path.join(eval_dir, RECALL_CURVES_FILE)
  plot_recall_curves(curves, path)
  return path


def _write_training_curves(eval_dir: str, workdir: str, notes: list[str]) -> str | None:
  records = metrics_writer.read_metrics(workdir)
  if not records:
    notes.append(f"Training curves: skipped, no training log in {workdir}/metrics.jsonl")
    return None
  path = os.path.join(eval_dir, TRAINING_CURVES_FILE)
  plot_training_curves(records, path)
  return path


def _write_examples(eval_dir: str, embeddings: Mapping[str, embed.DomainEmbeddings],
                    config: ml_collections.ConfigDict) -> str | None:
  num_examples = int(config.eval.report_examples)
  if num_examples <= 0:
    return None

  prepared_dir, split = config.data.prepared_dir, config.data.eval_split
  config_name = config.data.prepared_config
  products = prepare.load_products(prepared_dir, split, config_name=config_name)
  images = {domain: report_examples.RecordImages(
      prepare.open_domain(prepared_dir, split, domain, config_name=config_name), products,
      domain) for domain in embeddings}
  path = os.path.join(eval_dir, EXAMPLES_FILE)
  page = report_examples.examples_html(embeddings, images, num_examples,
                       title=f"COPE retrieval examples ({split} split)")
  result_files.write_text(path, page)
  return path


# ----------------------------------------------------------------------------
# Rewriting a workdir's report, and the command line.

METRICS_FILE = workdir_layout.METRICS_FILE


def rewrite_report(workdir: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
  """(Re)writes report.md and training_curves.png of `workdir/eval` from its metrics.json
  and the training log, as one staged swap; returns the paths written.

  The recall curves and the examples page need the embeddings: those of the evaluation
  that wrote metrics.json are kept (and linked) when present.

  Raises:
    FileNotFoundError: no `eval/metrics.json` in `workdir`.
  """

  eval_dir = workdir_layout.eval_dir(workdir)
  metrics_path = workdir_layout.metrics_file(workdir)
  if not os.path.isfile(metrics_path):
    raise FileNotFoundError(f"{metrics_path}: no evaluation metrics (run `python -m "
                            f"cope_jax.evaluate --config C --workdir {workdir}` first)")
  with open(metrics_path, encoding="utf-8") as f:
    try:
      metrics = json.load(f)
    except ValueError as error:
      raise ValueError(f"{metrics_path}: not JSON ({error})") from None
  notes: list[str] = []
  problems: list[str] = []
  artefacts: dict[str, str | None] = {
      "recall_curves": RECALL_CURVES_FILE
                       if os.path.isfile(os.path.join(eval_dir, RECALL_CURVES_FILE)) else None,
      "examples": EXAMPLES_FILE if os.path.isfile(os.path.join(eval_dir, EXAMPLES_FILE))
                  else None}
  written = []
  with result_files.staged_directory(eval_dir) as staging:
    try:
      artefacts["training_curves"] = _write_training_curves(staging, workdir, notes)
    except result_files.ResultWriteError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("report: could not write the training curves")
      problems.append(f"training curves: {type(error).__name__}: {error}")
      artefacts["training_curves"] = None
    result_files.write_text(os.path.join(staging, REPORT_FILE),
                            _markdown_report(metrics, config, artefacts, notes, problems))
    written = sorted(os.listdir(staging))
  return [os.path.join(eval_dir, name) for name in written]
