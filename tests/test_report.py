"""The evaluation report: the Markdown table, recall curves, plots and the examples page."""

import base64
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from cope_jax import embed
from cope_jax import eval_report
from cope_jax import report_examples
from cope_jax.search import metrics as search_metrics
from cope_jax.base import domains
from data_pipelines import prepare
from cope_jax.testing import tiny_configs

DIRECTION_LABELS = ("page → video", "video → page", "page → live", "live → page",
                    "video → live", "live → video")


def _direction_metrics(r1, r5, r10, median_rank, mean_ap, one_shot, chance):
  return {"R@1": r1, "R@5": r5, "R@10": r10, "median_rank": median_rank, "mAP": mean_ap,
          "one_shot_accuracy": one_shot, "chance_R@1": chance, "num_queries": 10,
          "num_excluded_queries": 0}


def _hand_made_metrics():
  metrics = {
      "page_to_video": _direction_metrics(0.1234, 0.5, 0.75, 3.0, 0.2468, 0.3333, 0.0126),
      "video_to_page": _direction_metrics(0.2, 0.4, 0.6, 2.5, 0.3, 0.5, 0.01),
      "page_to_live": {"skipped": "no live embeddings"},
      "live_to_page": {"skipped": "no live embeddings"},
      "video_to_live": {"skipped": "no live embeddings"},
      "live_to_video": _direction_metrics(1.0, 1.0, 1.0, 1.0, 1.0, 0.999, 0.5),
      "chance_R@1": 0.1, "search": "exact", "checkpoint_step": 42, "split": "test",
      "num_items": {"page": 31, "video": 29},
  }
  metrics["live_to_video"]["median_rank"] = None  # as under ScaNN search
  return metrics


def _table_rows(table):
  lines = table.strip().splitlines()
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_summary_table_shows_percentages_and_skipped_directions():
  rows = _table_rows(eval_report.summary_table(_hand_made_metrics()))
  assert rows[0] == ["direction", "R@1", "R@5", "R@10", "median rank", "mAP",
                     "one-shot acc.", "chance R@1"]
  assert set("".join(rows[1])) <= set("-:")
  body = {row[0]: row[1:] for row in rows[2:]}
  assert list(body) == list(DIRECTION_LABELS)
  assert body["page → video"] == ["12.3", "50.0", "75.0", "3", "24.7", "33.3", "1.3"]
  assert body["video → page"] == ["20.0", "40.0", "60.0", "2.5", "30.0", "50.0", "1.0"]
  assert body["live → video"] == ["100.0", "100.0", "100.0", "–", "100.0", "99.9", "50.0"]
  for label in ("page → live", "live → page", "video → live"):
    assert body[label][0] == "skipped: no live embeddings"
    assert body[label][1:] == [""] * 6


def test_summary_table_marks_absent_directions():
  rows = _table_rows(eval_report.summary_table({"page_to_video": _direction_metrics(
      0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.1)}))
  assert len(rows) == 2 + 6
  assert rows[3][1] == "skipped: not evaluated"


# ---- embeddings over the tiny prepared split -----------------------------------------


def _domain_embeddings(prepared_dir, domain, noise, seed):
  """Records of the test split with embeddings near a per-product direction."""
  source = prepare.open_domain(prepared_dir, "test", domain)
  records = [source[i] for i in range(len(source))]
  product_ids = np.array([r["product_id"] for r in records], object)
  products = sorted(set(product_ids))
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(0).normal(size=(len(products), 16))
  codes = np.array([products.index(p) for p in product_ids])
  vectors = directions[codes] + noise * rng.normal(size=(len(records), 16))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return embed.DomainEmbeddings(domain, np.array([r["id"] for r in records], object),
                                product_ids, vectors.astype(np.float32)), records


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_prepared_dir):
  return {domain: _domain_embeddings(tiny_prepared_dir, domain, noise=1.0, seed=seed)[0]
          for seed, domain in enumerate(domains.NAMES)}


def _numpy_recall_curve(query, gallery, max_k):
  """Reference: full score matrix, stable sort, position of the first correct item."""
  scores = query.embeddings.astype(np.float64) @ gallery.embeddings.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")
  correct = gallery.product_ids[order] == query.product_ids[:, None]
  usable = correct.any(axis=1)
  first = np.argmax(correct[usable], axis=1) + 1
  return np.array([np.mean(first <= k) for k in range(1, max_k + 1)])


def test_recall_curve_matches_a_numpy_reference(tiny_embeddings):
  query, gallery = tiny_embeddings["video"], tiny_embeddings["page"]
  curve = eval_report.recall_curve(query, gallery, max_k=50)
  assert curve.shape == (50,)
  assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
  # The gallery has fewer than 50 items: the tail repeats R@G.
  np.testing.assert_allclose(curve, _numpy_recall_curve(query, gallery, 50), atol=1e-12)
  # Continuous random embeddings have no ties, so R@1/5/10 equal the exact metrics.
  exact = search_metrics.retrieval_metrics(query.embeddings, query.product_ids,
                                           gallery.embeddings, gallery.product_ids)
  np.testing.assert_allclose(curve[[0, 4, 9]], [exact["R@1"], exact["R@5"], exact["R@10"]])


def test_recall_curve_samples_a_bounded_number_of_queries(tiny_embeddings):
  query, gallery = tiny_embeddings["page"], tiny_embeddings["live"]
  first = eval_report.recall_curve(query, gallery, max_k=5, max_queries=7, seed=3)
  again = eval_report.recall_curve(query, gallery, max_k=5, max_queries=7, seed=3)
  np.testing.assert_array_equal(first, again)
  # Each R@K of 7 sampled queries is a multiple of 1/7 (all queries are usable here).
  np.testing.assert_allclose(first * 7, np.round(first * 7), atol=1e-9)


