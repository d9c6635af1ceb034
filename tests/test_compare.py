"""`cope_jax.compare` and the release's embedding format (`cope_jax.release_format`).

Release folders are written here the way the release's `infer.py` writes them: one file
per domain and rank, `{rank}_item` / `{rank}_photo` / `{rank}_live`, each line the id, a
TAB (for lives: start TAB end TAB) and the float32 values as Python's `str`, comma-joined;
items are spread over the ranks by the rule of PyTorch's `DistributedSampler`
(shuffle off), which pads every rank to the same length by repeating items from the start.
The metrics are checked against a NumPy brute force written here from the definitions in
`cope_jax/search/metrics.py`.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from cope_jax import compare
from cope_jax import export_format
from cope_jax.base import result_files
from cope_jax import release_format
from cope_jax.search import metrics as search_metrics
from cope_jax.base import domains
from data_pipelines import rope_format

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "test"
DIM = 16
NUM_PRODUCTS = 12
ITEMS = {"page": 30, "video": 26, "live": 22}
CLUSTER_NOISE = 1.4  # item = product centre + this much Gaussian noise (then normalised)
METRIC_TOLERANCE = 1e-12  # metrics are ratios of counts: the same counts give the same values
CANDIDATE_NOISE = 0.05


# ----------------------------------------------------------------------------
# Data: pair files, embeddings, folders written like the release's infer.py.


def make_dataset(seed=0, products=NUM_PRODUCTS, items=None):
  """domain -> dict(ids [N] str, product_ids [N] str, embeddings [N, D] float32 unit
  rows, times [N, 2] int for release_times domains), ids in a shuffled order."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(products, DIM))
  data = {}
  for domain in domains.DOMAINS:
    count = (items or ITEMS)[domain.name]
    product_index = rng.integers(0, products, size=count)
    vectors = centres[product_index] + CLUSTER_NOISE * rng.normal(size=(count, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    entry = {"ids": np.array([f"{domain.name[0]}{seed}{i:04d}" for i in range(count)], object),
             "product_ids": np.array([f"P{p:03d}" for p in product_index], object),
             "embeddings": vectors.astype(np.float32)}
    if domain.release_times:
      start = 1690000000000 + rng.integers(0, 10**6, size=count)
      entry["times"] = np.stack([start, start + rng.integers(1000, 60000, size=count)], 1)
    order = rng.permutation(count)  # the release lists items in a set's order
    data[domain.name] = {k: v[order] for k, v in entry.items()}
  # An exact tie at the top: a page's best video (its own product's) gets the page's
  # embedding, and so does a video of another product, so that page ranks its product
  # second (ties count against the query).
  pages, videos = data["page"], data["video"]
  for page, product in enumerate(pages["product_ids"]):
    own = np.flatnonzero(videos["product_ids"] == product)
    other = np.flatnonzero(videos["product_ids"] != product)
    if own.size and other.size:
      videos["embeddings"][[own[0], other[0]]] = pages["embeddings"][page]
      break
  return data


def write_pairs(root, data, split=SPLIT, extra=None):
  """The three ROPE pair files of `split` (`product_id, item_id` per line)."""
  os.makedirs(root, exist_ok=True)
  for domain in domains.DOMAINS:
    rows = list(zip(data[domain.name]["product_ids"], data[domain.name]["ids"]))
    rows += (extra or {}).get(domain.name, [])
    with open(os.path.join(root, rope_format.file_name(split, domain.files.pair)), "w",
              encoding="utf-8") as f:
      f.writelines(f"{product}, {item}\n" for product, item in rows)
  return str(root)


def sampler_indices(num_items, world_size, rank):
  """PyTorch DistributedSampler(shuffle=False, drop_last=False): rank's dataset indices."""
  num_samples = math.ceil(num_items / world_size)
  total = num_samples * world_size
  indices = list(range(num_items))
  padding = total - num_items
  indices += (indices * math.ceil(padding / num_items))[:padding]
  return indices[rank:total:world_size]


def infer_line(item_id, embedding, times=None):
  """One line as infer.py writes it."""
  feat = np.asarray(embedding).astype("float32").tolist()
  fields = [item_id] + ([str(times[0]), str(times[1])] if times is not None else [])
  return "\t".join(fields + [",".join([str(x) for x in feat])]) + "\n"


def write_release_folder(folder, data, world_size):
  """Every domain's `{rank}_{release name}` files for `world_size` ranks."""
  os.makedirs(folder, exist_ok=True)
  for domain in domains.DOMAINS:
    entry = data[domain.name]
    for rank in range(world_size):
      with open(os.path.join(folder, f"{rank}_{domain.release_name}"), "w") as f:
        for i in sampler_indices(len(entry["ids"]), world_size, rank):
          f.write(infer_line(entry["ids"][i], entry["embeddings"][i],
                             entry["times"][i] if domain.release_times else None))
  return str(folder)


def padded_repeats(data, world_size):
  return {d: math.ceil(len(e["ids"]) / world_size) * world_size - len(e["ids"])
          for d, e in data.items()}


def write_export_folder(folder, data):
  """A cope_jax.export folder (Parquet + manifest) holding `data`'s embeddings as given."""
  os.makedirs(folder, exist_ok=True)
  manifest = {"embedding_dim": DIM, "domains": {}}
  for domain, entry in data.items():
    name = export_format.parquet_name(domain, 0, 1)
    table = export_format.embeddings_table(domain, entry["ids"], entry["product_ids"],
                                    entry["embeddings"])
    pq.write_table(table, os.path.join(folder, name))
    manifest["domains"][domain] = {"count": len(entry["ids"]),
                                   "files": [{"file": name, "rows": len(entry["ids"])}]}
  result_files.write_json(os.path.join(folder, export_format.MANIFEST_FILE), manifest)
  return str(folder)


def subset(data, keep):
  """data restricted per domain to rows where keep[domain] is True."""
  return {d: {k: v[keep[d]] for k, v in e.items()} for d, e in data.items()}


# ----------------------------------------------------------------------------
# The NumPy reference.


def sorted_by_id(entry):
  order = np.argsort(entry["ids"].astype(str), kind="stable")
  return {k: v[order] for k, v in entry.items()}


def unit(embeddings):
  values = np.asarray(embeddings, np.float64)
  return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


def numpy_direction(query, gallery, ks, draws=5):
  """R@K, median rank, mAP, one-shot accuracy of one direction, by brute force.

  Ranking of the gallery for a query: score descending; on equal scores wrong items
  before correct ones; correct items among themselves by gallery index. A query's rank
  is its first correct item's position; AP the mean over its correct items of
  (position among the correct items) / (position in the ranking). Queries whose product
  has no gallery item are excluded. One-shot: per draw one prototype per product
  (`one_shot_prototypes`, the draw's definition); a query is right when its product's
  prototype scores strictly above every other prototype.
  """
  q = unit(query["embeddings"]).astype(np.float64)
  g = unit(gallery["embeddings"]).astype(np.float64)
  scores = q @ g.T
  ranks, precisions = [], []
  excluded = 0
  for i, product in enumerate(query["product_ids"]):
    correct = gallery["product_ids"] == product
    if not correct.any():
      excluded += 1
      continue
    order = sorted(range(len(g)), key=lambda j: (-scores[i, j], bool(correct[j]), j))
    positions = [p + 1 for p, j in enumerate(order) if correct[j]]
    ranks.append(positions[0])
    precisions.append(np.mean([(c + 1) / r for c, r in enumerate(positions)]))
  ranks = np.asarray(ranks)
  result = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
  result.update({"median_rank": float(np.median(ranks)), "mAP": float(np.mean(precisions)),
                 "num_queries": len(ranks), "num_excluded_queries": excluded})
  accuracies = []
  for draw in range(draws):
    prototypes = search_metrics.one_shot_prototypes(gallery["ids"], gallery["product_ids"],
                                                    0, draw)
    proto_scores = q @ g[prototypes].T
    proto_products = gallery["product_ids"][prototypes]
    right = []
    for i, product in enumerate(query["product_ids"]):
      own = np.flatnonzero(proto_products == product)
      if own.size:
        others = np.delete(proto_scores[i], own[0])
        right.append(bool((proto_scores[i, own[0]] > others).all()))
    accuracies.append(np.mean(right))
  result["one_shot_accuracy"] = float(np.mean(accuracies))
  return result


def numpy_metrics(data, ks=(1, 5, 10)):
  data = {d: sorted_by_id(e) for d, e in data.items()}
  return {domains.direction_name(q, g): numpy_direction(data[q], data[g], ks)
          for q, g in domains.DIRECTIONS}


def assert_metrics_match(computed, expected):
  for name, reference in expected.items():
    for key, value in reference.items():
      assert computed[name][key] == pytest.approx(value, abs=METRIC_TOLERANCE), (name, key)


def strict_json(path):
  def refuse(constant):
    raise AssertionError(f"{path}: non-standard JSON constant {constant}")
  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=refuse)


# ----------------------------------------------------------------------------
# The release format.


def test_release_lines_read_back_bit_for_bit(tmp_path):
  values = np.array([[1e-45, -0.0, 3.4028235e38, 1e-8, -0.1, 1 / 3, 7.0, -2.5e-20]],
                    np.float32)
  path = tmp_path / "0_live"
  path.write_text(release_format.format_line("L1", values[0], (1690000000000, 1690000005000))
                  + infer_line("L2", values[0] * 0.5, ("1690000000001", "1690000000002")))
  rows = release_format.read_file(str(path), "live")
  assert list(rows.ids) == ["L1", "L2"]
  assert rows.times.tolist() == [["1690000000000", "1690000005000"],
                                 ["1690000000001", "1690000000002"]]
  read = rows.embeddings.astype(np.float32)
  np.testing.assert_array_equal(read.view(np.uint32), np.concatenate([values, values * 0.5])
                                .view(np.uint32))
  assert list(rows.lines) == [1, 2]
  # The project's writer and the release's produce the same text.
  assert release_format.format_line("x", values[0]) == infer_line("x", values[0])


def test_release_files_are_found_by_rank_and_domain(tmp_path):
  data = make_dataset()
  write_release_folder(tmp_path, data, world_size=3)
  (tmp_path / "infer.log").write_text("not an embedding file")
  (tmp_path / "10_item").write_text("")  # rank 10 sorts after rank 2
  files = release_format.release_files(str(tmp_path))
  assert list(files) == list(domains.NAMES)
  assert [os.path.basename(p) for p in files["page"]] == ["0_item", "1_item", "2_item",
                                                          "10_item"]
  assert release_format.file_name(1, "video") == "1_photo"


def test_pairs_are_read_without_any_other_file(tmp_path):
  data = make_dataset()
  root = write_pairs(tmp_path, data)
  pairs, problems = rope_format.read_pairs(root, SPLIT, "live")
  assert pairs == dict(zip(data["live"]["ids"], data["live"]["product_ids"]))
  assert problems == []
  with pytest.raises(FileNotFoundError, match="test_product_pages_pair.txt"):
    rope_format.read_pairs(str(tmp_path / "nowhere"), SPLIT, "page")


# ----------------------------------------------------------------------------
# Metrics against NumPy.


def test_one_release_folder_with_padded_repeats_matches_numpy(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = write_release_folder(tmp_path / "release", data, world_size=4)
  # A repeat within one file too (an item written twice by one rank).
  with open(os.path.join(folder, "1_photo"), "a") as f:
    f.write(infer_line(data["video"]["ids"][1], data["video"]["embeddings"][1]))
  repeats = padded_repeats(data, 4)
  assert repeats["page"] and repeats["video"] and repeats["live"]  # the sampler padded

  result = compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))

  side = result["sides"]["reference"]
  assert side["format"] == "release" and side["dim"] == DIM
  for domain, entry in data.items():
    stats = side["domains"][domain]
    assert stats["unique_ids"] == len(entry["ids"])
    assert stats["duplicates_dropped"] == repeats[domain] + (domain == "video")
    assert stats["rows_read"] == len(entry["ids"]) + stats["duplicates_dropped"]
    assert stats["unpaired_ids"] == 0
  expected = numpy_metrics(data, ks=range(1, compare.CURVE_MAX_K + 1))
  table = {name: {k: v for k, v in m.items()
                  if not k.startswith("R@") or k in ("R@1", "R@5", "R@10")}
           for name, m in expected.items()}
  assert_metrics_match(result["metrics"]["reference"], table)
  for name, reference in expected.items():
    np.testing.assert_allclose(result["recall_at_k"]["reference"][name],
                               [reference[f"R@{k}"] for k in range(1, compare.CURVE_MAX_K + 1)],
                               atol=METRIC_TOLERANCE)
  assert "candidate" not in result["sides"] and "cosine" not in result
  # The tie (two videos of different products, one embedding) counts against the query.
  assert strict_json(tmp_path / "out" / "compare.json") == result
  report = (tmp_path / "out" / "compare.md").read_text()
  assert "| page → video |" in report and "4 repeats dropped" not in report
  assert f"{len(data['video']['ids'])} ids ({repeats['video'] + 1} repeats dropped" in report
  assert (tmp_path / "out" / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_release_against_export_side_by_side_matches_numpy(tmp_path):
  data = make_dataset()
  rng = np.random.default_rng(1)
  rope_dir = write_pairs(tmp_path / "rope", data,
                         extra={"page": [("P999", "unpaired-nowhere")]})
  reference_folder = write_release_folder(tmp_path / "reference", data, world_size=3)
  # The candidate: every embedding moved a little, a few ids missing, one extra id the
  # reference lacks and one id that no pair file names.
  keep = {d: rng.random(len(e["ids"])) > 0.15 for d, e in data.items()}
  candidate = subset(data, keep)
  for entry in candidate.values():
    moved = entry["embeddings"] + CANDIDATE_NOISE * rng.normal(size=entry["embeddings"].shape)
    entry["embeddings"] = unit(moved)
  extra = make_dataset(seed=7, items={"page": 2, "video": 1, "live": 1})["page"]
  extra["ids"] = np.array(["candidate-extra", "not-in-rope"], object)
  candidate["page"] = {k: np.concatenate([candidate["page"][k], extra[k]])
                       for k in ("ids", "product_ids", "embeddings")}
  with open(os.path.join(rope_dir, rope_format.file_name(SPLIT, "product_pages_pair")),
            "a") as f:
    f.write(f"{extra['product_ids'][0]}, candidate-extra\n")
  # The export states the product the pair file gives; "not-in-rope" is in no pair file.
  candidate_folder = write_export_folder(tmp_path / "candidate", candidate)

  out = tmp_path / "out"
  result = compare.compare(reference_folder, rope_dir, SPLIT, candidate_folder, str(out))

  assert result["sides"]["candidate"]["format"] == "export"
  assert result["sides"]["candidate"]["domains"]["page"]["unpaired_ids"] == 1
  assert result["sides"]["candidate"]["domains"]["page"]["unpaired_examples"] == ["not-in-rope"]
  both = {}
  for domain, entry in data.items():
    counts = result["ids"][domain]
    in_both = keep[domain]
    assert counts["both"] == in_both.sum()
    assert counts["reference_only"] == (~in_both).sum()
    assert counts["candidate_only"] == (1 if domain == "page" else 0)
    both[domain] = in_both
  assert result["ids"]["page"]["candidate_only_examples"] == ["candidate-extra"]

  reference_both = subset(data, both)
  candidate_both = {d: {k: v[: both[d].sum()] for k, v in e.items()}
                    for d, e in candidate.items()}
  assert_metrics_match(result["metrics"]["reference"], numpy_metrics(reference_both))
  assert_metrics_match(result["metrics"]["candidate"], numpy_metrics(candidate_both))
  for name, entry in result["differences"].items():
    for key, value in entry.items():
      assert value == pytest.approx(result["metrics"]["candidate"][name][key]
                                    - result["metrics"]["reference"][name][key], abs=1e-15)

  # Per-item cosine, computed here from the two sides' vectors of each id.
  all_cosines = []
  for domain in data:
    ref, cand = sorted_by_id(reference_both[domain]), sorted_by_id(candidate_both[domain])
    assert list(ref["ids"]) == list(cand["ids"])
    a, b = ref["embeddings"].astype(np.float64), cand["embeddings"].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    all_cosines.append(cosine)
    stats = result["cosine"][domain]
    assert stats["count"] == len(cosine) and stats["identical"] == 0
    assert stats["min"] == pytest.approx(cosine.min(), abs=1e-12)
    assert stats["p1"] == pytest.approx(np.percentile(cosine, 1), abs=1e-12)
    assert stats["median"] == pytest.approx(np.median(cosine), abs=1e-12)
    assert 0.9 < stats["min"] < 1.0
  assert result["cosine"]["all"]["count"] == sum(len(c) for c in all_cosines)
  assert result["cosine"]["all"]["min"] == pytest.approx(np.concatenate(all_cosines).min())

  # Top-10 overlap, by brute force.
  for (query, gallery), name in zip(domains.DIRECTIONS, domains.DIRECTION_NAMES):
    shares = []
    ref_q, ref_g = (unit(sorted_by_id(reference_both[d])["embeddings"]) for d in (query, gallery))
    cand_q, cand_g = (unit(sorted_by_id(candidate_both[d])["embeddings"])
                      for d in (query, gallery))
    k = min(10, len(ref_g))
    for i in range(len(ref_q)):
      top_ref = set(np.argsort(-(ref_g.astype(np.float64) @ ref_q[i]), kind="stable")[:k])
      top_cand = set(np.argsort(-(cand_g.astype(np.float64) @ cand_q[i]), kind="stable")[:k])
      shares.append(len(top_ref & top_cand) / k)
    overlap = result["top10_overlap"][name]
    assert overlap["queries"] == len(ref_q) and overlap["k"] == k
    assert overlap["mean"] == pytest.approx(np.mean(shares), abs=1e-12)
    assert overlap["min"] == pytest.approx(np.min(shares), abs=1e-12)
    assert 0 < overlap["mean"] < 1

  saved = strict_json(out / "compare.json")
  assert saved == result
  report = (out / "compare.md").read_text()
  page_to_video = result["metrics"]
  r1 = (100 * page_to_video["reference"]["page_to_video"]["R@1"],
        100 * page_to_video["candidate"]["page_to_video"]["R@1"])
  assert f"| page → video | {r1[0]:.1f} / {r1[1]:.1f} ({r1[1] - r1[0]:+.1f}) |" in report
  assert "candidate-extra" in report and "not-in-rope" in report
  assert "## Agreement item by item" in report and "### Top-10 overlap" in report
  assert (out / "recall_at_k.png").stat().st_size > 1000


def test_the_same_embeddings_sharded_differently_compare_identical(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  reference = write_release_folder(tmp_path / "four_ranks", data, world_size=4)
  candidate = write_release_folder(tmp_path / "one_rank", data, world_size=1)
  result = compare.compare(reference, rope_dir, SPLIT, candidate, str(tmp_path / "out"))
  assert result["metrics"]["reference"] == result["metrics"]["candidate"]
  assert all(value == 0.0 for entry in result["differences"].values()
             for value in entry.values())
  for domain, entry in data.items():
    assert result["cosine"][domain]["identical"] == len(entry["ids"])
    assert result["cosine"][domain]["min"] == 1.0
  assert all(o["mean"] == 1.0 and o["same_items"] == 1.0
             for o in result["top10_overlap"].values())
  report = (tmp_path / "out" / "compare.md").read_text()
  assert "1.000000 | 1.000000 | 1.000000 |" in report


def test_sides_of_different_dimensions_are_scored_without_cosine(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  reference = write_release_folder(tmp_path / "reference", data, world_size=2)
  wider = {d: dict(e, embeddings=unit(np.concatenate([e["embeddings"], e["embeddings"]], 1)))
           for d, e in data.items()}
  candidate = write_release_folder(tmp_path / "candidate", wider, world_size=1)
  result = compare.compare(reference, rope_dir, SPLIT, candidate, str(tmp_path / "out"))
  assert result["sides"]["candidate"]["dim"] == 2 * DIM
  assert result["cosine"] == {"skipped": f"embedding dimensions differ: reference {DIM}, "
                                         f"candidate {2 * DIM}"}
  # [v, v] / sqrt(2) ranks as v does: the same metrics and neighbours.
  assert_metrics_match(result["metrics"]["candidate"], numpy_metrics(data))
  assert all(o["mean"] == 1.0 for o in result["top10_overlap"].values())
  assert "Not computed: embedding dimensions differ" in (tmp_path / "out" / "compare.md").read_text()


def test_undefined_metrics_are_null_in_strict_json(tmp_path):
  data = make_dataset()
  # Lives of products that have no page: page -> live has no includable query.
  page_products = set(data["page"]["product_ids"])
  data["live"]["product_ids"] = np.array([f"Q{i}" for i in range(len(data["live"]["ids"]))],
                                         object)
  assert not page_products & set(data["live"]["product_ids"])
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = write_release_folder(tmp_path / "release", data, world_size=2)
  result = compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))
  saved = strict_json(tmp_path / "out" / "compare.json")
  assert saved["metrics"]["reference"]["page_to_live"]["R@1"] is None
  assert saved["metrics"]["reference"]["page_to_live"]["num_excluded_queries"] == len(
      data["page"]["ids"])
  assert result == saved
  assert "| page → live | – | – | – | – | – |" in (tmp_path / "out" / "compare.md").read_text()


# ----------------------------------------------------------------------------
# Duplicates and bad input.


def test_conflicting_copies_are_an_error_listing_them(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = write_release_folder(tmp_path / "release", data, world_size=2)
  item_id = data["page"]["ids"][2]  # rank 0's second line
  with open(os.path.join(folder, "1_item"), "a") as f:  # its line 16
    f.write(infer_line(item_id, -data["page"]["embeddings"][2]))
  live_id, live_times = data["live"]["ids"][0], data["live"]["times"][0]
  with open(os.path.join(folder, "1_live"), "a") as f:
    f.write(infer_line(live_id, data["live"]["embeddings"][0], (live_times[0], 1)))
  with pytest.raises(compare.CompareInputError) as caught:
    compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))
  message = str(caught.value)
  assert "2 ids have copies that differ" in message
  assert (f"page {item_id} ({folder}/0_item, line 2 vs {folder}/1_item, line 16: "
          "different embeddings)") in message
  assert (f"live {live_id} ({folder}/0_live, line 1 vs {folder}/1_live, line 12: "
          "different start/end times)") in message
  assert not (tmp_path / "out" / "compare.json").exists()


