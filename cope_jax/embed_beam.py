r"""Embeds a ROPE split on Apache Beam with the serving artifact: `python -m cope_jax.embed_beam`.

  python -m cope_jax.embed_beam --serving SERVING_DIR --rope_dir ROPE_DIR --split test \
      --out OUT [--since EARLIER_EXPORT] [--workers 2] [--batch_size 32] \
      [--beam_runner DirectRunner] [--beam_pipeline_options "key=value,..."]

Batch inference for downstream jobs, on an engine a data team already runs: it needs
the serving artifact (`python -m cope_jax.serving`: each domain's `jax.export` function,
params.npz, the config and the vocabulary), the ROPE txt files and the images, and
neither the model code, a TFDS preparation nor an accelerator. It

  1. reads the split's txt files with the project's reader (`rope_format.load_rope`,
     keeping the `config.data.num_frames` segment-middle frames of each clip): every
     row it refuses is in the report with its file and line;
  2. runs one Beam pipeline (`cope_jax.beam_inference`): each worker reads a record's
     images, digests its inputs (`eval_inputs.content_digest`), applies the
     evaluation transforms and embeds batches of each domain with `RunInference` and
     `ServingModelHandler`, which loads the artifact once per worker process (never
     the model code); an image that does not decode is reported and left out as
     `prepare` leaves it out;
  3. writes the export format (`export_format`, as `cope_jax.export` writes it with one
     process: OUT/<domain>-0-of-1.parquet in catalog order, OUT/index/<domain>/ built
     by `export_index` to `config.eval.target_recall`, OUT/manifest.json with
     `writer: cope_jax.embed_beam`) and OUT/embed_report.json (every problem, and each
     worker process that loaded the artifact).

With `--since EARLIER_EXPORT` (an export of the same model and split by this job or by
`cope_jax.export`; OUT itself, say) a worker that finds an item's digest equal to the
earlier row's skips decoding and embedding it: the row is carried over bit for bit,
the items the catalog no longer has are left out, and the manifest's lineage counts
the rows added, changed, carried and removed (`cope_jax.incremental`). An export of
another model or split is refused, naming the field.

The same numbers: a record's inputs are built as `cope_jax.export`'s eval pipeline
builds them (`eval_inputs`), so for one checkpoint the embeddings agree with the
export's within float rounding (1e-5) when both read the same image bytes: the export
of data prepared without re-encoding (`prepare` without --max_image_side keeps RGB
JPEGs as they are). Where a clip frame that is not among the segment-middle ones does
not decode, `prepare` with every frame drops it and samples other frames; this job (as
`prepare --num_frames T`) never reads it.

Runners. By default the DirectRunner with --workers local processes (Beam's
multi-processing mode). A cluster runner is a matter of pipeline options, as for
`data_pipelines.prepare`: `--beam_pipeline_options="runner=DataflowRunner,project=P,
region=R,temp_location=gs://...,setup_file=./pyproject.toml,requirements_file=
requirements-beam.txt"` (Flink: `runner=FlinkRunner,flink_master=HOST:8081`; Spark:
`runner=SparkRunner,spark_master_url=spark://HOST:7077`). The workers read the images
and the serving artifact at the paths given and write their results under OUT's
staging folder, so ROPE_DIR, SERVING_DIR and OUT's parent must be on a file system
every worker mounts at the same path.

Whole or nothing: everything is written into a staging folder beside OUT
(`.OUT.staging-shared`) that replaces OUT only when complete (other entries of OUT are
carried over as hard links). A failed or killed run leaves OUT as it was; the next run
removes the staging folder it left.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np

from cope_jax import config_checks
from cope_jax import export_format
from cope_jax import export_index
from cope_jax import incremental
from cope_jax.base import result_files
from cope_jax import run_record
from cope_jax.base import command_line
from cope_jax import serving_artifact
from cope_jax.base import domains
from data_pipelines import eval_inputs
from data_pipelines import rope_format

WRITER = "cope_jax.embed_beam"
REPORT_FILE = "embed_report.json"
WORK_DIR = ".beam"  # in the staging folder: the catalog rows and the workers' results
DEFAULT_RUNNER = "DirectRunner"


class ServingArtifactError(ValueError):
  """A serving folder this job cannot embed with (the message says what is missing)."""


# ----------------------------------------------------------------------------
# The job.


def embed(serving_dir: str, rope_dir: str, split: str, out_dir: str, *,
          since: str | None = None, workers: int = 1, batch_size: int = 0,
          beam_runner: str | None = DEFAULT_RUNNER, beam_pipeline_options: str = "",
          log=logging.info) -> export_format.Manifest:
  """Embeds `split` of `rope_dir` with the artifact in `serving_dir` into `out_dir`.

  Args:
    serving_dir: written by `cope_jax.serving` (with its config and vocabulary).
    rope_dir: a ROPE folder (the nine txt files of `split`, the images).
    split: the ROPE split ("test", "training").
    out_dir: the export folder (replaced whole when the job succeeds).
    since: an earlier export of the same model and split (see the module docstring).
    workers: DirectRunner processes.
    batch_size: rows per RunInference batch (0: the config's eval.batch_size).
    beam_runner: Beam runner (None: the one in `beam_pipeline_options`).
    beam_pipeline_options: comma-separated key=value Beam pipeline options.
    log: where progress lines go.

  Returns:
    The manifest written to `out_dir/manifest.json`.
  """
  started = time.perf_counter()
  artifact = read_artifact(serving_dir)
  config = artifact["config"]
  batch_size = int(batch_size or config.eval.batch_size)
  if batch_size < 1 or workers < 1:
    raise ValueError(f"--batch_size and --workers must be positive, got {batch_size} and "
                     f"{workers}")
  config_checks.check_index_installed(config.eval.index, "eval.index")
  options = pipeline_options(beam_runner, workers, beam_pipeline_options)
  num_frames = int(config.data.num_frames)
  catalog = rope_format.load_rope(rope_dir, split, num_frames=num_frames)
  log(f"{rope_dir} {split}: " + ", ".join(
      f"{len(catalog.domain(d))} {d}s" for d in domains.NAMES)
      + f"; {len(catalog.problems)} rows refused")
  provenance = artifact["manifest"].get("provenance") or {}
  manifest = export_format.Manifest(
      config_hash=artifact["manifest"]["config_hash"],
      embedding_dim=int(artifact["manifest"]["embedding_dim"]), split=split,
      config=artifact["manifest"]["config"],
      checkpoint_step=provenance.get("checkpoint_step"),
      checkpoint=provenance.get("checkpoint") or "", process_count=1,
      code=run_record.code_version(), writer=WRITER,
      content_digest=eval_inputs.CONTENT_DIGEST,
      inputs={"rope_dir": os.path.abspath(rope_dir), "split": split,
              "serving": os.path.abspath(serving_dir),
              "serving_manifest_sha256": artifact["manifest_sha256"],
              "batch_size": batch_size, "report": REPORT_FILE})
  earlier = incremental.EarlierExport.open(since, manifest) if since else None

  staging = result_files.shared_staging_path(out_dir)
  result_files.remove_stale_staging(out_dir)  # a killed run's, after an interrupted swap
  os.makedirs(staging)
  try:
    work = os.path.join(staging, WORK_DIR)
    os.makedirs(work)
    earlier_rows = {d: earlier.rows(d) for d in domains.NAMES} if earlier else {}
    catalog_path = _write_catalog_rows(catalog, earlier_rows, work)
    runner = options.get_all_options()["runner"] or DEFAULT_RUNNER
    log(f"embedding on the {runner}"
        + (f" with {workers} worker process(es)" if _is_direct(options) else ""))
    _run_pipeline(options, catalog_path, artifact, serving_dir, batch_size, work)
    results, problems, seen_workers = _read_results(work, catalog)
    worker_loads = _read_worker_loads(work)
    shutil.rmtree(work)

    plans, report_counts = {}, {}
    for domain in domains.NAMES:
      rows, plan, counts = _domain_rows(domain, results[domain], earlier, earlier_rows,
                                        manifest.embedding_dim)
      report_counts[domain] = counts
      if not len(rows):
        log(f"{split} has no usable {domain} record: nothing exported for it")
        if earlier is not None:
          plans[domain] = plan
        continue
      plans[domain] = plan
      name = export_format.parquet_name(domain, 0, 1)
      path = os.path.join(staging, name)
      try:
        rows = export_format.write_rows(path, rows)
      except OSError as error:
        raise result_files.write_error(path, error) from None
      manifest.domains[domain] = export_format.DomainExport(
          count=len(rows), files=[{"file": name, "rows": len(rows)}],
          index=f"{export_format.INDEX_DIR}/{domain}", index_complete=True,
          embedded=len(plan.embed), **export_index.write_index(
              rows.embeddings, os.path.join(staging, export_format.INDEX_DIR, domain),
              config.eval))
    if not manifest.domains:
      raise ValueError(f"{rope_dir}: split {split!r} has no usable record (first problems: "
                       + "; ".join(f"{p['file']} line {p['line']}: {p['reason']}"
                                   for p in problems[:3]) + ")")
    if earlier is not None:
      manifest.lineage = earlier.lineage(plans)
    read_problems = [{"stage": "read", **problem} for problem in catalog.problems]
    all_problems = read_problems + problems
    manifest.inputs["problems"] = len(all_problems)
    result_files.write_json(os.path.join(staging, REPORT_FILE), {
        "rope_dir": os.path.abspath(rope_dir), "split": split,
        "serving": os.path.abspath(serving_dir), "runner": options.get_all_options()["runner"],
        "workers_requested": workers, "batch_size": batch_size, "counts": report_counts,
        "worker_processes": worker_loads, "rows_per_worker": seen_workers,
        "seconds": round(time.perf_counter() - started, 3),
        "num_problems": len(all_problems), "problems": all_problems})
    manifest.write(staging)
    result_files.link_entries(out_dir, staging, lambda name: not _is_job_entry(name))
    result_files.swap_in(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def _is_job_entry(name: str) -> bool:
  """Whether an entry of OUT is replaced by this job's output (rather than kept)."""
  return export_format.is_export_entry(name) or name == REPORT_FILE


def read_artifact(serving_dir: str) -> dict[str, Any]:
  """The serving manifest, its sha256 and config, checked to hold what the job needs:
  every domain, the config and the vocabulary."""
  manifest = serving_artifact.read_manifest(serving_dir)
  path = os.path.join(serving_dir, serving_artifact.MANIFEST)
  if not manifest.get("config") or not manifest.get("vocabulary"):
    raise ServingArtifactError(
        f"{path}: no config or vocabulary in the serving artifact (written by an earlier "
        "version, or from a config whose data.vocab_path is missing); write it again "
        "with python -m cope_jax.serving")
  missing = [d for d in domains.NAMES if d not in manifest["domains"]]
  if missing:
    raise ServingArtifactError(f"{path}: the artifact lacks the domain(s) {missing}; "
                               "write it with every domain")
  vocab_path = os.path.join(serving_dir, manifest["vocabulary"]["file"])
  for name in (manifest["params_file"], manifest["vocabulary"]["file"],
               *(entry["file"] for entry in manifest["domains"].values())):
    if not os.path.isfile(os.path.join(serving_dir, name)):
      raise ServingArtifactError(f"{os.path.join(serving_dir, name)}: missing (listed in "
                                 f"{path})")
  with open(path, "rb") as f:
    manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
  return {"manifest": manifest, "manifest_sha256": manifest_sha256,
          "config": run_record.config_from_json(manifest["config"]),
          "vocab_path": os.path.abspath(vocab_path)}


def pipeline_options(beam_runner: str | None, workers: int, options: str):
  """Beam PipelineOptions from the flags: `options` is comma-separated `key=value`; the
  DirectRunner runs `workers` processes (its multi-processing mode)."""
  try:
    from apache_beam.options import pipeline_options as beam_options  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise RuntimeError("cope_jax.embed_beam needs apache-beam: "
                       "pip install -r requirements-beam.txt") from error
  flags = [f"--{item.strip().lstrip('-')}" for item in options.split(",") if item.strip()]
  if beam_runner and not any(f.startswith("--runner=") for f in flags):
    flags.insert(0, f"--runner={beam_runner}")
  runner = next((f.split("=", 1)[1] for f in flags if f.startswith("--runner=")), None)
  if runner in (None, "DirectRunner", "direct"):
    if not any(f.startswith("--direct_running_mode=") for f in flags):
      flags.append("--direct_running_mode=multi_processing")
    if not any(f.startswith("--direct_num_workers=") for f in flags):
      flags.append(f"--direct_num_workers={workers}")
  return beam_options.PipelineOptions(flags)


def _is_direct(options) -> bool:
  return options.get_all_options()["runner"] in (None, "DirectRunner", "direct")


def _write_catalog_rows(catalog: rope_format.RopeCatalog,
                        earlier_rows: Mapping[str, export_format.ExportRows], work: str) -> str:
  """The catalog as JSON lines (what the workers read), with each id's earlier digest."""
  from cope_jax import beam_inference  # pylint: disable=g-import-not-at-top

  path = os.path.join(work, "catalog.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for domain in domains.NAMES:
      earlier = earlier_rows.get(domain)
      digests = (dict(zip(earlier.ids.tolist(), earlier.content_digests.tolist()))
                 if earlier is not None else {})
      media_file = catalog.media_file(domain)
      for key, record in enumerate(catalog.domain(domain).values()):
        f.write(beam_inference.catalog_row(domain, key, record, media_file,
                                           digests.get(record.id)) + "\n")
  return path


def _run_pipeline(options, catalog_path: str, artifact: Mapping[str, Any], serving_dir: str,
                  batch_size: int, work: str) -> None:
  """The Beam pipeline: catalog rows -> inputs -> RunInference -> result lines in
  `work/results-*.jsonl`; waits until it is done (raises when it fails)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.ml.inference import base as inference  # pylint: disable=g-import-not-at-top
  from cope_jax import beam_inference  # pylint: disable=g-import-not-at-top

  config = artifact["config"]
  handler = beam_inference.ServingModelHandler(os.path.abspath(serving_dir), batch_size,
                                               report_dir=work)
  row_inputs = beam_inference.CatalogRowInputs(
      artifact["vocab_path"], int(config.data.image_size), int(config.data.num_frames),
      {d.name: int(config.data[d.text_length_field]) for d in domains.DOMAINS})
  with beam.Pipeline(options=options) as pipeline:
    items = (pipeline
             | "ReadCatalog" >> beam.io.ReadFromText(catalog_path)
             | "Distribute" >> beam.Reshuffle()
             | "Inputs" >> beam.ParDo(row_inputs).with_outputs(beam_inference.RESULTS,
                                                               main="items"))
    by_domain = items.items | "ByDomain" >> beam.Partition(beam_inference.domain_partition,
                                                           len(domains.NAMES))
    batches = [part | f"Batch_{name}" >> beam.BatchElements(**handler.batch_elements_kwargs())
               for name, part in zip(domains.NAMES, by_domain)]
    embedded = (batches
                | "AllBatches" >> beam.Flatten()
                | "Embed" >> inference.RunInference(
                    inference.KeyedModelHandler(handler).with_no_batching())
                | "EmbeddedLines" >> beam.Map(beam_inference.embedded_line))
    _ = ((embedded, items[beam_inference.RESULTS])
         | "AllResults" >> beam.Flatten()
         | "WriteResults" >> beam.io.WriteToText(os.path.join(work, "results"),
                                                 file_name_suffix=".jsonl"))


def _read_results(work: str, catalog: rope_format.RopeCatalog):
  """The workers' result lines: {domain: {key: entry}}, the problems (sorted by file and
  line) and rows embedded per worker process. RuntimeError when a catalog row has no
  result (or two)."""
  from cope_jax import beam_inference  # pylint: disable=g-import-not-at-top

  results = {domain: {} for domain in domains.NAMES}
  problems, per_worker = [], {}
  for path in sorted(glob.glob(os.path.join(work, "results*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      for line in f:
        entry = json.loads(line)
        kind = entry.pop("type")
        if kind == beam_inference.PROBLEM:
          problems.append(entry)
          continue
        if kind == beam_inference.EMBEDDED:
          per_worker[entry["worker"]] = per_worker.get(entry["worker"], 0) + 1
        entry["type"] = kind
        if entry["key"] in results[entry["domain"]]:
          raise RuntimeError(f"{entry['domain']} {entry['id']}: two results from the "
                             "pipeline")
        results[entry["domain"]][entry["key"]] = entry
  for domain in domains.NAMES:
    expected = len(catalog.domain(domain))
    if len(results[domain]) != expected:
      raise RuntimeError(f"the pipeline returned {len(results[domain])} of the "
                         f"{expected} {domain} rows of the catalog")
  problems.sort(key=lambda p: (p["file"], p["line"]))
  return results, problems, per_worker


def _read_worker_loads(work: str) -> list[dict]:
  from cope_jax import beam_inference  # pylint: disable=g-import-not-at-top

  loads = []
  for path in sorted(glob.glob(os.path.join(work, beam_inference.WORKER_FILE_PREFIX + "*"))):
    with open(path, encoding="utf-8") as f:
      loads.append(json.load(f))
  return loads


def _domain_rows(domain: str, results: Mapping[int, dict],
                 earlier: incremental.EarlierExport | None,
                 earlier_rows: Mapping[str, export_format.ExportRows], dim: int):
  """The export's rows of `domain` in catalog order, the plan and the report's counts."""
  from cope_jax import beam_inference  # pylint: disable=g-import-not-at-top

  entries = [results[key] for key in sorted(results)
             if results[key]["type"] != beam_inference.DROPPED]
  ids = [e["id"] for e in entries]
  product_ids = [e["product_id"] for e in entries]
  digests = [e["content_digest"] for e in entries]
  plan = (earlier.plan(domain, ids, digests, earlier_rows[domain]) if earlier is not None
          else incremental.full_plan(domain, len(ids)))
  missing = [ids[i] for i in plan.embed if entries[i]["type"] != beam_inference.EMBEDDED]
  if missing:
    raise RuntimeError(f"{domain} {missing[0]}: carried over by a worker but not by the "
                       f"earlier export's digests ({len(missing)} such rows)")
  embedded = (np.stack([beam_inference.decode_embedding(entries[i]["embedding"])
                        for i in plan.embed]) if len(plan.embed)
              else np.zeros((0, dim), np.float32))
  rows = incremental.assemble(domain, ids, product_ids, digests, plan, embedded, dim,
                              earlier_rows.get(domain))
  counts = {"catalog": len(results), "dropped": len(results) - len(entries),
            "embedded": len(plan.embed), "carried": len(plan.carry)}
  return rows, plan, counts


# ----------------------------------------------------------------------------
# Command line.


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("serving", None, "serving artifact folder (python -m cope_jax.serving)",
                      **define)
  flags.DEFINE_string("rope_dir", None, "ROPE-format folder: the split's txt files and images",
                      **define)
  flags.DEFINE_string("split", "test", "ROPE split to embed", **define)
  flags.DEFINE_string("out", None, "export folder (Parquet files, index, manifest)", **define)
  flags.DEFINE_string("since", "", "an earlier export of the same model and split (OUT "
                      "itself, say): carry over the rows whose inputs did not change",
                      **define)
  flags.DEFINE_integer("workers", 1, "DirectRunner worker processes", **define)
  flags.DEFINE_integer("batch_size", 0, "rows per inference batch (0: the config's "
                       "eval.batch_size)", **define)
  flags.DEFINE_string("beam_runner", DEFAULT_RUNNER, "Beam runner (DirectRunner, "
                      "DataflowRunner, FlinkRunner, SparkRunner); a runner= in "
                      "--beam_pipeline_options wins", **define)
  flags.DEFINE_string("beam_pipeline_options", "", "comma-separated key=value Beam "
                      "pipeline options", **define)


COMMAND = command_line.Command("python -m cope_jax.embed_beam", __doc__,
                               define_flags=_define_flags,
                               required=("serving", "rope_dir", "out"))


def _main(args) -> None:
  manifest = embed(args.serving, args.rope_dir, args.split, args.out,
                   since=args.since or None, workers=args.workers,
                   batch_size=args.batch_size, beam_runner=args.beam_runner,
                   beam_pipeline_options=args.beam_pipeline_options, log=print)
  counts = ", ".join(f"{d}: {e.count} ({e.embedded} embedded)"
                     for d, e in manifest.domains.items())
  print(f"exported checkpoint step {manifest.checkpoint_step} ({counts}) to {args.out}")
  if manifest.lineage is not None:
    print(incremental.describe_lineage(manifest))
  print(f"{manifest.inputs['problems']} problem(s); report: "
        f"{os.path.join(args.out, REPORT_FILE)}")


def main(argv: list[str] | None = None) -> None:
  command_line.run(COMMAND, _main, argv)


if __name__ == "__main__":
  main()
