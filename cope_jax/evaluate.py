r"""Evaluates cross-domain retrieval: `python -m cope_jax.evaluate --config C --workdir DIR`.

Loads the latest training checkpoint of DIR (or `--config.eval.checkpoint_step=N`, or,
when DIR has none, the converted weights of `config.train.init_from`), embeds every
record of the evaluation split in the three domains and writes

  DIR/eval/metrics.json    six directions x (R@1, R@5, R@10, median rank, mAP,
                           one-shot accuracy), chance level, search kind
  DIR/eval/report.md       the table, plots and an HTML page of example queries

What is computed is the evaluators of `config.evals` (cope_jax/evaluators/: retrieval and
one-shot by default), each handed the split's embeddings. The same `evaluate_params` runs
as the periodic evaluation hook of training, with the evaluators due at that step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging
import jax
import ml_collections

from cope_jax.base import workdir as workdir_layout
from cope_jax import cli
from cope_jax import config_checks
from cope_jax import embed
from cope_jax import evaluators
from cope_jax import eval_report
from cope_jax.base import result_files
from cope_jax import run_record
from cope_jax import sharding
from cope_jax import state as state_lib
from cope_jax import workdir_lock
from cope_jax.base import domains
from data_pipelines import prepare


def eval_split_embeddings(config: ml_collections.ConfigDict, model_params,
                          mesh: jax.sharding.Mesh, split: str | None = None
                          ) -> evaluators.EmbeddingSource:
  """The embedding function the evaluators get: each domain of the split embedded on
  first use (gathered on every process), None for a domain without records."""
  model = state_lib.build_model(config)
  split = split or config.data.eval_split

  def embed_domain(domain: str) -> embed.DomainEmbeddings | None:
    try:
      num_records = len(prepare.open_domain(config.data.prepared_dir, split, domain,
                                                config_name=config.data.prepared_config))
    except FileNotFoundError as error:
      logging.warning("split %r has no %s records (%s): its directions are skipped", split,
                      domain, error)
      return None
    if num_records == 0:
      logging.warning("split %r has no %s records: its directions are skipped", split, domain)
      return None
    local = embed.embed_split(config, model, model_params, domain, mesh, split)
    return embed.gather_to_all(local)

  return evaluators.EmbeddingSource(embed_domain, domains.NAMES)


def evaluate_params(config: ml_collections.ConfigDict, workdir: str, model_params, step: int,
                    mesh: jax.sharding.Mesh, source: str = "",
                    names: Sequence[str] | None = None) -> dict:
  """Runs the evaluators of `config.evals` (those in `names`, default all) on the eval
  split's embeddings and writes metrics.json + report."""
  config_checks.check_split(config.data.prepared_dir, config.data.eval_split,
                            "config.data.eval_split", min_domains=2,
                            config_name=config.data.prepared_config)
  built = evaluators.build(config)
  embeddings = eval_split_embeddings(config, model_params, mesh)
  metrics = evaluators.run(built, embeddings, names)
  # Where the numbers come from: checkpoint step, config digest, prepared data, code.
  metrics.update(run_record.provenance(config, step, source))
  metrics["split"] = config.data.eval_split
  metrics["num_items"] = {domain: len(e) for domain, e in embeddings.all().items()}
  if jax.process_index() == 0:
    eval_dir = workdir_layout.eval_dir(workdir)
    # Swapped in once all are written, metrics.json last.
    with result_files.staged_directory(eval_dir, last=(workdir_layout.METRICS_FILE,)) as staging:
      result_files.write_json(os.path.join(staging, workdir_layout.METRICS_FILE), metrics)
      eval_report.write_report(staging, metrics, embeddings.all(), config, workdir)
    result_files.append_json_line(workdir_layout.history_file(workdir), metrics)
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str, **job_options) -> dict:
  """Evaluates the checkpoint of `workdir` (see the module docstring).

  `job_options`: `run_record.begin_job`'s (allow_change, config_source, overrides): the
  config is checked against the run's record in `workdir`, if any.
  """
  # One writer of the workdir's outputs at a time (re-entrant: training's own evaluation).
  with workdir_lock.hold(workdir, "evaluate", enabled=jax.process_index() == 0):
    return _run(config, workdir, **job_options)


def _run(config: ml_collections.ConfigDict, workdir: str, **job_options) -> dict:
  config_checks.check_config(config)
  config = run_record.begin_job(config, workdir, "evaluate",
                                writer=jax.process_index() == 0, **job_options)
  config_checks.check_split(config.data.prepared_dir, config.data.eval_split,
                            "config.data.eval_split", min_domains=2,
                            config_name=config.data.prepared_config)
  mesh = sharding.make_mesh(config.mesh)
  params, step, source = state_lib.load_model_params(config, workdir, mesh)
  return evaluate_params(config, workdir, params, step, mesh, source)


def _main(config: ml_collections.ConfigDict, workdir: str, **job_options) -> None:
  metrics = run(config, workdir, **job_options)
  if jax.process_index() == 0:
    print(eval_report.summary_table(metrics))
    print(eval_report.search_line(metrics))
    print(f"\nwrote {workdir_layout.metrics_file(workdir)}")


def main(argv=None) -> None:
  cli.run(_main, "training directory to evaluate (its checkpoints/ are read)",
          prog="python -m cope_jax.evaluate", doc=__doc__, argv=argv)


if __name__ == "__main__":
  main()