def _release_folder(tmp_path, data):
  return write_release_folder(tmp_path / "release", data, world_size=2)


def _replace_line(path, line_number, text):
  with open(path) as f:
    lines = f.readlines()
  lines[line_number - 1] = text
  with open(path, "w") as f:
    f.writelines(lines)


def _corrupt_value(path):
  item_id, values = open(path).readline().rstrip("\n").split("\t")
  values = values.split(",")
  values[4] = "0.1x"
  _replace_line(path, 1, f"{item_id}\t{','.join(values)}\n")


def _short_line(path):
  item_id, values = open(path).readlines()[1].rstrip("\n").split("\t")
  _replace_line(path, 2, f"{item_id}\t{','.join(values.split(',')[:-1])}\n")


def _nan_value(path):
  item_id, values = open(path).readline().rstrip("\n").split("\t")
  _replace_line(path, 1, f"{item_id}\tnan,{values.split(',', 1)[1]}\n")


def _live_without_times(path):
  fields = open(path).readline().rstrip("\n").split("\t")
  _replace_line(path, 1, f"{fields[0]}\t{fields[3]}\n")


def _blank_line(path):
  _replace_line(path, 2, "\n")


@pytest.mark.parametrize("file, corrupt, message", [
    ("0_item", _corrupt_value, r"0_item, line 1: embedding value 5 '0.1x' is not a number"),
    ("1_photo", _short_line,
     r"1_photo, line 2: 15 embedding values, expected 16 \(as on .*0_item, line 1\)"),
    ("0_photo", _nan_value, r"0_photo, line 1: embedding value 1 'nan' is not a finite number"),
    ("0_live", _live_without_times,
     r"0_live, line 1: 2 TAB-separated fields, expected 4 \(id, start, end, embedding\)"),
    ("1_item", _blank_line, r"1_item, line 2: blank line"),
])
def test_bad_release_lines_are_named_by_file_and_line(tmp_path, file, corrupt, message):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = _release_folder(tmp_path, data)
  corrupt(os.path.join(folder, file))
  with pytest.raises(release_format.ReleaseFormatError, match=message):
    compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))


