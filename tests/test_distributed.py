"""Multi-process settings and messages without starting processes: what is read (and
refused) to say "distributed", and the stderr filter that ends a runtime abort with a
paragraph instead of a C++ stack trace. (Real processes: tests/test_multihost.py.)"""

import io
import math
import os
import subprocess
import sys
import types

import pytest

from configs import common
from cope_jax import distributed
from cope_jax import embed
from cope_jax import stderr_filter

ADDRESS = "10.0.0.1:1234"


def _config(**fields):
  """A config with the `distributed` section every config has, some fields changed."""
  section = common.distributed_config()
  for name, value in fields.items():
    section[name] = value
  return {"distributed": section}


@pytest.mark.parametrize("environ, expected", [
    ({}, (False, None, None, None)),
    ({"COPE_COORDINATOR_ADDRESS": ADDRESS, "COPE_NUM_PROCESSES": "2", "COPE_PROCESS_ID": "1"},
     (True, ADDRESS, 2, 1)),
    # JAX's own names, with the documented switch (once not read: each process trained
    # alone) or on their own.
    ({"COPE_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": ADDRESS, "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"}, (True, ADDRESS, 2, 1)),
    ({"JAX_COORDINATOR_ADDRESS": ADDRESS, "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     (True, ADDRESS, 4, 3)),
    # COPE_* wins over JAX_*.
    ({"COPE_COORDINATOR_ADDRESS": ADDRESS, "JAX_COORDINATOR_ADDRESS": "other:1",
      "COPE_NUM_PROCESSES": "2", "JAX_NUM_PROCESSES": "3", "COPE_PROCESS_ID": "0"},
     (True, ADDRESS, 2, 0)),
    # Switched on with no address: JAX discovers the cluster (nothing invented).
    ({"COPE_DISTRIBUTED": "yes"}, (True, None, None, None)),
])
def test_what_is_read(environ, expected):
  settings = distributed.resolve_settings(_config(), environ)
  assert (settings.enabled, settings.coordinator_address, settings.num_processes,
          settings.process_id) == expected


def test_the_config_fields_and_timeouts_are_read():
  settings = distributed.resolve_settings(
      _config(enabled=True, coordinator_address=ADDRESS, num_processes=2, process_id=1,
              initialization_timeout=7, heartbeat_timeout=5), {})
  assert (settings.enabled, settings.coordinator_address, settings.num_processes,
          settings.process_id) == (True, ADDRESS, 2, 1)
  assert (settings.initialization_timeout, settings.heartbeat_timeout,
          settings.shutdown_timeout) == (7, 5, 300)


@pytest.mark.parametrize("environ, config_fields, message", [
    # Several processes said, but start-up off: it would train on its own.
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, {},
     "JAX_NUM_PROCESSES=2 says 2 processes, but multi-process start-up is off"),
    ({"COPE_NUM_PROCESSES": "2"}, {}, "COPE_NUM_PROCESSES=2 says 2 processes"),
    ({"COPE_DISTRIBUTED": "0", "COPE_NUM_PROCESSES": "2",
      "COPE_COORDINATOR_ADDRESS": ADDRESS}, {}, "but COPE_DISTRIBUTED=0"),
    ({}, {"num_processes": 2}, "config.distributed.num_processes=2 says 2 processes"),
    ({"COPE_DISTRIBUTED": "maybe"}, {}, "COPE_DISTRIBUTED='maybe'"),
    ({"COPE_COORDINATOR_ADDRESS": ADDRESS, "COPE_NUM_PROCESSES": "two"}, {},
     "COPE_NUM_PROCESSES=two: 'two' is not an integer"),
    ({"COPE_COORDINATOR_ADDRESS": ADDRESS, "COPE_NUM_PROCESSES": "2",
      "COPE_PROCESS_ID": "2"}, {}, r"COPE_PROCESS_ID=2 2 is outside \[0, 2\)"),
    ({}, {"heartbeat_timeout": 0}, "config.distributed.heartbeat_timeout"),
])
def test_contradictions_are_refused(environ, config_fields, message):
  with pytest.raises(distributed.DistributedConfigError, match=message):
    distributed.resolve_settings(_config(**config_fields), environ)


def test_an_unread_process_count_refuses_to_start_a_job(tmp_path):
  # The whole command: it stops before JAX starts, naming the variable.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="1")
  for name in ("COPE_DISTRIBUTED", "COPE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
               "COPE_NUM_PROCESSES"):
    env.pop(name, None)
  result = subprocess.run(
      [sys.executable, "-m", "cope_jax.train", "--config",
       os.path.join(repo, "configs", "synthetic_tiny.py"), "--workdir", str(tmp_path)],
      cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "error: DistributedConfigError: JAX_NUM_PROCESSES=2 says 2 processes" in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


# ---- the stderr filter --------------------------------------------------------------

ABORT = (
    b"train:  10%|#  | 4/40\rtrain:  12%|#  | 5/40"  # a progress bar: no newline
    b"\nE1206 10:57:50.119524 5259 coordination_service_agent.cc:289] Polled an error\n"
    b"F1206 10:57:50.119530 5259 client.h:80] Terminating process because the JAX "
    b"distributed service detected fatal errors. absl::Status: UNAVAILABLE: The following "
    b"tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
    b"*** Check failure stack trace: ***\n"
    b"    @     0x7fcee7640634  absl::log_internal::LogMessage::SendToLog()\n"
    b"    @     0x7fcee76405b6  absl::log_internal::LogMessage::Flush()\n"
    b"E1206 10:57:50.312157 5259 coredump_hook.cc:349] RAW: Skipping coredump\n")


def _filtered(data: bytes, **options) -> str:
  read, write = os.pipe()
  os.write(write, data)
  os.close(write)
  sink = io.BytesIO()
  defaults = dict(process_id=0, num_processes=2, address=ADDRESS, initialization_timeout=9,
                  heartbeat_timeout=5)
  stderr_filter.run(read, sink, types.SimpleNamespace(**dict(defaults, **options)))
  os.close(read)
  return sink.getvalue().decode()


def test_the_filter_drops_the_stack_trace_and_names_the_lost_process():
  text = _filtered(ABORT)
  assert "train:  12%|#  | 5/40" in text  # everything else passes
  assert "Terminating process because" in text and "unhealthy" in text
  assert "@     0x" not in text and "Check failure" not in text and "RAW:" not in text
  last = text.strip().splitlines()
  assert last[-2] == (
      "error: PeerLostError: process 0 of 2 was ended by JAX's distributed runtime: process "
      "1 of 2 stopped sending heartbeats for 5 s (config.distributed.heartbeat_timeout): it "
      "died, was killed or hangs.")
  assert last[-1].startswith("(the runtime's message is above")


@pytest.mark.parametrize("details, process_id, reason", [
    (b"absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination."
     b"CoordinationService/RegisterTask\n", 1,
     f"not all 2 processes connected to the coordinator at {ADDRESS} within 9 s"),
    (b"absl::Status: UNAVAILABLE: Failed to send RPC to coordination service.\n"
     b':UNKNOWN:Error received from peer  {grpc_message:"Socket closed"}\n', 1,
     f"the coordinator, process 0 of 2 at {ADDRESS}, is gone"),
    (b"Barrier timed out. Some timed out task names:\n1\n", 0,
     "process 1 of 2 did not reach a barrier in time"),
])
def test_the_filter_names_what_was_lost(details, process_id, reason):
  text = _filtered(b"F1206 10:48:39.045892 27163 client.h:80] Terminating process because "
                   b"the JAX distributed service detected fatal errors. " + details
                   + b"*** Check failure stack trace: ***\n    @     0x7f  x()\n",
                   process_id=process_id)
  assert reason in text.strip().splitlines()[-2]
  assert "0x7f" not in text


def test_without_an_abort_the_filter_only_passes_output_through():
  data = b"waiting for 2 processes\n\rtrain: 1/4\rtrain: 4/4\nstopped at step 4\n"
  assert _filtered(data) == data.decode()


@pytest.mark.parametrize("num_records, process_count, batch_size", [
    (25, 2, 8), (7, 2, 8), (16, 1, 8), (3, 4, 2)])
def test_process_0_progress_counts_every_process_rows(num_records, process_count, batch_size):
  largest_part = math.ceil(num_records / process_count)  # as the eval pipeline splits
  num_batches = max(1, math.ceil(largest_part / batch_size))
  rows = embed.global_rows_per_batch(num_records, process_count, batch_size, num_batches)
  assert sum(rows) == num_records  # the bar reaches 100%, not 1 / process_count of it
  assert all(0 <= r <= batch_size * process_count for r in rows)
