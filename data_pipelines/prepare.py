"""ROPE directory -> ArrayRecord shards per split and domain, a product table, a report.

  python -m data_pipelines.prepare --rope_dir demo_run/rope --out demo_run/prepared

For each split present (`training`, `test`) it parses the catalog
(`rope_format.load_rope`), checks that every image decodes, optionally re-encodes images
whose longer side exceeds `--max_image_side`, and writes

  OUT/<split>/<domain>-<i>-of-<n>.array_record   domain in page | video | live
  OUT/<split>/<domain>.complete.json             completion marker (see below)
  OUT/<split>/catalog.complete.json              product ids and reader problems
  OUT/<split>/products.json                      the product table
  OUT/prepare_report.json                        counts and every problem

Each record is a msgpack-serialised dict (docs/interfaces.md): pages
`{id, product_id, product_index, text, image}`, videos and lives
`{id, product_id, product_index, text, frames, frame_keys}`, images as JPEG bytes.
Readers use `open_domain` and `load_products` and never open these files by hand.

Why ArrayRecord written directly rather than through a TFDS builder: a TFDS
`GeneratorBasedBuilder` shuffles examples by key when it writes, while the
product-grouped training sampler needs record indices that stay exactly where this
module put them (the product table lists them), and a sequence-of-bytes feature (the
frames of a clip) makes TFDS encode through TensorFlow. `ArrayRecordWriter` keeps
record order, needs no TensorFlow, and the files stay readable by
`grain.sources.ArrayRecordDataSource` like any TFDS-made ArrayRecord shard.

Resumption: a split/domain is written to a temporary folder, its shards are renamed
into place, and only then its marker is written, holding a fingerprint of the inputs
(the split's nine txt files, hashed, plus the options that change the records). A rerun
skips every part whose marker holds the current fingerprint and redoes the others; a
run killed half-way leaves no marker for the unfinished part. Image files themselves are
not hashed: if you replace images under the same names, delete OUT.

Products: `product_index` numbers every product of the catalog in sorted product-id
order. A product all of whose images fail to decode keeps its index with empty lists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator

import msgpack
from array_record.python import array_record_data_source
from array_record.python import array_record_module
from PIL import Image
import tqdm

from data_pipelines import domains
from data_pipelines import rope_format

DOMAINS = domains.NAMES
FORMAT_VERSION = 1  # bump when the record layout changes: invalidates every marker
REPORT_NAME = "prepare_report.json"
# group_size:1 makes every record its own chunk: cheap random access for Grain.
WRITER_OPTIONS = "group_size:1"
JPEG_QUALITY = 90


# --- images ------------------------------------------------------------------------

def encode_image(path: str, max_image_side: int = 0) -> bytes:
  """JPEG bytes of the image at `path`, checked to decode fully.

  The file's own bytes are kept when it is an RGB JPEG within `max_image_side` (0: no
  limit); otherwise it is re-encoded as RGB JPEG, resized so its longer side is
  `max_image_side`.

  Raises:
    OSError / ValueError (from PIL) when the file is missing, truncated or not an image.
  """
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    source_format, source_mode = image.format, image.mode
    rgb = image.convert("RGB")
  too_large = max_image_side > 0 and max(rgb.size) > max_image_side
  if source_format == "JPEG" and source_mode == "RGB" and not too_large:
    return data
  if too_large:
    scale = max_image_side / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def _encode_images(task: tuple[tuple[str, ...], int]) -> list[bytes | str]:
  """Worker: (paths, max side) -> per path its JPEG bytes or the error message."""
  paths, max_image_side = task
  results: list[bytes | str] = []
  for path in paths:
    try:
      results.append(encode_image(path, max_image_side))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      results.append(f"{type(e).__name__}: {e}")
  return results


# --- writing -----------------------------------------------------------------------

def shard_name(domain: str, index: int, count: int) -> str:
  return f"{domain}-{index:05d}-of-{count:05d}.array_record"


class _ShardWriter:
  """Writes records into numbered ArrayRecord files of at most `shard_size` records."""

  def __init__(self, directory: str, shard_size: int):
    self._directory = directory
    self._shard_size = shard_size
    self._writer = None
    self._in_shard = 0
    self.paths: list[str] = []

  def write(self, record: bytes) -> None:
    if self._writer is None or self._in_shard == self._shard_size:
      self._close_shard()
      path = os.path.join(self._directory, f"part-{len(self.paths):05d}")
      self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
      self.paths.append(path)
    self._writer.write(record)
    self._in_shard += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self) -> list[str]:
    """Closes the last shard; returns the shard paths (one empty shard if no records)."""
    if not self.paths:
      self.write_empty()
    self._close_shard()
    return self.paths

  def write_empty(self) -> None:
    path = os.path.join(self._directory, f"part-{len(self.paths):05d}")
    array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS).close()
    self.paths.append(path)


def _write_json(path: str, value) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp_path = path + ".tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False, indent=1)
  os.replace(tmp_path, path)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def input_fingerprint(rope_dir: str, split: str, options: dict) -> str:
  """sha256 over the split's nine txt files and the options that shape the records."""
  digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options},
                                     sort_keys=True).encode())
  for name in rope_format.split_file_names(split):
    digest.update(name.encode())
    with open(os.path.join(rope_dir, name), "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


class _ImageEncoder:
  """Maps `_encode_images` over tasks, in a process pool started on first use."""

  def __init__(self, num_workers: int):
    self._num_workers = num_workers
    self._pool = None

  def imap(self, tasks) -> Iterator[list[bytes | str]]:
    if self._num_workers == 1:
      return map(_encode_images, tasks)
    if self._pool is None:
      self._pool = multiprocessing.get_context("spawn").Pool(self._num_workers)
    return self._pool.imap(_encode_images, tasks, chunksize=8)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.close()
      self._pool.join()


def _image_tasks(records: list, domain: str, max_image_side: int
                 ) -> Iterator[tuple[tuple[str, ...], int]]:
  for record in records:
    paths = record.frames if domains.get(domain).is_clip else (record.image,)
    yield paths, max_image_side


def _write_domain(catalog: rope_format.RopeCatalog, domain: str, product_index: dict,
                  split_dir: str, options: dict, encoder: _ImageEncoder,
                  progress: bool) -> dict:
  """Verifies and writes one domain; returns its marker (without the fingerprint)."""
  tmp_dir = os.path.join(split_dir, f".tmp-{domain}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  records = list(catalog.domain(domain).values())
  media_file = catalog.media_file(domain)
  tasks = _image_tasks(records, domain, options["max_image_side"])
  results = encoder.imap(tasks)
  writer = _ShardWriter(tmp_dir, options["shard_size"])
  problems, record_products, dropped = [], [], 0
  bar = tqdm.tqdm(zip(records, results), total=len(records), disable=not progress,
                  desc=f"{catalog.split}/{domain}", unit="rec")
  is_clip = domains.get(domain).is_clip
  for record, encoded in bar:
    lines = record.frame_lines if is_clip else (record.image_line,)
    kept, kept_keys = [], []
    for index, result in enumerate(encoded):
      if isinstance(result, str):
        problems.append({"file": media_file, "line": lines[index],
                         "reason": f"image does not decode ({result}); not stored"})
      else:
        kept.append(result)
        kept_keys.append(record.frame_keys[index] if is_clip else 0)
    if not kept:
      what = "all its frames" if is_clip else "its image"
      problems.append({"file": media_file, "line": lines[0],
                       "reason": f"{domain} {record.id}: {what} failed to decode; dropped"})
      dropped += 1
      continue
    item = {"id": record.id, "product_id": record.product_id,
            "product_index": product_index[record.product_id], "text": record.text}
    if is_clip:
      item["frames"], item["frame_keys"] = kept, kept_keys
    else:
      item["image"] = kept[0]
    writer.write(msgpack.packb(item, use_bin_type=True))
    record_products.append(item["product_index"])
  tmp_paths = writer.close()

  # Swap in the new shards: old marker first, so a crash never pairs it with new files.
  marker_path = os.path.join(split_dir, f"{domain}.complete.json")
  if os.path.exists(marker_path):
    os.remove(marker_path)
  for name in os.listdir(split_dir):
    if name.startswith(f"{domain}-") and name.endswith(".array_record"):
      os.remove(os.path.join(split_dir, name))
  shards = [shard_name(domain, i, len(tmp_paths)) for i in range(len(tmp_paths))]
  for tmp_path, name in zip(tmp_paths, shards):
    os.replace(tmp_path, os.path.join(split_dir, name))
  shutil.rmtree(tmp_dir)
  return {"shards": shards, "num_records": len(record_products),
          "record_product_index": record_products, "dropped": dropped,
          "problems": problems}


def _prepare_split(rope_dir: str, split: str, out_dir: str, options: dict,
                   encoder: _ImageEncoder, progress: bool, log) -> dict:
  """Writes (or skips) the parts of one split; returns its report entry."""
  split_dir = os.path.join(out_dir, split)
  os.makedirs(split_dir, exist_ok=True)
  fingerprint = input_fingerprint(rope_dir, split, options)

  catalog = None
  catalog_path = os.path.join(split_dir, "catalog.complete.json")
  catalog_marker = _read_json(catalog_path)
  if not catalog_marker or catalog_marker.get("fingerprint") != fingerprint:
    catalog = rope_format.load_rope(rope_dir, split)
    catalog_marker = {"fingerprint": fingerprint, "product_ids": list(catalog.products),
                      "catalog_counts": {d: len(catalog.domain(d)) for d in DOMAINS},
                      "problems": catalog.problems}
    _write_json(catalog_path, catalog_marker)
  product_index = {p: i for i, p in enumerate(catalog_marker["product_ids"])}

  markers, status = {}, {}
  for domain in DOMAINS:
    marker_path = os.path.join(split_dir, f"{domain}.complete.json")
    marker = _read_json(marker_path)
    if marker and marker.get("fingerprint") == fingerprint:
      log(f"{split}/{domain}: up to date ({marker['num_records']} records), skipped")
      status[domain] = "skipped (up to date)"
    else:
      if catalog is None:
        catalog = rope_format.load_rope(rope_dir, split)
      marker = {"fingerprint": fingerprint,
                **_write_domain(catalog, domain, product_index, split_dir, options, encoder,
                                progress)}
      _write_json(marker_path, marker)
      log(f"{split}/{domain}: wrote {marker['num_records']} records in "
          f"{len(marker['shards'])} shard(s)")
      status[domain] = "written"
    markers[domain] = marker

  products = [{"product_id": p, "product_index": i, **{d: [] for d in DOMAINS}}
              for p, i in product_index.items()]
  for domain, marker in markers.items():
    for record_index, index in enumerate(marker["record_product_index"]):
      products[index][domain].append(record_index)
  _write_json(os.path.join(split_dir, "products.json"),
              {"fingerprint": fingerprint, "products": products})

  problems = [{"split": split, "stage": "read", **p} for p in catalog_marker["problems"]]
  for domain in DOMAINS:
    problems += [{"split": split, "stage": "decode", **p} for p in markers[domain]["problems"]]
  return {
      "fingerprint": fingerprint,
      "products": len(products),
      "products_with_all_domains": sum(all(p[d] for d in DOMAINS) for p in products),
      "domains": {d: {"records": markers[d]["num_records"],
                      "products": sum(bool(p[d]) for p in products),
                      "dropped_at_decode": markers[d]["dropped"],
                      "shards": len(markers[d]["shards"]),
                      "status": status[d]} for d in DOMAINS},
      "problems": problems,
  }


def prepare(rope_dir: str, out_dir: str, *, max_image_side: int = 0,
            shard_size: int = 1000, num_workers: int = 1, progress: bool = True,
            log=print) -> dict:
  """Prepares every split of `rope_dir` into `out_dir`; returns the report it writes.

  Args:
    rope_dir: ROPE-format directory (see `rope_format`).
    out_dir: output directory (created).
    max_image_side: re-encode images whose longer side exceeds this (0: never resize).
    shard_size: records per ArrayRecord file.
    num_workers: processes decoding/re-encoding images (1: in this process).
    progress: show a tqdm bar per split/domain.
    log: receives one line per part written or skipped.

  Raises:
    FileNotFoundError: no split in `rope_dir`, or a split lacks one of its nine files.
  """
  if shard_size < 1 or num_workers < 1 or max_image_side < 0:
    raise ValueError(f"need shard_size >= 1, num_workers >= 1, max_image_side >= 0; got "
                     f"{shard_size}, {num_workers}, {max_image_side}")
  splits = [s for s in rope_format.SPLITS if rope_format.has_split(rope_dir, s)]
  if not splits:
    raise FileNotFoundError(
        f"{rope_dir!r} holds no ROPE split (looked for "
        f"{', '.join(rope_format.file_name(s, domains.DOMAINS[0].files.pair) for s in rope_format.SPLITS)})")
  options = {"max_image_side": max_image_side, "shard_size": shard_size}
  os.makedirs(out_dir, exist_ok=True)
  encoder = _ImageEncoder(num_workers)
  try:
    split_reports = {split: _prepare_split(rope_dir, split, out_dir, options, encoder,
                                           progress, log) for split in splits}
  finally:
    encoder.close()
  problems = [p for report in split_reports.values() for p in report.pop("problems")]
  report = {"rope_dir": os.path.abspath(rope_dir), "options": options,
            "splits": split_reports, "num_problems": len(problems), "problems": problems}
  _write_json(os.path.join(out_dir, REPORT_NAME), report)
  return report


# --- reading -----------------------------------------------------------------------

class DomainSource:
  """Random access to one split/domain's records, decoded to dicts.

  `len(source)`, `source[i]`; usable as `grain.MapDataset.source(source)` and picklable
  for Grain worker processes.
  """

  def __init__(self, paths: list[str]):
    self._paths = list(paths)
    self._source = array_record_data_source.ArrayRecordDataSource(self._paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._source):
      raise IndexError(f"record {index} out of range [0, {len(self._source)})")
    return msgpack.unpackb(self._source[index], raw=False)

  def __iter__(self) -> Iterator[dict]:
    return (self[i] for i in range(len(self)))

  def __getitems__(self, indices) -> list[dict]:
    return [msgpack.unpackb(r, raw=False) for r in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"DomainSource({len(self._paths)} shard(s), first {self._paths[0]!r})"


def _marker(prepared_dir: str, split: str, name: str) -> dict:
  path = os.path.join(prepared_dir, split, name)
  value = _read_json(path)
  if value is None:
    raise FileNotFoundError(f"{path} is missing or unreadable: run "
                            f"`python -m data_pipelines.prepare --out {prepared_dir}` first")
  return value


def open_domain(prepared_dir: str, split: str, domain: str) -> DomainSource:
  """The records of `domain` ("page" | "video" | "live") of a prepared split.

  Items: pages `{"id", "product_id", "product_index", "text", "image": bytes}`; videos and
  lives `{"id", "product_id", "product_index", "text", "frames": [bytes] (time order),
  "frame_keys": [int]}`.
  """
  if domain not in DOMAINS:
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
  marker = _marker(prepared_dir, split, f"{domain}.complete.json")
  return DomainSource([os.path.join(prepared_dir, split, name) for name in marker["shards"]])


def load_products(prepared_dir: str, split: str) -> list[dict]:
  """[{"product_id", "product_index", "page": [record index], "video": [...], "live": [...]}]

  in `product_index` order; indices point into `open_domain(prepared_dir, split, domain)`.
  """
  return _marker(prepared_dir, split, "products.json")["products"]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rope_dir", required=True, help="ROPE-format input directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--max_image_side", type=int, default=0,
                      help="re-encode images whose longer side exceeds this (0: keep)")
  parser.add_argument("--shard_size", type=int, default=1000, help="records per file")
  parser.add_argument("--num_workers", type=int, default=2,
                      help="image decoding processes (1: in the main process)")
  args = parser.parse_args(argv)
  report = prepare(args.rope_dir, args.out, max_image_side=args.max_image_side,
                   shard_size=args.shard_size, num_workers=args.num_workers)
  for split, entry in report["splits"].items():
    counts = ", ".join(f"{d} {c['records']}" for d, c in entry["domains"].items())
    print(f"{split}: {entry['products']} products ({entry['products_with_all_domains']} with "
          f"all three domains); records: {counts}")
  print(f"{report['num_problems']} problem(s); report: "
        f"{os.path.join(args.out, REPORT_NAME)}")


if __name__ == "__main__":
  main()
