"""The command-line layer of every entry point (data tools and model jobs alike).

Each program describes itself as a `Command` (its flags, whether it takes `--config` and
`--workdir`) and hands a job to `run`:

  COMMAND = command_line.Command("python -m data_pipelines.prepare", __doc__,
                                 define_flags=_define_flags, required=("rope_dir", "out"))
  def main(argv=None):
    command_line.run(COMMAND, lambda args: prepare(args.rope_dir, args.out, ...), argv)

Flags are absl flags, parsed into a `FlagValues` of the command's own (never the global
one), and `--config FILE` with `--config.a.b=value` overrides is ml_collections' config
flag, as in big_vision. Every command gets the same behaviour:

  --help (-h)     the first paragraph of the module's docstring and the command's own
                  flags, one line each with its default; nothing of absl's or JAX's
  an error        one paragraph on stderr, `error: <type>: <message>` (plus its root
                  cause); `--traceback` or COPE_TRACEBACK=1 prints the traceback instead
  a config typo   `--config.train.batch_sise=4` names the field and the nearest valid
                  names before anything runs
  exit status     0 success, 1 a user error (bad config, missing input, a failed job),
                  2 a usage error (unknown flag, missing required flag, a flag value
                  that does not parse, stray arguments), 130 stopped by SIGINT (Ctrl-C),
                  143 stopped by SIGTERM
  signals         the first SIGINT or SIGTERM stops the job cleanly (training at a step
                  boundary, with that step saved), a second one at once
                  (`cope_jax/base/stop_signals.py`)

This module sits at the lowest library layer (it imports only absl and ml_collections),
so that `data_pipelines` tools and `cope_jax` jobs share it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging as python_logging
import os
import re
import sys
import threading
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging

from cope_jax.base import stop_signals
from cope_jax.base import workdir as workdir_layout

TRACEBACK_ENV = "COPE_TRACEBACK"
EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull")
_MAX_LINES = 30
_MAX_CHARS = 4000
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


class UsageError(Exception):
  """The command line itself is malformed (exit status 2)."""


class ConfigFieldError(KeyError):
  """A `--config.<path>` override names a field the config does not have."""

  def __str__(self) -> str:
    return str(self.args[0])


class CommandExit(SystemExit):
  """The end of an in-process `run` that failed: `code` is the exit status, `str()` the
  paragraph that was printed."""

  def __init__(self, status: int, message: str):
    super().__init__(status)
    self.message = message

  def __str__(self) -> str:
    return self.message


@dataclasses.dataclass(frozen=True)
class Command:
  """What a program takes.

  Attributes:
    prog: how it is started, e.g. "python -m cope_jax.train".
    doc: its module docstring; the first paragraph is the --help summary.
    define_flags: defines the program's own flags in the `FlagValues` it is given.
    required: names of flags without which it cannot run.
    config: False: no --config; True: --config is required; a path: its default; "":
      an optional --config without a default (`args.config` is then None).
    config_help: the help line of --config.
    workdir_help: the help line of --workdir (None: no --workdir).
    workdir_required: whether --workdir must be given.
    config_from_workdir: WORKDIR -> the config recorded there, or None: where a command
      given --workdir without --config takes its config (overrides apply to it).
  """
  prog: str
  doc: str
  define_flags: Callable[[flags.FlagValues], None] | None = None
  required: tuple[str, ...] = ()
  config: bool | str = False
  config_help: str = "config file: a get_config() returning a ConfigDict"
  workdir_help: str | None = None
  workdir_required: bool = True
  config_from_workdir: Callable[[str], Any] | None = None


# ---- errors -------------------------------------------------------------------------


def _innermost_cause(error: BaseException) -> BaseException:
  seen = {id(error)}
  while True:
    cause = error.__cause__
    if cause is None and not error.__suppress_context__:  # `raise ... from None`: no cause
      cause = error.__context__
    if cause is None or id(cause) in seen:
      return error
    seen.add(id(cause))
    error = cause


def first_line(error: BaseException, limit: int = 300) -> str:
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
  if root is not error and first_line(root) and first_line(root) not in paragraph:
    paragraph += f"\ncaused by {type(root).__name__}: {first_line(root)}"
  return paragraph


def traceback_requested(argv: Sequence[str] = ()) -> bool:
  if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  return any(re.fullmatch(r"--?traceback(=(true|t|1|yes))?", arg, re.IGNORECASE)
             for arg in argv)


def _quiet_thread_excepthook(args: threading.ExceptHookArgs) -> None:
  if args.exc_type is SystemExit or args.exc_value is None:
    return
  name = args.thread.name if args.thread is not None else "?"
  print(f"background thread {name} failed: {type(args.exc_value).__name__}: "
        f"{first_line(args.exc_value)}", file=sys.stderr, flush=True)


class BackgroundErrorReports:
  """An unraisable-exception hook: the first error of a background task in one line, the
  later ones counted; nothing for `Event loop is closed`.

  When one read of an Orbax restore fails, Orbax closes its asyncio loop while
  TensorStore still completes the other reads; each completion then fails to reach the
  closed loop, and the coroutines of the failed reads raise again when they are
  garbage-collected, at any moment later. Python would print a traceback for each
  (dozens, burying the real error, which is reported in one line).
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
          f"{first_line(error)}", file=sys.stderr, flush=True)


