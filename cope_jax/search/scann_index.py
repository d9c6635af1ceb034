"""ScaNN as an `Index`: a partitioning tree, anisotropic quantisation (AH), exact reordering.

Galleries under `TREE_MIN_GALLERY` items are scored by brute force (exactly): the tree
only pays off for larger ones. Above it the tree has `num_leaves` leaves (k-means over a
training sample); a query scores the items of its `leaves_to_search` nearest leaves with
AH (4-bit codes, two dimensions per block) and re-scores the best `reorder` of them
exactly. `leaves_to_search` and `reorder` are search-time settings: one built tree
serves every value, which is what the recall tuning (`cope_jax.search.tuning`) sweeps.
With SOAR (`soar_lambda` > 0) every item is also stored in a second leaf, chosen so
that the two leaves' errors are near orthogonal: more recall per leaf searched, for
about twice the codes and a longer build.

A build is deterministic: one gallery and one set of parameters give the same tree,
codes and search results every time, whatever the number of threads. The tree's
k-means starts from k-means++ centres drawn with the seeded generator (`BUILD_SEED`,
written into ScaNN's config with the AH training's seeds). ScaNN's random
initialisation does not follow its seed (its draws pass through a hash set whose
iteration order varies): two builds over one gallery gave different trees, and the
settings tuned on them differed. k-means++ costs build time: 1.9x the CPU time of a
build at 100k x 128 (632 leaves) and 2.4x at 250k x 128 (1000 leaves) on a shared
2-core CPU (`benchmarks/search_reproducibility.py`).

ScaNN itself is imported only when an index is built or loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar

import numpy as np

from cope_jax.search.embeddings import check_embeddings

KIND = "scann"
# Below this many gallery items the index scores every item (brute force, exact).
TREE_MIN_GALLERY = 2048
# Leaves of a tree: this many times sqrt(G) unless the config sets them (at 1M x 128,
# 2000 leaves reached recall@10 0.98 about a quarter faster than 1000 or 4000:
# benchmarks/search.py).
LEAVES_PER_SQRT_GALLERY = 2
TRAINING_SAMPLE_SIZE = 250_000  # most items the tree and the AH codebooks train on
AH_DIMENSIONS_PER_BLOCK = 2
AH_ANISOTROPIC_THRESHOLD = 0.2
DEFAULT_NUM_NEIGHBORS = 10  # the searcher's own default; every search passes its k
# Seeds the tree's k-means (PartitioningConfig.clustering_seed) and the AH codebooks'
# sampling and k-means (AsymmetricHasherConfig.sampling_seed, clustering_seed).
BUILD_SEED = 0
_ASSETS_FILE = "scann_assets.pbtxt"


@dataclasses.dataclass(frozen=True)
class ScannParameters:
  """num_leaves 0: no tree (brute force; the other fields are then unused)."""
  num_leaves: int
  leaves_to_search: int
  reorder: int  # candidates re-scored exactly (at least the k searched for)
  training_sample_size: int
  soar_lambda: float  # > 0: SOAR, each item also in a second leaf (0: off)


def _leaves_grid(num_leaves: int) -> list[int]:
  """Ascending leaves-to-search values, about 2^(1/4) apart, ending at num_leaves."""
  values = sorted({min(num_leaves, round(2 ** (step / 4)))
                   for step in range(4 * max(1, math.ceil(math.log2(num_leaves))) + 1)})
  return values if values[-1] == num_leaves else values + [num_leaves]


def _reorder_grid(k: int) -> list[int]:
  """Reorder sizes, most thorough first: 64k down to k."""
  return [k * factor for factor in (64, 32, 16, 8, 4, 2, 1)]


def _with_fields(config: str, message: str, fields: str) -> str:
  """ScaNN's text config with `fields` added at the start of its one `message {` block."""
  opening = f"{message} {{"
  if config.count(opening) != 1:
    raise RuntimeError(f"ScaNN's config holds {config.count(opening)} '{opening}' blocks, "
                       "expected one (has the scann package changed?)")
  return config.replace(opening, f"{opening}\n{fields}\n")


