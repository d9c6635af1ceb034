"""Exact (blocked JAX) vs ScaNN nearest-neighbour search, and embedding throughput.

  python -m benchmarks.search                       # galleries of 100k and 1M
  python -m benchmarks.search --gallery_sizes 100000
  python -m benchmarks.search --only_embedding      # export's embedding speed only

faiss HNSW (M=32) joins the comparison when faiss-cpu is installed (it is not a
dependency of the project: `pip install faiss-cpu==1.15.1`).

Embedding: items/s of the streaming embedding that export runs, per domain, on a
synthetic test split with the tiny config, at eval batch 32 against batch 1 (the
in-run baseline); written to benchmarks/results/embedding.json.

For each gallery size: build time, queries/s and recall@10 of ScaNN (default
parameters of `cope_jax.retrieval.scann_parameters`) against exact search on
the same queries. Prints a table and writes JSON (default
benchmarks/results/search.json).

Data: unit vectors around random centres (100 vectors per centre on average,
noise norm 0.6 before normalisation), queries drawn the same way: a stand-in
for product embeddings where each product has a tight group of items.
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from cope_jax import result_files
from cope_jax import retrieval

K = 10


def clustered_unit_vectors(rng, centers, num, noise, chunk=100_000):
  """[num, D] float32 unit vectors around `centers` (generated in chunks)."""
  dim = centers.shape[1]
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, chunk):
    stop = min(start + chunk, num)
    x = centers[rng.integers(0, len(centers), stop - start)]
    x = x + rng.standard_normal((stop - start, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def make_data(gallery_size, num_queries, dim, seed):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((max(gallery_size // 100, 1), dim), dtype=np.float32)
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  gallery = clustered_unit_vectors(rng, centers, gallery_size, noise=0.6)
  queries = clustered_unit_vectors(rng, centers, num_queries, noise=0.6)
  return queries, gallery


def time_exact(queries, gallery, chunk, query_block, gallery_block):
  """Exact top-K in fixed-size query chunks (one compilation); -> indices, s, compile s."""
  def run(chunk_queries):
    return retrieval.exact_search(chunk_queries, gallery, K, query_block=query_block,
                                  gallery_block=gallery_block)

  padded = np.pad(queries, ((0, -len(queries) % chunk), (0, 0)))
  start = time.perf_counter()
  run(padded[:chunk])  # compile (and one chunk of work)
  compile_and_first = time.perf_counter() - start
  start = time.perf_counter()
  indices = np.concatenate([run(padded[i:i + chunk])[1] for i in range(0, len(padded), chunk)])
  return indices[:len(queries)], time.perf_counter() - start, compile_and_first


def time_scann(queries, gallery, eval_config):
  start = time.perf_counter()
  searcher = retrieval.build_scann_index(gallery, eval_config, k=K)
  build_seconds = time.perf_counter() - start
  retrieval.scann_search(searcher, queries[:100], K)  # warm-up
  start = time.perf_counter()
  _, indices = retrieval.scann_search(searcher, queries, K)
  return indices, time.perf_counter() - start, build_seconds


def time_faiss_hnsw(queries, gallery, m=32, ef_construction=200, ef_search=128):
  """faiss HNSW (inner product) if faiss-cpu is installed, else None.

  faiss is not a dependency of the project: `pip install faiss-cpu` to include it.
  """
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  start = time.perf_counter()
  index = faiss.IndexHNSWFlat(gallery.shape[1], m, faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = ef_construction
  index.add(np.ascontiguousarray(gallery, np.float32))
  build_seconds = time.perf_counter() - start
  index.hnsw.efSearch = ef_search
  start = time.perf_counter()
  _, indices = index.search(np.ascontiguousarray(queries, np.float32), K)
  return indices, time.perf_counter() - start, build_seconds, {
      "M": m, "efConstruction": ef_construction, "efSearch": ef_search,
      "faiss_version": faiss.__version__}


def benchmark(gallery_size, args, eval_config):
  queries, gallery = make_data(gallery_size, args.num_queries, args.dim, args.seed)
  exact_indices, exact_seconds, exact_compile = time_exact(
      queries, gallery, args.query_chunk, args.query_block, args.gallery_block)
  scann_indices, scann_seconds, build_seconds = time_scann(queries, gallery, eval_config)
  row = {
      "gallery_size": gallery_size,
      "num_queries": len(queries),
      "dim": args.dim,
      "exact_seconds": exact_seconds,
      "exact_queries_per_second": len(queries) / exact_seconds,
      "exact_compile_and_first_chunk_seconds": exact_compile,
      "scann_build_seconds": build_seconds,
      "scann_seconds": scann_seconds,
      "scann_queries_per_second": len(queries) / scann_seconds,
      "scann_recall@10_vs_exact": retrieval.recall_against(exact_indices, scann_indices),
      "scann_parameters": retrieval.scann_parameters(gallery_size, K, eval_config),
  }
  hnsw = None if args.skip_faiss else time_faiss_hnsw(queries, gallery)
  if hnsw is not None:
    hnsw_indices, hnsw_seconds, hnsw_build, hnsw_parameters = hnsw
    row.update({"hnsw_build_seconds": hnsw_build, "hnsw_seconds": hnsw_seconds,
                "hnsw_queries_per_second": len(queries) / hnsw_seconds,
                "hnsw_recall@10_vs_exact": retrieval.recall_against(exact_indices, hnsw_indices),
                "hnsw_parameters": hnsw_parameters})
  return row


def print_table(rows):
  header = (f"{'gallery':>9} {'exact q/s':>10} {'scann q/s':>10} {'speed-up':>9} "
            f"{'scann build s':>14} {'recall@10':>10}")
  print(header)
  print("-" * len(header))
  for row in rows:
    print(f"{row['gallery_size']:>9,d} {row['exact_queries_per_second']:>10,.0f} "
          f"{row['scann_queries_per_second']:>10,.0f} "
          f"{row['scann_queries_per_second'] / row['exact_queries_per_second']:>8.1f}x "
          f"{row['scann_build_seconds']:>14.1f} {row['scann_recall@10_vs_exact']:>10.4f}")
  hnsw_rows = [row for row in rows if "hnsw_queries_per_second" in row]
  if hnsw_rows:
    print(f"\n{'gallery':>9} {'HNSW q/s':>10} {'HNSW build s':>13} {'recall@10':>10}  (faiss)")
    for row in hnsw_rows:
      print(f"{row['gallery_size']:>9,d} {row['hnsw_queries_per_second']:>10,.0f} "
            f"{row['hnsw_build_seconds']:>13.1f} {row['hnsw_recall@10_vs_exact']:>10.4f}")


def embedding_throughput(test_products: int, batch_sizes=(1, 32)) -> list[dict]:
  """Items/s of export's streaming embedding (`embed.iter_embedding_batches`), tiny config.

  A synthetic ROPE split is generated and prepared in a temporary folder and embedded
  with randomly initialised tiny-config weights (speed does not depend on the values);
  batch size 1 is the in-run baseline.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from configs import synthetic_tiny  # pylint: disable=g-import-not-at-top
  from cope_jax import config_checks, embed, sharding, train  # pylint: disable=g-import-not-at-top
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
    state, _ = train.create_train_state(config, mesh, num_classes=0)
    model = train.build_model(config)
    for batch_size in batch_sizes:
      config.eval.batch_size = batch_size
      for domain in embed.DOMAINS:
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gallery_sizes", default="100000,1000000",
                      help="comma-separated gallery sizes")
  parser.add_argument("--num_queries", type=int, default=10_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--query_chunk", type=int, default=1024,
                      help="queries per exact_search call (one compiled shape)")
  parser.add_argument("--query_block", type=int, default=256)
  parser.add_argument("--gallery_block", type=int, default=8192)
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "search.json"))
  parser.add_argument("--skip_faiss", action="store_true",
                      help="leave out faiss HNSW even when faiss-cpu is installed")
  parser.add_argument("--embed_test_products", type=int, default=60,
                      help="test products of the synthetic split embedded (0: skip)")
  parser.add_argument("--only_embedding", action="store_true",
                      help="skip the search part (writes --embed_out only)")
  parser.add_argument("--embed_out",
                      default=os.path.join("benchmarks", "results", "embedding.json"))
  args = parser.parse_args()

  if args.embed_test_products:
    embedding_rows = embedding_throughput(args.embed_test_products)
    print(f"\n{'domain':6} {'batch':>5} {'items/s':>9} {'vs batch 1':>10}")
    for row in embedding_rows:
      print(f"{row['domain']:6} {row['batch_size']:>5} {row['items_per_s']:>9.1f} "
            f"{row['speedup_vs_batch_1']:>10.2f}")
    os.makedirs(os.path.dirname(args.embed_out) or ".", exist_ok=True)
    with open(args.embed_out, "w") as f:
      json.dump(result_files.strict(
          {"machine": {"jax_backend": jax.default_backend(), "cpu_count": os.cpu_count()},
           "config": "configs/synthetic_tiny.py (random weights)",
           "results": embedding_rows}), f, indent=2, allow_nan=False)
    print(f"wrote {args.embed_out}")
  if args.only_embedding:
    return

  from configs.synthetic_tiny import get_config  # pylint: disable=g-import-not-at-top
  eval_config = get_config().eval
  rows = []
  for gallery_size in (int(size) for size in args.gallery_sizes.split(",")):
    rows.append(benchmark(gallery_size, args, eval_config))
    print(json.dumps(rows[-1]), flush=True)
  print_table(rows)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result_files.strict(
        {"machine": {"jax_backend": jax.default_backend(),
                     "devices": [str(d) for d in jax.devices()],
                     "cpu_count": os.cpu_count(),
                     "platform": platform.platform()},
         "settings": {"k": K, "query_chunk": args.query_chunk,
                      "query_block": args.query_block,
                      "gallery_block": args.gallery_block},
         "results": rows}), f, indent=2, allow_nan=False)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
