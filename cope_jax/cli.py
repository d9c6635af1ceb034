"""Shared command-line plumbing of the entry points (train, evaluate, export).

Each entry point takes `--config FILE` (with `--config.a.b=value` overrides) and
`--workdir DIR`; flags are defined only when a module runs as a program, so the entry
modules can import each other.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from cope_jax import distributed


def run(job: Callable[[ml_collections.ConfigDict, str], Any], workdir_help: str) -> None:
  """Defines --config/--workdir, initialises multi-process JAX if asked, runs `job`."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to a config file (a get_config() returning a ConfigDict).",
      lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      # Checkpointing libraries log every save at INFO; `--verbosity=0` shows them again.
      logging.set_verbosity(logging.WARNING)
    distributed.maybe_initialize(config_flag.value)
    job(config_flag.value, workdir_flag.value)

  app.run(main)
