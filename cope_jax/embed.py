"""Embeds every record of one split and domain, streaming over the device mesh.

Memory stays bounded: one batch of decoded images is alive at a time on the host, and
only the [N, D] embeddings accumulate. Each process embeds its own part of the split
(the eval pipeline shards records by process) and keeps the rows it fed.
"""

from __future__ import annotations

import pickle

from flax import linen as nn
import jax
import ml_collections
import numpy as np

from cope_jax import sharding
from cope_jax.base import progress
from cope_jax.models import cope
from cope_jax.search.embeddings import DomainEmbeddings
from cope_jax.base import domains
from data_pipelines import pipelines


def make_embed_fn(model: nn.Module, domain: str, mesh: jax.sharding.Mesh):
  """jit-compiled `(model_params, batch) -> [B, D]` for one domain's eval batches."""
  name = domains.get(domain).embedding_key

  def embed(model_params, batch):
    return model.apply({"params": model_params}, batch, domain, outputs=(name,),
                       method=cope.COPE.embed)[name]

  return jax.jit(embed, out_shardings=sharding.batch_sharding(mesh))


def _local_rows(global_array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that live on this process, in order."""
  if jax.process_count() == 1:
    return np.asarray(global_array)
  shards = {}
  for shard in global_array.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))
  return np.concatenate([shards[start] for start in sorted(shards)], axis=0)


def iter_embedding_batches(config: ml_collections.ConfigDict, model: nn.Module, model_params,
                           domain: str, mesh: jax.sharding.Mesh, split: str | None = None,
                           show_progress: bool = True):
  """Yields (ids [b], product_ids [b], embeddings [b, D] float32) per batch of this process.

  Padding rows are already removed. Streams: nothing but one batch is held.
  """
  dataset = pipelines.make_eval_dataset(
      config, domain, split=split, process_index=jax.process_index(),
      process_count=jax.process_count())
  yield from iter_dataset_embeddings(config, model, model_params, dataset, mesh,
                                     show_progress)


def iter_dataset_embeddings(config: ml_collections.ConfigDict, model: nn.Module, model_params,
                            dataset: pipelines.EvalDataset, mesh: jax.sharding.Mesh,
                            show_progress: bool = True):
  """`iter_embedding_batches` over the batches of `dataset` (this process's part of an
  `pipelines.eval_dataset_from_source`, every process yielding as many batches)."""
  domain = dataset.domain
  embed_fn = make_embed_fn(model, domain, mesh)
  # Process 0 shows the work of all processes: batch i is batch i of every process.
  rows_per_batch = global_rows_per_batch(dataset.num_records, jax.process_count(),
                                         config.eval.batch_size, dataset.num_batches)
  shown = progress.bar(dataset.num_records, desc=f"embed {domain}", unit="item",
                       disable=not show_progress or jax.process_index() != 0)
  # Closed however the loop ends (a signal included): the bar ends its line.
  with shown, jax.set_mesh(mesh), nn.logical_axis_rules(
      sharding.logical_axis_rules(config.mesh)):
    for batch_index, host_batch in enumerate(dataset):
      batch = sharding.host_batch_to_global(host_batch, mesh)
      batch_embeddings = _local_rows(embed_fn(model_params, batch))
      valid = np.asarray(host_batch["valid"], bool)
      shown.update(rows_per_batch[batch_index] if batch_index < len(rows_per_batch)
                   else 0)
      yield (np.asarray(host_batch["id"])[valid], np.asarray(host_batch["product_id"])[valid],
             np.asarray(batch_embeddings, np.float32)[valid])


def global_rows_per_batch(num_records: int, process_count: int, batch_size: int,
                          num_batches: int) -> list[int]:
  """Records in batch i of all processes together, for each i (process p embeds the
  p-th contiguous part of the records, `batch_size` rows a batch, padded at its end)."""
  rows = [0] * num_batches
  for process in range(process_count):
    part = (num_records * (process + 1) // process_count
            - num_records * process // process_count)
    for index in range(num_batches):
      rows[index] += max(0, min(batch_size, part - index * batch_size))
  return rows


def embed_split(config: ml_collections.ConfigDict, model: nn.Module, model_params, domain: str,
                mesh: jax.sharding.Mesh, split: str | None = None,
                show_progress: bool = True) -> DomainEmbeddings:
  """Embeds every record of `split` (default config.data.eval_split) in `domain`."""
  ids, product_ids, embeddings = [], [], []
  for batch_ids, batch_product_ids, batch_embeddings in iter_embedding_batches(
      config, model, model_params, domain, mesh, split, show_progress):
    ids.append(batch_ids)
    product_ids.append(batch_product_ids)
    embeddings.append(batch_embeddings)
  dim = config.model.emb_dim
  return DomainEmbeddings(
      domain=domain,
      ids=np.concatenate(ids) if ids else np.zeros((0,), object),
      product_ids=np.concatenate(product_ids) if product_ids else np.zeros((0,), object),
      embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32))


def gather_objects(value) -> list:
  """Every process's `value` (picklable), in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  payload = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  gathered = multihost_utils.process_allgather(padded)
  return [pickle.loads(gathered[i, :int(sizes[i, 0])].tobytes()) for i in range(len(sizes))]


def gather_to_all(local: DomainEmbeddings) -> DomainEmbeddings:
  """Concatenates every process's rows (in process order) on every process."""
  if jax.process_count() == 1:
    return local
  parts = gather_objects((local.ids, local.product_ids, local.embeddings))
  return DomainEmbeddings(
      domain=local.domain,
      ids=np.concatenate([p[0] for p in parts]),
      product_ids=np.concatenate([p[1] for p in parts]),
      embeddings=np.concatenate([p[2] for p in parts]))

