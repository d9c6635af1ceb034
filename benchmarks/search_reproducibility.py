"""Reproducible search: what a deterministic ScaNN build costs, and how often a tuned
index misses its recall target on held-out queries.

  python -m benchmarks.search_reproducibility                       # both parts
  python -m benchmarks.search_reproducibility --part build --gallery_sizes 100000,250000
  python -m benchmarks.search_reproducibility --part tuning --galleries 80

Build (`--part build`): for each gallery size (`benchmarks.search.product_embeddings`,
d=128), the ScaNN index of `config.eval` is built `--builds` times as the project builds
it (k-means++ initialisation of the tree, seeded: `scann_index.searcher_config`) and as
ScaNN's random initialisation would (the baseline, measured in the same run). Per
initialisation: build seconds (wall clock and CPU time of the process, all threads;
best of the builds), whether every build returns the same top-10 lists and scores for
1000 queries, and the recall@10 of one fixed search setting against exact search. The
cost of determinism is the ratio of the two build times.

Tuning (`--part tuning`): on `--galleries` clustered galleries (the tests' gallery,
`cope_jax.testing.search_data.clustered_search_data`, seeds 0..N-1: 4000 items, 300 queries)
the ScaNN index is built once and tuned to each target on 150 of the queries with each
lower-bound rule (`tuning.RecallBound`: the project's default, and the mean less one
standard error it replaced); the recall of the chosen settings is measured on the other
150. Per rule and target: the galleries whose held-out recall misses the target, the
worst held-out recall, and the mean modelled bytes read per query (as a ratio to the
old rule's).

Prints a table per part; writes JSON (default benchmarks/results/search_reproducibility.json).
"""

import dataclasses
import time

import numpy as np

from benchmarks import common
from benchmarks.search import DATA
from benchmarks.search import product_embeddings
from configs import synthetic_tiny
from cope_jax.search import exact
from cope_jax.search import metrics
from cope_jax.search import scann_index
from cope_jax.search import tuning
from cope_jax.testing.search_data import clustered_search_data

K = 10
NUM_QUERIES = 1000  # build part: queries searched after each build
FIXED_LEAVES_FRACTION = 0.05  # build part: the fixed setting searches this share of leaves
FIXED_REORDER = 100
TUNING_QUERIES = 150  # tuning part: the first half of the 300 queries, in a seeded order
RULES = {"default": tuning.RecallBound(),
         "mean_less_one_standard_error": tuning.RecallBound(standard_errors=1.0,
                                                            unseen_failing_queries=0)}


def build_part(gallery_size: int, dim: int, builds: int, seed: int) -> dict:
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  gallery, queries, _, _ = product_embeddings(rng, gallery_size, NUM_QUERIES, dim, **DATA)
  exact_indices = exact.exact_search(queries, gallery, K)[1]
  parameters, _ = scann_index.ScannIndex.parameters_from_config(
      synthetic_tiny.get_config().eval, gallery_size)
  leaves = max(1, round(parameters.num_leaves * FIXED_LEAVES_FRACTION))
  parameters = dataclasses.replace(parameters, leaves_to_search=leaves, reorder=FIXED_REORDER)
  result = {"gallery_size": gallery_size, "dim": dim, "builds": builds,
            "parameters": dataclasses.asdict(parameters)}
  for name, random_init in (("kmeans_plus_plus", False), ("random_baseline", True)):
    walls, cpus, outputs = [], [], []
    for _ in range(builds):
      config = scann_index.searcher_config(gallery, parameters, random_init=random_init)
      wall, cpu = time.perf_counter(), time.process_time()
      searcher = scann_ops_pybind.create_searcher(gallery, config)
      walls.append(time.perf_counter() - wall)
      cpus.append(time.process_time() - cpu)
      index = scann_index.ScannIndex(searcher, parameters, gallery_size, dim)
      outputs.append(index.search(queries, K))
      print(f"[{gallery_size:,}] {name}: build {walls[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU",
            flush=True)
    identical = all(np.array_equal(o[0], outputs[0][0]) and np.array_equal(o[1], outputs[0][1])
                    for o in outputs[1:])
    result[name] = {
        "build_wall_seconds": min(walls), "build_cpu_seconds": min(cpus),
        "all_builds_identical": identical,
        "recall@10_at_fixed_setting": [metrics.recall_against(exact_indices, o[1])
                                       for o in outputs]}
  for clock in ("wall", "cpu"):
    key = f"build_{clock}_seconds"
    result[f"{clock}_cost_ratio"] = result["kmeans_plus_plus"][key] / result["random_baseline"][key]
  return result


