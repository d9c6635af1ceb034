"""Search benchmark: recall@10 against queries/s of exact search, ScaNN and faiss HNSW.

  python -m benchmarks.search --embed_test_products 0   # search only: 100k and 1M galleries
  python -m benchmarks.search --gallery_sizes 100000 --embed_test_products 0
  python -m benchmarks.search --only_embedding          # export's embedding speed only

For each gallery size (d=128, 10k queries), in the same run:

* exact: the project's blocked JAX exact search (`cope_jax.search.exact`), the
  baseline of every speed-up and the true top-10 of every recall;
* ScaNN: one tree built as `config.eval` says (about sqrt(G) leaves), swept over its
  search-time settings, leaves to search x reorder size; and the setting
  `cope_jax.search` tunes to `config.eval.target_recall` on separate held-out queries
  (the normal way settings are chosen), measured on the benchmark queries;
* faiss HNSW (M=32, efConstruction=200) swept over efSearch, and its tuned efSearch,
  when faiss-cpu is installed (requirements-search.txt) and G <= --hnsw_max_gallery.

Prints the Pareto table (no other point is both faster and of higher recall) and the
tuned settings; writes JSON (default benchmarks/results/search.json) and a PNG of
recall@10 against queries/s (benchmarks/results/search.png). Timings: best of
--repeats runs for exact search and the tuned settings, one run per sweep point; every
method uses all cores. Each point is timed by the wall clock and by the CPU time of
the process (all threads): when other work shares the machine the CPU-time figures
(`--clock cpu` for the table and plot) still compare the methods on equal terms.

Data (`product_embeddings`): unit vectors shaped like product embeddings, not uniform
random (which has no neighbourhood structure). Categories of about 40 products, products
of about 16 items (lognormal popularity), with an anisotropic spectrum; queries are new
items of gallery products drawn farther from their product (as queries from another
domain are). The JSON records the parameters and how hard the data is (the product
R@1 of exact search, the cosine of the 1st and 10th neighbours).

Embedding: items/s of the streaming embedding that export runs, per domain, on a
synthetic test split with the tiny config, at eval batch 32 against batch 1 (the
in-run baseline); written to benchmarks/results/embedding.json.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np

from benchmarks import common
from configs import synthetic_tiny
from cope_jax.search import exact
from cope_jax.search import index as search_index
from cope_jax.search import metrics

K = 10
DATA = {  # product_embeddings parameters, recorded in the JSON
    "items_per_product": 16, "products_per_category": 40, "product_spread": 0.6,
    "item_spread": 0.8, "query_spread": 1.0, "spectrum_decay": 8.0, "spectrum_power": 1.0,
    "popularity_sigma": 1.0}
SCANN_SWEEP_REORDERS = (20, 40, 80, 160, 320)
SCANN_SWEEP_MAX_LEAVES_FRACTION = 0.25  # sweep leaves to search up to this share of leaves
HNSW_SWEEP_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PLOT_MIN_RECALL = 0.85  # the plot shows recall@10 from here to 1
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200


def product_embeddings(rng, num_items, num_queries, dim, items_per_product,
                       products_per_category, product_spread, item_spread, query_spread,
                       spectrum_decay, spectrum_power, popularity_sigma):
  """Gallery [num_items, dim], queries [num_queries, dim] (unit rows) and the product of
  each row ([num_items], [num_queries] int).

  Noise is Gaussian with per-dimension scale (1 + i/spectrum_decay)^-spectrum_power in a
  random rotation (normalised to unit expected norm; learned embeddings vary in few
  directions): category centres are noise; a product
  is its category centre plus product_spread x noise; an item its product plus
  item_spread x noise (queries: query_spread); every vector is L2-normalised.
  """
  scale = (1.0 + np.arange(dim) / spectrum_decay) ** -spectrum_power
  scale = (scale / np.sqrt(np.sum(scale ** 2))).astype(np.float32)
  rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)

  def noise(num):
    return (rng.standard_normal((num, dim), dtype=np.float32) * scale) @ rotation

  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  def items(products, num, spread, chunk=200_000):
    product_of_item = rng.choice(len(products), size=num, p=popularity)
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, chunk):
      stop = min(start + chunk, num)
      out[start:stop] = unit(products[product_of_item[start:stop]]
                             + spread * noise(stop - start))
    return out, product_of_item

  num_products = max(1, num_items // items_per_product)
  categories = unit(noise(max(1, num_products // products_per_category)))
  products = unit(categories[rng.integers(0, len(categories), num_products)]
                  + product_spread * noise(num_products))
  popularity = rng.lognormal(0.0, popularity_sigma, num_products)
  popularity /= popularity.sum()
  gallery, gallery_products = items(products, num_items, item_spread)
  queries, query_products = items(products, num_queries, query_spread)
  return gallery, queries, gallery_products, query_products


# ----------------------------------------------------------------------------
# Timing.


def _clocks():
  return time.perf_counter(), time.process_time()


def _since(start):
  """(wall seconds, CPU seconds of this process, all threads) since `start`."""
  wall, cpu = _clocks()
  return wall - start[0], cpu - start[1]


def _best(timings):
  return min(t[0] for t in timings), min(t[1] for t in timings)


def time_exact(queries, gallery, k, chunk, query_block, gallery_block, repeats):
  """Exact top-k in fixed-size query chunks (one compilation).

  Returns (indices [Q, k], best (wall, CPU) seconds over `repeats`, compile + first
  chunk wall seconds).
  """
  def run(chunk_queries):
    return exact.exact_search(chunk_queries, gallery, k, query_block=query_block,
                              gallery_block=gallery_block)[1]

  padded = np.pad(queries, ((0, -len(queries) % chunk), (0, 0)))
  start = time.perf_counter()
  run(padded[:chunk])  # compile (and one chunk of work)
  compile_and_first = time.perf_counter() - start
  timings = []
  for _ in range(repeats):
    start = _clocks()
    indices = np.concatenate([run(padded[i:i + chunk]) for i in range(0, len(padded), chunk)])
    timings.append(_since(start))
  return indices[:len(queries)], _best(timings), compile_and_first


def time_index(index, queries, k, repeats=1):
  """(indices [Q, k], best (wall, CPU) seconds over `repeats`) of `index.search`,
  after a warm-up."""
  index.search(queries[:256], k)
  timings, indices = [], None
  for _ in range(repeats):
    start = _clocks()
    _, indices = index.search(queries, k)
    timings.append(_since(start))
  return indices, _best(timings)


def point(method, settings, recall, timing, num_queries, exact_timing, cost=None):
  """One measured setting. Throughput by the wall clock (queries_per_second) and per
  CPU-second of this process (queries_per_cpu_second: robust to other load on the
  machine), each also as a ratio to exact search."""
  wall, cpu = timing
  row = {"method": method, "settings": settings, "recall@10": recall,
         "wall_seconds": wall, "cpu_seconds": cpu,
         "queries_per_second": num_queries / wall,
         "queries_per_cpu_second": num_queries / cpu,
         "speedup_vs_exact": exact_timing[0] / wall,
         "cpu_speedup_vs_exact": exact_timing[1] / cpu}
  if cost is not None:
    row["modelled_bytes_per_query"] = cost
  return row


# ----------------------------------------------------------------------------
# One gallery size.


def benchmark_scann(gallery, queries, tuning_queries, exact_indices, exact_timing,
                    eval_config, repeats):
  cls = search_index.index_class("scann")
  parameters, free = cls.parameters_from_config(eval_config, len(gallery))
  start = time.perf_counter()
  index = cls.build(gallery, parameters)
  build_seconds = time.perf_counter() - start
  sweep = []
  max_leaves = max(1, round(parameters.num_leaves * SCANN_SWEEP_MAX_LEAVES_FRACTION))
  leaves_values = [row["leaves_to_search"] for row in index.tuning_grid(K, free)[0]][::2]
  for reorder in SCANN_SWEEP_REORDERS:
    for leaves in (v for v in leaves_values if v <= max_leaves):
      candidate = index.with_search_parameters(leaves_to_search=leaves, reorder=reorder)
      found, timing = time_index(candidate, queries, K)
      sweep.append(point("scann", {"leaves_to_search": leaves, "reorder": reorder},
                         metrics.recall_against(exact_indices, found), timing, len(queries),
                         exact_timing, candidate.search_cost()))
  start = time.perf_counter()
  tuned, info = search_index.tune_index(index, free, gallery, eval_config, K,
                                        queries=tuning_queries)
  tuning_seconds = time.perf_counter() - start
  found, timing = time_index(tuned, queries, K, repeats)
  tuned_point = point("scann (tuned)", {key: info["parameters"][key] for key in
                                        ("leaves_to_search", "reorder")},
                      metrics.recall_against(exact_indices, found), timing, len(queries),
                      exact_timing, tuned.search_cost())
  return {"build_seconds": build_seconds, "num_leaves": parameters.num_leaves,
          "training_sample_size": parameters.training_sample_size,
          "tuning_seconds": tuning_seconds, "tuning": info, "tuned": tuned_point,
          "sweep": sweep}


def benchmark_hnsw(gallery, queries, tuning_queries, exact_indices, exact_timing,
                   eval_config, repeats):
  cls = search_index.index_class("faiss_hnsw")
  config = eval_config.copy_and_resolve_references()
  config.hnsw_m, config.hnsw_ef_construction = HNSW_M, HNSW_EF_CONSTRUCTION
  parameters, free = cls.parameters_from_config(config, len(gallery))
  start = time.perf_counter()
  index = cls.build(gallery, parameters)
  build_seconds = time.perf_counter() - start
  sweep = []
  for ef_search in HNSW_SWEEP_EF_SEARCH:
    candidate = index.with_search_parameters(ef_search=ef_search)
    found, timing = time_index(candidate, queries, K)
    sweep.append(point("faiss_hnsw", {"ef_search": ef_search},
                       metrics.recall_against(exact_indices, found), timing, len(queries),
                       exact_timing, candidate.search_cost()))
  tuned, info = search_index.tune_index(index, free, gallery, config, K, queries=tuning_queries)
  found, timing = time_index(tuned, queries, K, repeats)
  tuned_point = point("faiss_hnsw (tuned)", {"ef_search": info["parameters"]["ef_search"]},
                      metrics.recall_against(exact_indices, found), timing, len(queries),
                      exact_timing, tuned.search_cost())
  return {"build_seconds": build_seconds, "parameters": dataclasses.asdict(parameters),
          "tuning": info, "tuned": tuned_point, "sweep": sweep}


def data_difficulty(gallery, queries, gallery_products, query_products, exact_indices):
  """How hard the data is: product R@1 / R@10 of exact search, neighbour cosines."""
  sample = slice(0, min(1000, len(queries)))
  neighbours = gallery[exact_indices[sample]]  # [q, K, D]
  scores = np.einsum("qd,qkd->qk", queries[sample], neighbours)
  hits = gallery_products[exact_indices] == query_products[:, None]
  return {"product_R@1": float(hits[:, 0].mean()), "product_R@10": float(hits.any(1).mean()),
          "mean_cosine_1st_neighbour": float(scores[:, 0].mean()),
          "mean_cosine_10th_neighbour": float(scores[:, -1].mean())}


def benchmark(gallery_size, args, eval_config, faiss_available):
  rng = np.random.default_rng(args.seed)
  num_tuning = int(eval_config.tune_queries + eval_config.recall_check_queries)
  gallery, all_queries, gallery_products, all_query_products = product_embeddings(
      rng, gallery_size, args.num_queries + num_tuning, args.dim, **DATA)
  # Tuning uses its own held-out queries, never the benchmark's.
  queries, tuning_queries = all_queries[:args.num_queries], all_queries[args.num_queries:]
  query_products = all_query_products[:args.num_queries]
  exact_indices, exact_timing, exact_compile = time_exact(
      queries, gallery, K, args.query_chunk, args.query_block, args.gallery_block, args.repeats)
  exact_point = point("exact", {}, 1.0, exact_timing, len(queries), exact_timing)
  print(f"[{gallery_size:,}] exact: {exact_point['queries_per_second']:,.0f} q/s, "
        f"{exact_point['queries_per_cpu_second']:,.0f} q/CPU-s", flush=True)
  result = {
      "gallery_size": gallery_size, "num_queries": len(queries), "dim": args.dim,
      "data": data_difficulty(gallery, queries, gallery_products, query_products,
                              exact_indices),
      "exact": exact_point,
      "exact_compile_and_first_chunk_seconds": exact_compile,
  }
  result["scann"] = benchmark_scann(gallery, queries, tuning_queries, exact_indices,
                                    exact_timing, eval_config, args.repeats)
  tuned = result["scann"]["tuned"]
  print(f"[{gallery_size:,}] scann tuned {tuned['settings']}: recall@10 "
        f"{tuned['recall@10']:.4f}, {tuned['queries_per_second']:,.0f} q/s "
        f"({tuned['speedup_vs_exact']:.1f}x exact; per CPU-second "
        f"{tuned['cpu_speedup_vs_exact']:.1f}x)", flush=True)
  if not faiss_available:
    result["faiss_hnsw"] = {"skipped": "faiss-cpu not installed (requirements-search.txt)"}
  elif gallery_size > args.hnsw_max_gallery:
    result["faiss_hnsw"] = {"skipped": f"gallery above --hnsw_max_gallery "
                                       f"{args.hnsw_max_gallery:,} (build time on this machine)"}
  else:
    result["faiss_hnsw"] = benchmark_hnsw(gallery, queries, tuning_queries, exact_indices,
                                          exact_timing, eval_config, args.repeats)
  return result


# ----------------------------------------------------------------------------
# Report.


def all_points(result):
  points = [result["exact"], *result["scann"]["sweep"], result["scann"]["tuned"]]
  if "sweep" in result["faiss_hnsw"]:
    points += [*result["faiss_hnsw"]["sweep"], result["faiss_hnsw"]["tuned"]]
  return points


THROUGHPUT = {"wall": ("queries_per_second", "speedup_vs_exact", "queries / s (wall clock)"),
              "cpu": ("queries_per_cpu_second", "cpu_speedup_vs_exact",
                      "queries per CPU-second of the process")}


def pareto(points, clock):
  """Points no other point beats on both recall@10 and throughput, by descending recall."""
  key = THROUGHPUT[clock][0]
  front = [p for p in points if not any(
      q["recall@10"] >= p["recall@10"] and q[key] > p[key]
      or q["recall@10"] > p["recall@10"] and q[key] >= p[key]
      for q in points)]
  return sorted(front, key=lambda p: (-p["recall@10"], -p[key]))


def _settings_text(settings):
  return ", ".join(f"{key}={value}" for key, value in settings.items()) or "-"


def print_tables(results, target_recall, clock):
  print(f"\nPareto front by {THROUGHPUT[clock][2]}, and the tuned settings "
        f"(target recall@10 {target_recall}); speed-ups against exact search by the wall "
        "clock and per CPU-second:")
  lines = []
  for result in results:
    tuned = [result["scann"]["tuned"]]
    if "tuned" in result["faiss_hnsw"]:
      tuned.append(result["faiss_hnsw"]["tuned"])
    rows = pareto(all_points(result), clock)
    rows += [p for p in tuned if p not in rows]
    lines += [[f"{result['gallery_size']:>9,d}", p["method"], _settings_text(p["settings"]),
               f"{p['recall@10']:.4f}", f"{p['queries_per_second']:,.0f}",
               f"{p['speedup_vs_exact']:.1f}x", f"{p['queries_per_cpu_second']:,.0f}",
               f"{p['cpu_speedup_vs_exact']:.1f}x"] for p in rows]
  print(common.table(["gallery", "method", "settings", "recall@10", "q/s", "vs exact",
                      "q/CPU-s", "vs exact"], lines, left=3))
  print()
  for result in results:
    scann, hnsw = result["scann"], result["faiss_hnsw"]
    line = (f"{result['gallery_size']:>9,d}: ScaNN build {scann['build_seconds']:.1f} s "
            f"({scann['num_leaves']} leaves), tuning {scann['tuning_seconds']:.1f} s")
    line += (f"; HNSW build {hnsw['build_seconds']:.1f} s" if "build_seconds" in hnsw
             else f"; HNSW {hnsw['skipped']}")
    print(line)


def plot(results, path, target_recall, clock):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  key, _, label = THROUGHPUT[clock]
  figure, axes_row = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5),
                                  squeeze=False)
  for axes, result in zip(axes_row[0], results):
    sweep = result["scann"]["sweep"]
    for reorder in SCANN_SWEEP_REORDERS:
      line = [p for p in sweep if p["settings"]["reorder"] == reorder]
      axes.plot([p["recall@10"] for p in line], [p[key] for p in line],
                marker=".", linewidth=1, label=f"ScaNN reorder {reorder}")
    if "sweep" in result["faiss_hnsw"]:
      line = result["faiss_hnsw"]["sweep"]
      axes.plot([p["recall@10"] for p in line], [p[key] for p in line],
                marker="s", markersize=3, color="black", linewidth=1,
                label="faiss HNSW (efSearch)")
      tuned = result["faiss_hnsw"]["tuned"]
      axes.plot(tuned["recall@10"], tuned[key], marker="*", markersize=14,
                color="grey", linestyle="none", label="HNSW tuned")
    tuned = result["scann"]["tuned"]
    axes.plot(tuned["recall@10"], tuned[key], marker="*", markersize=16,
              color="red", linestyle="none", label="ScaNN tuned")
    exact_throughput = result["exact"][key]
    axes.axhline(exact_throughput, color="grey", linestyle="--", label="exact (JAX)")
    axes.axhline(50 * exact_throughput, color="grey", linestyle=":", label="50x exact")
    axes.axvline(target_recall, color="red", linestyle=":", linewidth=1)
    axes.set_xlim(PLOT_MIN_RECALL, 1.002)
    axes.set_yscale("log")
    axes.set_xlabel("recall@10 against exact search")
    axes.set_ylabel(label)
    axes.set_title(f"{result['gallery_size']:,} x {result['dim']} gallery, "
                   f"{result['num_queries']:,} queries")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def embedding_throughput(test_products: int, batch_sizes=(1, 32)) -> list[dict]:
  """Items/s of export's streaming embedding (`embed.iter_embedding_batches`), tiny config.

  A synthetic ROPE split is generated and prepared in a temporary folder and embedded
  with randomly initialised tiny-config weights (speed does not depend on the values);
  batch size 1 is the in-run baseline.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from cope_jax import config_checks, embed, sharding  # pylint: disable=g-import-not-at-top
  from cope_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from cope_jax.base import domains  # pylint: disable=g-import-not-at-top
  from data_pipelines import prepare, synthetic  # pylint: disable=g-import-not-at-top

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    rope_dir, prepared_dir = os.path.join(tmp, "rope"), os.path.join(tmp, "prepared")
    synthetic.generate(rope_dir, products=8, test_products=test_products, seed=0)
    prepare.prepare(rope_dir, prepared_dir, progress=False, log=lambda *a: None)
    config = synthetic_tiny.get_config()
    config.data.rope_dir, config.data.prepared_dir = rope_dir, prepared_dir
    config.data.vocab_path = os.path.join(rope_dir, "vocab.txt")
    config = config_checks.resolve_vocab_size(config)
    mesh = sharding.make_mesh(config.mesh)
    state, _ = state_lib.create_train_state(config, mesh, num_classes=0)
    model = state_lib.build_model(config)
    for batch_size in batch_sizes:
      config.eval.batch_size = batch_size
      for domain in domains.NAMES:
        # The first pass compiles; the second is timed.
        for timed in (False, True):
          start = time.perf_counter()
          count = sum(len(ids) for ids, _, _ in embed.iter_embedding_batches(
              config, model, state.params["model"], domain, mesh, show_progress=False))
          seconds = time.perf_counter() - start
        rows.append({"domain": domain, "batch_size": batch_size, "items": count,
                     "seconds": round(seconds, 3), "items_per_s": round(count / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
  for row in rows:
    baseline = next(r for r in rows if r["domain"] == row["domain"] and r["batch_size"] == 1)
    row["speedup_vs_batch_1"] = round(row["items_per_s"] / baseline["items_per_s"], 2)
  return rows


def measure_embedding(test_products: int, out: str) -> None:
  """Export's embedding rate (`embedding_throughput`): a table, and `out`."""
  rows = embedding_throughput(test_products)
  print()
  print(common.table(["domain", "batch", "items/s", "vs batch 1"],
                     [[row["domain"], row["batch_size"], f"{row['items_per_s']:.1f}",
                       f"{row['speedup_vs_batch_1']:.2f}"] for row in rows]))
  common.write_result(out, {"machine": common.machine(jax=True),
                            "config": "configs/synthetic_tiny.py (random weights)",
                            "results": rows})


def _faiss_available(skip: bool) -> bool:
  if skip:
    return False
  try:
    import faiss  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    print("faiss-cpu is not installed: HNSW left out (pip install -r requirements-search.txt)")
    return False


def _versions(faiss_available: bool) -> dict[str, str]:
  import scann  # pylint: disable=g-import-not-at-top
  versions = {"jax": jax.__version__,
              "scann": getattr(scann, "__version__", "see requirements.txt")}
  if faiss_available:
    import faiss  # pylint: disable=g-import-not-at-top
    versions["faiss"] = faiss.__version__
  return versions


def search_report(results, args, eval_config, faiss_available, load_before) -> dict:
  """The JSON of the search part: the machine, versions, data, settings, every point
  measured and each gallery's Pareto front."""
  return {
      "machine": common.machine(jax=True, load_average_1_5_15_min={
          "start": load_before, "end": os.getloadavg()}),
      "versions": _versions(faiss_available),
      "data": {"generator": "benchmarks/search.py product_embeddings", "parameters": DATA,
               "description": (
                   "unit vectors: categories of ~40 products, products of ~16 items "
                   "(lognormal popularity); Gaussian noise whose per-dimension scale "
                   f"decays as (1 + i/{DATA['spectrum_decay']})^-{DATA['spectrum_power']} "
                   "in a random rotation (participation ratio about 20 of 128 dimensions "
                   "for 8 and 1: learned embeddings vary in few directions); queries "
                   "are new items of gallery products, drawn "
                   "farther from their product (query_spread > item_spread)"),
               "seed": args.seed},
      "settings": {"k": K, "repeats": args.repeats, "clock": args.clock,
                   "scann_num_leaves": eval_config.scann_num_leaves,
                   "scann_soar_lambda": eval_config.scann_soar_lambda,
                   "query_chunk": args.query_chunk,
                   "query_block": args.query_block, "gallery_block": args.gallery_block,
                   "target_recall": eval_config.target_recall,
                   "tune_queries": eval_config.tune_queries,
                   "recall_check_queries": eval_config.recall_check_queries,
                   "scann_sweep_reorders": SCANN_SWEEP_REORDERS,
                   "scann_sweep_max_leaves_fraction": SCANN_SWEEP_MAX_LEAVES_FRACTION,
                   "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                            "efSearch_sweep": HNSW_SWEEP_EF_SEARCH}},
      "results": results,
      "pareto": {str(r["gallery_size"]): pareto(all_points(r), args.clock) for r in results},
  }


def _parser():
  parser = common.parser(__doc__, "search.json")
  parser.add_argument("--gallery_sizes", default="100000,1000000",
                      help="comma-separated gallery sizes")
  parser.add_argument("--num_queries", type=int, default=10_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs of exact search and of the tuned settings (best kept)")
  parser.add_argument("--query_chunk", type=int, default=1024,
                      help="queries per exact_search call (one compiled shape)")
  parser.add_argument("--query_block", type=int, default=256)
  parser.add_argument("--gallery_block", type=int, default=8192)
  parser.add_argument("--hnsw_max_gallery", type=int, default=100_000,
                      help="largest gallery faiss HNSW is built for (its build is slow on "
                      "few cores)")
  parser.add_argument("--clock", choices=sorted(THROUGHPUT), default="wall",
                      help="throughput of the Pareto table and plot: wall clock, or per "
                      "CPU-second of the process (when other work shares the machine)")
  parser.add_argument("--scann_num_leaves", type=int, default=None,
                      help="override config.eval.scann_num_leaves")
  parser.add_argument("--scann_soar_lambda", type=float, default=None,
                      help="override config.eval.scann_soar_lambda")
  parser.add_argument("--skip_faiss", action="store_true",
                      help="leave out faiss HNSW even when faiss-cpu is installed")
  parser.add_argument("--plot", default=common.result_path("search.png"))
  parser.add_argument("--embed_test_products", type=int, default=60,
                      help="test products of the synthetic split embedded (0: skip)")
  parser.add_argument("--only_embedding", action="store_true",
                      help="skip the search part (writes --embed_out only)")
  parser.add_argument("--embed_out", default=common.result_path("embedding.json"))
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.embed_test_products:
    measure_embedding(args.embed_test_products, args.embed_out)
  if args.only_embedding:
    return

  faiss_available = _faiss_available(args.skip_faiss)
  eval_config = synthetic_tiny.get_config().eval
  if args.scann_num_leaves is not None:
    eval_config.scann_num_leaves = args.scann_num_leaves
  if args.scann_soar_lambda is not None:
    eval_config.scann_soar_lambda = args.scann_soar_lambda
  load_before = os.getloadavg()
  results = [benchmark(int(size), args, eval_config, faiss_available)
             for size in args.gallery_sizes.split(",")]
  print_tables(results, eval_config.target_recall, args.clock)
  os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
  plot(results, args.plot, eval_config.target_recall, args.clock)
  common.write_result(args.out, search_report(results, args, eval_config, faiss_available,
                                              load_before))
  print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
