"""Multi-process start-up: `jax.distributed.initialize` when the config or environment asks.

Set `config.distributed.enabled=True` with `coordinator_address`, `num_processes` and
`process_id`, or export COPE_COORDINATOR_ADDRESS, COPE_NUM_PROCESSES and COPE_PROCESS_ID
(convenient for launchers that start one identical command per host). On managed
clusters (TPU pods, SLURM) `enabled=True` with empty fields lets JAX discover them.
"""

from __future__ import annotations

import os

import jax
import ml_collections


def maybe_initialize(config: ml_collections.ConfigDict) -> bool:
  """Initialises the JAX distributed runtime if asked; returns whether it did."""
  settings = config.distributed
  address = os.environ.get("COPE_COORDINATOR_ADDRESS", settings.coordinator_address)
  num_processes = int(os.environ.get("COPE_NUM_PROCESSES", settings.num_processes))
  process_id = int(os.environ.get("COPE_PROCESS_ID", settings.process_id))
  if not (settings.enabled or "COPE_COORDINATOR_ADDRESS" in os.environ):
    return False
  # Cross-process collectives between CPU devices need an explicit implementation; the
  # setting does not touch accelerators. (No backend may be initialised before this point.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"config.distributed.process_id: {process_id} is outside "
                       f"[0, {num_processes})")
    jax.distributed.initialize(address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True