def tuning_part(num_galleries: int, targets: list[float]) -> dict:
  rows = {(rule, target): [] for rule in RULES for target in targets}
  for seed in range(num_galleries):
    queries, gallery = clustered_search_data(seed=seed)
    parameters, free = scann_index.ScannIndex.parameters_from_config(
        synthetic_tiny.get_config().eval, len(gallery))
    index = scann_index.ScannIndex.build(gallery, parameters)
    order = np.random.default_rng(seed).permutation(len(queries))
    tune, check = np.sort(order[:TUNING_QUERIES]), np.sort(order[TUNING_QUERIES:])
    exact_indices = exact.exact_search(queries, gallery, K)[1]
    for (rule, target), found in rows.items():
      tuned, result = tuning.tune_to_recall(index, queries[tune], exact_indices[tune], target,
                                            K, free, bound=RULES[rule])
      held_out = metrics.recall_against(exact_indices[check], tuned.search(queries[check], K)[1])
      found.append({"seed": seed, "settings": result.settings, "tuning_recall": result.recall,
                    "held_out_recall": held_out, "bytes_per_query": tuned.search_cost()})
    print(f"gallery {seed + 1}/{num_galleries}", end="\r", flush=True)
  summary = []
  for target in targets:
    baseline_cost = np.mean([r["bytes_per_query"]
                             for r in rows[("mean_less_one_standard_error", target)]])
    for rule in RULES:
      found = rows[(rule, target)]
      held_out = np.array([r["held_out_recall"] for r in found])
      cost = float(np.mean([r["bytes_per_query"] for r in found]))
      summary.append({"rule": rule, "bound": dataclasses.asdict(RULES[rule]),
                      "target_recall": target, "galleries": len(found),
                      "held_out_misses": int(np.sum(held_out < target)),
                      "worst_held_out_recall": float(held_out.min()),
                      "mean_held_out_recall": float(held_out.mean()),
                      "mean_bytes_per_query": cost,
                      "bytes_vs_mean_less_one_standard_error": cost / baseline_cost})
  return {"galleries": num_galleries, "tuning_queries": TUNING_QUERIES,
          "held_out_queries": 300 - TUNING_QUERIES, "summary": summary,
          "per_gallery": {f"{rule}@{target}": found for (rule, target), found in rows.items()}}


def print_build_table(rows: list[dict]) -> None:
  lines = []
  for row in rows:
    for name in ("kmeans_plus_plus", "random_baseline"):
      entry = row[name]
      lines.append([f"{row['gallery_size']:>9,}", name, row["parameters"]["num_leaves"],
                    f"{entry['build_wall_seconds']:.1f}", f"{entry['build_cpu_seconds']:.1f}",
                    entry["all_builds_identical"],
                    f"{np.mean(entry['recall@10_at_fixed_setting']):.4f}"])
  print()
  print(common.table(["gallery", "init", "leaves", "wall s", "CPU s", "identical",
                      "recall@10"], lines, left=2))
  for row in rows:
    print(f"{row['gallery_size']:,}: deterministic build / random: "
          f"{row['wall_cost_ratio']:.2f}x wall, {row['cpu_cost_ratio']:.2f}x CPU")


def print_tuning_table(summary: list[dict]) -> None:
  print()
  print(common.table(
      ["rule", "target", "misses", "worst", "mean", "bytes"],
      [[row["rule"], f"{row['target_recall']:.2f}",
        f"{row['held_out_misses']}/{row['galleries']}", f"{row['worst_held_out_recall']:.4f}",
        f"{row['mean_held_out_recall']:.4f}",
        f"{row['bytes_vs_mean_less_one_standard_error']:.2f}x"] for row in summary]))


def main(argv=None):
  parser = common.parser(__doc__, "search_reproducibility.json")
  parser.add_argument("--part", choices=("build", "tuning", "both"), default="both")
  parser.add_argument("--gallery_sizes", default="100000", help="build part, comma-separated")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--builds", type=int, default=3, help="builds per initialisation")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--galleries", type=int, default=80, help="tuning part")
  parser.add_argument("--targets", default="0.95,0.98", help="tuning part, comma-separated")
  args = parser.parse_args(argv)
  report = {}
  if args.part in ("build", "both"):
    report["build"] = [build_part(int(size), args.dim, args.builds, args.seed)
                       for size in args.gallery_sizes.split(",")]
    print_build_table(report["build"])
  if args.part in ("tuning", "both"):
    report["tuning"] = tuning_part(args.galleries, [float(t) for t in args.targets.split(",")])
    print_tuning_table(report["tuning"]["summary"])
  print()
  common.write_result(args.out, {"machine": common.machine(jax=True), **report})


if __name__ == "__main__":
  main()
