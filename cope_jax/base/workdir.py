"""A training workdir's layout: the one place its file and folder names are spelled.

  WORKDIR/
    run.json               the run's description (`cope_jax.run_record`)
    jobs.jsonl             one line per job run on the folder
    .lock                  the writer's lock (`cope_jax.workdir_lock`)
    checkpoints/<step>/    Orbax steps (`cope_jax.checkpoints`)
    metrics.jsonl          the training log, one line per logged step (`metrics_writer`)
    tensorboard/           the same for TensorBoard
    eval/metrics.json      the latest evaluation (`cope_jax.evaluate`)
    eval/history.jsonl     every evaluation, one line each
    eval/report.md         its report (`cope_jax.report`), plots and examples beside it
"""

from __future__ import annotations

import os

RUN_FILE = "run.json"
JOBS_FILE = "jobs.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_LOG_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"  # in EVAL_DIR
HISTORY_FILE = "history.jsonl"  # in EVAL_DIR
REPORT_FILE = "report.md"  # in EVAL_DIR


def run_file(workdir: str) -> str:
  return os.path.join(workdir, RUN_FILE)


def jobs_file(workdir: str) -> str:
  return os.path.join(workdir, JOBS_FILE)


def lock_file(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def training_log(workdir: str) -> str:
  return os.path.join(workdir, TRAINING_LOG_FILE)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD_DIR)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def metrics_file(workdir: str) -> str:
  """The latest evaluation's metrics: WORKDIR/eval/metrics.json."""
  return os.path.join(workdir, EVAL_DIR, METRICS_FILE)


def history_file(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR, HISTORY_FILE)
