"""Fetches the images a ROPE release names, by URL prefix, with a ledger.

  python -m data_pipelines.download --rope_dir /data/rope --url_prefix https://HOST/PATH/ \
      [--split training|test|all] [--out DIR] [--num_frames 8] [--all_frames] \
      [--workers 32] [--timeout 30] [--retries 5] [--max_side PX]

The release's nine txt files per split name each image by file name only
(`eae32f52-2a9a-11ee-a32e-507c6f3c3e56.jpg`). The URL of an image is the prefix followed
by the name (URL-quoted); a `/` is put between them when the prefix has neither a
trailing `/` nor a query (`?`). The files go to `--out`, by default
`ROPE_DIR/images/NAME`, which is where `rope_format.load_rope` looks, so `prepare` and
the readers run unchanged afterwards.

What is fetched. The image rows are read with the reader's own rules
(`rope_format.media_names`: pair file + media file of each domain in
`domains.DOMAINS`), so a row the reader would not use (malformed, unpaired id,
contradicting an earlier row) is not fetched; the report counts those problems and
`prepare` lists them. Every page image is fetched. Of a clip (short video or live), only
the frames that training and evaluation use: the middle frame of each of `--num_frames`
equal segments of the frames in time order (`transforms.sample_frame_indices`, the rule
the release and `data_pipelines.pipelines` apply). Applied again to the frames kept, the
rule picks all of them, so the pipelines see the same frames with `num_frames` set to
the same value. `--all_frames` fetches every frame. The files saved are printed and
recorded (`frames_skipped_by_sampling`). `load_rope` reads the report's `num_frames` and
does not count the frames left out as missing (`RopeCatalog.frames_skipped_by_download`);
a segment-middle frame that is absent is still reported.

Why aiohttp. Downloading ~100M small files is bound by latency, not bandwidth: the
number of requests in flight sets the rate. aiohttp (asyncio) keeps thousands of
requests in flight on one thread, with no thread per request; its `TCPConnector` pools
keep-alive connections and enforces a per-host connection limit (`limit_per_host`); and
it raises typed errors for each way a request can fail (cannot connect, connection
reset, body shorter than its Content-Length, timeout), which the retry policy below
needs. It is mature and widely used (aio-libs). requests in a thread pool would need one
OS thread per request in flight.

Requests. `--workers` coroutines each hold at most one request, and the connector allows
`--workers` connections per host, so a request never waits for a pooled connection and
`--timeout` bounds one whole request (connect, headers and body).
  * Retried, up to `--retries` more attempts, after an exponential backoff with jitter
    (`--backoff` * 2^(attempt-1), at most `--max_backoff`, times a random factor in
    [0.5, 1.5)): timeouts, connection errors (refused, reset), a body cut short, HTTP
    408, 429 and 5xx. On 429 and 503 a `Retry-After` header (seconds or an HTTP date,
    at most `--max_retry_after`) replaces the backoff and pauses every request to the
    prefix until then.
  * Never retried: 404, 403 and every other 4xx. They are listed in the ledger.
  * Redirects are followed (at most 10).
  * Every 2xx body must decode as an image: PIL's `verify()` and then a full decode.
    A 200 carrying an HTML page is a failure (with its content type in the ledger), not
    a file, and is not retried (a rerun tries again). `--max_side` re-encodes an image
    whose longer side exceeds it as an RGB JPEG of that side (quality 90), to save disk.
  * An unreachable prefix stops the run early: after `--abort_after` failed connection
    attempts (refused, unreachable, unknown host, connect timeout) in a row with no
    response in between, the run stops with a message naming the prefix (exit status
    1). Nothing is lost: files already written stay.

Files. Each body is written to a temporary file in `OUT/.partial/`, then renamed into
place with `os.replace`, so a name in OUT is always a complete, checked image; a kill -9
at any moment loses nothing that was complete. A run starts by removing what a killed
run left in `OUT/.partial/` (so one run per OUT at a time). A rerun skips every file
that is present and decodes; one that is present and does not decode (e.g. written by
something else, or cut by a power loss, since files are not fsynced) is fetched again.
An image name that is not a plain file name (empty, hidden, with a path separator, a
`:` as in a URL scheme or a drive, or a control character) is never fetched: it is a
ledger line, and nothing is ever written outside OUT.

Ledger, in ROPE_DIR:
  download_report.json      status (running / complete / aborted), counts (requested,
                            downloaded, already_present, failed, not_attempted,
                            invalid_names, duplicate_names, frames_skipped_by_sampling,
                            bytes written), failures by reason, and the options. Written when
                            the run starts and when it ends.
  download_failures.jsonl   one line per image that failed in this run: {file, line,
                            id, name, url, status, error, attempts} (file/line: the
                            txt row that names the image; status: the last HTTP status
                            or null; attempts: 0 for a name never fetched). Written as
                            failures happen.
  requested = downloaded + already_present + failed + not_attempted.

Memory: the rows of one media txt file are held at a time (as `load_rope` holds
them); the files are read twice (once to count, for the progress bar's ETA).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import email.utils
import io
import itertools
import json
import os
import random
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable

import aiohttp
from PIL import Image
import tqdm

from data_pipelines import domains
from data_pipelines import rope_format
from data_pipelines import transforms

REPORT_NAME = rope_format.DOWNLOAD_REPORT
FAILURES_NAME = "download_failures.jsonl"
PARTIAL_DIR = ".partial"
JPEG_QUALITY = 90
MAX_BODY_BYTES = 64 << 20  # a larger body is a failure (no image of ROPE comes close)
_READ_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Options:
  """How to fetch (see the module docstring and `main`'s flags)."""
  url_prefix: str
  out: str
  num_frames: int = 8
  all_frames: bool = False
  workers: int = 32
  timeout: float = 30.0
  retries: int = 5
  max_side: int = 0
  backoff: float = 1.0
  max_backoff: float = 60.0
  max_retry_after: float = 600.0
  abort_after: int = 100


class DownloadAborted(RuntimeError):
  """The run stopped early (the prefix is unreachable); the ledger says what was done."""


# --- what to fetch -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageRequest:
  """One image to fetch and the txt row that names it."""
  file: str  # txt file name, e.g. training_video_frames.txt
  line: int  # 1-based line in it
  id: str  # page / video / live id
  name: str  # image file name as written


def name_problem(name: str) -> str | None:
  """Why `name` is not a plain file name that can be written in OUT; None if it is."""
  if not name:
    return "empty"
  if name.startswith("."):
    return "starts with '.' (hidden, '.' or '..')"
  if "/" in name or "\\" in name:
    return "contains a path separator"
  if ":" in name:
    return "contains ':' (a URL scheme or a drive)"
  if any(ord(c) < 32 or ord(c) == 127 for c in name):
    return "contains a control character"
  if len(name.encode("utf-8")) > 255:
    return "longer than 255 bytes"
  return None


def image_url(url_prefix: str, name: str) -> str:
  """The URL of image `name`: the prefix, a `/` if needed, the URL-quoted name."""
  if not url_prefix.endswith("/") and "?" not in url_prefix:
    url_prefix += "/"
  return url_prefix + urllib.parse.quote(name, safe="")


@dataclasses.dataclass
class PlanCounts:
  """What planning found, for one (split, domain) or added up."""
  requests: int = 0  # distinct names, invalid ones included
  invalid_names: int = 0
  duplicate_names: int = 0  # rows naming a file already requested for the same domain
  frames_skipped_by_sampling: int = 0
  catalog_problems: int = 0

  def add(self, other: PlanCounts) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def domain_requests(rope_dir: str, split: str, domain: domains.Domain, num_frames: int,
                    all_frames: bool) -> tuple[list[ImageRequest], PlanCounts]:
  """The images one domain of one split needs, in media-file order, and the counts."""
  names, problems = rope_format.media_names(rope_dir, split, domain.name)
  media_file = rope_format.file_name(split, domain.files.media)
  counts = PlanCounts(catalog_problems=len(problems))
  requests: list[ImageRequest] = []
  seen: set[str] = set()
  for item_id, rows in names.items():
    if domain.is_clip and not all_frames:
      kept = sorted(set(transforms.sample_frame_indices(len(rows), num_frames)))
      counts.frames_skipped_by_sampling += len(rows) - len(kept)
      rows = [rows[index] for index in kept]
    for _, name, line in rows:
      if name in seen:
        counts.duplicate_names += 1
        continue
      seen.add(name)
      requests.append(ImageRequest(media_file, line, item_id, name))
      counts.invalid_names += name_problem(name) is not None
  counts.requests = len(requests)
  return requests, counts


def resolve_splits(rope_dir: str, split: str) -> list[str]:
  """`split` as a list ("all": every split present); checks that the files exist."""
  if split == "all":
    splits = [s for s in rope_format.SPLITS if rope_format.has_split(rope_dir, s)]
    if not splits:
      raise FileNotFoundError(f"ROPE directory {rope_dir!r} holds no split "
                              f"({' or '.join(rope_format.SPLITS)}): no "
                              f"{rope_format.file_name('training', domains.DOMAINS[0].files.pair)}")
  else:
    splits = [split]
  for name in splits:
    needed = [rope_format.file_name(name, getattr(d.files, role))
              for d in domains.DOMAINS for role in ("pair", "media")]
    missing = [f for f in needed if not os.path.isfile(os.path.join(rope_dir, f))]
    if missing:
      raise FileNotFoundError(f"ROPE directory {rope_dir!r} lacks {name!r} file(s) needed "
                              f"to know the images: {', '.join(missing)}")
  return splits


# --- images ------------------------------------------------------------------------

def check_image(data: bytes) -> Image.Image:
  """The fully decoded image; ValueError saying why `data` is not one."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise ValueError(f"not a decodable image ({len(data)} bytes): "
                     f"{type(error).__name__}: {error}") from error


def encoded_for_disk(data: bytes, max_side: int) -> bytes:
  """The bytes to store: `data` itself once it decodes, or an RGB JPEG whose longer side
  is `max_side` when the image is larger (0: no limit). ValueError if not an image."""
  image = check_image(data)
  if max_side <= 0 or max(image.size) <= max_side:
    return data
  scale = max_side / max(image.size)
  size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
  buffer = io.BytesIO()
  image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
      buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def file_decodes(path: str) -> bool:
  """Whether `path` exists and holds a complete image."""
  try:
    with open(path, "rb") as f:
      check_image(f.read())
    return True
  except (OSError, ValueError):
    return False


# --- the ledger --------------------------------------------------------------------

class Ledger:
  """Counts, the failure lines and the progress bar of one run."""

  def __init__(self, rope_dir: str, options: Options, splits: list[str], plan: PlanCounts,
               progress: bool):
    self.report_path = os.path.join(rope_dir, REPORT_NAME)
    self.failures_path = os.path.join(rope_dir, FAILURES_NAME)
    self._options = options
    self._splits = splits
    self._plan = plan
    self.downloaded = self.already_present = self.failed = self.bytes = 0
    self.failed_by_reason: collections.Counter = collections.Counter()
    self._start = time.monotonic()
    self._failures = open(self.failures_path, "w", encoding="utf-8")
    self._bar = tqdm.tqdm(total=plan.requests, unit="file", smoothing=0.05,
                          disable=not progress, dynamic_ncols=True)
    self._last_postfix = 0.0
    self.write_report("running")

  def _advance(self) -> None:
    self._bar.update(1)
    now = time.monotonic()
    if now - self._last_postfix > 0.2 or self._bar.n == self._bar.total:
      self._last_postfix = now
      megabytes_per_s = self.bytes / max(now - self._start, 1e-9) / 1e6
      self._bar.set_postfix_str(f"{megabytes_per_s:.2f} MB/s, {self.failed} failed",
                                refresh=False)

  def stored(self, size: int) -> None:
    self.downloaded += 1
    self.bytes += size
    self._advance()

  def present(self) -> None:
    self.already_present += 1
    self._advance()

  def failure(self, request: ImageRequest, url: str | None, status: int | None, error: str,
              attempts: int, reason: str) -> None:
    """Records a failed image; `reason` is the short form counted in the report."""
    self.failed += 1
    self.failed_by_reason[reason] += 1
    line = {"file": request.file, "line": request.line, "id": request.id,
            "name": request.name, "url": url, "status": status, "error": error,
            "attempts": attempts}
    self._failures.write(json.dumps(line, ensure_ascii=False) + "\n")
    self._failures.flush()  # a killed run keeps every line written so far
    self._advance()

  def counts(self) -> dict:
    done = self.downloaded + self.already_present + self.failed
    return {"requested": self._plan.requests, "downloaded": self.downloaded,
            "already_present": self.already_present, "failed": self.failed,
            "not_attempted": self._plan.requests - done,
            "invalid_names": self._plan.invalid_names,
            "duplicate_names": self._plan.duplicate_names,
            "frames_skipped_by_sampling": self._plan.frames_skipped_by_sampling,
            "bytes": self.bytes}

  def write_report(self, status: str, message: str = "") -> dict:
    report = {"status": status, "message": message, "splits": self._splits,
              "counts": self.counts(),
              "failed_by_reason": dict(self.failed_by_reason.most_common()),
              "catalog_problems": self._plan.catalog_problems,
              "seconds": round(time.monotonic() - self._start, 2),
              "options": dataclasses.asdict(self._options),
              "failures_file": FAILURES_NAME}
    temporary = self.report_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
      json.dump(report, f, ensure_ascii=False, indent=1)
    os.replace(temporary, self.report_path)
    return report

  def close(self) -> None:
    self._bar.close()
    self._failures.close()


# --- fetching ----------------------------------------------------------------------

@dataclasses.dataclass
class _Outcome:
  data: bytes | None  # the body of a 2xx response; None on failure
  status: int | None  # last HTTP status seen
  error: str  # why it failed ("" on success)
  reason: str  # short form of `error` for the report's counts
  attempts: int
  content_type: str = ""


def retry_after_seconds(value: str | None, now: datetime.datetime | None = None
                        ) -> float | None:
  """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date)."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  now = now or datetime.datetime.now(datetime.timezone.utc)
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return max(0.0, (when - now).total_seconds())


