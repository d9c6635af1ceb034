"""(Re)writes a run's evaluation report: `python -m cope_jax.report --workdir DIR`.

Writes DIR/eval/report.md and the training curves from DIR/eval/metrics.json and the
training log (`cope_jax.eval_report.rewrite_report`); the recall curves and examples of
the evaluation that wrote metrics.json are kept. The config is the run's (DIR/run.json);
`--config` names other prepared data in the report.
"""

from __future__ import annotations

import os

from cope_jax import cli
from cope_jax import eval_report
from cope_jax import run_record
from cope_jax import workdir_lock


def _command():
  return cli.command(
      "python -m cope_jax.report", __doc__, config="",
      config_help="a config file (optional: names the prepared data in the report)",
      workdir_help="training directory whose eval/metrics.json the report is written from")


def _job(args) -> None:
  if not os.path.isdir(args.workdir):
    raise FileNotFoundError(f"--workdir {args.workdir}: no such folder")
  config = args.config
  if config is not None:  # the run's own (--workdir alone), or one checked against it
    config = run_record.begin_job(config, args.workdir, "report", check_data=False,
                                  **cli.job_options(args))
  with workdir_lock.hold(args.workdir, "report"):
    paths = eval_report.rewrite_report(args.workdir, config)
  print("wrote " + ", ".join(paths))


def main(argv=None) -> None:
  cli.run_job(_command(), _job, argv)


if __name__ == "__main__":
  main()
