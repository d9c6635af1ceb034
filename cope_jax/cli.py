"""The model jobs' side of the command-line layer (`cope_jax/base/command_line.py`).

The jobs (train, evaluate, export, convert, report, serving) take `--config FILE` (with
`--config.a.b=value` overrides) and most take `--workdir DIR`; before the job runs,
multi-process JAX is initialised when the config or the environment asks for it
(`cope_jax.distributed`). In a multi-process job, an error that says a peer was lost
names the lost process, any other error is posted for the other processes to name, and
a job stopped by a signal leaves through JAX's shutdown barrier. Everything else (help,
one-paragraph errors with `--traceback`, config-field typos, exit statuses 0/1/2,
130/143 for SIGINT/SIGTERM) is the shared layer's.

  COMMAND = cli.command("python -m cope_jax.evaluate", __doc__,
                        workdir_help="training directory to evaluate")
  def main(argv=None):
    cli.run_job(COMMAND, lambda args: run(args.config, args.workdir), argv)

Flags are defined only when a command runs, so the entry modules can import each other.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import ml_collections

from cope_jax import distributed
from cope_jax import run_record
from cope_jax.base import command_line
from cope_jax.base import stop_signals

TRACEBACK_ENV = command_line.TRACEBACK_ENV
error_paragraph = command_line.error_paragraph
_BackgroundErrorReports = command_line.BackgroundErrorReports


def _recorded_config(workdir: str):
  return run_record.recorded_config(workdir)


def command(prog: str, doc: str, *, workdir_help: str | None = None,
            workdir_required: bool = True, define_flags=None, required: tuple[str, ...] = (),
            config: bool | str = True,
            config_help: str = "config file: a get_config() returning a ConfigDict "
                               "(configs/*.py)",
            config_from_workdir: bool | None = None) -> command_line.Command:
  """A `Command` of a model job (by default with a required --config).

  A job on a training workdir (`workdir_help` given, a --config taken) takes the run's
  recorded config when it is given --workdir without --config (`run_record`), and has
  the flag --allow_config_change for running with other model or data fields than the
  run's (`config_from_workdir=False`: neither).
  """
  if config_from_workdir is None:
    config_from_workdir = workdir_help is not None and config is not False
  if config_from_workdir:
    own_flags = define_flags

    def define_flags(flag_values, own_flags=own_flags):
      if own_flags is not None:
        own_flags(flag_values)
      flags.DEFINE_bool("allow_config_change", False, "run with model or input-data "
                        "fields other than the run's (WORKDIR/run.json); refused otherwise",
                        flag_values=flag_values)
  return command_line.Command(
      prog=prog, doc=doc, define_flags=define_flags, required=required, config=config,
      config_help=config_help, workdir_help=workdir_help, workdir_required=workdir_required,
      config_from_workdir=_recorded_config if config_from_workdir else None)


def job_options(args: types.SimpleNamespace) -> dict:
  """What `run_record.begin_job` / `begin_training` take from a job's command line."""
  return {"allow_change": bool(getattr(args, "allow_config_change", False)),
          "config_source": getattr(args, "config_source", None) or "",
          "overrides": tuple(getattr(args, "config_overrides", ()) or ())}


def _initialize_distributed(args: types.SimpleNamespace) -> None:
  if getattr(args, "config", None) is not None:
    keep_traces = bool(getattr(args, "traceback", False)) or command_line.traceback_requested()
    distributed.maybe_initialize(args.config, keep_traces=keep_traces)


def _with_peers(job: Callable[[types.SimpleNamespace], Any]
                ) -> Callable[[types.SimpleNamespace], Any]:
  """`job` with the multi-process endings of `cope_jax.distributed` (a no-op on one
  process)."""
  def run(args: types.SimpleNamespace) -> Any:
    try:
      return job(args)
    except stop_signals.Stopped as stop:
      distributed.after_stop(stop)
      raise
    except Exception as error:  # pylint: disable=broad-except
      explained = distributed.explain_failure(error)
      if explained is error:
        raise
      if command_line.traceback_requested() or getattr(args, "traceback", False):
        raise explained from error
      raise explained from None  # the runtime's raw line stays off the terminal

  return run


def run_job(cmd: command_line.Command, job: Callable[[types.SimpleNamespace], Any],
            argv: Sequence[str] | None = None) -> None:
  """`command_line.run` with multi-process JAX initialised before the job."""
  command_line.run(cmd, _with_peers(job), argv, before_job=_initialize_distributed)


def run(job: Callable[..., Any], workdir_help: str,
        prog: str = "", doc: str = "", define_flags=None, required: tuple[str, ...] = (),
        argv: Sequence[str] | None = None) -> None:
  """Runs `job(config, workdir, allow_change=, config_source=, overrides=)` as a command
  with --config and --workdir (see `command`: --workdir alone takes the run's config)."""
  import __main__  # pylint: disable=g-import-not-at-top

  prog = prog or f"python -m {getattr(__main__.__spec__, 'name', 'cope_jax')}"
  cmd = command(prog, doc or (__main__.__doc__ or ""), workdir_help=workdir_help,
                define_flags=define_flags, required=required)
  run_job(cmd, lambda args: job(args.config, args.workdir, **job_options(args)), argv)
