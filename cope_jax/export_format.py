"""The on-disk format of `cope_jax.export`: one module that writes and reads it.

  OUT/<domain>-<p>-of-<n>.parquet   columns id, product_id, domain (string), embedding
                                    (list<float32>, unit L2 norm) and content_digest
                                    (string: `data_pipelines.eval_inputs.content_digest`
                                    of the item's inputs); one file per domain and JAX
                                    process, row groups of ROW_GROUP_ROWS rows
  OUT/index/<domain>/               the dot-product index over the domain's rows, in the
                                    order of the files the manifest lists for it
  OUT/manifest.json                 `Manifest`: model (config hash, config, checkpoint),
                                    embedding dimension, split, the job that wrote it,
                                    per domain its files with their row counts, the rows
                                    embedded by this job and its index; for an
                                    incremental export (`--since`) its lineage

Writers (`cope_jax.export`) and readers (`cope_jax.compare`, `load_exported_index`,
downstream jobs) use this module alone, as both sides of the release's text files use
`cope_jax.release_format`; so two tools cannot disagree about a file. It needs NumPy and
pyarrow, not JAX.

Embeddings are written as the model gives them: `normalise_rows` leaves a row that is
already of unit length (within UNIT_NORM_TOLERANCE) bit for bit as it is, so an export
holds exactly what `cope_jax.evaluate` scores, and a reader that normalises again changes
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cope_jax import config_checks
from cope_jax.base import result_files
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.base import domains

MANIFEST_FILE = "manifest.json"
# 2: index folders hold index.json; 3: the config itself; 4: a content digest per row,
# the writer, rows embedded per domain and the lineage of an incremental export
MANIFEST_FORMAT_VERSION = 4
INDEX_DIR = "index"
ROW_GROUP_ROWS = 8192  # rows per Parquet row group (batches are buffered up to this)
# A row whose L2 norm is within this of 1 counts as unit length and is kept as it is
# (the model's float32 normalisation leaves norms within about 1e-7 of 1).
UNIT_NORM_TOLERANCE = 1e-5

PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("product_id", pa.string()),
    ("domain", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    ("content_digest", pa.string()),
])


class ExportMismatchError(ValueError):
  """An export was made by another model or holds embeddings of another dimension."""


class ExportFormatError(ValueError):
  """A folder or file that is not a readable export (the message names it and the cause)."""


def parquet_name(domain: str, process_index: int, process_count: int) -> str:
  return f"{domain}-{process_index}-of-{process_count}.parquet"


def is_export_entry(name: str) -> bool:
  """Whether an entry of an export folder belongs to the Parquet export (replaced by a
  new one) rather than being carried over (prepared/, a release export, other files)."""
  return (name in (MANIFEST_FILE, INDEX_DIR)
          or name.removesuffix(".tmp").endswith(".parquet"))


def normalise_rows(embeddings: np.ndarray, where: str = "embeddings") -> np.ndarray:
  """[N, D] -> float32 rows of unit L2 norm. A row already of unit length (within
  UNIT_NORM_TOLERANCE) is returned bit for bit; others are divided by their norm, computed
  in float64. ValueError naming `where` on a zero or non-finite row."""
  values = np.asarray(embeddings)
  if values.ndim != 2:
    raise ValueError(f"{where}: expected [N, D] embeddings, got shape {values.shape}")
  norms = np.linalg.norm(values.astype(np.float64), axis=1)
  bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
  if bad.size:
    raise ValueError(f"{where}: {bad.size} rows are zero or not finite (first: row {bad[0]})")
  result = values.astype(np.float32)  # a copy
  off_unit = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
  if off_unit.size:
    result[off_unit] = (values[off_unit].astype(np.float64)
                        / norms[off_unit, None]).astype(np.float32)
  return result


# ----------------------------------------------------------------------------
# Parquet.


@dataclasses.dataclass(frozen=True)
class ExportRows:
  """One domain's rows of an export, in file order: ids [N], product_ids [N],
  content_digests [N] (str; None where a file holds none), embeddings [N, D] float32."""
  domain: str
  ids: np.ndarray
  product_ids: np.ndarray
  content_digests: np.ndarray
  embeddings: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, rows: np.ndarray) -> ExportRows:
    """The rows at positions `rows` [M] int, in that order."""
    rows = np.asarray(rows, np.int64)
    return ExportRows(self.domain, self.ids[rows], self.product_ids[rows],
                      self.content_digests[rows], self.embeddings[rows])

  def as_domain_embeddings(self) -> DomainEmbeddings:
    return DomainEmbeddings(domain=self.domain, ids=self.ids, product_ids=self.product_ids,
                            embeddings=self.embeddings)


def empty_rows(domain: str, dim: int) -> ExportRows:
  nothing = np.zeros((0,), object)
  return ExportRows(domain, nothing, nothing.copy(), nothing.copy(),
                    np.zeros((0, dim), np.float32))


def embeddings_table(domain: str, ids: Sequence[str], product_ids: Sequence[str],
                     embeddings: np.ndarray,
                     content_digests: Sequence[str | None] | None = None) -> pa.Table:
  """A Parquet-schema table of one batch: ids [b], product_ids [b], embeddings [b, D],
  content_digests [b] (None: null digests, which a later `--since` embeds again).

  The embeddings are written as given: normalise them first (`normalise_rows`).
  """
  embeddings = np.asarray(embeddings, np.float32)
  num_rows, dim = embeddings.shape
  if content_digests is None:
    content_digests = [None] * num_rows
  if len(ids) != num_rows or len(product_ids) != num_rows or len(content_digests) != num_rows:
    raise ValueError(f"{domain}: {len(ids)} ids, {len(product_ids)} product ids and "
                     f"{len(content_digests)} content digests for {num_rows} embeddings")
  offsets = pa.array(np.arange(0, (num_rows + 1) * dim, dim, dtype=np.int32))
  embedding_column = pa.ListArray.from_arrays(offsets, pa.array(embeddings.reshape(-1)))
  return pa.Table.from_arrays(
      [pa.array([str(i) for i in ids], pa.string()),
       pa.array([str(p) for p in product_ids], pa.string()),
       pa.array([domain] * num_rows, pa.string()),
       embedding_column,
       pa.array([None if d is None else str(d) for d in content_digests], pa.string())],
      schema=PARQUET_SCHEMA)


def write_rows(path: str, rows: ExportRows, row_group_rows: int = ROW_GROUP_ROWS) -> ExportRows:
  """Writes `rows` into the Parquet file `path`, in row groups of `row_group_rows`.

  Embeddings are normalised first (`normalise_rows`: unit rows stay bit for bit). The
  file appears under its final name only once complete (written as `<path>.tmp`, then
  renamed).

  Returns:
    The rows written (normalised), for building the index.
  """
  domain = rows.domain
  embeddings = normalise_rows(rows.embeddings, f"{domain} embeddings")
  written = dataclasses.replace(rows, embeddings=embeddings)
  temporary = path + ".tmp"
  with pq.ParquetWriter(temporary, PARQUET_SCHEMA) as writer:
    for start in range(0, len(rows), row_group_rows):
      part = slice(start, start + row_group_rows)
      writer.write_table(embeddings_table(domain, rows.ids[part], rows.product_ids[part],
                                          embeddings[part], rows.content_digests[part]),
                         row_group_size=row_group_rows)
  os.replace(temporary, path)
  return written


def read_rows(paths: Sequence[str], domain: str) -> ExportRows:
  """Every row of exported Parquet files (content digests included), concatenated in
  the given order. ExportFormatError naming the file when one cannot be read."""
  tables = []
  for path in paths:
    try:
      table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
      raise ExportFormatError(f"{path}: not a readable export Parquet file ({error})") from None
    if "content_digest" not in table.column_names:  # written before digests were kept
      table = table.append_column("content_digest",
                                  pa.nulls(table.num_rows, pa.string()))
    tables.append(table.select(PARQUET_SCHEMA.names))
  if not tables:
    return empty_rows(domain, 0)
  table = pa.concat_tables(tables)
  embeddings = np.zeros((table.num_rows, 0), np.float32)
  if table.num_rows:
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    embeddings = values.astype(np.float32, copy=False).reshape(table.num_rows, -1)
  return ExportRows(domain=domain,
                    ids=np.asarray(table.column("id").to_pylist(), object),
                    product_ids=np.asarray(table.column("product_id").to_pylist(), object),
                    content_digests=np.asarray(table.column("content_digest").to_pylist(),
                                               object),
                    embeddings=embeddings)


def read_parquet(paths: Sequence[str], domain: str,
                 with_embeddings: bool = True) -> DomainEmbeddings:
  """The rows of exported Parquet files, concatenated in the given order."""
  columns = ["id", "product_id"] + (["embedding"] if with_embeddings else [])
  tables = [pq.read_table(path, columns=columns) for path in paths]
  table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table().select(columns)
  embeddings = np.zeros((table.num_rows, 0), np.float32)
  if with_embeddings and table.num_rows:
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    embeddings = values.astype(np.float32, copy=False).reshape(table.num_rows, -1)
  return DomainEmbeddings(
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
  # Rows this job embedded (the others were carried over from the export named in the
  # manifest's lineage); None for --format release.
  embedded: int | None = None

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
  # Where the rows come from (`run_record.provenance`): the prepared dataset's name,
  # config, version and fingerprint, and the code's version and git commit.
  prepared_data: dict[str, Any] | None = None
  code: dict[str, Any] | None = None
  columns: list[str] = dataclasses.field(default_factory=lambda: list(PARQUET_SCHEMA.names))
  domains: dict[str, DomainExport] = dataclasses.field(default_factory=dict)
  format_version: int = MANIFEST_FORMAT_VERSION
  # The job that wrote the export ("cope_jax.export", "cope_jax.embed_beam") and what it
  # read besides the model (the Beam job: ROPE folder, split, serving artifact).
  writer: str = "cope_jax.export"
  inputs: dict[str, Any] | None = None
  # What the content_digest column holds (`data_pipelines.eval_inputs.CONTENT_DIGEST`).
  content_digest: str = ""
  # An incremental export's origin: {"since": the earlier export's folder,
  # "since_manifest_sha256", "since_writer", "domains": {domain: {"added", "changed",
  # "carried", "removed"}}}; None for an export made in full.
  lineage: dict[str, Any] | None = None

  # Fields that must agree for --resume to keep an earlier export's files.
  IDENTITY = ("config_hash", "embedding_dim", "split", "checkpoint_step")
  # Fields that must agree for --since to carry an earlier export's rows over: the same
  # model (config and checkpoint), split and digest definition.
  SINCE_IDENTITY = ("config_hash", "embedding_dim", "checkpoint_step", "checkpoint", "split",
                    "content_digest")

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
    difference = self.difference(other, self.IDENTITY)
    if difference:
      raise ExportMismatchError(
          f"{os.path.join(out_dir, MANIFEST_FILE)}: --resume with a different {difference}; "
          "use a new --out folder or remove the old export")

  def check_since(self, other: Manifest, since_dir: str) -> None:
    """ExportMismatchError unless `other` (the export being made) may carry this
    export's rows over: the first `SINCE_IDENTITY` field that differs is named with
    both values (for the config, the fields that differ). Fields `other` does not know
    yet (None, "") are skipped: check again once they are set."""
    difference = self.difference(other, self.SINCE_IDENTITY)
    if difference:
      raise ExportMismatchError(
          f"{os.path.join(since_dir, MANIFEST_FILE)}: --since an export of another "
          f"model or data: {difference}. Its rows are not what this job would write; "
          "export in full (without --since)")

  def difference(self, other: Manifest, keys: Sequence[str]) -> str:
    """'<field> (<self> -> <other>)' for the first of `keys` where both are known and
    differ (the config hash: the config fields that differ); '' when none does."""
    for key in keys:
      mine, theirs = getattr(self, key), getattr(other, key)
      if mine in (None, "") or theirs in (None, "") or mine == theirs:
        continue
      detail = f"manifest: {mine!r}, this run: {theirs!r}"
      if key == "config_hash":
        detail = "fields that differ, manifest -> this run: " + "; ".join(
            config_checks.config_differences(self.config, other.config))
      return f"{key} ({detail})"
    return ""


# ----------------------------------------------------------------------------
# Checked reading (every row verified, errors naming file and row), for compare.


@dataclasses.dataclass(frozen=True)
class CheckedRows:
  """One domain's rows as the files hold them (copies of an id included): ids [N],
  product ids [N], embeddings [N, D] float32, where [N] ('<file>, row <n>')."""
  ids: np.ndarray
  product_ids: np.ndarray
  embeddings: np.ndarray
  where: np.ndarray


def read_manifest_fields(folder: str) -> dict[str, Any]:
  """The fields of `folder`'s manifest.json as written, whatever its format version (an
  export of another version, or a folder written by another tool in this format); {}
  when it is missing or not a JSON object."""
  try:
    with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
      fields = json.load(f)
  except (OSError, ValueError):
    return {}
  return fields if isinstance(fields, dict) else {}


def read_checked(folder: str) -> dict[str, CheckedRows]:
  """Every domain of the export in `folder`: the files its manifest lists, in order, with
  each row checked (ids and product ids non-empty, embeddings of the manifest's dimension,
  finite). Raises FileNotFoundError or ExportFormatError naming the file (and row)."""
  manifest_path = os.path.join(folder, MANIFEST_FILE)
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    entries = manifest["domains"]
    files = {domain: [entry["file"] for entry in value["files"]]
             for domain, value in entries.items()}
  except (ValueError, KeyError, TypeError) as error:
    raise ExportFormatError(f"{manifest_path}: not an export manifest with "
                            f"domains -> files ({type(error).__name__}: {error})") from None
  unknown = sorted(set(files) - set(domains.NAMES))
  if unknown:
    raise ExportFormatError(f"{manifest_path}: unknown domains {unknown}; expected some of "
                            f"{', '.join(domains.NAMES)}")
  if not files:
    raise ExportFormatError(f"{manifest_path}: lists no domain (an empty export)")
  dim, dim_source = manifest.get("embedding_dim"), manifest_path
  result = {}
  for domain in (d for d in domains.NAMES if d in files):
    parts = []
    for name in files[domain]:
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (listed for {domain} in {manifest_path})")
      part = _read_checked_file(path, dim, dim_source)
      if dim is None and len(part.ids):
        dim, dim_source = part.embeddings.shape[1], f"{path}, row 1"
      if len(part.ids):
        parts.append(part)
    if parts:
      result[domain] = CheckedRows(
          ids=np.concatenate([p.ids for p in parts]),
          product_ids=np.concatenate([p.product_ids for p in parts]),
          embeddings=np.concatenate([p.embeddings for p in parts]),
          where=np.concatenate([p.where for p in parts]))
  if not result:
    raise ExportFormatError(f"{folder}: its export files hold no embedding")
  return result


def _read_checked_file(path: str, dim: int | None, dim_source: str) -> CheckedRows:
  try:
    table = pq.read_table(path, columns=["id", "product_id", "embedding"])
  except (OSError, pa.ArrowInvalid, KeyError) as error:
    raise ExportFormatError(f"{path}: not an export Parquet file with columns id, "
                            f"product_id, embedding ({error})") from None
  ids = np.asarray(table.column("id").to_pylist(), object)
  product_ids = np.asarray(table.column("product_id").to_pylist(), object)
  column = table.column("embedding").combine_chunks()
  lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
  where = np.array([f"{path}, row {i + 1}" for i in range(len(ids))], object)
  for name, values in (("id", ids), ("product_id", product_ids)):
    empty = [i for i, value in enumerate(values) if not value]
    if empty:
      raise ExportFormatError(f"{where[empty[0]]}: empty or null {name}")
  missing = np.flatnonzero(np.isnan(lengths.astype(np.float64)))
  if missing.size:
    raise ExportFormatError(f"{where[missing[0]]} (id {ids[missing[0]]}): null embedding")
  expected = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
  wrong = np.flatnonzero(lengths != expected)
  if wrong.size:
    row = wrong[0]
    raise ExportFormatError(
        f"{where[row]} (id {ids[row]}): {int(lengths[row])} embedding values, expected "
        f"{expected} (as on {dim_source if dim is not None else where[0]})")
  flat = column.flatten()
  if flat.null_count:
    raise ExportFormatError(f"{path}: {flat.null_count} null embedding values")
  values = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), expected)
  bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
  if bad.size:
    raise ExportFormatError(f"{where[bad[0]]} (id {ids[bad[0]]}): an embedding value is "
                            "not a finite number")
  return CheckedRows(ids, product_ids, values, where)
