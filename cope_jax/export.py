r"""Exports embeddings and search indices: `python -m cope_jax.export`.

  python -m cope_jax.export --config configs/synthetic_tiny.py --workdir DIR --out OUT \
      [--split test] [--rope_dir ROPE_DIR] [--resume] [--since EARLIER_EXPORT] \
      [--format parquet|release]

Embeds every record of a split (default `config.data.eval_split`) with the model of
DIR (its latest checkpoint, as `cope_jax.evaluate` picks it) and writes

  OUT/<domain>-<p>-of-<n>.parquet   columns id, product_id, domain (string),
                                    embedding (list<float32>, L2-normalised) and
                                    content_digest (a digest of the item's inputs); one
                                    file per domain and JAX process
  OUT/index/<domain>/               a dot-product index (kind `config.eval.index`, search
                                    tuned to `config.eval.target_recall`) over all
                                    processes' rows of the domain: its rows are the rows
                                    of the files the manifest lists for the domain, in
                                    that order; `index.json` names its kind
  OUT/manifest.json                 checkpoint, config hash, embedding dimension,
                                    counts and files per domain, and per domain the
                                    index kind, its parameters and measured recall;
                                    with --since, the lineage

With `--format release` it writes the PyTorch release's embedding files instead, exactly
as its `infer.py` does, for downstream jobs that read them (`cope_jax.release_format`):

  OUT/{p}_item, OUT/{p}_photo, OUT/{p}_live   one text file per domain and JAX process p;
                                    lines `id<TAB>v1,...,vD` (L2-normalised float32
                                    values), live lines `id<TAB>start<TAB>end<TAB>v1,...`
                                    with the first and last frame timestamps (epoch ms)
                                    of the clip's prepared record

and no Parquet, index or manifest (--resume and --since apply to the Parquet format
only).

With `--since EARLIER_EXPORT` (an export of the same model and split, made by this
command or by `cope_jax.embed_beam`; it may be OUT itself) only the items EARLIER lacks
or whose inputs changed (their `content_digest` differs) are embedded; its other rows
are carried over bit for bit and the items the split no longer has are left out
(`cope_jax.incremental`). The result is a complete export, the same as a full export of
the split (the carried rows are those the earlier export computed), and the manifest's
`lineage` names EARLIER and counts the rows added, changed, carried over and removed
per domain. An export of another config, checkpoint or split is refused, naming the
field that differs.

With --rope_dir a ROPE-format directory is prepared into OUT/prepared first and read
from there. The export is written whole: every process writes into one staging folder
beside OUT (`.OUT.staging-shared`), which replaces OUT only once every file is complete
(other entries of OUT, such as prepared/, are carried over as hard links). A failure at
any point, a full disk included, leaves the previous export in OUT byte-identical;
--resume continues a killed export from its staging folder, or keeps every domain whose
files are complete and listed in OUT's manifest. Writing into a training workdir takes
its lock (`cope_jax.workdir_lock`). The files' format (schema, manifest, reading) is `cope_jax.export_format`; the
embeddings are written as the model gives them (unit rows are not normalised again), so
an export holds exactly what `cope_jax.evaluate` scores. `load_exported_index` reads an
index back and refuses one made by another model (config hash) or of another embedding
dimension.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cope_jax import cli
from cope_jax import config_checks
from cope_jax import embed
from cope_jax import export_format
from cope_jax import export_index
from cope_jax import incremental
from cope_jax import release_format
from cope_jax.base import result_files
from cope_jax import run_record
from cope_jax import sharding
from cope_jax import state
from cope_jax import workdir_lock
from cope_jax.search import index as search_index
from cope_jax.base import domains
from data_pipelines import eval_inputs

PREPARED_DIR = "prepared"
INDEX_RECALL_K = export_index.INDEX_RECALL_K
DIGEST_CHUNK = 256  # records read at a time to compute content digests
FORMATS = ("parquet", "release")  # --format: this project's Parquet + index, or the release's


# ----------------------------------------------------------------------------
# The export.


def export_embeddings(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
                      split: str | None = None, rope_dir: str | None = None,
                      resume: bool = False, output_format: str = "parquet",
                      since: str | None = None, **job_options) -> export_format.Manifest:
  """Embeds `split` with the model of `workdir` and writes Parquet, indices, manifest.

  See `_export_embeddings` for the arguments; `job_options` are `run_record.begin_job`'s
  (the config is checked against the run's record in `workdir`). When `out_dir` lies
  inside `workdir`, the workdir's lock is held throughout (one writer of a workdir at a
  time).
  """
  inside = os.path.abspath(out_dir).startswith(os.path.abspath(workdir) + os.sep)
  with workdir_lock.hold(workdir, "export", enabled=inside and jax.process_index() == 0):
    try:
      return _export_embeddings(config, workdir, out_dir, split=split, rope_dir=rope_dir,
                                resume=resume, output_format=output_format, since=since,
                                **job_options)
    except BaseException:
      if jax.process_index() == 0:
        _clean_failed_staging(out_dir, resumable=not since)
      raise


def _clean_failed_staging(out_dir: str, resumable: bool = True) -> None:
  """After a failure: the staging folder's partial files go; its complete domains and
  manifest stay for a --resume (a fresh export removes them), an empty one goes, and so
  does that of an incremental export (which starts again)."""
  staging = result_files.shared_staging_path(out_dir)
  if not os.path.isdir(staging):
    return
  if not resumable or not os.path.isfile(os.path.join(staging, export_format.MANIFEST_FILE)):
    shutil.rmtree(staging, ignore_errors=True)
    return
  for root, _, names in os.walk(staging):
    for name in names:
      if name.endswith(".tmp"):
        os.remove(os.path.join(root, name))


def _export_embeddings(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
                       split: str | None = None, rope_dir: str | None = None,
                       resume: bool = False, output_format: str = "parquet",
                       since: str | None = None, **job_options) -> export_format.Manifest:
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
    since: an earlier export of the same model and split: embed only what it lacks or
      what changed, carry its other rows over (`cope_jax.incremental`).

  Returns:
    The manifest written to `out_dir/manifest.json` (for "release", the same fields
    without index entries, not written).
  """
  if output_format not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
  if resume and output_format != "parquet":
    raise ValueError("--resume keeps Parquet files listed in a manifest: it applies to "
                     "--format parquet only")
  if since and output_format != "parquet":
    raise ValueError("--since carries rows of an earlier Parquet export over: it applies "
                     "to --format parquet only")
  if since and resume:
    raise ValueError("--since and --resume together: an interrupted incremental export "
                     "starts again (it embeds only what changed); drop --resume")
  config_checks.check_config(config, need_data=not rope_dir)
  if output_format == "parquet":
    config_checks.check_index_installed(config.eval.index, "eval.index")
  process_index, process_count = jax.process_index(), jax.process_count()
  # The run's config (or this one, checked against it); with --rope_dir other data.
  config = run_record.begin_job(config, workdir, "export", check_data=not rope_dir,
                                writer=process_index == 0, **job_options)
  model_hash = config_checks.config_hash(config)
  model_config = json.loads(config.to_json(sort_keys=True))  # kept to name differences
  split_field = "--split" if split else "config.data.eval_split"
  split = split or config.data.eval_split
  os.makedirs(out_dir, exist_ok=True)
  if rope_dir:
    config = _with_prepared_data(config, rope_dir, out_dir)
    config_checks.check_config(config)
  config_checks.check_split(config.data.prepared_dir, split, split_field,  # before any output
                            config_name=config.data.prepared_config)
  # Every file goes into the staging folder, which replaces out_dir once all are written.
  staging = result_files.shared_staging_path(out_dir)
  if process_index == 0:
    _prepare_staging(out_dir, staging, resume and output_format == "parquet")
  _sync_processes("cope_jax.export: staging folder ready")

  manifest = export_format.Manifest(config_hash=model_hash, embedding_dim=int(config.model.emb_dim),
                      split=split, config=model_config,
                      prepared_dir=config.data.prepared_dir, process_count=process_count,
                      content_digest=eval_inputs.CONTENT_DIGEST)
  previous = export_format.Manifest.read(staging) if resume else None
  if previous is not None:
    previous.check_same_run(manifest, out_dir)  # before the (slow) model load
  earlier = incremental.EarlierExport.open(since, manifest) if since else None

  mesh = sharding.make_mesh(config.mesh)
  model_params, step, source = state.load_model_params(config, workdir, mesh)
  manifest.checkpoint_step, manifest.checkpoint = int(step), source
  origin = run_record.provenance(config, step, source)
  manifest.prepared_data, manifest.code = origin["prepared_data"], origin["code"]
  if output_format == "release":
    summary = _export_release(config, model_params, mesh, split, staging, manifest)
    _swap_in(staging, out_dir, _is_release_file)
    return summary
  if previous is not None:
    previous.check_same_run(manifest, out_dir)
    manifest.domains = dict(previous.domains)
  if earlier is not None:
    earlier.check(manifest)  # the checkpoint, now known

  model = state.build_model(config)
  plans = {}
  for domain in domains.NAMES:
    if not _has_records(config, split, domain):
      logging.warning("split %r has no %s records: nothing exported for it", split, domain)
      manifest.domains.pop(domain, None)
      continue
    manifest.domains[domain], plan = _export_domain(
        config, model, model_params, mesh, domain, split, staging,
        manifest.domains.get(domain) if resume else None, earlier)
    if plan is not None:
      plans[domain] = plan
    if process_index == 0:
      manifest.write(staging)  # the progress a --resume continues from
  if earlier is not None:
    manifest.lineage = earlier.lineage(plans)
  if process_index == 0:
    manifest.write(staging)
  _swap_in(staging, out_dir, _is_parquet_export_file)
  return manifest