def _retryable(status: int) -> bool:
  return status in (408, 429) or 500 <= status <= 599


class _HostHealth:
  """Shared by the workers: a Retry-After pause, and the unreachable-prefix check."""

  def __init__(self, url_prefix: str, abort_after: int):
    self._url_prefix = url_prefix
    self._abort_after = abort_after
    self._connection_errors_in_a_row = 0
    self._responses = 0
    self._resume_at = 0.0
    self.abort_message: str | None = None

  async def wait_turn(self) -> None:
    delay = self._resume_at - time.monotonic()
    if delay > 0:
      await asyncio.sleep(delay)

  def pause(self, seconds: float) -> None:
    self._resume_at = max(self._resume_at, time.monotonic() + seconds)

  def responded(self) -> None:
    self._responses += 1
    self._connection_errors_in_a_row = 0

  def connection_failed(self, error: str) -> None:
    self._connection_errors_in_a_row += 1
    if (self._connection_errors_in_a_row >= self._abort_after
        and self.abort_message is None):
      history = ("no request has had a response" if not self._responses else
                 f"after {self._responses} responses")
      self.abort_message = (
          f"stopped: {self._connection_errors_in_a_row} connection attempts in a row to "
          f"{self._url_prefix} failed ({history}; last error: {error}). Check "
          "--url_prefix and the network, then rerun: files already written are kept.")


