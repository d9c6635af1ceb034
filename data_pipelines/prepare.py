"""ROPE directory -> the `rope` TFDS dataset (ArrayRecord), product tables, a report.

  python -m data_pipelines.prepare --rope_dir demo_run/rope --out demo_run/prepared

  # only the 8 frames per clip training reads, images at most 256 px:
  python -m data_pipelines.prepare --rope_dir R --out O --num_frames 8 --max_image_side 256

  # check a catalog before a long build: parse, check the image files, count, report
  python -m data_pipelines.prepare --rope_dir R --out O --num_frames 8 --plan_only

  # every core: 8 local processes decode / check / re-encode, one writer writes shards
  python -m data_pipelines.prepare --rope_dir R --out O --workers 8

  # Apache Beam's local runner (pip install -r requirements-beam.txt):
  python -m data_pipelines.prepare --rope_dir R --out O --beam_runner=DirectRunner --workers 8

  # a cluster runner: the same, with pipeline options (see README, "Running on real ROPE")
  python -m data_pipelines.prepare --rope_dir R --out O \\
      --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,temp_location=gs://..."

This is a thin command over the `rope` builder (`data_pipelines.rope_tfds`, whose
docstring describes splits, record order and configs). It

  1. checks every one of the nine txt files of each requested split (`--splits`,
     default: those of which ROPE_DIR holds any file) before writing anything: a missing
     file, a directory in its place or an unreadable one is an error naming each;
  2. builds the dataset into OUT/tfds, or skips the build when OUT already holds it for
     the same inputs and options (the dataset folder carries a fingerprint of the txt
     files and options). A build first plans: it parses the catalog, checks the image
     files and writes the records to encode as Arrow files (`rope_tfds.plan_build`,
     `rope_plan`; in OUT/.building/<config>-<fingerprint>.plan/, deleted at the end),
     which the workers read. `--plan_only` stops there, writes the counts and problems
     to OUT/configs/<config>/plan_report.json and no plan file, decodes no image and
     builds no dataset (`--check_files=false` also skips the file check).
     Without a Beam runner the build is the project's shard writer
     (`rope_shards`): `--workers` processes encode, one writes the ArrayRecord shards
     in order, in OUT/.building/<config>-<fingerprint>/, which is renamed into place
     when complete. It resumes per shard: a rerun after a kill -9 keeps every shard
     finished before it and writes the rest (the report counts both); the records
     equal an uninterrupted build's, in the same order. A progress bar shows images/s
     and the time left. With a Beam runner, TFDS's own writer builds the dataset (a
     killed Beam build starts again);
  3. writes what the readers open, for this config and as the default of OUT:

  OUT/tfds/rope/<config>/<version>/   the TFDS dataset: `tfds.data_source("rope/<config>",
                                      data_dir="OUT/tfds", split="training_video")`
  OUT/configs/<config>/               the config's reader files: dataset.json (config,
                                      version, splits, record counts, fingerprint),
                                      <split>/products.json (the product table) and
                                      prepare_report.json (counts, every problem)
  OUT/dataset.json                    the default config (the one the latest prepare
  OUT/<split>/products.json           wrote): copies of its dataset.json, product
  OUT/prepare_report.json             tables and report

Configs live side by side: a prepare with other options (`--num_frames`,
`--max_image_side`) adds its config and makes it the default, and every config prepared
before stays readable by name, with its own report. Readers that name no config read
the default; a job that must read the data it was trained on names its config
(`open_domain(..., config_name=...)`) and compares `dataset_identity`. An OUT written
before configs lived side by side (OUT/dataset.json of format 2) is still read, and the
next prepare into it keeps its config in OUT/configs/.

A split with no usable product (no record with a usable image: e.g. the images are not
downloaded yet) stops prepare with an error saying why, before anything is encoded; the
default config is not changed (exit status 1).

Every row that the catalog reader (`rope_format.load_rope`) refuses and every image that
does not decode is in the report's `problems` with its txt file and line: stage "read"
or "decode". A clip keeps its frames that decode; a record none of whose images decode
is left out (and reported). Products keep their `product_index` (sorted product-id
order) even when all their records are left out.

Readers call `open_domain`, `load_products`, `prepared_configs` and `dataset_identity`
(docs/interfaces.md) and never open the files by hand.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from etils import epath
import numpy as np

from cope_jax.base import result_files
from cope_jax.base import command_line
from cope_jax.base import domains
from data_pipelines import rope_format
from data_pipelines import rope_records
from data_pipelines import rope_shards
from data_pipelines import rope_tfds

REPORT_NAME = "prepare_report.json"
PLAN_REPORT_NAME = "plan_report.json"  # prepare --plan_only, in OUT/configs/<config>/
PLAN_SUFFIX = ".plan"  # OUT/.building/<config>-<fingerprint>.plan/: the build's plan files
POINTER_NAME = "dataset.json"
PRODUCTS_NAME = "products.json"
TFDS_SUBDIR = "tfds"
CONFIGS_SUBDIR = "configs"  # OUT/configs/<config>/: each prepared config's reader files
BUILDING_SUBDIR = ".building"  # shard-writer builds in progress (resumable)
# 3: configs side by side in OUT/configs/; 2: one config per OUT (OUT/dataset.json and
# OUT/<split>/products.json only, still read); 1: the msgpack shards of earlier versions
POINTER_FORMAT = 3


def _write_json(path: str, value) -> None:
  """Strict JSON, written whole (`result_files`), keys in the order written."""
  result_files.write_json(path, value, indent=1, sort_keys=False, ensure_ascii=False)


def _beam_options(beam_runner: str | None, workers: int, pipeline_options: str):
  """Beam PipelineOptions from the flags, or None for the project's shard writer.

  `pipeline_options` is TFDS's `--beam_pipeline_options` format: comma-separated
  `key=value` (e.g. `runner=FlinkRunner,flink_master=host:8081`). Beam runs only when a
  runner or options are given; `workers` > 1 on the DirectRunner means its
  multi-processing mode with that many processes.
  """
  flags = [f"--{item.strip().lstrip('-')}" for item in pipeline_options.split(",")
           if item.strip()]
  if beam_runner is None and not flags:
    return None
  try:
    from apache_beam.options import pipeline_options as beam_pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("preparing with Apache Beam needs apache-beam: "
                       "pip install -r requirements-beam.txt") from e
  runner = beam_runner
  if runner is not None:
    flags.insert(0, f"--runner={runner}")
  if runner in ("DirectRunner", "direct") and workers > 1:
    if not any(f.startswith("--direct_running_mode=") for f in flags):
      flags.append("--direct_running_mode=multi_processing")
    flags.append(f"--direct_num_workers={workers}")
  return beam_pipeline_options.PipelineOptions(flags)


def _remove_stale(out_dir: str, dataset_dir: str, staging_dir: str, log) -> None:
  """Removes what earlier or killed runs left that this run's outputs replace (a
  staging folder of other inputs or options, the files of the format-1 layout; the
  staging folder of this build is kept)."""
  building_dir = os.path.join(out_dir, BUILDING_SUBDIR)
  if os.path.isdir(building_dir):
    for name in os.listdir(building_dir):
      path = os.path.join(building_dir, name)
      if path != staging_dir:
        log(f"removing the unfinished build {path} (other inputs or options)")
        shutil.rmtree(path, ignore_errors=True)
  config_dir = os.path.dirname(dataset_dir)
  if os.path.isdir(config_dir):
    for name in os.listdir(config_dir):
      if name.startswith("incomplete."):  # TFDS's temporary folder of a killed build
        log(f"removing the unfinished build {os.path.join(config_dir, name)}")
        shutil.rmtree(os.path.join(config_dir, name), ignore_errors=True)
  for split in rope_format.SPLITS:
    split_dir = os.path.join(out_dir, split)
    if not os.path.isdir(split_dir):
      continue
    for name in os.listdir(split_dir):
      path = os.path.join(split_dir, name)
      if name.endswith((".array_record", ".complete.json")) or name.startswith(".tmp-"):
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)


def prepare(rope_dir: str, out_dir: str, *, splits: Sequence[str] | None = None,
            num_frames: int = 0, max_image_side: int = 0, num_shards: int | None = None,
            workers: int = 1, beam_runner: str | None = None,
            beam_pipeline_options: str = "", plan_only: bool = False,
            check_files: bool = True, progress: bool = True, log=print) -> dict:
  """Prepares `rope_dir` into `out_dir`; returns the report it writes.

  Args:
    rope_dir: ROPE-format directory (see `rope_format`).
    out_dir: output directory (created).
    splits: ROPE splits to prepare (default: every split with any of its files present).
    num_frames: keep the T segment-middle frames of each clip (0: every frame).
    max_image_side: re-encode images whose longer side exceeds this (0: never resize).
    num_shards: ArrayRecord files per TFDS split (None: the shard writer cuts shards of
      about `rope_shards.IMAGES_PER_SHARD` images; TFDS sizes Beam's, 64 MiB-1 GiB).
    workers: local processes that decode / check / re-encode (the shard writer; 1: this
      process), or the DirectRunner's processes with `beam_runner`.
    beam_runner: Beam runner name (DirectRunner, DataflowRunner, FlinkRunner,
      SparkRunner); None: the shard writer unless pipeline options name one.
    beam_pipeline_options: comma-separated `key=value` Beam pipeline options.
    plan_only: stop after the plan (`plan` below): parse the catalog, check the image
      files, count products, records, images and shards, write the report to
      OUT/configs/<config>/plan_report.json; decode no image and write no dataset.
    check_files: check that every image named exists (a directory listing per folder);
      False (only with `plan_only`) skips it.
    progress: show the progress bar (images/s and time left).
    log: receives one line per step.

  Raises:
    rope_tfds.RopeFilesError (a FileNotFoundError): no split in `rope_dir`, or a
      requested split lacks some of its nine files (all named); nothing is written then.
    rope_tfds.NoUsableProductError (a ValueError): a split has no usable product (the
      message says why: e.g. image files not found, run download first); the default
      config is not changed.
    ValueError: bad option values.
  """
  if workers < 1 or num_frames < 0 or max_image_side < 0 or (num_shards or 1) < 1:
    raise ValueError(f"need workers >= 1, num_frames >= 0, max_image_side >= 0, "
                     f"num_shards >= 1; got {workers}, {num_frames}, {max_image_side}, "
                     f"{num_shards}")
  if not check_files and not plan_only:
    raise ValueError("check_files=False (--check_files=false) is for --plan_only: a build "
                     "reads every image anyway, and the frames kept depend on the check")
  splits = list(splits) if splits else rope_tfds.present_splits(rope_dir)
  if not splits:
    raise rope_tfds.RopeFilesError(
        f"{rope_dir!r} holds no ROPE split (looked for the nine txt files of "
        f"{' and '.join(rope_format.SPLITS)}, e.g. "
        f"{rope_format.file_name(rope_format.SPLITS[0], domains.DOMAINS[0].files.pair)})")
  rope_tfds.check_split_files(rope_dir, splits)  # before anything is written
  config = rope_tfds.rope_config(num_frames, max_image_side)
  fingerprint = rope_tfds.input_fingerprint(rope_dir, splits, config)
  if plan_only:
    return _plan_only(rope_dir, out_dir, splits, config, fingerprint, num_shards,
                      check_files, log)
  beam_options = _beam_options(beam_runner, workers, beam_pipeline_options)

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_dir = os.path.join(out_dir, TFDS_SUBDIR)
  builder = rope_tfds.Rope(config=config, data_dir=tfds_dir, rope_splits=splits,
                           file_format=rope_tfds.FILE_FORMAT, fingerprint=fingerprint)
  dataset_dir = os.fspath(builder.data_path)
  staging_dir = os.path.join(out_dir, BUILDING_SUBDIR, f"{config.name}-{fingerprint[:16]}")
  os.makedirs(out_dir, exist_ok=True)
  _remove_stale(out_dir, dataset_dir, staging_dir, log)
  _keep_single_config_folder(out_dir, log)

  build_info = rope_tfds.read_build_info(dataset_dir)
  shard_counts = {"written": 0, "reused": 0}
  if build_info and build_info.get("fingerprint") == fingerprint:
    status = "skipped (up to date)"
    log(f"{config.name}: up to date in {dataset_dir}, skipped")
    if os.path.exists(os.path.join(dataset_dir, rope_shards.STATE_NAME)):
      rope_shards.remove_work_files(dataset_dir)  # killed right after the rename
  else:
    changed = os.path.exists(dataset_dir)
    if changed and beam_options is not None:  # built from other inputs: stale (TFDS
      shutil.rmtree(dataset_dir)  # builds into an empty folder; the shard writer
      builder = rope_tfds.Rope(config=config, data_dir=tfds_dir, rope_splits=splits,
                               file_format=rope_tfds.FILE_FORMAT,  # replaces it at the end)
                               fingerprint=fingerprint)
    runner = (f"the shard writer ({workers} process{'es' if workers > 1 else ''})"
              if beam_options is None else "Apache Beam")
    log(f"{config.name}: building {', '.join(splits)} into {dataset_dir} with {runner}"
        + (" (inputs or options changed)" if changed else ""))
    if beam_options is None:
      shard_counts = _build_with_shard_writer(builder, rope_dir, splits, staging_dir,
                                              dataset_dir, num_shards, workers, progress,
                                              log)
    else:
      tfds.display_progress_bar(progress)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=rope_dir, beam_options=beam_options, num_shards=num_shards))
    build_info = rope_tfds.read_build_info(dataset_dir)
    status = "written"
    if build_info is None or build_info["fingerprint"] != fingerprint:
      raise RuntimeError(f"the build of {dataset_dir} left no matching "
                         f"{rope_tfds.BUILD_INFO_NAME} (did the txt files change during "
                         "the build?)")

  split_reports = {}
  products_by_split = {}
  for split in splits:
    products = rope_tfds.read_products(dataset_dir, split)
    products_by_split[split] = products
    counts = build_info["splits"][split]["domains"]
    split_reports[split] = {
        "fingerprint": fingerprint,
        "products": len(products),
        "products_with_all_domains": sum(all(p[d] for d in domains.NAMES) for p in products),
        "frames_skipped_by_download": build_info["splits"][split].get(
            "frames_skipped_by_download", 0),
        "domains": {d: {"records": counts[d]["records"],
                        "products": sum(bool(p[d]) for p in products),
                        "dropped_at_decode": counts[d]["dropped_at_decode"],
                        "images": counts[d].get("images"),
                        "shards": counts[d]["shards"], "status": status}
                    for d in domains.NAMES},
    }
    if not any(p[d] for p in products for d in domains.NAMES):
      raise rope_tfds.NoUsableProductError(
          rope_tfds.no_usable_product_message(rope_dir, split, [
              p for p in build_info["problems"] if p["split"] == split])
          + f"; the dataset in {dataset_dir} was left as it is, and the default config "
          f"of {out_dir} was not changed")
  pointer = {
      "format": POINTER_FORMAT, "name": rope_tfds.DATASET_NAME, "config": config.name,
      "version": str(builder.version), "data_dir": TFDS_SUBDIR,
      "dataset_dir": os.path.relpath(dataset_dir, out_dir), "splits": splits,
      "fingerprint": fingerprint,
      "records": {split: {d: split_reports[split]["domains"][d]["records"]
                          for d in domains.NAMES} for split in splits}}
  problems = build_info["problems"]
  report = {
      "rope_dir": os.path.abspath(rope_dir),
      "options": {"splits": splits, "num_frames": num_frames,
                  "max_image_side": max_image_side, "num_shards": num_shards},
      "tfds": {"name": rope_tfds.DATASET_NAME, "config": config.name,
               "version": str(builder.version), "data_dir": os.path.abspath(tfds_dir),
               "dataset_dir": os.path.abspath(dataset_dir),
               "generated_with": build_info["generated_with"]},
      "status": status, "shards": shard_counts,
      "splits": split_reports, "num_problems": len(problems), "problems": problems}
  _write_reader_files(out_dir, config.name, pointer, products_by_split, report)
  return report


def _write_reader_files(out_dir: str, config: str, pointer: dict,
                        products_by_split: dict[str, list[dict]], report: dict) -> None:
  """Writes the config's own reader files, then makes it the default of `out_dir`.

  OUT/configs/<config>/ gets dataset.json, prepare_report.json and <split>/products.json
  (other configs' folders are not touched); then the same files at the top of OUT:
  the products tables, prepare_report.json, and dataset.json last (the switch).
  """
  config_dir = os.path.join(out_dir, CONFIGS_SUBDIR, config)
  for directory in (config_dir, out_dir):
    for split, products in products_by_split.items():
      os.makedirs(os.path.join(directory, split), exist_ok=True)
      _write_json(os.path.join(directory, split, PRODUCTS_NAME),
                  {"fingerprint": pointer["fingerprint"], "products": products})
    for split in rope_format.SPLITS:  # a split this prepare did not prepare
      path = os.path.join(directory, split, PRODUCTS_NAME)
      if split not in products_by_split and os.path.exists(path):
        os.remove(path)
    _write_json(os.path.join(directory, REPORT_NAME), report)
    _write_json(os.path.join(directory, POINTER_NAME), pointer)


def _keep_single_config_folder(out_dir: str, log) -> None:
  """Gives the config of an OUT written before configs lived side by side (format 2:
  OUT/dataset.json, OUT/<split>/products.json) its own OUT/configs/<config>/ folder,
  so that it stays readable by name once another config becomes the default."""
  pointer = rope_shards.read_json(os.path.join(out_dir, POINTER_NAME))
  if not isinstance(pointer, dict) or pointer.get("format") != 2:
    return
  config_dir = os.path.join(out_dir, CONFIGS_SUBDIR, pointer["config"])
  if os.path.exists(os.path.join(config_dir, POINTER_NAME)):
    return
  tables = {split: rope_shards.read_json(os.path.join(out_dir, split, PRODUCTS_NAME))
            for split in pointer["splits"]}
  if any(table is None for table in tables.values()):
    log(f"{out_dir}: the product tables of {pointer['config']} are incomplete; it is "
        "not kept as a config of its own (prepare it again to read it)")
    return
  log(f"{out_dir}: keeping {pointer['config']} (prepared before configs lived side by "
      f"side) in {config_dir}")
  for split, table in tables.items():
    os.makedirs(os.path.join(config_dir, split), exist_ok=True)
    _write_json(os.path.join(config_dir, split, PRODUCTS_NAME), table)
  report = rope_shards.read_json(os.path.join(out_dir, REPORT_NAME))
  if isinstance(report, dict) and report.get("tfds", {}).get("config") == pointer["config"]:
    _write_json(os.path.join(config_dir, REPORT_NAME), report)
  _write_json(os.path.join(config_dir, POINTER_NAME), {**pointer, "format": POINTER_FORMAT})


def _build_with_shard_writer(builder, rope_dir: str, splits: list[str], staging_dir: str,
                             dataset_dir: str, num_shards: int | None, workers: int,
                             progress: bool, log) -> dict:
  """Builds (or finishes) the dataset in `staging_dir`, then renames it to `dataset_dir`.
  The plan files go to `staging_dir`.plan and are deleted at the end.
  Returns {"written": shards written, "reused": shards a killed run had finished}."""
  plan_dir = staging_dir + PLAN_SUFFIX
  build, plans = rope_tfds.plan_build(rope_dir, splits, builder.builder_config, plan_dir,
                                      fingerprint=builder.fingerprint)
  images = [counts for entry in build["splits"].values() for counts in entry["images"].values()]
  log(f"planned {sum(len(c) for c in images):,} records, {sum(int(c.sum()) for c in images):,} "
      "images")
  result = rope_shards.build_shards(builder, build, plans, staging_dir,
                                    num_shards=num_shards, workers=workers,
                                    progress=progress, log=log)
  rope_tfds.write_build_files(epath.Path(staging_dir), build, result["decode_problems"],
                              result["split_counts"], "shard_writer")
  os.makedirs(os.path.dirname(dataset_dir), exist_ok=True)
  if os.path.exists(dataset_dir):  # built from other inputs: readable until now
    shutil.rmtree(dataset_dir)
  os.replace(staging_dir, dataset_dir)
  rope_shards.remove_work_files(dataset_dir)
  shutil.rmtree(plan_dir, ignore_errors=True)
  return {"written": result["shards_written"], "reused": result["shards_reused"]}


def _plan_only(rope_dir: str, out_dir: str, splits: list[str], config, fingerprint: str,
               num_shards: int | None, check_files: bool, log) -> dict:
  """`prepare(plan_only=True)`: the catalog checked and counted, the report written to
  OUT/configs/<config>/plan_report.json; no image decoded, no dataset written."""
  log(f"{config.name}: planning {', '.join(splits)} (no image is decoded"
      + ("" if check_files else "; image files not checked") + ")")
  build, _ = rope_tfds.plan_build(rope_dir, splits, config, None, check_files=check_files,
                                  fingerprint=fingerprint, require_products=False)
  split_reports, problems = {}, []
  totals = {"records": 0, "images": 0, "shards": 0}
  for split, entry in build["splits"].items():
    problems += [{"split": split, "stage": "read", **p} for p in entry["read_problems"]]
    num_products = len(entry["product_ids"])
    present = {d: np.bincount(entry["product_index"][d], minlength=num_products) > 0
               for d in domains.NAMES}
    domain_reports = {}
    for d in domains.NAMES:
      images = entry["images"][d]
      shards = len(rope_shards.shard_bounds(images, num_shards)) if len(images) else 0
      domain_reports[d] = {"records": len(images), "products": int(present[d].sum()),
                           "images": int(images.sum()), "shards": shards,
                           "status": "planned"}
      for key in totals:
        totals[key] += domain_reports[d][key]
    split_reports[split] = {
        "fingerprint": fingerprint, "products": num_products,
        "products_with_all_domains": int(np.logical_and.reduce(list(present.values())).sum()),
        "frames_skipped_by_download": entry["frames_skipped_by_download"],
        "domains": domain_reports}
  report = {
      "rope_dir": os.path.abspath(rope_dir),
      "options": {"splits": splits, "num_frames": config.num_frames,
                  "max_image_side": config.max_side, "num_shards": num_shards,
                  "check_files": check_files},
      "tfds": {"name": rope_tfds.DATASET_NAME, "config": config.name,
               "version": rope_tfds.DATASET_VERSION},
      "status": "planned (no image decoded)", "plan": totals,
      "splits": split_reports, "num_problems": len(problems), "problems": problems}
  report_path = os.path.join(out_dir, CONFIGS_SUBDIR, config.name, PLAN_REPORT_NAME)
  os.makedirs(os.path.dirname(report_path), exist_ok=True)
  _write_json(report_path, report)
  for split, entry in split_reports.items():
    if not entry["products"]:
      raise rope_tfds.NoUsableProductError(
          rope_tfds.no_usable_product_message(rope_dir, split, [
              p for p in problems if p["split"] == split]) + f" (report: {report_path})")
  return report


# --- reading -----------------------------------------------------------------------

def _prepared_json(prepared_dir: str, path: str):
  """The JSON value of a file `prepare` writes; FileNotFoundError naming it otherwise."""
  value = rope_shards.read_json(path)
  if value is None:
    raise FileNotFoundError(f"{path} is missing or unreadable: run `python -m "
                            f"data_pipelines.prepare --rope_dir ROPE_DIR --out {prepared_dir}` "
                            "first")
  return value


def prepared_configs(prepared_dir: str) -> list[str]:
  """The names of the configs prepared in `prepared_dir` (sorted; [] when none).

  Each has its reader files in OUT/configs/<config>/; an OUT written before configs
  lived side by side holds one, named by its OUT/dataset.json.
  """
  configs_dir = os.path.join(prepared_dir, CONFIGS_SUBDIR)
  names = set()
  if os.path.isdir(configs_dir):
    names = {name for name in os.listdir(configs_dir)
             if os.path.isfile(os.path.join(configs_dir, name, POINTER_NAME))}
  default = rope_shards.read_json(os.path.join(prepared_dir, POINTER_NAME))
  if isinstance(default, dict) and default.get("format") == 2 and "config" in default:
    names.add(default["config"])
  return sorted(names)


def default_config(prepared_dir: str) -> str:
  """The config readers open when they name none: the one the latest prepare wrote."""
  return _pointer(prepared_dir, "")[0]["config"]


def _pointer(prepared_dir: str, config_name: str) -> tuple[dict, str]:
  """(dataset.json of `config_name` ("": the default config), the folder holding its
  <split>/products.json).

  Raises:
    FileNotFoundError: nothing prepared there, or `config_name` is not prepared there
      (the message names it and the configs that are).
  """
  default_path = os.path.join(prepared_dir, POINTER_NAME)
  if not config_name:
    default = _prepared_json(prepared_dir, default_path)
    _check_format(default_path, default)
    if default["format"] == 2:
      return default, prepared_dir
    config_name = default["config"]
  config_dir = os.path.join(prepared_dir, CONFIGS_SUBDIR, config_name)
  path = os.path.join(config_dir, POINTER_NAME)
  if os.path.exists(path):
    pointer = _prepared_json(prepared_dir, path)
    _check_format(path, pointer)
    return pointer, config_dir
  default = rope_shards.read_json(default_path)
  if isinstance(default, dict) and default.get("format") == 2 and (
      default.get("config") == config_name):
    return default, prepared_dir
  configs = prepared_configs(prepared_dir)
  raise FileNotFoundError(
      f"the prepared config {config_name!r} is not in {prepared_dir!r} (prepared there: "
      f"{', '.join(configs) if configs else 'none'}); prepare it with `python -m "
      f"data_pipelines.prepare --rope_dir ROPE_DIR --out {prepared_dir}` and the options "
      "its name says (--num_frames, --max_image_side)")


def _check_format(path: str, pointer) -> None:
  if (not isinstance(pointer, dict) or pointer.get("format") not in (2, POINTER_FORMAT)
      or "config" not in pointer):
    found = pointer.get("format") if isinstance(pointer, dict) else None
    raise FileNotFoundError(
        f"{path} has format {found!r}, not {POINTER_FORMAT} (or 2): written by another "
        "version; run `python -m data_pipelines.prepare` again")


def _check_split(prepared_dir: str, pointer: dict, split: str) -> None:
  if split not in pointer["splits"]:
    raise FileNotFoundError(f"split {split!r} was not prepared in {prepared_dir!r} "
                            f"for {pointer['config']} (prepared: "
                            f"{', '.join(pointer['splits'])})")


def prepared_splits(prepared_dir: str, config_name: str = "") -> list[str]:
  """The ROPE splits prepared for `config_name` ("": the default config)."""
  return list(_pointer(prepared_dir, config_name)[0]["splits"])


def open_domain(prepared_dir: str, split: str, domain: str,
                config_name: str = "") -> rope_records.RecordSource:
  """The records of `domain` (a name of `domains.NAMES`) of a prepared split.

  Items: pages `{"id", "product_id", "product_index", "text", "image": bytes}`; videos and
  lives `{"id", "product_id", "product_index", "text", "frames": [bytes] (time order),
  "frame_keys": [int]}`. Random access (`len`, `[i]`), usable by
  `grain.MapDataset.source`, picklable.

  `config_name`: the prepared config to read ("": the default, the latest prepared);
  FileNotFoundError naming the configs there when it is not prepared in `prepared_dir`.
  """
  domains.get(domain)  # ValueError naming the known domains
  pointer, _ = _pointer(prepared_dir, config_name)
  _check_split(prepared_dir, pointer, split)
  name = rope_tfds.split_name(split, domain)
  if pointer["records"][split][domain] == 0:
    return rope_records.RecordSource(None, domain, name)
  dataset_dir = os.path.join(prepared_dir, pointer["dataset_dir"])
  try:
    return rope_records.open_split(dataset_dir, name, domain)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: run `python -m data_pipelines.prepare` again (delete "
                            f"{dataset_dir} first)") from e


def load_products(prepared_dir: str, split: str, config_name: str = "") -> list[dict]:
  """[{"product_id", "product_index", "page": [record index], "video": [...], "live": [...]}]

  in `product_index` order; indices point into `open_domain(prepared_dir, split, domain,
  config_name)`. `config_name` as for `open_domain`.
  """
  pointer, products_dir = _pointer(prepared_dir, config_name)
  _check_split(prepared_dir, pointer, split)
  path = os.path.join(products_dir, split, PRODUCTS_NAME)
  return _prepared_json(prepared_dir, path)["products"]


def dataset_identity(prepared_dir: str, config_name: str = "") -> dict:
  """What identifies a prepared config, for a run to record and a later job to compare.

  Strict JSON, the same on every call and after a rerun of prepare that skips or
  rebuilds the same inputs, wherever OUT lives:

    {"name": "rope", "config": "frames8_side256", "version": "1.0.0",
     "num_frames": 8, "max_image_side": 256,
     "fingerprint": sha256 of the txt files and the options (the build's),
     "metadata_digest": sha256 of the dataset's metadata: the features, each TFDS
       split's record count and bytes, the product tables and the problems,
     "splits": {split: {"products": n, "records": {domain: n}}}}

  Two identities are the same data when they are equal (a rebuild after the txt files
  or the images changed gives another fingerprint or digest).

  Raises:
    FileNotFoundError: the config is not prepared there, or its dataset folder is gone.
  """
  pointer, _ = _pointer(prepared_dir, config_name)
  dataset_dir = os.path.join(prepared_dir, pointer["dataset_dir"])
  build_info = rope_tfds.read_build_info(dataset_dir)
  if build_info is None:
    raise FileNotFoundError(f"{os.path.join(dataset_dir, rope_tfds.BUILD_INFO_NAME)} is "
                            "missing or unreadable: run `python -m data_pipelines.prepare` "
                            "again")
  return {
      "name": pointer["name"], "config": pointer["config"], "version": pointer["version"],
      "num_frames": build_info["config"]["num_frames"],
      "max_image_side": build_info["config"]["max_side"],
      "fingerprint": pointer["fingerprint"],
      "metadata_digest": rope_tfds.metadata_digest(dataset_dir),
      "splits": {split: {"products": build_info["splits"][split]["products"],
                         "records": dict(pointer["records"][split])}
                 for split in pointer["splits"]}}


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("rope_dir", None, "ROPE-format input directory", **define)
  flags.DEFINE_string("out", None, "output directory", **define)
  flags.DEFINE_string("splits", "", "comma-separated ROPE splits (default: those present)",
                      **define)
  flags.DEFINE_integer("num_frames", 0, "keep the T segment-middle frames of each clip "
                       "(0: all)", **define)
  flags.DEFINE_integer("max_image_side", 0, "re-encode images whose longer side exceeds "
                       "this (0: keep)", **define)
  flags.DEFINE_integer("num_shards", None, "ArrayRecord files per split (default: TFDS "
                       "sizes them)", **define)
  flags.DEFINE_integer("workers", 1, "local processes that decode and re-encode images "
                       "(with --beam_runner=DirectRunner: its processes)", **define)
  flags.DEFINE_string("beam_runner", None, "Beam runner: DirectRunner, DataflowRunner, "
                      "FlinkRunner, SparkRunner (default: no Beam, the shard writer)",
                      **define)
  flags.DEFINE_string("beam_pipeline_options", "", "comma-separated key=value Beam "
                      "pipeline options", **define)
  flags.DEFINE_bool("plan_only", False, "parse the catalog, check the image files, count "
                    "and write the report (OUT/configs/<config>/plan_report.json); decode "
                    "no image, build no dataset", **define)
  flags.DEFINE_bool("check_files", True, "check that every image file exists "
                    "(--check_files=false: skip it; only with --plan_only)", **define)


COMMAND = command_line.Command("python -m data_pipelines.prepare", __doc__,
                               define_flags=_define_flags, required=("rope_dir", "out"))


def _main(args) -> None:
  report = prepare(args.rope_dir, args.out,
                   splits=[s for s in args.splits.split(",") if s] or None,
                   num_frames=args.num_frames, max_image_side=args.max_image_side,
                   num_shards=args.num_shards, workers=args.workers,
                   beam_runner=args.beam_runner,
                   beam_pipeline_options=args.beam_pipeline_options,
                   plan_only=args.plan_only, check_files=args.check_files)
  for split, entry in report["splits"].items():
    counts = ", ".join(f"{d} {c['records']}" for d, c in entry["domains"].items())
    print(f"{split}: {entry['products']} products ({entry['products_with_all_domains']} with "
          f"all three domains); records: {counts}")
  if args.plan_only:
    plan = report["plan"]
    print(f"{report['tfds']['config']} planned: {plan['records']:,} records, "
          f"{plan['images']:,} images to decode, {plan['shards']:,} shards "
          f"({report['status']})")
    print(f"{report['num_problems']} problem(s); report: "
          f"{os.path.join(args.out, CONFIGS_SUBDIR, report['tfds']['config'], PLAN_REPORT_NAME)}")
    return
  config = report["tfds"]["config"]
  print(f"{config} ({report['status']}): {report['tfds']['dataset_dir']}")
  others = [name for name in prepared_configs(args.out) if name != config]
  print(f"{config} is the default config of {args.out}"
        + (f"; also prepared there: {', '.join(others)}" if others else ""))
  print(f"{report['num_problems']} problem(s); report: "
        f"{os.path.join(args.out, CONFIGS_SUBDIR, config, REPORT_NAME)}")


def main(argv: list[str] | None = None) -> None:
  """The command line (`argv`: the arguments after the program name; see COMMAND)."""
  command_line.run(COMMAND, _main, argv)


if __name__ == "__main__":
  main()
