r"""Exports embeddings and search indices: `python -m cope_jax.export`.

  python -m cope_jax.export --config configs/synthetic_tiny.py --workdir DIR --out OUT \
      [--split test] [--rope_dir ROPE_DIR] [--resume] [--format parquet|release]

Embeds every record of a split (default `config.data.eval_split`) with the model of
DIR (its latest checkpoint, as `cope_jax.evaluate` picks it) and writes

  OUT/<domain>-<p>-of-<n>.parquet   columns id, product_id, domain (string) and
                                    embedding (list<float32>, L2-normalised); one
                                    file per domain and JAX process
  OUT/index/<domain>/               a dot-product index (kind `config.eval.index`, search
                                    tuned to `config.eval.target_recall`) over all
                                    processes' rows of the domain: its rows are the rows
                                    of the files the manifest lists for the domain, in
                                    that order; `index.json` names its kind
  OUT/manifest.json                 checkpoint, config hash, embedding dimension,
                                    counts and files per domain, and per domain the
                                    index kind, its parameters and measured recall

With `--format release` it writes the PyTorch release's embedding files instead, exactly
as its `infer.py` does, for downstream jobs that read them (`cope_jax.release_format`):

  OUT/{p}_item, OUT/{p}_photo, OUT/{p}_live   one text file per domain and JAX process p;
                                    lines `id<TAB>v1,...,vD` (L2-normalised float32
                                    values), live lines `id<TAB>start<TAB>end<TAB>v1,...`
                                    with the first and last frame timestamps (epoch ms)
                                    of the clip's prepared record

and no Parquet, index or manifest (--resume applies to the Parquet format only).

With --rope_dir a ROPE-format directory is prepared into OUT/prepared first and read
from there. Parquet files are written under a temporary name and renamed when
complete; --resume keeps every domain whose files are complete and listed in the
manifest. `load_exported_index` reads an index back and refuses one made by another
model (config hash) or of another embedding dimension.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cope_jax import cli
from cope_jax import config_checks
from cope_jax import embed
from cope_jax import release_format
from cope_jax import result_files
from cope_jax import sharding
from cope_jax import state
from cope_jax.search import index as search_index
from data_pipelines import domains

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 3  # 2: index folders hold index.json; 3: the config itself
INDEX_DIR = "index"
PREPARED_DIR = "prepared"
ROW_GROUP_ROWS = 8192  # rows per Parquet row group (batches are buffered up to this)
INDEX_RECALL_K = 10  # the index is tuned to and checked at recall@10 against exact search
FORMATS = ("parquet", "release")  # --format: this project's Parquet + index, or the release's

PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("product_id", pa.string()),
    ("domain", pa.string()),
    ("embedding", pa.list_(pa.float32())),
])


class ExportMismatchError(ValueError):
  """An export was made by another model or holds embeddings of another dimension."""


def parquet_name(domain: str, process_index: int, process_count: int) -> str:
  return f"{domain}-{process_index}-of-{process_count}.parquet"


# ----------------------------------------------------------------------------
# Parquet.


def normalise_rows(embeddings: np.ndarray, where: str = "embeddings") -> np.ndarray:
  """[N, D] -> float32 rows of unit L2 norm; ValueError on a zero or non-finite row."""
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2:
    raise ValueError(f"{where}: expected [N, D] embeddings, got shape {embeddings.shape}")
  norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
  bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
  if bad.size:
    raise ValueError(f"{where}: {bad.size} rows are zero or not finite (first: row {bad[0]})")
  return embeddings / norms


def embeddings_table(domain: str, ids: Sequence[str], product_ids: Sequence[str],
                     embeddings: np.ndarray) -> pa.Table:
  """A Parquet-schema table of one batch: ids [b], product_ids [b], embeddings [b, D].

  The embeddings are written as given: normalise them first (`normalise_rows`).
  """
  embeddings = np.asarray(embeddings, np.float32)
  num_rows, dim = embeddings.shape
  if len(ids) != num_rows or len(product_ids) != num_rows:
    raise ValueError(f"{domain}: {len(ids)} ids and {len(product_ids)} product ids for "
                     f"{num_rows} embeddings")
  offsets = pa.array(np.arange(0, (num_rows + 1) * dim, dim, dtype=np.int32))
  embedding_column = pa.ListArray.from_arrays(offsets, pa.array(embeddings.reshape(-1)))
  return pa.Table.from_arrays(
      [pa.array([str(i) for i in ids], pa.string()),
       pa.array([str(p) for p in product_ids], pa.string()),
       pa.array([domain] * num_rows, pa.string()),
       embedding_column],
      schema=PARQUET_SCHEMA)


def write_parquet(path: str, domain: str, batches: Iterable[tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]],
                  dim: int, row_group_rows: int = ROW_GROUP_ROWS) -> embed.DomainEmbeddings:
  """Streams (ids [b], product_ids [b], embeddings [b, D]) batches into `path`.

  Rows are buffered into row groups of about `row_group_rows`. The file appears under
  its final name only once complete (written as `<path>.tmp`, then renamed).

  Returns:
    The rows written (L2-normalised embeddings), for building the index.
  """
  temporary = path + ".tmp"
  ids, product_ids, embeddings = [], [], []
  pending: list[pa.Table] = []
  pending_rows = 0
  with pq.ParquetWriter(temporary, PARQUET_SCHEMA) as writer:
    for batch_ids, batch_product_ids, batch_embeddings in batches:
      batch_embeddings = normalise_rows(batch_embeddings, f"{domain} embeddings")
      table = embeddings_table(domain, batch_ids, batch_product_ids, batch_embeddings)
      if table.num_rows == 0:
        continue
      ids.append(np.asarray(batch_ids, object))
      product_ids.append(np.asarray(batch_product_ids, object))
      embeddings.append(batch_embeddings)
      pending.append(table)
      pending_rows += table.num_rows
      if pending_rows >= row_group_rows:
        writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
        pending, pending_rows = [], 0
    if pending:
      writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
  os.replace(temporary, path)
  return embed.DomainEmbeddings(
      domain=domain,
      ids=np.concatenate(ids) if ids else np.zeros((0,), object),
      product_ids=np.concatenate(product_ids) if product_ids else np.zeros((0,), object),
      embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32))


def read_parquet(paths: Sequence[str], domain: str,
                 with_embeddings: bool = True) -> embed.DomainEmbeddings:
  """The rows of exported Parquet files, concatenated in the given order."""
  columns = ["id", "product_id"] + (["embedding"] if with_embeddings else [])
  tables = [pq.read_table(path, columns=columns) for path in paths]
  table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table().select(columns)
  embeddings = np.zeros((table.num_rows, 0), np.float32)
  if with_embeddings and table.num_rows:
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    embeddings = values.astype(np.float32, copy=False).reshape(table.num_rows, -1)
  return embed.DomainEmbeddings(
      domain=domain,
      ids=np.asarray(table.column("id").to_pylist(), object),
      product_ids=np.asarray(table.column("product_id").to_pylist(), object),
      embeddings=embeddings)


# ----------------------------------------------------------------------------
# Manifest.


@dataclasses.dataclass
class DomainExport:
  """One domain of an export: its Parquet files, in row order, and its index."""
  count: int  # rows over all files
  files: list[dict[str, Any]]  # [{"file": name, "rows": n}], one per process, in order
  index: str = ""  # the index folder, relative to the export ("" for --format release)
  index_complete: bool = False
  index_kind: str | None = None
  index_parameters: dict[str, Any] | None = None
  index_tuning: dict[str, Any] | None = None

  def file_complete(self, out_dir: str, name: str) -> bool:
    """Whether file `name` is listed here and holds the listed number of rows."""
    listed = {f["file"]: f["rows"] for f in self.files}
    path = os.path.join(out_dir, name)
    if name not in listed or not os.path.exists(path):
      return False
    try:
      return pq.ParquetFile(path).metadata.num_rows == listed[name]
    except (OSError, pa.ArrowInvalid):
      return False


@dataclasses.dataclass
class Manifest:
  """`OUT/manifest.json`: what an export holds and which model made it."""
  config_hash: str
  embedding_dim: int
  split: str
  config: dict[str, Any]  # the config as given (the one hashed), to name differences
  checkpoint_step: int | None = None
  checkpoint: str = ""
  prepared_dir: str = ""
  process_count: int = 1
  columns: list[str] = dataclasses.field(default_factory=lambda: list(PARQUET_SCHEMA.names))
  domains: dict[str, DomainExport] = dataclasses.field(default_factory=dict)
  format_version: int = MANIFEST_FORMAT_VERSION

  # Fields that must agree for --resume to keep an earlier export's files.
  IDENTITY = ("config_hash", "embedding_dim", "split", "checkpoint_step")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: Mapping[str, Any], path: str) -> Manifest:
    try:
      fields = dict(fields)
      domain_entries = {name: DomainExport(**entry)
                        for name, entry in fields.pop("domains", {}).items()}
      return cls(**fields, domains=domain_entries)
    except TypeError as error:
      raise ValueError(f"{path}: not an export manifest of this version ({error}); "
                       "re-export") from error

  def write(self, out_dir: str) -> None:
    """Writes `OUT/manifest.json` atomically (strict JSON)."""
    result_files.write_json(os.path.join(out_dir, MANIFEST_FILE), self.to_json())

  @classmethod
  def read(cls, out_dir: str) -> Manifest | None:
    """The manifest of `out_dir`, or None when there is none."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        fields = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not a valid export manifest ({error})") from error
    if fields.get("format_version") != MANIFEST_FORMAT_VERSION:
      raise ValueError(f"{path}: manifest format {fields.get('format_version')}, this code "
                       f"reads {MANIFEST_FORMAT_VERSION}; re-export")
    return cls.from_json(fields, path)

  def check_same_run(self, other: Manifest, out_dir: str) -> None:
    """ExportMismatchError naming the first identity field where `other` differs (and,
    for the config, which fields differ)."""
    for key in self.IDENTITY:
      mine, theirs = getattr(self, key), getattr(other, key)
      if mine is None or theirs is None or mine == theirs:
        continue
      detail = f"manifest: {mine!r}, this run: {theirs!r}"
      if key == "config_hash":
        detail = "fields that differ, manifest -> this run: " + "; ".join(
            config_checks.config_differences(self.config, other.config))
      raise ExportMismatchError(
          f"{os.path.join(out_dir, MANIFEST_FILE)}: --resume with a different {key} "
          f"({detail}); use a new --out folder or remove the old export")


