"""The `rope` TFDS dataset: a ROPE-format directory as ArrayRecord, built without TensorFlow.

Importing this module registers the builder, so that

  tfds.builder("rope/frames8_side256", data_dir=DATA_DIR)
  tfds.data_source("rope/frames8_side256", data_dir=DATA_DIR, split="training_video")

work as for any TFDS dataset. `python -m data_pipelines.prepare` is the command that
builds it (and the library's readers, `prepare.open_domain` / `prepare.load_products`,
read it); with TFDS directly:

  builder = tfds.builder("rope/all_frames_original", data_dir=DATA_DIR)  # ArrayRecord
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=ROPE_DIR))

ROPE_DIR is the "manual" input: the nine txt files of each split and the images
(`rope_format` describes them). TensorFlow is never imported: images are stored as
JPEG bytes in scalar object `Tensor` features, not `tfds.features.Image`.

Splits: one TFDS split per ROPE split and domain, named `<split>_<domain>`:
`training_page`, `training_video`, `training_live`, `test_page`, `test_video`,
`test_live`. The training pipelines want random access to one domain's records, and a
split is exactly that. All domains share one feature layout (a page is stored as a
one-frame record), so one `FeaturesDict` describes every split. A split with no usable
record is left out of the dataset (its count is 0 in `rope_build.json`).

Record order: records appear in the order of the ROPE pair file (`rope_format`'s
catalog order). The example key is that catalog position, an integer, and
`disable_shuffling=True` makes TFDS write records sorted by key, in the single-process
generator and in Beam alike. A record whose images all fail to decode is not written,
so record index = catalog position - (records dropped before it). Readers never compute
this: the product table lists record indices.

Files beside the ArrayRecord shards in the dataset folder (written inside the build, so
they appear together with the shards or not at all):

  rope_build.json              fingerprint of the inputs, options, counts per split and
                               domain, and every problem ({"split", "stage": "read" |
                               "decode", "file", "line", "reason"}); nothing is dropped
                               silently: a row the catalog reader refuses is a "read"
                               problem, an image that does not decode a "decode" one.
  rope_products-<split>.json   the product table of a ROPE split: product ids in
                               `product_index` order (sorted ids) and, per domain, the
                               `product_index` of each record in record order.

Configs (`BUILDER_CONFIGS`) are the shapes that change what is stored:
  * `num_frames` T: keep only the T segment-middle frames of each clip, the frames the
    release (and `transforms.sample_frame_indices`) read for T frames. A clip with
    fewer than T frames keeps all of them. Sampling T frames from the stored ones then
    gives exactly the frames that sampling T from the whole clip gives. Frames not kept
    are never read (a broken one among them is not reported; a missing one is, by the
    catalog reader, which also leaves it out before the T frames are chosen). 0: every
    frame.
  * `max_side` S: re-encode images whose longer side exceeds S (`images`: BICUBIC,
    JPEG quality 90); 0: images are stored as released (re-encoded only if not RGB
    JPEG).
Config names say both: `all_frames_original`, `frames8_original`, `frames8_side256`...
`rope_config(num_frames, max_side)` gives any other shape under the same naming.

Three ways to write the same dataset. All of them start from the plan (`plan_build`):
the catalogs parsed (`load_rope`, in the launching process, one split at a time) and
written as one Arrow file per TFDS split (`rope_plan`), from which the workers read the
rows they encode. `prepare` on one machine uses the project's shard writer
(`rope_shards`: worker processes, one writer, resumable per shard), which writes the
shards and metadata this builder's TFDS writer would. Through TFDS directly
(`download_and_prepare`), generation runs in this process (a plain generator) unless the
download config names a Beam runner or pipeline options: then each split is a Beam
pipeline, plan row ranges -> decode / check / re-encode -> TFDS's writer, on the
DirectRunner (several local processes) or a cluster runner (Dataflow, Flink, Spark).
The pipeline carries row ranges, not rows; the plan files are in the output folder and
ROPE_DIR's images are read at their paths, so every worker must see both at the same
paths as the launching machine (a shared file system).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from cope_jax.base import result_files
from cope_jax.base import domains
from data_pipelines import rope_examples
from data_pipelines import rope_format
from data_pipelines import rope_plan
from data_pipelines import rope_txt

DATASET_NAME = "rope"
DATASET_VERSION = "1.0.0"
FORMAT_VERSION = 3  # bump when the records or the fingerprint change (3: DCT-scaled resize)
FILE_FORMAT = "array_record"
BUILD_INFO_NAME = "rope_build.json"
PRODUCTS_PREFIX = "rope_products-"
NUM_FRAMES_CHOICES = (0, 4, 8, 16)
MAX_SIDE_CHOICES = (0, 256, 512)
DESCRIPTION = """\
ROPE (COPE, Bai et al., ICCV 2023): products shown as product pages (an image and a
title), short videos and live-stream clips (frames and ASR text).