def searcher_config(gallery: np.ndarray, parameters: ScannParameters,
                    random_init: bool = False) -> str:
  """ScaNN's text config for `parameters` over gallery [G, D], with the build seeded.

  `random_init` (ScaNN's random k-means initialisation instead of k-means++) makes
  builds differ from one another; only `benchmarks/search_reproducibility.py` sets it,
  to measure what the deterministic build costs.
  """
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

  builder = scann_ops_pybind.builder(
      gallery, min(DEFAULT_NUM_NEIGHBORS, gallery.shape[0]), "dot_product")
  if parameters.num_leaves == 0:
    return builder.score_brute_force().create_config()
  builder = builder.tree(num_leaves=parameters.num_leaves,
                         num_leaves_to_search=parameters.leaves_to_search,
                         training_sample_size=parameters.training_sample_size,
                         soar_lambda=parameters.soar_lambda or None,
                         random_init=random_init)
  builder = builder.score_ah(AH_DIMENSIONS_PER_BLOCK,
                             anisotropic_quantization_threshold=AH_ANISOTROPIC_THRESHOLD)
  config = builder.reorder(parameters.reorder).create_config()
  config = _with_fields(config, "partitioning", f"clustering_seed: {BUILD_SEED}")
  return _with_fields(config, "asymmetric_hash",
                      f"clustering_seed: {BUILD_SEED}\nsampling_seed: {BUILD_SEED}")