# ----------------------------------------------------------------------------
# The export.


def export_embeddings(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
                      split: str | None = None, rope_dir: str | None = None,
                      resume: bool = False, output_format: str = "parquet") -> Manifest:
  """Embeds `split` with the model of `workdir` and writes Parquet, indices, manifest.

  Args:
    config: the run config (as on the command line; its hash goes in the manifest).
    workdir: training directory whose checkpoint is exported
      (`state.load_model_params` rules).
    out_dir: output folder.
    split: split to embed (default `config.data.eval_split`).
    rope_dir: a ROPE-format folder to prepare into `out_dir/prepared` and embed
      instead of `config.data.prepared_dir`.
    resume: keep domains whose Parquet files and index are complete and listed in
      an existing manifest of the same model.
    output_format: "parquet" (Parquet, index, manifest) or "release" (the release's
      `{rank}_{item,photo,live}` files only; see the module docstring).

  Returns:
    The manifest written to `out_dir/manifest.json` (for "release", the same fields
    without index entries, not written).
  """
  if output_format not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
  if resume and output_format != "parquet":
    raise ValueError("--resume keeps Parquet files listed in a manifest: it applies to "
                     "--format parquet only")
  config_checks.check_config(config, need_data=not rope_dir)
  model_hash = config_checks.config_hash(config)
  model_config = json.loads(config.to_json(sort_keys=True))  # kept to name differences
  split_field = "--split" if split else "config.data.eval_split"
  split = split or config.data.eval_split
  process_index, process_count = jax.process_index(), jax.process_count()
  os.makedirs(out_dir, exist_ok=True)
  if rope_dir:
    config = _with_prepared_data(config, rope_dir, out_dir)
    config_checks.check_config(config)
  config_checks.check_split(config.data.prepared_dir, split, split_field)  # before any output
  config = config_checks.resolve_vocab_size(config)

  manifest = Manifest(config_hash=model_hash, embedding_dim=int(config.model.emb_dim),
                      split=split, config=model_config,
                      prepared_dir=config.data.prepared_dir, process_count=process_count)
  previous = Manifest.read(out_dir) if resume else None
  if previous is not None:
    previous.check_same_run(manifest, out_dir)  # before the (slow) model load

  mesh = sharding.make_mesh(config.mesh)
  model_params, step, source = state.load_model_params(config, workdir, mesh)
  manifest.checkpoint_step, manifest.checkpoint = int(step), source
  if output_format == "release":
    return _export_release(config, model_params, mesh, split, out_dir, manifest)
  if previous is not None:
    previous.check_same_run(manifest, out_dir)
    manifest.domains = dict(previous.domains)
  elif process_index == 0 and os.path.exists(os.path.join(out_dir, MANIFEST_FILE)):
    os.remove(os.path.join(out_dir, MANIFEST_FILE))  # it would describe files replaced now

  model = state.build_model(config)
  for domain in domains.NAMES:
    if not _has_records(config.data.prepared_dir, split, domain):
      logging.warning("split %r has no %s records: nothing exported for it", split, domain)
      manifest.domains.pop(domain, None)
      continue
    manifest.domains[domain] = _export_domain(
        config, model, model_params, mesh, domain, split, out_dir,
        manifest.domains.get(domain) if resume else None)
    if process_index == 0:
      manifest.write(out_dir)
  if process_index == 0:
    manifest.write(out_dir)
  return manifest