Splits are `<rope split>_<domain>`: training_page, training_video, training_live,
test_page, test_video, test_live. All share one layout; a page is a one-frame record.
Records are in the order of the release's pair files (integer keys = catalog position,
shuffling disabled). `product_index` numbers the products of a ROPE split in sorted-id
order; rope_products-<split>.json beside the shards lists each record's product_index in
record order. rope_build.json lists every row the reader refused and every image that
did not decode, with its txt file and line; records none of whose images decode are not
stored."""
BEAM_RANGE_ROWS = 64  # plan rows per element of a Beam pipeline
_PLAN_DIR = "plan.tmp"
_PROBLEMS_PREFIX = "problems.tmp-"


# --- configs -----------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class RopeConfig(tfds.core.BuilderConfig):
  """One stored shape of ROPE: frames kept per clip and the longest image side."""
  num_frames: int = 0  # T segment-middle frames kept per clip (0: every frame)
  max_side: int = 0  # re-encode images whose longer side exceeds this (0: as released)


def config_name(num_frames: int, max_side: int) -> str:
  """`frames8_side256`, `all_frames_original`, ..."""
  frames = f"frames{num_frames}" if num_frames else "all_frames"
  side = f"side{max_side}" if max_side else "original"
  return f"{frames}_{side}"


def _make_config(num_frames: int, max_side: int) -> RopeConfig:
  frames = (f"the {num_frames} segment-middle frames of each clip" if num_frames
            else "every frame of each clip")
  side = (f"images re-encoded to at most {max_side} px on the longer side" if max_side
          else "images as released")
  return RopeConfig(name=config_name(num_frames, max_side), num_frames=num_frames,
                    max_side=max_side, description=f"{frames}; {side}.")


BUILDER_CONFIGS = [_make_config(t, s) for t in NUM_FRAMES_CHOICES for s in MAX_SIDE_CHOICES]


def rope_config(num_frames: int = 0, max_side: int = 0) -> RopeConfig:
  """The config for this shape: a predefined one, else a new one named the same way."""
  if num_frames < 0 or max_side < 0:
    raise ValueError(f"need num_frames >= 0 and max_side >= 0; got {num_frames}, {max_side}")
  for config in BUILDER_CONFIGS:
    if (config.num_frames, config.max_side) == (num_frames, max_side):
      return config
  return _make_config(num_frames, max_side)


def split_name(rope_split: str, domain: str) -> str:
  """TFDS split of one ROPE split and domain: `training_page`, `test_live`, ..."""
  return f"{rope_split}_{domain}"


# --- input files -------------------------------------------------------------------

class RopeFilesError(FileNotFoundError):
  """A requested split lacks some of its nine txt files (the message lists each one)."""


class NoUsableProductError(ValueError):
  """A requested split has no record that can be stored (the message says why)."""


def no_usable_product_message(rope_dir: str, rope_split: str, problems: list[dict]) -> str:
  """Why `rope_split` of `rope_dir` has no usable product, from the reader's problems:
  the images are missing (run download first), or no row is usable."""
  def example(p):
    return f"{p['file']} line {p['line']}: {p['reason']}"

  not_found = [p for p in problems if rope_format.IMAGE_NOT_FOUND in p["reason"]]
  if not_found:
    return (f"split {rope_split!r} of {rope_dir!r} has no usable product: "
            f"{len(not_found):,} of its {len(problems):,} problems are image files not "
            f"found (first: {example(not_found[0])}); run `python -m "
            f"data_pipelines.download --rope_dir {rope_dir} --url_prefix URL` first, or put "
            f"the images in {os.path.join(rope_dir, rope_format.IMAGE_SUBDIR)}")
  first = "; ".join(example(p) for p in problems[:3])
  return (f"split {rope_split!r} of {rope_dir!r} has no usable product: no page, video or "
          f"live has a pair row and a usable image ({len(problems):,} problems"
          + (f"; first: {first})" if problems else ")"))


def present_splits(rope_dir: str) -> list[str]:
  """The ROPE splits of which `rope_dir` holds at least one of the nine txt files."""
  return [split for split in rope_format.SPLITS
          if any(os.path.lexists(os.path.join(rope_dir, name))
                 for name in rope_format.split_file_names(split))]


def check_split_files(rope_dir: str, splits: Sequence[str]) -> None:
  """Checks that each of the nine txt files of every split is a readable file.

  Raises:
    RopeFilesError: listing every missing file, directory in place of a file and
      unreadable file, by name, for all `splits` at once.
  """
  if not os.path.isdir(rope_dir):
    raise RopeFilesError(f"ROPE directory {rope_dir!r} does not exist or is not a directory")
  unknown = [s for s in splits if s not in rope_format.SPLITS]
  if unknown:
    raise ValueError(f"unknown ROPE split(s) {', '.join(map(repr, unknown))}; expected "
                     f"{' or '.join(rope_format.SPLITS)}")
  faults = []
  for split in splits:
    for name in rope_format.split_file_names(split):
      path = os.path.join(rope_dir, name)
      if os.path.isdir(path):
        faults.append(f"{name}: is a directory, not a file")
      elif not os.path.exists(path):
        faults.append(f"{name}: missing")
      else:
        try:
          with open(path, "rb") as f:
            f.read(1)
        except OSError as e:
          faults.append(f"{name}: cannot be read ({e.strerror or e})")
  if faults:
    raise RopeFilesError(
        f"ROPE directory {rope_dir!r} lacks required file(s) of split(s) "
        f"{', '.join(splits)}; nothing was written:\n  " + "\n  ".join(faults))


def input_fingerprint(rope_dir: str, splits: Sequence[str], config: RopeConfig) -> str:
  """sha256 over the splits' txt files and everything that shapes the records."""
  options = {"format": FORMAT_VERSION, "version": DATASET_VERSION, "splits": list(splits),
             "num_frames": config.num_frames, "max_side": config.max_side}
  digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
  for split in splits:
    for name in rope_format.split_file_names(split):
      digest.update(name.encode())
      with open(os.path.join(rope_dir, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
  return digest.hexdigest()


def _encode_range_beam(row_range: tuple[int, int], plan_path: str, max_side: int):
  """Beam: the plan's rows start:stop -> (key, example) and tagged problems."""
  beam = tfds.core.lazy_imports.apache_beam
  start, stop = row_range
  rows = rope_plan.open_plan(plan_path).rows(start, stop)
  for row, (example, problems) in zip(rows, rope_examples.encode_rows(rows, max_side)):
    for problem in problems:
      yield beam.pvalue.TaggedOutput("problems", json.dumps(problem, ensure_ascii=False))
    if example is not None:
      yield row["key"], example


def _beam_split(plan_path: str, num_rows: int, problems_prefix: str, max_side: int):
  """PTransform: the plan's row ranges -> (key, example); problems to JSON-lines files.
  The pipeline carries ranges of `BEAM_RANGE_ROWS` rows; each worker reads its rows
  from the plan file (which it must see at the same path)."""
  beam = tfds.core.lazy_imports.apache_beam
  ranges = [(start, min(num_rows, start + BEAM_RANGE_ROWS))
            for start in range(0, num_rows, BEAM_RANGE_ROWS)]

  @beam.ptransform_fn
  def transform(pipeline):
    row_ranges = (pipeline
                  | "PlanRanges" >> beam.Create(ranges)
                  | "Distribute" >> beam.Reshuffle())
    outputs = row_ranges | "DecodeCheckEncode" >> beam.FlatMap(
        _encode_range_beam, plan_path=plan_path, max_side=max_side).with_outputs(
            "problems", main="examples")
    _ = outputs.problems | "WriteProblems" >> beam.io.WriteToText(
        problems_prefix, file_name_suffix=".jsonl")
    return outputs.examples

  return transform()  # pylint: disable=no-value-for-parameter


# --- the builder -------------------------------------------------------------------

def _text(doc: str):
  return tfds.features.Text(doc=doc)


class Rope(tfds.core.GeneratorBasedBuilder):
  """ROPE (COPE's product pages, short videos and live clips) as ArrayRecord."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Records per ROPE split and domain; integer keys in "
                                    "catalog order; product tables and problems beside "
                                    "the shards."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "ROPE comes by e-mail after a licence agreement: put its nine txt files per split "
      "in the manual directory and the images in its images/ subfolder (`python -m "
      "data_pipelines.download` fetches them), then pass it as "
      "DownloadConfig(manual_dir=...) or `prepare --rope_dir`.")

  def __init__(self, *, rope_splits: Sequence[str] | None = None,
               fingerprint: str | None = None, **kwargs):
    """`rope_splits`: the ROPE splits to build (default: those in the manual dir);
    `fingerprint`: their `input_fingerprint`, when the caller has computed it."""
    self._rope_splits = tuple(rope_splits) if rope_splits is not None else None
    self.fingerprint = fingerprint
    self._build: dict[str, Any] = {}
    if kwargs.get("file_format") is None:  # TFDS's default, TFRecord, needs TensorFlow
      kwargs["file_format"] = FILE_FORMAT
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    scalar_bytes = tfds.features.Tensor(shape=(), dtype=np.object_)
    features = tfds.features.FeaturesDict({
        "id": _text("page / video / live id (the ROPE pair file's second column)"),
        "product_id": _text("product (SPU) id"),
        "product_index": tfds.features.Scalar(
            dtype=np.int64, doc="the product's row in the product table: products of the "
            "ROPE split sorted by id, numbered from 0"),
        "text": _text(f"page title or clip ASR text; '{rope_format.MISSING_TEXT}' where "
                      "the release has none"),
        "frames": tfds.features.Sequence(
            scalar_bytes, doc="JPEG bytes in time order; a page's one image is its one "
            "frame; clips keep the config's segment-middle frames"),
        "frame_keys": tfds.features.Sequence(
            tfds.features.Scalar(dtype=np.int64),
            doc="frame number (videos) or epoch-ms timestamp (lives) of each frame; 0 "
                "for a page"),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=DESCRIPTION,
        features=features,
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2308.05550",
        citation="""@inproceedings{bai2023cope,
  title={Cross-Domain Product Representation Learning for Rich-Content E-Commerce},
  author={Bai, Xuehan and Li, Yan and Cheng, Yanhua and Yang, Wenjie and Chen, Quan
          and Li, Han},
  booktitle={ICCV},
  year={2023}
}""")

  # The build: catalog -> rows -> (generator | Beam) -> TFDS writer -> product tables.

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    self._build = {"beam": (download_config.beam_runner is not None
                            or download_config.beam_options is not None),
                   "decode_problems": {}, "beam_files": []}
    super()._download_and_prepare(dl_manager, download_config)
    if self._build["beam"]:
      self._collect_beam_problems()
    plan_dir = self.data_path / _PLAN_DIR  # what the workers read: not part of the dataset
    if plan_dir.exists():
      plan_dir.rmtree()
    split_infos = self.info.splits
    write_build_files(
        self.data_path, self._build, self._build["decode_problems"],
        {name: (split_infos[name].num_examples, split_infos[name].num_shards)
         for name in split_infos},
        "beam" if self._build["beam"] else "generator")

  def _split_generators(self, dl_manager):
    rope_dir = os.fspath(dl_manager.manual_dir)
    splits = self._rope_splits or present_splits(rope_dir)
    if not splits:
      raise RopeFilesError(f"{rope_dir!r} holds no ROPE split (looked for the txt files of "
                           f"{' and '.join(rope_format.SPLITS)})")
    check_split_files(rope_dir, splits)
    # The plan files are read by the workers: in the dataset's (temporary) folder.
    build, plans = plan_build(rope_dir, splits, self.builder_config,
                              os.fspath(self.data_path / _PLAN_DIR),
                              fingerprint=self.fingerprint)
    self._build.update(build)
    return {name: self._examples(name, path) for name, path in plans.items()}

  def _examples(self, name: str, plan_path: str):
    """The examples of one TFDS split: a generator, or a Beam PTransform."""
    max_side = self.builder_config.max_side
    if not self._build["beam"]:
      problems = self._build["decode_problems"].setdefault(name, [])
      return _generate(plan_path, max_side, problems, name)
    problems_prefix = self.data_path / f"{_PROBLEMS_PREFIX}{name}"
    self._build["beam_files"].append((name, problems_prefix))
    return _beam_split(plan_path, len(rope_plan.open_plan(plan_path)),
                       os.fspath(problems_prefix), max_side)

  def _generate_examples(self, **kwargs):  # splits come from `_split_generators`
    raise NotImplementedError

  def _collect_beam_problems(self) -> None:
    """Reads (then deletes) the problem files the workers wrote."""
    for name, prefix in self._build["beam_files"]:
      problems = self._build["decode_problems"].setdefault(name, [])
      for path in sorted(prefix.parent.glob(f"{prefix.name}-*.jsonl")):
        with path.open(encoding="utf-8") as f:
          problems.extend(json.loads(line) for line in f if line.strip())
        path.unlink()


# --- what a build writes besides the records ---------------------------------------

def plan_build(rope_dir: str, splits: Sequence[str], config: RopeConfig,
               plan_dir: str | None, *, check_files: bool = True,
               fingerprint: str | None = None, require_products: bool = True
               ) -> tuple[dict, dict[str, str]]:
  """Reads the catalogs: (the build's description, the plan file of each non-empty TFDS
  split).

  One ROPE split's catalog is held at a time; its records go into one plan file per
  TFDS split (`rope_plan`, in `plan_dir`; None: no plan files, for a plan-only run).
  The description holds no Python object per record:

    {rope_dir, rope_splits, fingerprint, plan_digest, config,
     splits: {rope split: {product_ids: [str] (product_index order), read_problems,
              frames_skipped_by_download, product_index: {domain: int32 [records]},
              images: {domain: int64 [records]}}}}

  plan_digest: sha256 of the fingerprint, the image folders and where each image was
  found, which with the txt files (the fingerprint) determine every row.

  Raises NoUsableProductError (with `require_products`), before anything is written,
  when a split has no record.
  """
  build = {"rope_dir": os.path.abspath(rope_dir), "rope_splits": list(splits),
           "fingerprint": fingerprint or input_fingerprint(rope_dir, splits, config),
           "config": {"name": config.name, "num_frames": config.num_frames,
                      "max_side": config.max_side}, "splits": {}}
  digest = hashlib.sha256(build["fingerprint"].encode())
  plans = {}
  if plan_dir is not None:
    os.makedirs(plan_dir, exist_ok=True)
  for rope_split in splits:
    catalog = rope_format.load_rope(rope_dir, rope_split, check_files=check_files,
                                    num_frames=config.num_frames or None)
    if require_products and not any(len(catalog.domain(d)) for d in domains.NAMES):
      raise NoUsableProductError(no_usable_product_message(rope_dir, rope_split,
                                                           catalog.problems))
    product_ids, product_index = catalog.product_columns()
    entry = {"product_ids": product_ids.to_pylist(), "read_problems": catalog.problems,
             "frames_skipped_by_download": catalog.frames_skipped_by_download,
             "product_index": product_index, "images": {}}
    for domain in domains.NAMES:
      records = catalog.domain(domain)
      entry["images"][domain] = np.diff(records.image_offsets)
      digest.update(json.dumps([rope_split, domain, list(records.directories)]).encode())
      digest.update(records.places.tobytes())
      name = split_name(rope_split, domain)
      if len(records) and plan_dir is not None:
        plans[name] = os.path.join(plan_dir, f"{name}.arrow")
        rope_plan.write_plan(plans[name], records, domain, catalog.media_file(domain),
                             product_index[domain])
    build["splits"][rope_split] = entry
    del catalog, records
    rope_txt.release_free_memory()
  build["plan_digest"] = digest.hexdigest()
  return build, plans


def write_build_files(data_path: epath.Path, build: dict, decode_problems: dict,
                      split_counts: dict[str, tuple[int, int]], generated_with: str
                      ) -> None:
  """Product tables and rope_build.json, into the (still temporary) dataset folder.

  Args:
    build: `plan_build`'s description.
    decode_problems: TFDS split name -> `encode_row`'s problems, any order.
    split_counts: TFDS split name -> (records written, shards); absent: none.
    generated_with: "generator", "beam" or "shard_writer".
  """
  report_splits, problems = {}, []
  for rope_split, entry in build["splits"].items():
    problems += [{"split": rope_split, "stage": "read", **p}
                 for p in entry["read_problems"]]
    record_product_index, domain_counts = {}, {}
    for domain in domains.NAMES:
      name = split_name(rope_split, domain)
      decode = sorted(decode_problems.get(name, []),
                      key=lambda p: (p["key"], p["position"]))
      product_index = entry["product_index"][domain]
      dropped = np.zeros(len(product_index), bool)
      dropped[[p["key"] for p in decode if p["dropped"]]] = True
      record_product_index[domain] = product_index[~dropped].tolist()
      num_records = len(record_product_index[domain])
      written, shards = split_counts.get(name, (0, 0))
      if written != num_records:
        raise RuntimeError(f"{name}: wrote {written} records but the catalog and the "
                           f"decode problems account for {num_records}")
      domain_counts[domain] = {
          "catalog": len(product_index), "records": num_records,
          "dropped_at_decode": int(dropped.sum()),
          "images": int(entry["images"][domain].sum()), "shards": shards}
      problems += [{"split": rope_split, "stage": "decode", "file": p["file"],
                    "line": p["line"], "reason": p["reason"]} for p in decode]
    _write_json(data_path / f"{PRODUCTS_PREFIX}{rope_split}.json",
                {"product_ids": entry["product_ids"],
                 "record_product_index": record_product_index})
    report_splits[rope_split] = {
        "products": len(entry["product_ids"]), "domains": domain_counts,
        # clip frames a sampled download never fetched (not problems)
        "frames_skipped_by_download": entry["frames_skipped_by_download"]}
  _write_json(data_path / BUILD_INFO_NAME, {
      "format": FORMAT_VERSION, "fingerprint": build["fingerprint"],
      "rope_dir": build["rope_dir"], "rope_splits": build["rope_splits"],
      "config": build["config"], "generated_with": generated_with,
      "splits": report_splits, "num_problems": len(problems), "problems": problems})


def _generate(plan_path: str, max_side: int, problems: list[dict], name: str
              ) -> Iterator[tuple[int, dict]]:
  """Single-process generation: (key, example) per usable row; problems appended."""
  plan = rope_plan.open_plan(plan_path)
  written = 0
  for start in range(0, len(plan), rope_plan.BATCH_RECORDS):
    for row in plan.rows(start, min(len(plan), start + rope_plan.BATCH_RECORDS)):
      example, row_problems = rope_examples.encode_row(row, max_side)
      problems.extend(row_problems)
      if example is not None:
        written += 1
        yield row["key"], example
  if not written:
    raise ValueError(f"every record of {name} failed to decode (first: "
                     f"{problems[0]['file']} line {problems[0]['line']}: "
                     f"{problems[0]['reason']})")


def _write_json(path: epath.Path, value) -> None:
  """Strict JSON (no NaN); the dataset folder itself only appears once complete."""
  path.write_text(result_files.dumps(value, ensure_ascii=False), encoding="utf-8")


# --- reading the files beside the records ------------------------------------------

def read_build_info(dataset_dir: str) -> dict | None:
  """The dataset folder's rope_build.json, or None if absent / unreadable."""
  try:
    return json.loads((epath.Path(dataset_dir) / BUILD_INFO_NAME).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None


def metadata_digest(dataset_dir: str) -> str:
  """sha256 of what defines the records of a built dataset, besides their bytes: the
  features, each TFDS split's record count and bytes, the product tables, the counts
  and problems of rope_build.json. Not the shard layout, the writer or the folder's
  place, so every build of the same inputs and options gives the same digest.

  Raises:
    FileNotFoundError: a metadata file is missing or unreadable.
  """
  folder = epath.Path(dataset_dir)

  def read(name: str) -> bytes:
    try:
      return (folder / name).read_bytes()
    except OSError as e:
      raise FileNotFoundError(f"{folder / name} is missing or unreadable ({e}): run "
                              "`python -m data_pipelines.prepare` again") from e

  info = json.loads(read("dataset_info.json"))
  build = json.loads(read(BUILD_INFO_NAME))
  described = {
      "features": json.loads(read("features.json")),
      "splits": {split["name"]: {"records": sum(int(n) for n in split["shardLengths"]),
                                 "bytes": int(split.get("numBytes", 0))}
                 for split in info.get("splits", [])},
      "products": {rope_split: hashlib.sha256(
          read(f"{PRODUCTS_PREFIX}{rope_split}.json")).hexdigest()
                   for rope_split in build["rope_splits"]},
      "build": {"format": build["format"], "fingerprint": build["fingerprint"],
                "config": build["config"], "problems": build["problems"],
                "splits": {rope_split: {"products": entry["products"],
                                        "records": {d: c["records"]
                                                    for d, c in entry["domains"].items()}}
                           for rope_split, entry in build["splits"].items()}}}
  text = json.dumps(described, sort_keys=True, ensure_ascii=False, allow_nan=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_products(dataset_dir: str, rope_split: str) -> list[dict]:
  """[{"product_id", "product_index", "page": [record index], "video": [...], "live": [...]}]."""
  path = epath.Path(dataset_dir) / f"{PRODUCTS_PREFIX}{rope_split}.json"
  table = json.loads(path.read_text(encoding="utf-8"))
  products = [{"product_id": p, "product_index": i, **{d: [] for d in domains.NAMES}}
              for i, p in enumerate(table["product_ids"])]
  for domain, indices in table["record_product_index"].items():
    for record_index, product_index in enumerate(indices):
      products[product_index][domain].append(record_index)
  return products


