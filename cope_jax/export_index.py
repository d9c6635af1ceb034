"""The search index of an export's domain: built, tuned to the recall target, saved.

Shared by the writers of the export format (`cope_jax.export`, `cope_jax.embed_beam`),
so that both build the same index from the same rows. Needs the search packages, not
the model code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cope_jax.base import result_files
from cope_jax.search import index as search_index

INDEX_RECALL_K = 10  # the index is tuned to and checked at recall@10 against exact search


def write_index(embeddings: np.ndarray, index_dir: str, eval_config) -> dict[str, Any]:
  """Builds the index of kind `eval_config.index` over `embeddings` [N, D] (unit rows),
  tuned to `eval_config.target_recall` with held-out rows of the gallery as queries, and
  saves it into `index_dir`, replacing an old one. Returns the manifest fields describing
  it (`export_format.DomainExport`'s index_kind, index_parameters, index_tuning).

  Written into a staging folder that replaces `index_dir` once complete (index folders
  are relocatable). The manifest marks the index complete only after this returns.
  """
  index, info = search_index.build_index(eval_config.index, embeddings, eval_config,
                                         INDEX_RECALL_K)
  try:
    with result_files.replaced_directory(index_dir) as staging:
      search_index.save_index(index, staging)
  except OSError as error:
    raise result_files.write_error(index_dir, error) from None
  tuning = {key: value for key, value in info.items() if key not in ("kind", "parameters")}
  return {"index_kind": info["kind"], "index_parameters": info["parameters"],
          "index_tuning": tuning}