class LibraryErrorLogs(python_logging.Filter):
  """A filter of the absl log handler: drops records that carry a traceback, counting them.

  Libraries log an exception with its whole traceback from their background threads and
  then hand it to the caller (Orbax: a failed asynchronous checkpoint write is logged by
  each of its threads, then raised by the next `save` or `wait_until_finished`), where the
  command reports it in one paragraph. `--traceback` keeps them.
  """

  def __init__(self):
    super().__init__()
    self.dropped = 0

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[0] is not None:
      self.dropped += 1
      return False
    return True


# ---- config overrides ---------------------------------------------------------------


def _is_mapping(value: Any) -> bool:
  return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "items")
                                        and not isinstance(value, type))


def _field_paths(config: Any, prefix: str = "") -> list[str]:
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    paths.append(path)
    if _is_mapping(value):
      paths.extend(_field_paths(value, f"{path}."))
  return paths


def override_paths(argv: Sequence[str]) -> list[str]:
  """The field paths of the `--config.<path>=...` overrides in `argv`, in order."""
  return [match.group(1) for match in map(_OVERRIDE.match, argv) if match]


def _nearest_paths(path: str, walked: list[str], part: str, node: Any,
                   every_path: list[str]) -> list[str]:
  """Up to three existing field paths closest to the typed `path`: the misspelt level's
  near names (with the rest of the path where that exists), then near paths anywhere."""
  prefix = ".".join(walked + [""])
  rest = path.split(".")[len(walked) + 1:]
  candidates = []
  for name in difflib.get_close_matches(part, [str(k) for k in node.keys()], n=3,
                                        cutoff=0.5):
    whole = ".".join([prefix + name] + rest)
    candidates.append(whole if whole in every_path else prefix + name)
  candidates += difflib.get_close_matches(path, every_path, n=3, cutoff=0.7)
  unique = list(dict.fromkeys(candidates))
  unique.sort(key=lambda c: -difflib.SequenceMatcher(None, path, c).ratio())
  return unique[:3]