def _is_parquet_export_file(name: str) -> bool:
  """Whether an entry of an export folder belongs to the Parquet export (replaced by a
  new one) rather than being carried over (prepared/, a release export, other files)."""
  return export_format.is_export_entry(name)


def _is_release_file(name: str) -> bool:
  rank, _, release_name = name.removesuffix(release_format.TEMPORARY_SUFFIX).partition("_")
  return rank.isdigit() and release_name in {d.release_name for d in domains.DOMAINS}


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _prepare_staging(out_dir: str, staging: str, resume: bool) -> None:
  """The staging folder of an export: a killed export's when resuming one, else a fresh
  one, holding (when resuming) links to out_dir's complete export files."""
  result_files.recover_interrupted_swap(out_dir)
  if resume and export_format.Manifest.read(staging) is not None:
    logging.info("export: continuing the interrupted export in %s", staging)
    return
  result_files.remove_stale_staging(out_dir)  # this job's shared folder included
  os.makedirs(staging)
  if resume:
    result_files.link_entries(out_dir, staging, _is_parquet_export_file)


def _swap_in(staging: str, out_dir: str, replaced) -> None:
  """Once every process has written its files: out_dir's entries that `replaced` does
  not claim are carried over (linked), then the staging folder replaces out_dir."""
  _sync_processes("cope_jax.export: all files written")
  if jax.process_index() == 0:
    carried = result_files.link_entries(out_dir, staging, lambda name: not replaced(name))
    if export_format.MANIFEST_FILE in carried:
      logging.warning("%s also holds a Parquet export (%s): cope_jax.compare will refuse "
                      "the folder until one of the two is moved", out_dir,
                      export_format.MANIFEST_FILE)
    result_files.swap_in(staging, out_dir)
  _sync_processes("cope_jax.export: swapped in")