def _export_release(config, model_params, mesh, split: str, out_dir: str,
                    summary: Manifest) -> Manifest:
  """Writes this process's `{rank}_{release name}` file of every domain with records."""
  from data_pipelines import pipelines  # pylint: disable=g-import-not-at-top
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top

  process_index, process_count = jax.process_index(), jax.process_count()
  if process_index == 0:
    for name in release_format.remove_other_ranks(out_dir, process_count):
      logging.warning("removed %s, left by an export with more processes", name)
    if os.path.exists(os.path.join(out_dir, MANIFEST_FILE)):
      logging.warning("%s also holds a Parquet export (%s): cope_jax.compare will refuse "
                      "the folder until one of the two is moved", out_dir, MANIFEST_FILE)
  model = state.build_model(config)
  for domain in domains.NAMES:
    if not _has_records(config.data.prepared_dir, split, domain):
      logging.warning("split %r has no %s records: nothing exported for it", split, domain)
      continue
    times = None
    if domains.get(domain).release_times:
      record_range = pipelines.make_eval_dataset(config, domain, split, process_index,
                                                 process_count).record_range
      times = release_format.clip_times(
          prepare.open_domain(config.data.prepared_dir, split, domain), record_range)
    batches = ((ids, product_ids, normalise_rows(embeddings, f"{domain} embeddings"))
               for ids, product_ids, embeddings in embed.iter_embedding_batches(
                   config, model, model_params, domain, mesh, split))
    rows = release_format.write_embeddings(out_dir, domain, process_index, batches, times)
    counts = _gather_counts(rows)
    summary.domains[domain] = DomainExport(
        count=sum(counts),
        files=[{"file": release_format.file_name(p, domain), "rows": count}
               for p, count in enumerate(counts)])
  return summary


