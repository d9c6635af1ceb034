"""Fetches the images a ROPE release names, by URL prefix, with a ledger.

  python -m data_pipelines.download --rope_dir /data/rope --url_prefix https://HOST/PATH/ \
      [--split training|test|all] [--out DIR] [--num_frames 8] [--all_frames] \
      [--workers 32] [--timeout 30] [--retries 5] [--max_side PX] [--verify quick|full] \
      [--max_failure_rate 0.01]

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
`--timeout` bounds one whole request (connect, headers and body). Retries
(`data_pipelines.http_fetch`):
  * Retried, up to `--retries` more attempts, after an exponential backoff with jitter
    (`--backoff` * 2^(attempt-1), at most `--max_backoff`, times a random factor in
    [0.5, 1.5)): timeouts, connection errors (refused, reset), a body cut short, HTTP
    408, 429 and 5xx. On 429 and 503 a `Retry-After` header (seconds or an HTTP date,
    at most `--max_retry_after`) replaces the backoff and pauses every request to the
    prefix until then.
  * Never retried: 404, 403 and every other 4xx. They are listed in the ledger.
  * Redirects are followed (at most 10).
  * Every 2xx body must pass `images.check`: a JPEG decodes whole in libjpeg-turbo
    with no corrupt-data warning (strict), another format passes PIL's `verify()` and
    a full decode. A 200 carrying an HTML page is a failure (with its
    content type in the ledger), not a file, and is not retried (a rerun tries again).
    `--max_side` re-encodes an image whose longer side exceeds it as an RGB JPEG of
    that side (quality 90), to save disk.
  * An unreachable prefix stops the run early: after `--abort_after` failed connection
    attempts (refused, unreachable, unknown host, connect timeout) in a row with no
    response in between, the run stops with a message naming the prefix (exit status
    1). Nothing is lost: files already written stay.

Exit status. 0 when every image is present in the end, or when the images that
failed are at most `--max_failure_rate` (default 0.01: 1%) of the images requested
(those fetched, those already present and those that failed); 1 otherwise, and when
the run stopped early. The last lines say how many failed, of how many, and where they
are listed (`download_failures.jsonl`); rerunning the same command retries them. A few
dead links are usual in a web-hosted release (`prepare` lists the records they leave
without images); a larger share usually means a wrong prefix or a throttling server.
`--max_failure_rate 0` asks for every image.

Files. Each body is written to a temporary file in `OUT/.partial/`, then renamed into
place with `os.replace`, so a name in OUT is always a complete, checked image; a kill -9
at any moment loses nothing that was complete. A run starts by removing what a killed
run left in `OUT/.partial/` (so one run per OUT at a time). A rerun skips every file
that is present and complete, and fetches again one that is not (written by something
else, or cut by a power loss, since files are not fsynced).
How a present file is checked (`--verify`):
  * quick (the default): a file that was fully decoded after it was last written (the
    ledger's `download_verified.u64` holds a key of its name, size and modification
    time: every file this tool stores, and every file a rerun decodes) is checked by
    its size and its JPEG header and trailer only (`images.quick_check`: a few bytes
    read). Any other file is decoded whole once, and recorded.
  * full: every present file is decoded whole (finds a file damaged in its middle
    without a change of size or time, which the quick check cannot).
An image name that is not a plain file name (empty, hidden, with a path separator, a
`:` as in a URL scheme or a drive, or a control character) is never fetched: it is a
ledger line, and nothing is ever written outside OUT.

Ledger, in ROPE_DIR:
  download_report.json      status (running / complete / aborted), counts (requested,
                            downloaded, already_present, checked_quickly,
                            checked_by_decode, failed, not_attempted, invalid_names,
                            duplicate_names, frames_skipped_by_sampling, bytes
                            written), failures by reason, and the options. Written
                            when the run starts and when it ends.
  download_failures.jsonl   one line per image that failed in this run: {file, line,
                            id, name, url, status, error, attempts} (file/line: the
                            txt row that names the image; status: the last HTTP status
                            or null; attempts: 0 for a name never fetched). Written as
                            failures happen.
  download_verified.u64     the files decoded whole (see `download_ledger.VerifiedFiles`)
  requested = downloaded + already_present + failed + not_attempted;
  already_present = checked_quickly + checked_by_decode.

Memory: the rows of one media txt file are held at a time (as `load_rope` holds
them). The files are read once to count (for the progress bar's ETA); the requests of
the first million are kept from that pass, beyond that the files are read again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import os
import random
import shutil
import urllib.parse
from collections.abc import Callable

import aiohttp

from cope_jax.base import command_line
from cope_jax.base import domains
from data_pipelines import download_ledger
from data_pipelines import download_plan
from data_pipelines import http_fetch
from data_pipelines import images
from data_pipelines import rope_format

REPORT_NAME = download_ledger.REPORT_NAME
FAILURES_NAME = download_ledger.FAILURES_NAME
VERIFIED_NAME = download_ledger.VERIFIED_NAME
PARTIAL_DIR = ".partial"
VERIFY_CHOICES = ("quick", "full")
_CHECK_BATCH = 512  # present files checked per batch, in a thread
# Up to this many requests the planning pass's are kept for the run (about 300 B each);
# beyond, each media file is read a second time as the run reaches it.
_PLAN_KEPT_REQUESTS = 1_000_000
DEFAULT_MAX_FAILURE_RATE = 0.01  # the command's exit rule (see "Exit status")


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
  verify: str = "quick"


class DownloadAborted(RuntimeError):
  """The run stopped early (the prefix is unreachable); the ledger says what was done."""


class TooManyFailures(RuntimeError):
  """More images failed than `max_failure_rate` allows; the ledger lists each one."""


def failure_rate_problem(counts: dict, max_failure_rate: float, failures_path: str
                         ) -> str | None:
  """Why a finished run breaks the exit rule (failed > max_failure_rate * requested),
  or None when it keeps it."""
  failed, requested = counts["failed"], counts["requested"]
  if failed <= max_failure_rate * requested:
    return None
  return (f"{failed:,} of the {requested:,} images requested failed "
          f"({failed / requested:.2%}, more than --max_failure_rate "
          f"{max_failure_rate:g}); each is listed in {failures_path}: rerun the same "
          "command to retry them")


# --- files already present ---------------------------------------------------------

class PresenceCheck:
  """Which requested files are already in OUT and complete (`--verify`)."""

  def __init__(self, out: str, verify: str, verified: download_ledger.VerifiedFiles,
               pool: concurrent.futures.Executor):
    self._out = out
    self._full = verify == "full"
    self._verified = verified
    self._pool = pool

  def _decodes(self, name: str) -> bool:
    path = os.path.join(self._out, name)
    try:
      before = os.stat(path)
    except OSError:
      return False
    if not images.file_passes_check(path):
      return False
    self._verified.add(self._verified.key(name, before))
    return True

  def _quick(self, names: list[str]) -> list[bool | None]:
    """Per name: True (passed the quick check), None (to decode), False (not there)."""
    paths = [os.path.join(self._out, name) for name in names]
    stats: list[os.stat_result | None] = []
    for path in paths:
      try:
        stats.append(os.stat(path))
      except OSError:
        stats.append(None)  # not there
    on_disk = [i for i, stat in enumerate(stats) if stat is not None]
    known = (self._verified.known([self._verified.key(names[i], stats[i]) for i in on_disk])
             if not self._full else [False] * len(on_disk))
    result: list[bool | None] = [False] * len(names)
    for i, is_known in zip(on_disk, known):
      result[i] = True if is_known and images.quick_check(paths[i], stats[i].st_size) else None
    return result

  def check(self, names: list[str]) -> tuple[list[bool], int, int]:
    """(present and complete, per name; how many checked quickly; how many decoded).
    The quick checks run in two parts on the pool (their system calls overlap)."""
    half = (len(names) + 1) // 2
    quick = [flag for part in self._pool.map(self._quick, [names[:half], names[half:]])
             for flag in part]
    present = [flag is True for flag in quick]
    to_decode = [i for i, flag in enumerate(quick) if flag is None]
    decoded = 0
    for i, decodes in zip(to_decode, self._pool.map(self._decodes,
                                                   [names[i] for i in to_decode])):
      present[i] = decodes
      decoded += decodes
    return present, len(names) - quick.count(False) - len(to_decode), decoded


# --- fetching ----------------------------------------------------------------------

class Downloader:
  """Fetches, checks and stores images; one instance per run."""

  def __init__(self, options: Options, fetcher: http_fetch.Fetcher,
               pool: concurrent.futures.Executor, ledger: download_ledger.Ledger,
               health: http_fetch.HostHealth, verified: download_ledger.VerifiedFiles):
    self._options = options
    self._fetcher = fetcher
    self._pool = pool
    self._ledger = ledger
    self._health = health
    self._verified = verified
    self._partial_dir = os.path.join(options.out, PARTIAL_DIR)
    self._partial_numbers = itertools.count()

  def _store(self, data: bytes, name: str) -> int:
    """Checks `data`, writes it to a temporary file and renames it into OUT; its size."""
    data = images.stored_bytes(data, self._options.max_side, strict=True)
    path = os.path.join(self._options.out, name)
    partial = os.path.join(self._partial_dir, f"{name}.{next(self._partial_numbers)}")
    with open(partial, "xb") as f:
      f.write(data)
    os.replace(partial, path)
    self._verified.add(self._verified.key(name, os.stat(path)))  # decoded above
    return len(data)

  async def handle(self, request: download_plan.ImageRequest) -> None:
    """Fetches one image (not present, or not complete); records the outcome."""
    url = download_plan.image_url(self._options.url_prefix, request.name)
    outcome = await self._fetcher.fetch(url)
    if outcome.data is None:
      self._ledger.failure(request, url, outcome.status, outcome.error, outcome.attempts,
                           outcome.reason)
      return
    loop = asyncio.get_running_loop()
    try:
      size = await loop.run_in_executor(self._pool, self._store, outcome.data, request.name)
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
                ledger: download_ledger.Ledger, health: http_fetch.HostHealth,
                presence: PresenceCheck, planned: dict) -> None:
  """Puts every planned request that is not present on `queue`, in txt-file order,
  until the run aborts. A name that is not a plain file name becomes a ledger line
  instead; present files are checked in batches, in a thread. `planned`: the requests
  the planning pass kept, by (split, domain); the others are read again."""
  for split in splits:
    for domain in domains.DOMAINS:
      requests = planned.pop((split, domain.name), None)
      if requests is None:
        # Read in a thread: the event loop keeps serving the requests in flight.
        requests, _ = await asyncio.to_thread(download_plan.domain_requests, rope_dir,
                                              split, domain, options.num_frames,
                                              options.all_frames)
      for start in range(0, len(requests), _CHECK_BATCH):
        batch = []
        for request in requests[start:start + _CHECK_BATCH]:
          problem = download_plan.name_problem(request.name)
          if problem:
            ledger.failure(request, None, None,
                           f"not a plain file name ({problem}); not fetched", 0,
                           "not a plain file name")
          else:
            batch.append(request)
        present, quickly, decoded = await asyncio.to_thread(
            presence.check, [request.name for request in batch])
        ledger.present(quickly, decoded)
        for request, is_present in zip(batch, present):
          if health.abort_message:
            return
          if not is_present:
            await queue.put(request)


async def _run(rope_dir: str, splits: list[str], options: Options,
               ledger: download_ledger.Ledger, verified: download_ledger.VerifiedFiles,
               planned: dict, seed: int) -> str | None:
  """Fetches everything planned; the abort message, or None when the run completed."""
  health = http_fetch.HostHealth(options.url_prefix, options.abort_after)
  policy = http_fetch.RetryPolicy(timeout=options.timeout, retries=options.retries,
                                  backoff=options.backoff, max_backoff=options.max_backoff,
                                  max_retry_after=options.max_retry_after)
  connector = aiohttp.TCPConnector(limit=options.workers, limit_per_host=options.workers)
  timeout = aiohttp.ClientTimeout(total=options.timeout, sock_connect=options.timeout)
  threads = min(options.workers, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
      fetcher = http_fetch.Fetcher(session, policy, health, random.Random(seed))
      downloader = Downloader(options, fetcher, pool, ledger, health, verified)
      presence = PresenceCheck(options.out, options.verify, verified, pool)
      queue: asyncio.Queue = asyncio.Queue(maxsize=4 * options.workers)
      workers = [asyncio.create_task(downloader.worker(queue))
                 for _ in range(options.workers)]
      try:
        await _feed(queue, rope_dir, splits, options, ledger, health, presence, planned)
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
             max_retry_after: float = 600.0, abort_after: int = 100,
             verify: str = "quick", seed: int = 0, progress: bool = True,
             max_failure_rate: float | None = None,
             log: Callable[[str], None] = print) -> dict:
  """Fetches the images of `split` of `rope_dir` from `url_prefix`; returns the report.

  See the module docstring for what is fetched, the retry policy and the ledger.
  `max_failure_rate`: the most images that may fail, as a share of those requested
  (None: no limit, the caller reads the report's counts).
  Raises:
    ValueError: an option is out of range or the prefix is not an http(s) URL.
    FileNotFoundError: a txt file that names the images is missing.
    DownloadAborted: the prefix is unreachable (the ledger is written first).
    TooManyFailures: more than `max_failure_rate` of the images failed (the ledger is
      written first).
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
  if verify not in VERIFY_CHOICES:
    raise ValueError(f"--verify must be {' or '.join(VERIFY_CHOICES)}, got {verify!r}")
  if max_failure_rate is not None and not 0 <= max_failure_rate <= 1:
    raise ValueError(f"--max_failure_rate must be in [0, 1], got {max_failure_rate}")
  if split not in (*rope_format.SPLITS, "all"):
    raise ValueError(f"--split must be training, test or all, got {split!r}")
  splits = download_plan.resolve_splits(rope_dir, split)
  out = os.path.abspath(out or os.path.join(rope_dir, rope_format.IMAGE_SUBDIR))
  if os.path.realpath(out) == os.path.realpath(rope_dir):
    raise ValueError(f"--out must not be ROPE_DIR itself ({rope_dir}): its txt files and "
                     f"the ledger live there; use {os.path.join(rope_dir, 'images')}")
  options = Options(url_prefix=url_prefix, out=out,
                    num_frames=num_frames, all_frames=all_frames, workers=workers,
                    timeout=timeout, retries=retries, max_side=max_side, backoff=backoff,
                    max_backoff=max_backoff, max_retry_after=max_retry_after,
                    abort_after=abort_after, verify=verify)

  plan = download_plan.PlanCounts()
  planned: dict[tuple[str, str], list] = {}  # kept for the run while they are few
  for split_name in splits:
    for domain in domains.DOMAINS:
      requests, counts = download_plan.domain_requests(rope_dir, split_name, domain,
                                                       num_frames, all_frames)
      plan.add(counts)
      if plan.requests <= _PLAN_KEPT_REQUESTS:
        planned[(split_name, domain.name)] = requests
  sampling = ("every frame of each clip (--all_frames)" if all_frames else
              f"the {num_frames} segment-middle frames of each clip: "
              f"{plan.frames_skipped_by_sampling:,} frame files not needed")
  log(f"{plan.requests:,} images to fetch from {url_prefix} into {options.out} "
      f"({', '.join(splits)}; {sampling})")

  partial_dir = os.path.join(options.out, PARTIAL_DIR)
  shutil.rmtree(partial_dir, ignore_errors=True)  # what a killed run left
  os.makedirs(partial_dir)
  ledger = download_ledger.Ledger(rope_dir, options, splits, plan, progress)
  verified = download_ledger.VerifiedFiles(os.path.join(rope_dir, VERIFIED_NAME),
                                           options.out)
  try:
    abort_message = asyncio.run(_run(rope_dir, splits, options, ledger, verified, planned,
                                     seed))
  except BaseException as e:
    ledger.write_report("aborted", f"interrupted: {type(e).__name__}: {e}")
    ledger.close()
    verified.close()
    raise
  ledger.close()
  verified.close()
  report = ledger.write_report("aborted" if abort_message else "complete",
                               abort_message or "")
  shutil.rmtree(partial_dir, ignore_errors=True)
  counts = report["counts"]
  log(f"downloaded {counts['downloaded']:,} ({counts['bytes'] / 1e6:,.1f} MB), "
      f"{counts['already_present']:,} already present ({counts['checked_quickly']:,} "
      f"checked quickly, {counts['checked_by_decode']:,} decoded), "
      f"{counts['failed']:,} failed"
      + (f", {counts['not_attempted']:,} not attempted" if counts["not_attempted"] else "")
      + f"; ledger: {ledger.report_path}, {ledger.failures_path}")
  if abort_message:
    raise DownloadAborted(abort_message)
  if max_failure_rate is not None:
    problem = failure_rate_problem(counts, max_failure_rate, ledger.failures_path)
    if problem:
      raise TooManyFailures(problem)
  return report


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("rope_dir", None, "folder of the release's txt files", **define)
  flags.DEFINE_string("url_prefix", None, "URL that, followed by an image's file name, "
                      "fetches it", **define)
  flags.DEFINE_enum("split", "all", [*rope_format.SPLITS, "all"], "the split to fetch",
                    **define)
  flags.DEFINE_string("out", None, "where the images go (default ROPE_DIR/images)", **define)
  flags.DEFINE_integer("num_frames", 8, "frames per clip that training/evaluation sample",
                       **define)
  flags.DEFINE_bool("all_frames", False, "fetch every frame of every clip", **define)
  flags.DEFINE_integer("workers", 32, "requests in flight (and connections per host)",
                       **define)
  flags.DEFINE_float("timeout", 30.0, "seconds for one whole request", **define)
  flags.DEFINE_integer("retries", 5, "further attempts after a retryable failure", **define)
  flags.DEFINE_integer("max_side", 0, "re-encode images whose longer side exceeds this "
                       "(0: never)", **define)
  flags.DEFINE_float("backoff", 1.0, "seconds before the first retry (doubled each time)",
                     **define)
  flags.DEFINE_float("max_backoff", 60.0, "longest wait between retries, in seconds",
                     **define)
  flags.DEFINE_float("max_retry_after", 600.0, "longest Retry-After wait honoured, in "
                     "seconds", **define)
  flags.DEFINE_integer("abort_after", 100, "stop after this many connection errors in a "
                       "row", **define)
  flags.DEFINE_enum("verify", "quick", list(VERIFY_CHOICES), "how files already present "
                    "are checked: quick (size, JPEG header and trailer, once decoded whole) "
                    "or full (decode each)", **define)
  flags.DEFINE_float("max_failure_rate", DEFAULT_MAX_FAILURE_RATE, "exit status 1 when "
                     "more than this share of the images requested failed (0: any "
                     "failure)", **define)
  flags.DEFINE_bool("no_progress", False, "no progress bar", **define)


COMMAND = command_line.Command("python -m data_pipelines.download", __doc__,
                               define_flags=_define_flags, required=("rope_dir", "url_prefix"))


def _main(args) -> None:
  download(args.rope_dir, args.url_prefix, split=args.split, out=args.out,
           num_frames=args.num_frames, all_frames=args.all_frames, workers=args.workers,
           timeout=args.timeout, retries=args.retries, max_side=args.max_side,
           backoff=args.backoff, max_backoff=args.max_backoff,
           max_retry_after=args.max_retry_after, abort_after=args.abort_after,
           verify=args.verify, progress=not args.no_progress,
           max_failure_rate=args.max_failure_rate)


def main(argv: list[str] | None = None) -> None:
  """The command line (`argv`: the arguments after the program name; see COMMAND)."""
  command_line.run(COMMAND, _main, argv)


if __name__ == "__main__":
  main()