def _export_release(config, model_params, mesh, split: str, out_dir: str,
                    summary: export_format.Manifest) -> export_format.Manifest:
  """Writes this process's `{rank}_{release name}` file of every domain with records."""
  from data_pipelines import pipelines  # pylint: disable=g-import-not-at-top
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top

  process_index, process_count = jax.process_index(), jax.process_count()
  if process_index == 0:
    for name in release_format.remove_other_ranks(out_dir, process_count):
      logging.warning("removed %s, left by an export with more processes", name)
    if os.path.exists(os.path.join(out_dir, export_format.MANIFEST_FILE)):
      logging.warning("%s also holds a Parquet export (%s): cope_jax.compare will refuse "
                      "the folder until one of the two is moved", out_dir, export_format.MANIFEST_FILE)
  model = state.build_model(config)
  for domain in domains.NAMES:
    if not _has_records(config, split, domain):
      logging.warning("split %r has no %s records: nothing exported for it", split, domain)
      continue
    times = None
    if domains.get(domain).release_times:
      record_range = pipelines.make_eval_dataset(config, domain, split, process_index,
                                                 process_count).record_range
      times = release_format.clip_times(
          prepare.open_domain(config.data.prepared_dir, split, domain,
                              config_name=config.data.prepared_config), record_range)
    batches = ((ids, product_ids,
                export_format.normalise_rows(embeddings, f"{domain} embeddings"))
               for ids, product_ids, embeddings in embed.iter_embedding_batches(
                   config, model, model_params, domain, mesh, split))
    try:
      rows = release_format.write_embeddings(out_dir, domain, process_index, batches, times)
    except OSError as error:
      raise result_files.write_error(
          os.path.join(out_dir, release_format.file_name(process_index, domain)),
          error) from None
    counts = _gather_counts(rows)
    summary.domains[domain] = export_format.DomainExport(
        count=sum(counts),
        files=[{"file": release_format.file_name(p, domain), "rows": count}
               for p, count in enumerate(counts)])
  return summary