def test_bad_export_rows_and_missing_files_are_named(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = write_export_folder(tmp_path / "export", data)
  os.remove(os.path.join(folder, "video-0-of-1.parquet"))
  with pytest.raises(FileNotFoundError, match=r"video-0-of-1.parquet: missing \(listed for "
                                              r"video in .*manifest.json\)"):
    compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))

  folder = write_export_folder(tmp_path / "export_short", data)
  page = data["page"]
  table = export_format.embeddings_table("page", page["ids"][:3], page["product_ids"][:3],
                                  page["embeddings"][:3, :12])
  pq.write_table(table, os.path.join(folder, "page-0-of-1.parquet"))
  with pytest.raises(compare.CompareInputError,
                     match=rf"page-0-of-1.parquet, row 1 \(id {page['ids'][0]}\): 12 embedding "
                           r"values, expected 16"):
    compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("layout, error, message", [
    ("missing", FileNotFoundError, r"nowhere: no such folder"),
    ("empty", compare.CompareInputError, r"empty folder; expected the release's embedding "
                                         r"files \({rank}_item"),
    ("other", compare.CompareInputError, r"found notes.txt, page-0-of-1.parquet \(1 Parquet "
                                         r"files but no manifest.json"),
    ("both", compare.CompareInputError, r"holds both release embedding files and an export"),
    ("no_lines", compare.CompareInputError, r"its release files hold no embedding"),
])
def test_folders_of_neither_format_are_refused_naming_what_was_found(tmp_path, layout, error,
                                                                     message):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  folder = tmp_path / "side"
  if layout != "missing":
    folder.mkdir()
  if layout == "other":
    (folder / "notes.txt").write_text("x")
    (folder / "page-0-of-1.parquet").write_bytes(b"")
  if layout == "both":
    write_release_folder(folder, data, world_size=1)
    (folder / "manifest.json").write_text("{}")
  if layout == "no_lines":
    (folder / "0_item").write_text("")
  side = str(tmp_path / "nowhere") if layout == "missing" else str(folder)
  with pytest.raises(error, match=message):
    compare.compare(side, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))