class ScannIndex:
  """A ScaNN dot-product searcher over a gallery [G, D] and its search settings."""
  kind: ClassVar[str] = KIND
  parameters_type: ClassVar[type] = ScannParameters

  def __init__(self, searcher, parameters: ScannParameters, size: int, dim: int):
    self.searcher = searcher
    self.parameters = parameters
    self.size = size
    self.dim = dim

  def __len__(self) -> int:
    return self.size

  @property
  def is_exact(self) -> bool:
    """Whether every item is scored exactly (no tree)."""
    return self.parameters.num_leaves == 0

  @classmethod
  def parameters_from_config(cls, eval_config, num_gallery: int
                             ) -> tuple[ScannParameters, frozenset[str]]:
    """The parameters for `num_gallery` items and the search settings left to tune.

    Reads `eval_config.scann_num_leaves` (0: about 2 sqrt(G)), `scann_soar_lambda`
    (SOAR spilling, 0: off) and the hand-set
    overrides `scann_num_leaves_to_search` and `scann_reorder` (0: tuned to
    `target_recall`; until then the most thorough value of the tuning grid).
    """
    if num_gallery < TREE_MIN_GALLERY:
      return ScannParameters(0, 0, 0, 0, 0.0), frozenset()
    num_leaves = (int(eval_config.scann_num_leaves)
                  or round(LEAVES_PER_SQRT_GALLERY * math.sqrt(num_gallery)))
    num_leaves = max(1, min(num_leaves, num_gallery))
    leaves_to_search = min(int(eval_config.scann_num_leaves_to_search), num_leaves)
    reorder = int(eval_config.scann_reorder)
    free = frozenset(name for name, value in (("leaves_to_search", leaves_to_search),
                                               ("reorder", reorder)) if value <= 0)
    return ScannParameters(
        num_leaves=num_leaves,
        leaves_to_search=leaves_to_search if leaves_to_search > 0 else num_leaves,
        reorder=reorder if reorder > 0 else _reorder_grid(DEFAULT_NUM_NEIGHBORS)[0],
        training_sample_size=min(num_gallery, TRAINING_SAMPLE_SIZE),
        soar_lambda=float(eval_config.scann_soar_lambda)), free

  @classmethod
  def build(cls, gallery, parameters: ScannParameters) -> ScannIndex:
    """Builds the searcher over gallery [G, D] (unit rows: inner product = cosine)."""
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

    gallery = check_embeddings("gallery", gallery)
    if gallery.shape[0] == 0:
      raise ValueError("gallery: cannot build a ScaNN index over an empty gallery")
    searcher = scann_ops_pybind.create_searcher(gallery, searcher_config(gallery, parameters))
    return cls(searcher, parameters, gallery.shape[0], gallery.shape[1])

  def with_search_parameters(self, **changes) -> ScannIndex:
    """The same built searcher with other `leaves_to_search` / `reorder`."""
    unknown = set(changes) - {"leaves_to_search", "reorder"}
    if unknown:
      raise ValueError(f"not ScaNN search settings: {sorted(unknown)}")
    parameters = dataclasses.replace(self.parameters, **changes)
    if self.parameters.num_leaves and not 1 <= parameters.leaves_to_search <= parameters.num_leaves:
      raise ValueError(f"leaves_to_search={parameters.leaves_to_search} must be in "
                       f"[1, {parameters.num_leaves}]")
    return ScannIndex(self.searcher, parameters, self.size, self.dim)

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries [Q, D] -> scores [Q, k] float32, indices [Q, k] int32.

    Where the gallery holds fewer than k items the rows are padded with score
    -inf and index -1.
    """
    queries = check_embeddings("queries", queries, dim=self.dim)
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    settings = {}
    if not self.is_exact:
      settings = {"leaves_to_search": self.parameters.leaves_to_search,
                  "pre_reorder_num_neighbors": max(self.parameters.reorder, k)}
    indices, scores = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k, **settings)
    indices = np.asarray(indices, np.int64)
    scores = np.asarray(scores, np.float32)
    # ScaNN fills the slots beyond the gallery size with NaN scores and index 0.
    missing_neighbour = np.isnan(scores)
    indices = np.where(missing_neighbour, -1, indices)
    scores = np.where(missing_neighbour, -np.inf, scores).astype(np.float32)
    if indices.shape[1] < k:
      missing = k - indices.shape[1]
      indices = np.pad(indices, ((0, 0), (0, missing)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
    return scores, indices.astype(np.int32)

  def tuning_grid(self, k: int, free: frozenset[str]) -> list[list[dict[str, int]]]:
    """Search settings to tune (see `tuning.tune_to_recall`): one row per reorder size,
    most thorough first, each row ascending in leaves-to-search. Settings not in
    `free` keep their current value."""
    if self.is_exact:
      return [[{}]]
    leaves = (_leaves_grid(self.parameters.num_leaves) if "leaves_to_search" in free
              else [self.parameters.leaves_to_search])
    reorders = _reorder_grid(k) if "reorder" in free else [self.parameters.reorder]
    return [[{"leaves_to_search": l, "reorder": r} for l in leaves] for r in reorders]

  def search_cost(self) -> float:
    """Bytes read per query under a simple model (the tree's centroids left out):
    4-bit AH codes of the searched leaves' items plus the float32 rows re-scored."""
    if self.is_exact:
      return float(self.size * self.dim * 4)
    copies = 2 if self.parameters.soar_lambda > 0 else 1  # SOAR: each item in two leaves
    items_scored = (copies * self.size * self.parameters.leaves_to_search
                    / self.parameters.num_leaves)
    ah_bytes = math.ceil(self.dim / AH_DIMENSIONS_PER_BLOCK) / 2
    return float(items_scored * ah_bytes + self.parameters.reorder * self.dim * 4)

  def save(self, directory: str) -> None:
    """Writes the searcher's assets into `directory` (created if needed), with asset
    paths relative to it: the folder can be moved or copied."""
    os.makedirs(directory, exist_ok=True)
    self.searcher.serialize(directory, relative_path=True)

  @classmethod
  def load(cls, directory: str, parameters: ScannParameters, size: int, dim: int
           ) -> ScannIndex:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(os.path.join(directory, _ASSETS_FILE)):
      raise FileNotFoundError(f"{directory}: no ScaNN index ({_ASSETS_FILE} missing)")
    searcher = scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
    return cls(searcher, parameters, size, dim)