def _has_records(prepared_dir: str, split: str, domain: str) -> bool:
  """Whether the prepared split holds any record of `domain`."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  try:
    return len(prepare.open_domain(prepared_dir, split, domain)) > 0
  except FileNotFoundError:
    return False


def _with_prepared_data(config: ml_collections.ConfigDict, rope_dir: str,
                        out_dir: str) -> ml_collections.ConfigDict:
  """Prepares `rope_dir` into `out_dir/prepared`; a config reading from there."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top

  prepared_dir = os.path.join(out_dir, PREPARED_DIR)
  if jax.process_index() == 0:  # prepare itself skips parts already written
    logging.info("preparing %s into %s", rope_dir, prepared_dir)
    prepare.prepare(rope_dir, prepared_dir, log=logging.info)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cope_jax.export: prepared")
  config = config.copy_and_resolve_references()
  config.data.prepared_dir = prepared_dir
  return config


def _export_domain(config, model, model_params, mesh, domain: str, split: str, out_dir: str,
                   previous_entry: DomainExport | None) -> DomainExport:
  """Writes this process's Parquet file and (process 0) the index of one domain."""
  process_index, process_count = jax.process_index(), jax.process_count()
  names = [parquet_name(domain, p, process_count) for p in range(process_count)]
  own_name = names[process_index]
  own_path = os.path.join(out_dir, own_name)
  index_dir = os.path.join(out_dir, INDEX_DIR, domain)
  all_complete = previous_entry is not None and all(
      previous_entry.file_complete(out_dir, name) for name in names)
  if (all_complete and previous_entry.index_complete
      and os.path.isfile(os.path.join(index_dir, search_index.INDEX_FILE))):
    logging.info("export %s: complete in the manifest, kept", domain)
    return previous_entry

  if previous_entry is not None and previous_entry.file_complete(out_dir, own_name):
    logging.info("export %s: %s complete, read back", domain, own_name)
    local = read_parquet([own_path], domain)
  else:
    batches = embed.iter_embedding_batches(config, model, model_params, domain, mesh, split)
    local = write_parquet(own_path, domain, batches, int(config.model.emb_dim))
  gathered = embed.gather_to_all(local)
  counts = _gather_counts(len(local))
  entry = DomainExport(count=len(gathered),
                       files=[{"file": name, "rows": rows} for name, rows in zip(names, counts)],
                       index=f"{INDEX_DIR}/{domain}")
  if process_index == 0 and len(gathered):
    entry = dataclasses.replace(entry, index_complete=True,
                                **_write_index(gathered.embeddings, index_dir, config.eval))
  return entry