def test_ids_of_another_split_are_an_error(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", make_dataset(seed=3))
  folder = write_release_folder(tmp_path / "release", data, world_size=1)
  with pytest.raises(compare.CompareInputError, match=r"none of its 78 ids is named by the "
                                                      r"ROPE pair files.*another --split"):
    compare.compare(folder, rope_dir, SPLIT, out_dir=str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="training_product_pages_pair.txt"):
    compare.compare(folder, rope_dir, "training", out_dir=str(tmp_path / "out"))


@pytest.mark.slow
def test_command_line(tmp_path):
  data = make_dataset()
  rope_dir = write_pairs(tmp_path / "rope", data)
  reference = write_release_folder(tmp_path / "reference", data, world_size=2)
  candidate = write_export_folder(tmp_path / "candidate", data)
  out = tmp_path / "out"
  command = [sys.executable, "-m", "cope_jax.compare", "--reference", reference,
             "--candidate", candidate, "--rope_dir", rope_dir, "--split", SPLIT,
             "--out", str(out)]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| page → video |" in result.stdout and "compare.json" in result.stdout
  saved = strict_json(out / "compare.json")
  assert saved["sides"]["reference"]["format"] == "release"
  assert saved["sides"]["candidate"]["format"] == "export"
  assert saved["cosine"]["all"]["min"] == pytest.approx(1.0, abs=1e-6)

  _corrupt_value(os.path.join(reference, "1_item"))
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "error:" in result.stderr and "1_item, line 1: embedding value 5" in result.stderr
  assert "Traceback" not in result.stderr
