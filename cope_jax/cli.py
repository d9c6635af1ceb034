"""Shared command-line plumbing of the entry points (train, evaluate, export).

Each entry point takes `--config FILE` (with `--config.a.b=value` overrides) and
`--workdir DIR`; flags are defined only when a module runs as a program, so the entry
modules can import each other.

A failure is printed as one paragraph on stderr (`error: <type>: <message>`) and the
process exits with status 1; the full traceback is printed with `--traceback` or the
environment variable `COPE_TRACEBACK=1`. Library loggers stay at WARNING, and an
exception in a background thread (an asynchronous checkpoint write, say) is one line.
"""

from __future__ import annotations

import logging as python_logging
import os
import sys
import threading
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from cope_jax import distributed

TRACEBACK_ENV = "COPE_TRACEBACK"
_MAX_LINES = 30
_MAX_CHARS = 4000


def _innermost_cause(error: BaseException) -> BaseException:
  seen = {id(error)}
  while True:
    cause = error.__cause__ or error.__context__
    if cause is None or id(cause) in seen:
      return error
    seen.add(id(cause))
    error = cause


def _first_line(error: BaseException, limit: int = 300) -> str:
  line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  return line if len(line) <= limit else line[:limit - 3] + "..."


def error_paragraph(error: BaseException) -> str:
  """The error as one paragraph: its type and message (capped), plus its root cause.

  No blank lines; a message of more than 30 lines or 4000 characters is cut, and the cut
  says how to see everything.
  """
  lines = [line.rstrip() for line in str(error).splitlines() if line.strip()]
  cut = len(lines) > _MAX_LINES
  lines = lines[:_MAX_LINES]
  text = "\n".join(lines)
  if len(text) > _MAX_CHARS:
    text, cut = text[:_MAX_CHARS].rstrip(), True
  paragraph = f"{type(error).__name__}: {text}" if text else type(error).__name__
  if cut:
    paragraph += f"\n[message shortened; {TRACEBACK_ENV}=1 shows all of it]"
  root = _innermost_cause(error)
  if root is not error and _first_line(root) and _first_line(root) not in paragraph:
    paragraph += f"\ncaused by {type(root).__name__}: {_first_line(root)}"
  return paragraph


def traceback_requested() -> bool:
  if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  return "traceback" in flags.FLAGS and bool(flags.FLAGS["traceback"].value)


def _quiet_thread_excepthook(args: threading.ExceptHookArgs) -> None:
  if args.exc_type is SystemExit or args.exc_value is None:
    return
  name = args.thread.name if args.thread is not None else "?"
  print(f"background thread {name} failed: {type(args.exc_value).__name__}: "
        f"{_first_line(args.exc_value)}", file=sys.stderr, flush=True)


class _BackgroundErrorReports:
  """An unraisable-exception hook: the first error of a background task in one line, the
  later ones counted; nothing for `Event loop is closed`.

  When one read of an Orbax restore fails, Orbax closes its asyncio loop while
  TensorStore still completes the other reads; each completion then fails to reach the
  closed loop, and the coroutines of the failed reads raise again when they are
  garbage-collected, at any moment later. Python would print a traceback for each
  (dozens, burying the real error, which checkpoints.py reports in one line).
  """

  def __init__(self):
    self.not_shown = 0
    self._shown = False

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    if self._shown:
      self.not_shown += 1
      return
    self._shown = True
    print(f"ignored error in a background task: {type(error).__name__}: "
          f"{_first_line(error)}", file=sys.stderr, flush=True)


def exit_with_error(error: BaseException, status: int = 1,
                    background_errors_not_shown: int = 0) -> None:
  """Prints `error` (one paragraph, or the traceback if requested) and ends the process.

  Ends with `os._exit`: after a fatal error, library threads (asynchronous checkpoint
  writers, data workers) must neither print more nor keep the process alive.
  """
  if traceback_requested():
    traceback.print_exception(error, file=sys.stderr)
  else:
    not_shown = (f"{background_errors_not_shown} more errors in background tasks not "
                 "shown; " if background_errors_not_shown else "")
    print(f"error: {error_paragraph(error)}\n({not_shown}full traceback: {TRACEBACK_ENV}=1 "
          "or --traceback)", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def run(job: Callable[[ml_collections.ConfigDict, str], Any], workdir_help: str) -> None:
  """Defines --config/--workdir, initialises multi-process JAX if asked, runs `job`."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to a config file (a get_config() returning a ConfigDict).",
      lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("traceback", False,
                    f"On an error print the full traceback (also: {TRACEBACK_ENV}=1).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      # Checkpointing libraries log every save at INFO; `--verbosity=0` shows them again.
      logging.set_verbosity(logging.WARNING)
    background_errors = _BackgroundErrorReports()
    if not traceback_requested():
      threading.excepthook = _quiet_thread_excepthook
      sys.unraisablehook = background_errors
      # The entry points run no asyncio code of their own: asyncio's reports come from
      # Orbax's reads, whose failures checkpoints.py turns into one line. An unretrieved
      # task of a failed read is reported when it is garbage-collected, at any moment
      # later, with a full traceback: silence them for the whole run.
      python_logging.getLogger("asyncio").setLevel(python_logging.CRITICAL + 1)
    try:
      distributed.maybe_initialize(config_flag.value)
      job(config_flag.value, workdir_flag.value)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(130)  # pylint: disable=protected-access
    except Exception as error:  # pylint: disable=broad-except
      exit_with_error(error, background_errors_not_shown=background_errors.not_shown)

  app.run(main)