# ---- write_report ---------------------------------------------------------------------


def _write_training_log(workdir, num_records=5):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i in range(num_records):
      step = 10 * (i + 1)
      f.write(json.dumps({"step": step, "loss": 5.0 - i, "loss/page_video": 2.0 - 0.1 * i,
                          "loss/video_live": 1.5 - 0.1 * i,
                          "loss/a_term_the_report_never_heard_of": 1.0,
                          "lr/visual": 1e-3 * (i + 1) / 5,
                          "lr/text": 1e-4, "examples_per_second": 100.0}) + "\n")


def _report_config(tiny_prepared_dir, tiny_rope_dir, examples=3):
  config = tiny_configs.training_config(tiny_prepared_dir, tiny_rope_dir)
  config.eval.report_examples = examples
  return config


def _is_png(path):
  with open(path, "rb") as f:
    return os.path.getsize(path) > 1000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report_makes_every_artefact(tiny_embeddings, tiny_prepared_dir, tiny_rope_dir,
                                           tmp_path):
  workdir = str(tmp_path / "work")
  eval_dir = str(tmp_path / "work" / "eval")
  _write_training_log(workdir)
  config = _report_config(tiny_prepared_dir, tiny_rope_dir, examples=3)
  metrics = _hand_made_metrics()
  written = eval_report.write_report(eval_dir, metrics, tiny_embeddings, config, workdir)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["examples.html", "recall_curves.png", "report.md", "training_curves.png"]
  assert _is_png(os.path.join(eval_dir, "recall_curves.png"))
  assert _is_png(os.path.join(eval_dir, "training_curves.png"))

  markdown = open(os.path.join(eval_dir, "report.md"), encoding="utf-8").read()
  assert "step 42" in markdown and "`test`" in markdown
  assert "31 pages" in markdown and "29 videos" in markdown
  assert "search: exact" in markdown
  assert eval_report.summary_table(metrics) in markdown
  for name in ("recall_curves.png", "training_curves.png", "examples.html"):
    assert f"({name})" in markdown
  assert "Problems" not in markdown

  page = open(os.path.join(eval_dir, "examples.html"), encoding="utf-8").read()
  assert page.count('class="query"') == 6 * 3  # six directions, three queries each
  results = page.count('class="correct"') + page.count('class="wrong"')
  assert results == 6 * 3 * 5
  assert page.count("✓") - page.count("have a green border and a ✓") == page.count(
      'class="correct"') > 0
  uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
  assert len(uris) == 6 * 3 * 6  # every query and result has its thumbnail
  with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as thumbnail:
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= report_examples.THUMBNAIL_SIDE
  assert "score " in page and "product " in page


def test_examples_show_a_clips_middle_frame(tiny_prepared_dir):
  video, records = _domain_embeddings(tiny_prepared_dir, "video", noise=0.5, seed=0)
  products = prepare.load_products(tiny_prepared_dir, "test")
  images = report_examples.RecordImages(prepare.open_domain(tiny_prepared_dir, "test", "video"),
                               products, "video")
  record = records[3]
  middle = record["frames"][len(record["frames"]) // 2]
  assert len(set(record["frames"])) > 1
  expected = report_examples.thumbnail_data_uri(middle)
  assert images.data_uri(3, record["id"], record["product_id"]) == expected
  # A wrong row (order not kept) is found through the products table.
  images = report_examples.RecordImages(prepare.open_domain(tiny_prepared_dir, "test", "video"),
                               products, "video")
  assert images.data_uri(0, record["id"], record["product_id"]) == expected
  assert report_examples.thumbnail_data_uri(record["frames"][0]) != expected


def test_report_survives_plot_failures_and_a_missing_log(tiny_embeddings, tiny_prepared_dir,
                                                         tiny_rope_dir, tmp_path, monkeypatch):
  def broken_plot(*args, **kwargs):
    raise RuntimeError("renderer exploded")

  monkeypatch.setattr(eval_report, "plot_recall_curves", broken_plot)
  eval_dir = str(tmp_path / "eval")
  config = _report_config(tiny_prepared_dir, tiny_rope_dir, examples=1)
  written = eval_report.write_report(eval_dir, _hand_made_metrics(), tiny_embeddings, config,
                                str(tmp_path / "no_training"))
  assert sorted(os.path.basename(p) for p in written) == ["examples.html", "report.md"]
  markdown = open(os.path.join(eval_dir, "report.md"), encoding="utf-8").read()
  assert "renderer exploded" in markdown
  assert "no training log" in markdown
  assert "recall_curves.png" not in markdown


def test_training_curves_plot_every_logged_loss_term(tmp_path):
  _write_training_log(str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  keys = eval_report.training_curve_keys(records)
  assert keys["loss"] == ["loss"]
  assert keys["terms"] == ["loss/a_term_the_report_never_heard_of", "loss/page_video",
                           "loss/video_live"]
  assert keys["lr"] == ["lr/text", "lr/visual"]


@pytest.mark.parametrize("kind", ["scann", "faiss_hnsw"])
def test_report_states_the_index_recall_of_any_index_kind(kind, tiny_prepared_dir,
                                                          tiny_rope_dir):
  metrics = dict(_hand_made_metrics(), search=kind, **{f"{kind}_recall@10_vs_exact": 0.983})
  text = eval_report._markdown_report(metrics, _report_config(tiny_prepared_dir, tiny_rope_dir),
                                 artefacts={}, notes=[], problems=[])
  assert f"- search: {kind} (recall@10 against exact search: 98.3%;" in text
