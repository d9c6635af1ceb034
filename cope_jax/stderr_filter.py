"""The stderr of a multi-process job, without C++ stack traces, ending with a paragraph.

JAX's distributed runtime ends a process from C++ when it loses its peers: a process that
did not come at start-up, one that stopped sending heartbeats, process 0 (which runs the
coordination service) gone. It logs one fatal line, a C++ stack trace, and aborts; nothing
of the job's Python code runs after it. So the job's stderr is read by this small program
(a child process, started by `cope_jax.distributed`, that outlives the abort). It passes
every byte through as it comes (progress bars included), except the stack-trace lines,
and when the runtime's fatal line was seen, ends with one paragraph naming what was lost:

  error: PeerLostError: process 0 of 2 was ended by JAX's distributed runtime: ...

It imports only the standard library and runs as a script:
`python cope_jax/stderr_filter.py --process_id=0 --num_processes=2 --address=HOST:PORT
--initialization_timeout=S --heartbeat_timeout=S < job's stderr`.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys

FATAL_LINE = re.compile(rb"^F\d{4} .*Terminating process because the JAX distributed service")
DROPPED_LINES = (
    re.compile(rb"^\*\*\* Check failure stack trace: \*\*\*"),
    re.compile(rb"^\s+@\s+0x[0-9a-f]+\s"),  # a stack frame
    re.compile(rb"^PC: @\s+0x"),
    re.compile(rb"^\*\*\* SIG[A-Z]+ received by PID"),
    re.compile(rb"^https://symbolize\."),
    re.compile(rb"^[EW]\d{4} .* RAW: "),  # crash-report hooks after the abort
)
PARTIAL_WAIT_SECONDS = 0.05  # how long an unterminated line waits before passing through


def reason(details: str, process_id: int, num_processes: int, address: str,
           initialization_timeout: int, heartbeat_timeout: int) -> str:
  """What the runtime's fatal log (`details`) says was lost, in one sentence."""
  count = f" of {num_processes}" if num_processes > 0 else ""
  if "RegisterTask" in details or ("Connect" in details and "DEADLINE_EXCEEDED" in details):
    every = f"all {num_processes}" if num_processes > 0 else "all"
    return (f"not {every} processes connected to the coordinator at {address or '?'} "
            f"within {initialization_timeout} s (config.distributed.initialization_timeout). "
            "Start every process with the same coordinator address and process count, each "
            "with its own process id (COPE_COORDINATOR_ADDRESS, COPE_NUM_PROCESSES, "
            "COPE_PROCESS_ID), and process 0 at that address")
  unhealthy = re.search(r"stopped sending heartbeats\)?:\s*([0-9,\s]+)", details)
  if unhealthy:
    ids = sorted({int(x) for x in re.findall(r"\d+", unhealthy.group(1))})
    named = ", ".join(str(x) for x in ids)
    return (f"process {named}{count} stopped sending heartbeats for {heartbeat_timeout} s "
            "(config.distributed.heartbeat_timeout): it died, was killed or hangs")
  timed_out = re.search(r"timed out task names:\s*([0-9,\s]+)", details)
  if timed_out:
    ids = sorted({int(x) for x in re.findall(r"\d+", timed_out.group(1))})
    return (f"process {', '.join(map(str, ids))}{count} did not reach a barrier in time: "
            "it died, was killed or hangs")
  if process_id != 0 and any(word in details for word in ("Socket closed", "UNAVAILABLE",
                                                           "Connection refused")):
    return (f"the coordinator, process 0{count} at {address or '?'}, is gone (it exited, "
            "failed or was killed; its log says why)")
  return "another process of the job died or failed (its log says why)"


def _passes(line: bytes) -> bool:
  return not any(pattern.match(line) for pattern in DROPPED_LINES)


def run(source: int, sink, options) -> None:
  """Copies `source` (a file descriptor) to `sink` (a binary file) until end of file."""
  pending = b""
  fatal: list[bytes] | None = None

  def emit(segment: bytes) -> None:
    nonlocal fatal
    if fatal is None and FATAL_LINE.match(segment):
      fatal = []
    if fatal is not None:
      fatal.append(segment)
    if _passes(segment):
      sink.write(segment)

  while True:
    ready, _, _ = select.select([source], [], [], PARTIAL_WAIT_SECONDS)
    if not ready:
      if pending and not pending.startswith((b"F", b"E", b"W", b"I", b" ")):
        sink.write(pending)  # a progress bar's unterminated update
        pending = b""
      sink.flush()
      continue
    chunk = os.read(source, 65536)
    if not chunk:
      break
    pending += chunk
    segments = re.split(rb"(?<=[\r\n])", pending)
    pending = segments.pop()  # "" or the unterminated rest
    for segment in segments:
      emit(segment)
    sink.flush()
  if pending:
    emit(pending + b"\n")
  if fatal is not None:
    details = b"".join(fatal).decode("utf-8", "replace")
    count = f" of {options.num_processes}" if options.num_processes > 0 else ""
    who = f"process {options.process_id}{count}" if options.process_id >= 0 else "this process"
    sink.write(
        f"error: PeerLostError: {who} was ended by JAX's distributed runtime: "
        f"{reason(details, options.process_id, options.num_processes, options.address, options.initialization_timeout, options.heartbeat_timeout)}.\n"
        "(the runtime's message is above; its C++ stack trace: COPE_TRACEBACK=1 or "
        "--traceback)\n".encode())
  sink.flush()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--process_id", type=int, default=-1)
  parser.add_argument("--num_processes", type=int, default=0)
  parser.add_argument("--address", default="")
  parser.add_argument("--initialization_timeout", type=int, default=300)
  parser.add_argument("--heartbeat_timeout", type=int, default=100)
  options = parser.parse_args()
  # The job decides when to stop; this reader must see its last words.
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
  try:
    run(sys.stdin.fileno(), sys.stderr.buffer, options)
  except BrokenPipeError:
    pass


if __name__ == "__main__":
  main()