def _gather_counts(local_count: int) -> list[int]:
  """Every process's row count, in process order."""
  if jax.process_count() == 1:
    return [int(local_count)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.array([local_count], np.int64))
  return [int(c) for c in np.asarray(counts).reshape(-1)]


def _write_index(embeddings: np.ndarray, index_dir: str, eval_config) -> dict[str, Any]:
  """Builds the index of kind `eval_config.index`, tuned to `eval_config.target_recall`
  with held-out rows of the gallery as queries, and saves it into `index_dir`,
  replacing an old one. Returns the manifest fields describing it.

  Written into a staging folder that replaces `index_dir` once complete (index folders
  are relocatable). The manifest marks the index complete only after this returns.
  """
  index, info = search_index.build_index(eval_config.index, embeddings, eval_config,
                                         INDEX_RECALL_K)
  with result_files.replaced_directory(index_dir) as staging:
    search_index.save_index(index, staging)
  tuning = {key: value for key, value in info.items() if key not in ("kind", "parameters")}
  return {"index_kind": info["kind"], "index_parameters": info["parameters"],
          "index_tuning": tuning}


# ----------------------------------------------------------------------------
# Reading an export back.


@dataclasses.dataclass(frozen=True)
class ExportedIndex:
  """A loaded index (`cope_jax.search.index.Index`); row i of it is `ids[i]` /
  `product_ids[i]`."""
  domain: str
  index: Any
  ids: np.ndarray  # [N] str
  product_ids: np.ndarray  # [N] str
  manifest: Manifest

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> scores [Q, k] float32, indices [Q, k] int32 (-1: none)."""
    return self.index.search(queries, k)


def load_exported_index(out_dir: str, domain: str, config_hash: str | None = None,
                        dim: int | None = None) -> ExportedIndex:
  """Loads `out_dir/index/<domain>` after checking the manifest.

  Args:
    out_dir: a folder written by `export_embeddings`.
    domain: 'page' | 'video' | 'live'.
    config_hash: when given, the hash (`config_hash(config)`) of the model the
      caller's queries come from; an index of another model is refused.
    dim: when given, the caller's embedding dimension; another dimension is refused.

  Raises:
    FileNotFoundError: no manifest, or no complete index for the domain.
    ExportMismatchError: the config hash or the dimension differs.
  """
  manifest_path = os.path.join(out_dir, MANIFEST_FILE)
  manifest = Manifest.read(out_dir)
  if manifest is None:
    raise FileNotFoundError(f"{manifest_path}: no export manifest (run cope_jax.export)")
  if config_hash is not None and manifest.config_hash != config_hash:
    raise ExportMismatchError(
        f"{manifest_path}: the index was exported from another model (config hash "
        f"{manifest.config_hash}, expected {config_hash}); re-export with this "
        "model's config")
  if dim is not None and manifest.embedding_dim != dim:
    raise ExportMismatchError(
        f"{manifest_path}: the index holds {manifest.embedding_dim}-dimensional "
        f"embeddings, expected {dim}")
  entry = manifest.domains.get(domain)
  if entry is None or not entry.index_complete:
    raise FileNotFoundError(f"{manifest_path}: no complete {domain!r} index in this export "
                            f"(domains: {sorted(manifest.domains)})")
  rows = read_parquet([os.path.join(out_dir, f["file"]) for f in entry.files], domain,
                      with_embeddings=False)
  if len(rows) != entry.count:
    raise ValueError(f"{manifest_path}: {domain} lists {entry.count} rows but its "
                     f"Parquet files hold {len(rows)}")
  index = search_index.load_index(os.path.join(out_dir, entry.index))
  return ExportedIndex(domain=domain, index=index, ids=rows.ids,
                       product_ids=rows.product_ids, manifest=manifest)


# ----------------------------------------------------------------------------
# Command line.


def _main(config: ml_collections.ConfigDict, workdir: str) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  manifest = export_embeddings(config, workdir, flag_values.out, split=flag_values.split or None,
                               rope_dir=flag_values.rope_dir or None, resume=flag_values.resume,
                               output_format=flag_values.format)
  if jax.process_index() == 0:
    counts = ", ".join(f"{d}: {e.count}" for d, e in manifest.domains.items())
    layout = " in the release's format" if flag_values.format == "release" else ""
    print(f"exported checkpoint step {manifest.checkpoint_step} ({counts}) to "
          f"{flag_values.out}{layout}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("out", None, "Output folder for Parquet files, indices and manifest.")
  flags.DEFINE_string("split", "", "Split to export (default: config.data.eval_split).")
  flags.DEFINE_string("rope_dir", "", "A ROPE-format folder to prepare into OUT/prepared "
                      "and export instead of config.data.prepared_dir.")
  flags.DEFINE_bool("resume", False, "Keep domains already complete in OUT/manifest.json.")
  flags.DEFINE_enum("format", "parquet", FORMATS, "parquet: Parquet files, search index and "
                    "manifest; release: the PyTorch release's {rank}_item/_photo/_live files.")
  flags.mark_flag_as_required("out")


if __name__ == "__main__":
  _define_flags()
  cli.run(_main, "Training directory whose checkpoint is exported.")
