"""HTTP GET with retries, for `data_pipelines.download` (aiohttp, asyncio).

  health = HostHealth(url_prefix, abort_after)
  fetcher = Fetcher(session, RetryPolicy(...), health, random.Random(seed))
  outcome = await fetcher.fetch(url)   # Outcome: body or why not, status, attempts

The policy (`download`'s module docstring describes it for users):
  * Retried, up to `retries` more attempts, after an exponential backoff with jitter
    (`backoff` * 2^(attempt-1), at most `max_backoff`, times a random factor in
    [0.5, 1.5)): timeouts, connection errors (refused, reset), a body cut short, HTTP
    408, 429 and 5xx. On 429 and 503 a `Retry-After` header (seconds or an HTTP date,
    at most `max_retry_after`) replaces the backoff and pauses every request to the
    prefix until then (`HostHealth.pause`).
  * Never retried: 404, 403 and every other 4xx; a body over `MAX_BODY_BYTES`.
  * `HostHealth` counts failed connection attempts in a row with no response in
    between; at `abort_after` it holds a message naming the prefix, and fetches stop
    retrying.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import random
import time

import aiohttp

MAX_BODY_BYTES = 64 << 20  # a larger body is a failure (no image of ROPE comes close)
_READ_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How often and how long to retry (see the module docstring)."""
  timeout: float = 30.0
  retries: int = 5
  backoff: float = 1.0
  max_backoff: float = 60.0
  max_retry_after: float = 600.0


@dataclasses.dataclass
class Outcome:
  """What one fetch ended with."""
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


def retryable(status: int) -> bool:
  return status in (408, 429) or 500 <= status <= 599


class HostHealth:
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


class Fetcher:
  """GETs URLs with the retry policy of the module docstring."""

  def __init__(self, session: aiohttp.ClientSession, policy: RetryPolicy,
               health: HostHealth, random_generator: random.Random):
    self._session = session
    self._policy = policy
    self._health = health
    self._random = random_generator

  def _backoff(self, attempt: int) -> float:
    policy = self._policy
    delay = min(policy.max_backoff, policy.backoff * 2 ** (attempt - 1))
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

  async def fetch(self, url: str) -> Outcome:
    """GETs `url`, retrying as the policy says; never raises for a failed request."""
    policy = self._policy
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
            return Outcome(data, status, "", "", attempts, response.content_type)
          error = reason = f"HTTP {status}"
          if response.reason:
            error += f" {response.reason}"
          if status in (429, 503):
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
          if not retryable(status):
            return Outcome(None, status, error, reason, attempts)
      except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        status = None
        error, reason = f"cannot connect: {e}", "cannot connect"
        self._health.connection_failed(error)
      except TimeoutError:
        error = reason = f"timed out (no complete response within {policy.timeout} s)"
      except aiohttp.ClientPayloadError as e:
        error, reason = f"body cut short: {e}", "body cut short"
      except aiohttp.ClientError as e:
        error, reason = f"{type(e).__name__}: {e}", type(e).__name__
      except ValueError as e:  # body too large
        return Outcome(None, status, str(e), "body too large", attempts)
      if attempts > policy.retries or self._health.abort_message:
        return Outcome(None, status, error, reason, attempts)
      if retry_after is not None:
        retry_after = min(retry_after, policy.max_retry_after)
        self._health.pause(retry_after)
        await asyncio.sleep(retry_after)
      else:
        await asyncio.sleep(self._backoff(attempts))