class Downloader:
  """Fetches, checks and stores images; one instance per run."""

  def __init__(self, options: Options, session: aiohttp.ClientSession,
               pool: concurrent.futures.Executor, ledger: Ledger, health: _HostHealth,
               random_generator: random.Random):
    self._options = options
    self._session = session
    self._pool = pool
    self._ledger = ledger
    self._health = health
    self._random = random_generator
    self._partial_dir = os.path.join(options.out, PARTIAL_DIR)
    self._partial_numbers = itertools.count()

  def _backoff(self, attempt: int) -> float:
    options = self._options
    delay = min(options.max_backoff, options.backoff * 2 ** (attempt - 1))
    return delay * (0.5 + self._random.random())

  async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
    if (response.content_length or 0) > MAX_BODY_BYTES:
      raise ValueError(f"Content-Length {response.content_length} exceeds "
                       f"{MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
      size += len(chunk)
      if size > MAX_BODY_BYTES:
        raise ValueError(f"body exceeds {MAX_BODY_BYTES} bytes")
      chunks.append(chunk)
    return b"".join(chunks)

  async def fetch(self, url: str) -> _Outcome:
    """GETs `url` with the retry policy of the module docstring."""
    options = self._options
    status: int | None = None
    attempts = 0
    while True:
      attempts += 1
      await self._health.wait_turn()
      retry_after = None
      try:
        async with self._session.get(url) as response:
          status = response.status
          self._health.responded()
          if 200 <= status <= 299:
            data = await self._read_body(response)
            return _Outcome(data, status, "", "", attempts, response.content_type)
          error = reason = f"HTTP {status}"
          if response.reason:
            error += f" {response.reason}"
          if status in (429, 503):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
          if not _retryable(status):
            return _Outcome(None, status, error, reason, attempts)
      except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        status = None
        error, reason = f"cannot connect: {e}", "cannot connect"
        self._health.connection_failed(error)
      except TimeoutError:
        error = reason = f"timed out (no complete response within {options.timeout} s)"
      except aiohttp.ClientPayloadError as e:
        error, reason = f"body cut short: {e}", "body cut short"
      except aiohttp.ClientError as e:
        error, reason = f"{type(e).__name__}: {e}", type(e).__name__
      except ValueError as e:  # body too large
        return _Outcome(None, status, str(e), "body too large", attempts)
      if attempts > options.retries or self._health.abort_message:
        return _Outcome(None, status, error, reason, attempts)
      if retry_after is not None:
        retry_after = min(retry_after, options.max_retry_after)
        self._health.pause(retry_after)
        await asyncio.sleep(retry_after)
      else:
        await asyncio.sleep(self._backoff(attempts))

  def _store(self, data: bytes, path: str) -> int:
    """Checks `data`, writes it to a temporary file and renames it to `path`; its size."""
    data = encoded_for_disk(data, self._options.max_side)
    partial = os.path.join(self._partial_dir,
                           f"{os.path.basename(path)}.{next(self._partial_numbers)}")
    with open(partial, "xb") as f:
      f.write(data)
    os.replace(partial, path)
    return len(data)

  async def handle(self, request: ImageRequest) -> None:
    """Fetches one image unless it is present and decodes; records the outcome."""
    loop = asyncio.get_running_loop()
    path = os.path.join(self._options.out, request.name)
    if await loop.run_in_executor(self._pool, file_decodes, path):
      self._ledger.present()
      return
    url = image_url(self._options.url_prefix, request.name)
    outcome = await self.fetch(url)
    if outcome.data is None:
      self._ledger.failure(request, url, outcome.status, outcome.error, outcome.attempts,
                           outcome.reason)
      return
    try:
      size = await loop.run_in_executor(self._pool, self._store, outcome.data, path)
    except ValueError as e:
      content_type = outcome.content_type or "no content type"
      self._ledger.failure(request, url, outcome.status,
                           f"HTTP {outcome.status} body is not an image ({content_type}): "
                           f"{e}", outcome.attempts, "body is not an image")
      return
    self._ledger.stored(size)

  async def worker(self, queue: asyncio.Queue) -> None:
    while (request := await queue.get()) is not None:
      if not self._health.abort_message:
        await self.handle(request)


async def _feed(queue: asyncio.Queue, rope_dir: str, splits: list[str], options: Options,
                ledger: Ledger, health: _HostHealth) -> None:
  """Puts every planned request on `queue`, in txt-file order, until the run aborts.
  A name that is not a plain file name becomes a ledger line instead."""
  for split in splits:
    for domain in domains.DOMAINS:
      # Read in a thread: the event loop keeps serving the requests in flight.
      requests, _ = await asyncio.to_thread(domain_requests, rope_dir, split, domain,
                                            options.num_frames, options.all_frames)
      for request in requests:
        if health.abort_message:
          return
        problem = name_problem(request.name)
        if problem:
          ledger.failure(request, None, None,
                         f"not a plain file name ({problem}); not fetched", 0,
                         "not a plain file name")
          continue
        await queue.put(request)


async def _run(rope_dir: str, splits: list[str], options: Options, ledger: Ledger,
               seed: int) -> str | None:
  """Fetches everything planned; the abort message, or None when the run completed."""
  health = _HostHealth(options.url_prefix, options.abort_after)
  connector = aiohttp.TCPConnector(limit=options.workers, limit_per_host=options.workers)
  timeout = aiohttp.ClientTimeout(total=options.timeout, sock_connect=options.timeout)
  threads = min(options.workers, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
      downloader = Downloader(options, session, pool, ledger, health, random.Random(seed))
      queue: asyncio.Queue = asyncio.Queue(maxsize=4 * options.workers)
      workers = [asyncio.create_task(downloader.worker(queue))
                 for _ in range(options.workers)]
      try:
        await _feed(queue, rope_dir, splits, options, ledger, health)
        for _ in workers:
          await queue.put(None)
        await asyncio.gather(*workers)
      finally:
        for task in workers:
          task.cancel()
  return health.abort_message


def download(rope_dir: str, url_prefix: str, *, split: str = "all", out: str | None = None,
             num_frames: int = 8, all_frames: bool = False, workers: int = 32,
             timeout: float = 30.0, retries: int = 5, max_side: int = 0,
             backoff: float = 1.0, max_backoff: float = 60.0,
             max_retry_after: float = 600.0, abort_after: int = 100, seed: int = 0,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """Fetches the images of `split` of `rope_dir` from `url_prefix`; returns the report.

  See the module docstring for what is fetched, the retry policy and the ledger.
  Raises:
    ValueError: an option is out of range or the prefix is not an http(s) URL.
    FileNotFoundError: a txt file that names the images is missing.
    DownloadAborted: the prefix is unreachable (the ledger is written first).
  """
  parsed = urllib.parse.urlsplit(url_prefix)
  if parsed.scheme not in ("http", "https") or not parsed.netloc:
    raise ValueError(f"--url_prefix {url_prefix!r} is not an http(s) URL with a host")
  for name, value, low in (("num_frames", num_frames, 1), ("workers", workers, 1),
                           ("retries", retries, 0), ("max_side", max_side, 0),
                           ("abort_after", abort_after, 1)):
    if value < low:
      raise ValueError(f"--{name} must be >= {low}, got {value}")
  for name, value in (("timeout", timeout), ("backoff", backoff),
                      ("max_backoff", max_backoff), ("max_retry_after", max_retry_after)):
    if not value > 0:
      raise ValueError(f"--{name} must be > 0, got {value}")
  if split not in (*rope_format.SPLITS, "all"):
    raise ValueError(f"--split must be training, test or all, got {split!r}")
  splits = resolve_splits(rope_dir, split)
  out = os.path.abspath(out or os.path.join(rope_dir, rope_format.IMAGE_SUBDIR))
  if os.path.realpath(out) == os.path.realpath(rope_dir):
    raise ValueError(f"--out must not be ROPE_DIR itself ({rope_dir}): its txt files and "
                     f"the ledger live there; use {os.path.join(rope_dir, 'images')}")
  options = Options(url_prefix=url_prefix, out=out,
                    num_frames=num_frames, all_frames=all_frames, workers=workers,
                    timeout=timeout, retries=retries, max_side=max_side, backoff=backoff,
                    max_backoff=max_backoff, max_retry_after=max_retry_after,
                    abort_after=abort_after)

  plan = PlanCounts()
  for split_name in splits:
    for domain in domains.DOMAINS:
      plan.add(domain_requests(rope_dir, split_name, domain, num_frames, all_frames)[1])
  sampling = ("every frame of each clip (--all_frames)" if all_frames else
              f"the {num_frames} segment-middle frames of each clip: "
              f"{plan.frames_skipped_by_sampling:,} frame files not needed")
  log(f"{plan.requests:,} images to fetch from {url_prefix} into {options.out} "
      f"({', '.join(splits)}; {sampling})")

  partial_dir = os.path.join(options.out, PARTIAL_DIR)
  shutil.rmtree(partial_dir, ignore_errors=True)  # what a killed run left
  os.makedirs(partial_dir)
  ledger = Ledger(rope_dir, options, splits, plan, progress)
  try:
    abort_message = asyncio.run(_run(rope_dir, splits, options, ledger, seed))
  except BaseException as e:
    ledger.write_report("aborted", f"interrupted: {type(e).__name__}: {e}")
    ledger.close()
    raise
  ledger.close()
  report = ledger.write_report("aborted" if abort_message else "complete",
                               abort_message or "")
  shutil.rmtree(partial_dir, ignore_errors=True)
  counts = report["counts"]
  log(f"downloaded {counts['downloaded']:,} ({counts['bytes'] / 1e6:,.1f} MB), "
      f"{counts['already_present']:,} already present, {counts['failed']:,} failed"
      + (f", {counts['not_attempted']:,} not attempted" if counts["not_attempted"] else "")
      + f"; ledger: {ledger.report_path}, {ledger.failures_path}")
  if abort_message:
    raise DownloadAborted(abort_message)
  return report


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rope_dir", required=True, help="folder of the release's txt files")
  parser.add_argument("--url_prefix", required=True,
                      help="URL that, followed by an image's file name, fetches it")
  parser.add_argument("--split", default="all", choices=(*rope_format.SPLITS, "all"))
  parser.add_argument("--out", default=None,
                      help="where the images go (default ROPE_DIR/images)")
  parser.add_argument("--num_frames", type=int, default=8,
                      help="frames per clip that training/evaluation sample")
  parser.add_argument("--all_frames", action="store_true",
                      help="fetch every frame of every clip")
  parser.add_argument("--workers", type=int, default=32,
                      help="requests in flight (and connections per host)")
  parser.add_argument("--timeout", type=float, default=30.0,
                      help="seconds for one whole request")
  parser.add_argument("--retries", type=int, default=5,
                      help="further attempts after a retryable failure")
  parser.add_argument("--max_side", type=int, default=0,
                      help="re-encode images whose longer side exceeds this (0: never)")
  parser.add_argument("--backoff", type=float, default=1.0,
                      help="seconds before the first retry (doubled each time)")
  parser.add_argument("--max_backoff", type=float, default=60.0)
  parser.add_argument("--max_retry_after", type=float, default=600.0,
                      help="longest Retry-After wait honoured, in seconds")
  parser.add_argument("--abort_after", type=int, default=100,
                      help="stop after this many connection errors in a row")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    download(args.rope_dir, args.url_prefix, split=args.split, out=args.out,
             num_frames=args.num_frames, all_frames=args.all_frames, workers=args.workers,
             timeout=args.timeout, retries=args.retries, max_side=args.max_side,
             backoff=args.backoff, max_backoff=args.max_backoff,
             max_retry_after=args.max_retry_after, abort_after=args.abort_after,
             progress=not args.no_progress)
  except (ValueError, FileNotFoundError, DownloadAborted) as e:
    sys.exit(f"download: {e}")


if __name__ == "__main__":
  main()