def _has_records(config: ml_collections.ConfigDict, split: str, domain: str) -> bool:
  """Whether the prepared split holds any record of `domain`."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  try:
    return len(prepare.open_domain(config.data.prepared_dir, split, domain,
                                   config_name=config.data.prepared_config)) > 0
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
  config.data.prepared_dir = os.path.abspath(prepared_dir)
  config.data.prepared_config = prepare.dataset_identity(prepared_dir)["config"]
  return config


def _export_domain(config, model, model_params, mesh, domain: str, split: str, out_dir: str,
                   previous_entry: export_format.DomainExport | None,
                   earlier: incremental.EarlierExport | None
                   ) -> tuple[export_format.DomainExport, incremental.DomainPlan | None]:
  """Writes this process's Parquet file and (process 0) the index of one domain.

  Returns the manifest entry and what was done with each row (None: the domain was
  complete in `previous_entry`, a --resume's manifest, and read back).
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  names = [export_format.parquet_name(domain, p, process_count) for p in range(process_count)]
  own_path = os.path.join(out_dir, names[process_index])
  index_dir = os.path.join(out_dir, export_format.INDEX_DIR, domain)
  all_complete = previous_entry is not None and all(
      previous_entry.file_complete(out_dir, name) for name in names)
  if (all_complete and previous_entry.index_complete
      and os.path.isfile(os.path.join(index_dir, search_index.INDEX_FILE))):
    logging.info("export %s: complete in the manifest, kept", domain)
    return previous_entry, None

  plan = None
  if all_complete:
    logging.info("export %s: files complete, read back", domain)
    rows = export_format.read_rows([os.path.join(out_dir, name) for name in names], domain)
    embedded = previous_entry.embedded
  else:
    rows, plan = _domain_rows(config, model, model_params, mesh, domain, split, earlier)
    start, stop = _record_range(len(rows), process_index, process_count)
    try:
      export_format.write_rows(own_path, rows.take(np.arange(start, stop)))
    except OSError as error:  # Arrow's messages name no file
      raise result_files.write_error(own_path, error) from None
    embedded = len(plan.embed)
  counts = [stop - start for start, stop in (_record_range(len(rows), p, process_count)
                                             for p in range(process_count))]
  entry = export_format.DomainExport(count=len(rows),
                       files=[{"file": name, "rows": count} for name, count in zip(names, counts)],
                       index=f"{export_format.INDEX_DIR}/{domain}", embedded=embedded)
  if process_index == 0 and len(rows):
    entry = dataclasses.replace(entry, index_complete=True, **export_index.write_index(
        rows.embeddings, index_dir, config.eval))
  return entry, plan


def _record_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous rows [start, stop) of a domain that process `process_index` writes
  (the part the eval pipeline gives it)."""
  return (num_records * process_index // process_count,
          num_records * (process_index + 1) // process_count)


class _Records:
  """The records at `indices` of a record source, in that order: a record source
  itself (`len`, `[i]`), picklable when the source is."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, position: int) -> dict:
    return self._source[int(self._indices[position])]


def _content_keys(source, start: int, stop: int, domain: str,
                  num_frames: int) -> tuple[list[str], list[str], list[str]]:
  """(ids, product ids, content digests) of the records [start, stop) of `source`."""
  spec = domains.get(domain)
  ids, product_ids, digests = [], [], []
  for first in range(start, stop, DIGEST_CHUNK):
    for record in source.__getitems__(range(first, min(stop, first + DIGEST_CHUNK))):
      ids.append(str(record["id"]))
      product_ids.append(str(record["product_id"]))
      digests.append(eval_inputs.content_digest(record, spec, num_frames))
  return ids, product_ids, digests


def _domain_rows(config, model, model_params, mesh, domain: str, split: str,
                 earlier: incremental.EarlierExport | None
                 ) -> tuple[export_format.ExportRows, incremental.DomainPlan]:
  """Every row of `domain` (all processes'), in record order, and the plan that made
  them: each process digests its part of the records; the rows to embed (all, or with
  `earlier` those it lacks or that changed) are embedded by all processes together, the
  others carried over from `earlier`."""
  from data_pipelines import pipelines  # pylint: disable=g-import-not-at-top
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  from data_pipelines import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  process_index, process_count = jax.process_index(), jax.process_count()
  dim = int(config.model.emb_dim)
  source = prepare.open_domain(config.data.prepared_dir, split, domain,
                               config_name=config.data.prepared_config)
  start, stop = _record_range(len(source), process_index, process_count)
  parts = embed.gather_objects(_content_keys(source, start, stop, domain,
                                             config.data.num_frames))
  ids, product_ids, digests = ([value for part in parts for value in part[column]]
                               for column in range(3))
  earlier_rows = earlier.rows(domain) if earlier is not None else None
  plan = (earlier.plan(domain, ids, digests, earlier_rows) if earlier is not None
          else incremental.full_plan(domain, len(ids)))
  if earlier is not None:
    logging.info("export %s: %s", domain, ", ".join(f"{count} {what}"
                                                    for what, count in plan.counts.items()))
  embedded = np.zeros((0, dim), np.float32)
  if len(plan.embed):
    dataset = pipelines.eval_dataset_from_source(
        config, domain, _Records(source, plan.embed),
        tokenizer_lib.Tokenizer(config.data.vocab_path), process_index, process_count)
    batches = list(embed.iter_dataset_embeddings(config, model, model_params, dataset, mesh))
    local_ids = np.concatenate([batch[0] for batch in batches])
    local_embeddings = np.concatenate([batch[2] for batch in batches])
    gathered = embed.gather_objects((local_ids, local_embeddings))
    embedded_ids = np.concatenate([part[0] for part in gathered])
    embedded = np.concatenate([part[1] for part in gathered])
    if embedded_ids.tolist() != [ids[i] for i in plan.embed]:
      raise RuntimeError(f"export {domain}: the embedded rows are not the records asked for")
  rows = incremental.assemble(domain, ids, product_ids, digests, plan, embedded, dim,
                              earlier_rows)
  return dataclasses.replace(rows, embeddings=export_format.normalise_rows(
      rows.embeddings, f"{domain} embeddings")), plan


def _gather_counts(local_count: int) -> list[int]:
  """Every process's row count, in process order."""
  if jax.process_count() == 1:
    return [int(local_count)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.array([local_count], np.int64))
  return [int(c) for c in np.asarray(counts).reshape(-1)]


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
  manifest: export_format.Manifest

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> scores [Q, k] float32, indices [Q, k] int32 (-1: none)."""
    return self.index.search(queries, k)


def load_exported_index(out_dir: str, domain: str, config_hash: str | None = None,
                        dim: int | None = None) -> ExportedIndex:
  """Loads `out_dir/index/<domain>` after checking the manifest.

  Args:
    out_dir: a folder written by `export_embeddings`.
    domain: 'page' | 'video' | 'live'.
    config_hash: when given, the digest (`run_record.config_digest(config)`) of the
      model the caller's queries come from; an index of another model is refused.
    dim: when given, the caller's embedding dimension; another dimension is refused.

  Raises:
    FileNotFoundError: no manifest, or no complete index for the domain.
    export_format.ExportMismatchError: the config hash or the dimension differs.
  """
  manifest_path = os.path.join(out_dir, export_format.MANIFEST_FILE)
  manifest = export_format.Manifest.read(out_dir)
  if manifest is None:
    raise FileNotFoundError(f"{manifest_path}: no export manifest (run cope_jax.export)")
  if config_hash is not None and manifest.config_hash != config_hash:
    raise export_format.ExportMismatchError(
        f"{manifest_path}: the index was exported from another model (config hash "
        f"{manifest.config_hash}, expected {config_hash}); re-export with this "
        "model's config")
  if dim is not None and manifest.embedding_dim != dim:
    raise export_format.ExportMismatchError(
        f"{manifest_path}: the index holds {manifest.embedding_dim}-dimensional "
        f"embeddings, expected {dim}")
  entry = manifest.domains.get(domain)
  if entry is None or not entry.index_complete:
    raise FileNotFoundError(f"{manifest_path}: no complete {domain!r} index in this export "
                            f"(domains: {sorted(manifest.domains)})")
  rows = export_format.read_parquet([os.path.join(out_dir, f["file"]) for f in entry.files], domain,
                      with_embeddings=False)
  if len(rows) != entry.count:
    raise ValueError(f"{manifest_path}: {domain} lists {entry.count} rows but its "
                     f"Parquet files hold {len(rows)}")
  index = search_index.load_index(os.path.join(out_dir, entry.index))
  return ExportedIndex(domain=domain, index=index, ids=rows.ids,
                       product_ids=rows.product_ids, manifest=manifest)


# ----------------------------------------------------------------------------
# Command line.


def _main(args) -> None:
  manifest = export_embeddings(args.config, args.workdir, args.out, split=args.split or None,
                               rope_dir=args.rope_dir or None, resume=args.resume,
                               output_format=args.format, since=args.since or None,
                               **cli.job_options(args))
  if jax.process_index() == 0:
    counts = ", ".join(f"{d}: {e.count}" for d, e in manifest.domains.items())
    layout = " in the release's format" if args.format == "release" else ""
    print(f"exported checkpoint step {manifest.checkpoint_step} ({counts}) to "
          f"{args.out}{layout}")
    if manifest.lineage is not None:
      print(incremental.describe_lineage(manifest))


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("out", None, "output folder for Parquet files, indices and manifest",
                      **define)
  flags.DEFINE_string("split", "", "split to export (default: config.data.eval_split)",
                      **define)
  flags.DEFINE_string("rope_dir", "", "a ROPE-format folder to prepare into OUT/prepared "
                      "and export instead of config.data.prepared_dir", **define)
  flags.DEFINE_bool("resume", False, "continue an interrupted export, or keep the domains "
                    "complete in OUT/manifest.json", **define)
  flags.DEFINE_string("since", "", "an earlier export of the same model and split (OUT "
                      "itself, say): embed only the items it lacks or whose inputs "
                      "changed, carry its other rows over", **define)
  flags.DEFINE_enum("format", "parquet", FORMATS, "parquet: Parquet files, search index "
                    "and manifest; release: the PyTorch release's {rank}_item/_photo/_live "
                    "files", **define)


def main(argv=None) -> None:
  command = cli.command("python -m cope_jax.export", __doc__,
                        workdir_help="training directory whose checkpoint is exported",
                        define_flags=_define_flags, required=("out",))
  cli.run_job(command, _main, argv)


if __name__ == "__main__":
  main()