def check_override_paths(config: Any, paths: Sequence[str]) -> None:
  """Raises ConfigFieldError naming the first override path `config` lacks, with the
  nearest valid field names."""
  every_path = None
  for path in paths:
    node, walked = config, []
    for part in path.split("."):
      if not _is_mapping(node):
        raise ConfigFieldError(
            f"--config.{path}: config.{'.'.join(walked)} is a {type(node).__name__} "
            f"({node!r}), it has no field {part!r}")
      if part in node:
        node = node[part]
        walked.append(part)
        continue
      if every_path is None:
        every_path = _field_paths(config)
      nearest = _nearest_paths(path, walked, part, node, every_path)
      level = f"config.{'.'.join(walked)}" if walked else "config"
      fields = sorted(str(k) for k in node.keys())
      shown = ", ".join(fields[:25]) + (", ..." if len(fields) > 25 else "")
      hint = ("did you mean " + " or ".join(f"--config.{n}" for n in nearest) + "? "
              if nearest else "")
      raise ConfigFieldError(
          f"--config.{path}: the config has no field {path!r} ({level} has no "
          f"{part!r}); {hint}Fields of {level}: {shown}")


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name VALUE` / `--name=VALUE` in `argv` (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
  return value


def _config_argument(argv: Sequence[str]) -> str | None:
  return _flag_argument(argv, "config")


def override_arguments(argv: Sequence[str]) -> list[str]:
  """The `--config.<path>=value` arguments of `argv`, as typed."""
  return [arg for arg in argv if _OVERRIDE.match(arg)]


def load_config_file(path: str) -> Any:
  """The config of `path` (`file.py` or `file.py:argument`), as the --config flag loads
  it (unlocked)."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path.split(":", 1)[0]):
    raise FileNotFoundError(f"--config={path}: no such file")
  config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(path)
  if not _is_mapping(config):  # the parser defers a load failure to first use
    config.keys()
  return config


# ---- help ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
  return " ".join((text or "").split())


def _summary(doc: str) -> str:
  paragraphs = [p for p in (doc or "").strip().split("\n\n") if p.strip()]
  return "\n".join(line.rstrip() for line in paragraphs[0].splitlines()) if paragraphs else ""


def _flag_left(flag: flags.Flag, required: bool, command: Command) -> str:
  if flag.name == "config" and isinstance(command.config, str):
    default = command.config or "(none)"
    if os.path.isabs(default) and default.startswith(os.getcwd() + os.sep):
      default = os.path.relpath(default)
    return f"--config={default}"
  if required:
    placeholder = {"config": "FILE", "workdir": "DIR"}.get(flag.name, "VALUE")
    return f"--{flag.name}={placeholder} (required)"
  if flag.boolean:
    return f"--[no]{flag.name}={'true' if flag.default else 'false'}"
  default = flag.default
  if default is None:
    shown = "(none)"
  elif isinstance(default, (list, tuple)):
    shown = ",".join(str(x) for x in default) or "''"
  else:
    shown = str(default) if str(default) != "" else "''"
  return f"--{flag.name}={shown}"


def help_text(command: Command, flag_values: flags.FlagValues) -> str:
  """What --help prints: usage, the docstring's first paragraph, one line per flag."""
  required = set(command.required)
  if command.config is True and command.config_from_workdir is None:
    required.add("config")
  if command.workdir_help is not None and command.workdir_required:
    required.add("workdir")
  usage = [command.prog] + [f"--{name}={placeholder}" for name, placeholder in
                            (("config", "FILE"), ("workdir", "DIR")) if name in required]
  usage += [f"--{name}=VALUE" for name in command.required]
  if command.config is not False:
    usage.append("[--config.FIELD=VALUE ...]")
  usage.append("[flags]")
  rows = []
  for flag in _own_flags(flag_values):
    left = _flag_left(flag, flag.name in required, command)
    description = _one_line(flag.help)  # an enum's starts with <value|value>
    if flag.name == "config" and command.config_from_workdir is not None:
      description += " (default: the run's own, from WORKDIR/run.json)"
    rows.append((left, description))
    if flag.name == "config":
      rows.append(("--config.FIELD=VALUE", "override one field of the config, e.g. "
                   "--config.train.batch_size=64"))
  width = min(max(len(left) for left, _ in rows) + 2, 40)
  lines = [f"usage: {' '.join(usage)}", "", _summary(command.doc), "", "flags:"]
  for left, description in rows:
    if len(left) + 2 > width:
      lines.append(f"  {left}  {description}")
    else:
      lines.append(f"  {left.ljust(width)}{description}")
  lines.append(f"  {'--help'.ljust(width)}this list")
  return "\n".join(lines)


def _own_flags(flag_values: flags.FlagValues) -> list[flags.Flag]:
  """The flags a command defined, in definition order (no config-field overrides)."""
  seen, ordered = set(), []
  for flag in flag_values._flags().values():  # pylint: disable=protected-access
    if id(flag) in seen or flag.name.startswith("config."):
      continue
    seen.add(id(flag))
    ordered.append(flag)
  return ordered


# ---- running ------------------------------------------------------------------------


def _define_common_flags(command: Command, flag_values: flags.FlagValues,
                         argv: Sequence[str], recorded_config: Any = None) -> None:
  if command.config is not False:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    if recorded_config is not None:  # --workdir without --config: the run's own
      config_flags.DEFINE_config_dict("config", recorded_config, command.config_help,
                                      flag_values=flag_values, lock_config=True,
                                      sys_argv=list(argv))
    else:
      default = command.config if isinstance(command.config, str) and command.config else None
      config_flags.DEFINE_config_file("config", default, command.config_help,
                                      flag_values=flag_values, lock_config=True,
                                      sys_argv=list(argv))
  if command.workdir_help is not None:
    flags.DEFINE_string("workdir", None, command.workdir_help, flag_values=flag_values)
  if command.define_flags is not None:
    command.define_flags(flag_values)
  flags.DEFINE_bool("traceback", False,
                    f"on an error print the full traceback (also: {TRACEBACK_ENV}=1)",
                    flag_values=flag_values)
  flags.DEFINE_integer("verbosity", -1, "log level: -1 warnings, 0 info (the checkpoint "
                       "libraries' logs), 1 debug", flag_values=flag_values)


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROJECT_PACKAGES = tuple(os.path.join(_PROJECT_ROOT, name) + os.sep
                          for name in ("cope_jax", "data_pipelines", "benchmarks"))


def _project_warnings_and_errors(record: python_logging.LogRecord) -> bool:
  """A log filter: errors from anywhere, warnings only from this project's code."""
  return (record.levelno >= python_logging.ERROR
          or os.path.abspath(record.pathname).startswith(_PROJECT_PACKAGES))


def _finish(status: int, message: str, in_process: bool) -> None:
  """Prints `message` and ends: os._exit for a program (library threads must neither
  print more nor keep it alive), CommandExit for an in-process call."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  if in_process:
    raise CommandExit(status, message)
  os._exit(status)  # pylint: disable=protected-access


def _usage_error(command: Command, message: str, in_process: bool) -> None:
  _finish(EXIT_USAGE_ERROR, f"usage error: {_one_line(message)}\n(`{command.prog} --help` "
          "lists the flags)", in_process)


def _user_error(error: BaseException, in_process: bool, argv: Sequence[str],
                background_errors: BackgroundErrorReports | None = None,
                library_errors: LibraryErrorLogs | None = None) -> None:
  if traceback_requested(argv):
    traceback.print_exception(error, file=sys.stderr)
    _finish(EXIT_USER_ERROR, "", in_process)
  not_shown = background_errors.not_shown if background_errors else 0
  more = f"{not_shown} more errors in background tasks not shown; " if not_shown else ""
  if library_errors is not None and library_errors.dropped:
    more += f"{library_errors.dropped} library error logs with tracebacks not shown; "
  _finish(EXIT_USER_ERROR, f"error: {error_paragraph(error)}\n({more}full traceback: "
          f"{TRACEBACK_ENV}=1 or --traceback)", in_process)


def parse(command: Command, argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` (with the program name first) into the command's flag values.

  Raises:
    UsageError: unknown or malformed flags, a missing required flag, stray arguments.
    ConfigFieldError: an override of a field the config does not have.
    Exception: whatever loading the config file raised.
  """
  argv = list(argv)
  recorded_config, config_source = None, None
  if command.config is not False:
    paths = override_paths(argv[1:])
    config_path = _config_argument(argv[1:])
    workdir = _flag_argument(argv[1:], "workdir") if command.workdir_help is not None else None
    if config_path is None and workdir and command.config_from_workdir is not None:
      recorded_config = command.config_from_workdir(workdir)
      if recorded_config is not None:
        config_source = workdir_layout.run_file(workdir)
        check_override_paths(recorded_config, paths)
    if recorded_config is None:
      config_path = config_path or (
          command.config if isinstance(command.config, str) and command.config else None)
      config_source = config_path
      if config_path:  # loaded first so that its errors and typos are a user's error (1)
        check_override_paths(load_config_file(config_path), paths)
  flag_values = flags.FlagValues()
  _define_common_flags(command, flag_values, argv, recorded_config)
  try:
    rest = flag_values(argv)
  except flags.Error as error:
    raise UsageError(str(error)) from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
  required = list(command.required)
  if command.config is True:
    required.insert(0, "config")
  if command.workdir_help is not None and command.workdir_required:
    required.insert(1 if command.config is True else 0, "workdir")
  missing = [f"--{name}" for name in required if flag_values[name].value is None]
  if missing:
    hint = ""
    if "--config" in missing and command.config_from_workdir is not None:
      hint = (" (a --workdir that holds a run's run.json gives its config; "
              f"{flag_values['workdir'].value or 'the --workdir'} holds none)")
    raise UsageError(f"missing {', '.join(missing)}{hint}")
  values = {flag.name: flag.value for flag in _own_flags(flag_values)}
  if command.config is not False:
    values["config_source"] = config_source
    values["config_overrides"] = override_arguments(argv[1:])
  if command.config is not False and values.get("config") is not None:
    _check_config_loaded(values["config"])
  return types.SimpleNamespace(**values)


def _check_config_loaded(config: Any) -> None:
  if not _is_mapping(config):
    config.keys()  # a deferred load error (file missing, get_config failed) raises here


def run(command: Command, job: Callable[[types.SimpleNamespace], int | None],
        argv: Sequence[str] | None = None,
        before_job: Callable[[types.SimpleNamespace], None] | None = None) -> None:
  """Parses the command line and runs `job(args)`; ends the program on an error.

  Args:
    command: what the program takes.
    job: the work; `args` holds each flag's value by name (`args.config` the loaded
      ConfigDict). An int it returns is the exit status; anything else is success.
    argv: the arguments after the program's name (as argparse takes them); None:
      `sys.argv[1:]`, and the process ends with `os._exit` on an error. Given
      explicitly (an in-process call, a test), an error raises `CommandExit` instead.
    before_job: run after parsing, inside the error handling (multi-process start-up).
  """
  in_process = argv is not None
  argv = list(sys.argv) if argv is None else [command.prog, *argv]
  arguments = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(arg in HELP_FLAGS for arg in arguments):
    flag_values = flags.FlagValues()
    _define_common_flags(command, flag_values, [argv[0]])
    print(help_text(command, flag_values))
    sys.stdout.flush()
    return
  try:
    args = parse(command, argv)
  except UsageError as error:
    _usage_error(command, str(error), in_process)
  except Exception as error:  # pylint: disable=broad-except
    _user_error(error, in_process, argv)
  if not flags.FLAGS.is_parsed():  # libraries that read absl's global flags see defaults
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(args.verbosity)
  if args.verbosity < 0 and not in_process:
    # The default verbosity shows this project's warnings and everyone's errors; the
    # libraries' warnings (TFDS's "Using custom data configuration", Orbax's) need
    # --verbosity 0.
    logging.get_absl_handler().addFilter(_project_warnings_and_errors)
  background_errors = BackgroundErrorReports()
  library_errors = None
  quiet = not traceback_requested(argv) and not in_process
  if quiet:
    threading.excepthook = _quiet_thread_excepthook
    sys.unraisablehook = background_errors
    # The entry points run no asyncio code of their own: asyncio's reports come from
    # Orbax's reads, whose failures are reported in one line. An unretrieved task of a
    # failed read is reported when it is garbage-collected, at any moment later, with a
    # full traceback: silence them for the whole run.
    python_logging.getLogger("asyncio").setLevel(python_logging.CRITICAL + 1)
    library_errors = LibraryErrorLogs()
    logging.get_absl_handler().addFilter(library_errors)
  try:
    with stop_signals.StopSignals():
      if before_job is not None:
        before_job(args)
      status = job(args)
  except stop_signals.Stopped as stop:
    _finish(stop.status, stop.message, in_process)
  except KeyboardInterrupt:
    _finish(EXIT_INTERRUPTED, "interrupted", in_process)
  except Exception as error:  # pylint: disable=broad-except
    _user_error(error, in_process, argv, background_errors, library_errors)
  finally:
    if library_errors is not None:
      logging.get_absl_handler().removeFilter(library_errors)
  if library_errors is not None and library_errors.dropped:
    print(f"note: libraries logged {library_errors.dropped} errors with tracebacks that "
          "were not shown (--traceback shows them)", file=sys.stderr, flush=True)
  if isinstance(status, int) and not isinstance(status, bool) and status != EXIT_OK:
    _finish(status, "", in_process)  # any other return value (a result) is success
