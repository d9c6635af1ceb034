r"""Kill soak: training stopped at random moments resumes to the uninterrupted result.

  python -m benchmarks.soak --kills 20            # about 10 minutes on 2 CPU cores
  python -m benchmarks.soak --kills 5             # what tests/test_reliability.py runs
  python -m benchmarks.soak --signal TERM --kills 20   # SIGTERM instead of SIGKILL
  python -m benchmarks.soak --signal INT --kills 10    # SIGINT (Ctrl-C)
  python -m benchmarks.soak --signal KILL,TERM,INT --kills 9   # the lives take turns

Trains the tiny test config (`cope_jax/testing/tiny_configs.py`) on a synthetic ROPE dataset made in
a temporary folder, 8 fake CPU devices: first without interruption (the reference), then
the same command again and again, each time killed with SIGKILL. Half of the kills (the
even ones) strike while a checkpoint is being written (as soon as Orbax's temporary step
folder appears, at the first, second or third save of that life); the others come a
random 0-1 s after the run has logged one to six new steps (often during a write too).
After the last kill the command runs to the end and its final parameters are compared
with the reference.

With `--signal TERM` or `--signal INT` each life gets that signal instead (same moments)
and must stop by itself: each life's exit status (143 or 130), the seconds from the
signal to its exit, and its newest checkpoint against the last step it logged (the
step it stopped at is saved) are recorded; `all_stopped_cleanly` says whether every
signalled life did so within `--max_stop_seconds`. A list (`--signal KILL,TERM,INT`)
gives the lives those signals in turn.

Prints a table (and writes benchmarks/results/soak.json): kills, kills during a
checkpoint write, the steps the runs resumed from, damaged steps reported, wall time of
the soak against the uninterrupted run, and the largest absolute parameter difference
(0 when identical).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from cope_jax.base import workdir as workdir_layout
from cope_jax.testing import tiny_configs
# pylint: enable=g-import-not-at-top,wrong-import-position

TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a step folder being written
POLL_SECONDS = 0.002
LIFE_TIMEOUT_SECONDS = 300
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
MAX_STOP_SECONDS = 30.0  # from a SIGTERM/SIGINT to the exit, checkpoint written


@dataclasses.dataclass
class Life:
  """One run of the training command."""
  plan: str  # "write 2": killed during its 2nd checkpoint write; "steps 3": after 3 steps
  signal: str = "KILL"  # what it gets: KILL, TERM or INT
  killed: bool = False
  killed_during_write: bool = False
  resumed_from: int | None = None
  damaged_reports: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  returncode: int | None = None
  stop_seconds: float | None = None  # from the signal to the exit (SIGTERM/SIGINT)
  last_logged: int | None = None  # the last step in metrics.jsonl when the life ended
  newest_checkpoint: int | None = None  # the newest committed step when the life ended


def train_command(workdir: str, prepared_dir: str, rope_dir: str, num_steps: int,
                  checkpoint_every: int) -> list[str]:
  return [sys.executable, "-m", "cope_jax.train", "--config",
          os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py"), "--workdir", workdir,
          *tiny_configs.command_line_overrides(prepared_dir, rope_dir),
          f"--config.train.num_steps={num_steps}",
          f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.log_every=1"]


def subprocess_env(cache_dir: str | None, platform: str = "cpu") -> dict[str, str]:
  """The environment of the runs: 8 fake CPU devices, a shared compilation cache."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS=platform, PYTHONUNBUFFERED="1")
  if platform == "cpu":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _logged_steps(workdir: str) -> int:
  try:
    with open(workdir_layout.training_log(workdir), encoding="utf-8") as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _last_logged_step(workdir: str) -> int | None:
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
  except FileNotFoundError:
    return None
  return int(json.loads(lines[-1])["step"]) if lines else None


def _newest_checkpoint(workdir: str) -> int | None:
  try:
    steps = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
             if name.isdigit()]
  except FileNotFoundError:
    return None
  return max(steps) if steps else None


def _writing(workdir: str) -> bool:
  try:
    return any(TMP_MARKER in name for name in os.listdir(workdir_layout.checkpoints_dir(workdir)))
  except FileNotFoundError:
    return False


def _run_life(command: list[str], env: dict[str, str], workdir: str, plan: str,
              rng: random.Random, log_dir: str, index: int,
              stop_signal: int = signal.SIGKILL) -> Life:
  """Starts the command and signals it as `plan` says (or lets it finish)."""
  life = Life(plan=plan, signal=signal.Signals(stop_signal).name[len("SIG"):])
  out_path = os.path.join(log_dir, f"life-{index:03d}.out")
  started = time.monotonic()
  with open(out_path, "w", encoding="utf-8") as out:
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    kind, count = plan.split() if plan != "finish" else ("finish", "0")
    count = int(count)
    logged_at_start = _logged_steps(workdir)
    # A write is a temporary step folder appearing; one left by the previous kill (removed
    # by this run at start-up) does not count.
    writes_seen, was_writing = 0, _writing(workdir)
    deadline = started + LIFE_TIMEOUT_SECONDS
    kill_at = signalled_at = None
    while process.poll() is None and time.monotonic() < deadline:
      if kind == "write":
        writing = _writing(workdir)
        if writing and not was_writing:
          writes_seen += 1
          if writes_seen >= count:
            process.send_signal(stop_signal)
            signalled_at = time.monotonic()
            life.killed, life.killed_during_write = True, True
            break
        was_writing = writing
      elif kind == "steps":
        if kill_at is None and _logged_steps(workdir) >= logged_at_start + count:
          kill_at = time.monotonic() + rng.uniform(0.0, 1.0)
        if kill_at is not None and time.monotonic() >= kill_at:
          life.killed_during_write = _writing(workdir)
          process.send_signal(stop_signal)
          signalled_at = time.monotonic()
          life.killed = True
          break
      time.sleep(POLL_SECONDS)
    if process.poll() is None and not life.killed:
      process.send_signal(signal.SIGKILL)  # over its time limit
      life.killed = True
    if life.killed and stop_signal != signal.SIGKILL and process.poll() is None:
      try:
        process.wait(timeout=LIFE_TIMEOUT_SECONDS)
      except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)  # it did not stop: recorded as status -9
    life.returncode = process.wait()
    if signalled_at is not None and stop_signal != signal.SIGKILL:
      life.stop_seconds = time.monotonic() - signalled_at
  life.seconds = time.monotonic() - started
  life.last_logged = _last_logged_step(workdir)
  life.newest_checkpoint = _newest_checkpoint(workdir)
  with open(out_path, encoding="utf-8") as f:
    text = f.read()
  resumed = re.findall(r"resumed from .*/checkpoints/(\d+)", text)
  life.resumed_from = int(resumed[-1]) if resumed else None
  life.damaged_reports = re.findall(r"checkpoint step \d+ .* is damaged: .*", text)
  if kind == "finish" and life.returncode != 0:
    raise RuntimeError(f"the final run failed (status {life.returncode}):\n{text[-3000:]}")
  return life


def final_params(workdir: str, step: int) -> dict[str, np.ndarray]:
  """'path' -> array of the step's saved model and classifier parameters."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  manager = ocp.CheckpointManager(workdir_layout.checkpoints_dir(os.path.abspath(workdir)),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  flat = jax.tree_util.tree_flatten_with_path(restored["state"]["params"])[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
          for path, leaf in flat}


def max_abs_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  if set(a) != set(b):
    return float("inf")
  return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
              if a[k].size else 0.0) for k in a)


def run_soak(prepared_dir: str, rope_dir: str, root: str, kills: int, num_steps: int,
             checkpoint_every: int = 2, seed: int = 0, cache_dir: str | None = None,
             platform: str = "cpu", reference_workdir: str | None = None,
             signal_name: str = "KILL", max_stop_seconds: float = MAX_STOP_SECONDS,
             reference_checkpoint_every: int | None = None) -> dict[str, Any]:
  """Runs the soak in `root`; returns the result (see the module docstring).

  Args:
    reference_workdir: an uninterrupted run of the same command, if one exists already.
    signal_name: KILL, TERM or INT: what each life gets; a comma-separated list of them
      (`"KILL,TERM"`): the lives get them in turn.
    max_stop_seconds: (TERM, INT) the longest a life may take from the signal to its exit.
    reference_checkpoint_every: the uninterrupted run's checkpoint cadence (default: the
      lives'); `num_steps` writes one checkpoint, at the end, for a quicker reference
      (the saves do not change the training: the comparison checks that too).
  """
  stop_signals = [SIGNALS[name.strip()] for name in signal_name.split(",")]
  rng = random.Random(seed)
  env = subprocess_env(cache_dir, platform)
  log_dir = os.path.join(root, "logs")
  os.makedirs(log_dir, exist_ok=True)
  started = time.monotonic()
  if reference_workdir is None:
    reference_workdir = os.path.join(root, "uninterrupted")
    reference = _run_life(train_command(reference_workdir, prepared_dir, rope_dir, num_steps,
                                        reference_checkpoint_every or checkpoint_every),
                          env, reference_workdir, "finish", rng, log_dir, 0)
    reference_seconds = reference.seconds
  else:
    reference_seconds = float("nan")
  workdir = os.path.join(root, "killed")
  command = train_command(workdir, prepared_dir, rope_dir, num_steps, checkpoint_every)
  lives = []
  soak_started = time.monotonic()
  for index in range(kills):
    plan = f"write {rng.randint(1, 3)}" if index % 2 == 0 else f"steps {rng.randint(1, 6)}"
    life = _run_life(command, env, workdir, plan, rng, log_dir, index + 1,
                     stop_signals[index % len(stop_signals)])
    lives.append(life)
    if not life.killed:  # it reached the last step before the planned kill
      break
  lives.append(_run_life(command, env, workdir, "finish", rng, log_dir, len(lives) + 1))
  soak_seconds = time.monotonic() - soak_started
  difference = max_abs_difference(final_params(reference_workdir, num_steps),
                                  final_params(workdir, num_steps))
  signalled = [life for life in lives if life.killed and life.signal != "KILL"]
  clean = [life for life in signalled
           if life.returncode == 128 + int(SIGNALS[life.signal])
           and life.stop_seconds is not None and life.stop_seconds <= max_stop_seconds
           and life.newest_checkpoint is not None
           and life.newest_checkpoint == life.last_logged]
  only_kills = all(sig == signal.SIGKILL for sig in stop_signals)
  return {
      "signal": signal_name,
      "stopped_cleanly": None if only_kills else len(clean),
      "all_stopped_cleanly": None if only_kills else len(clean) == len(signalled),
      "max_stop_seconds": max((life.stop_seconds for life in signalled
                               if life.stop_seconds is not None), default=None),
      "kills_requested": kills,
      "kills": sum(life.killed for life in lives),
      "kills_during_checkpoint_write": sum(life.killed_during_write for life in lives),
      "resumed_from": [life.resumed_from for life in lives],
      "damaged_reports": [report for life in lives for report in life.damaged_reports],
      "lives": [dataclasses.asdict(life) for life in lives],
      "num_steps": num_steps,
      "checkpoint_every": checkpoint_every,
      "seed": seed,
      "uninterrupted_seconds": reference_seconds,
      "soak_seconds": soak_seconds,
      "total_seconds": time.monotonic() - started,
      "max_abs_param_difference": difference,
      "identical": difference == 0.0,
  }


def make_dataset(root: str) -> tuple[str, str]:
  """The tests' tiny synthetic ROPE dataset, prepared (rope_dir, prepared_dir)."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  rope_dir, prepared_dir = os.path.join(root, "rope"), os.path.join(root, "prepared")
  synthetic.generate(rope_dir, products=16, test_products=8, frames_per_clip=4,
                     image_size=32, seed=0)
  prepare.prepare(rope_dir, prepared_dir, num_shards=3, progress=False,
                  log=lambda line: None)
  return rope_dir, prepared_dir


def print_table(result: dict[str, Any]) -> None:
  rows = [
      ("signal", ", ".join(f"SIG{name}" for name in result["signal"].split(","))),
      ("kills (requested)", f"{result['kills']} ({result['kills_requested']})"),
      ("kills during a checkpoint write", str(result["kills_during_checkpoint_write"])),
      ("resumed from steps", " ".join("-" if s is None else str(s)
                                      for s in result["resumed_from"])),
      ("damaged steps reported", str(len(result["damaged_reports"]))),
      ("uninterrupted run (s)", f"{result['uninterrupted_seconds']:.1f}"),
      ("soak, all lives (s)", f"{result['soak_seconds']:.1f}"),
      ("soak / uninterrupted", f"{result['soak_seconds'] / result['uninterrupted_seconds']:.1f}"),
      ("max |param difference|", f"{result['max_abs_param_difference']:.3g}"),
      ("identical final parameters", "yes" if result["identical"] else "NO"),
  ]
  if result["stopped_cleanly"] is not None:
    rows[2:2] = [
        ("stopped cleanly (status, saved step)",
         f"{result['stopped_cleanly']} of "
         f"{sum(life['killed'] and life['signal'] != 'KILL' for life in result['lives'])}"),
        ("longest signal-to-exit (s)", f"{result['max_stop_seconds'] or 0:.1f}"),
    ]
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")


def main() -> None:
  parser = common.parser(
      __doc__, out_help="default benchmarks/results/soak.json (soak-term.json, ...)")
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--signal", default="KILL",
                      help="what each life gets: KILL (kill -9), TERM or INT, or a "
                           "comma-separated list of them that the lives take in turn")
  parser.add_argument("--max_stop_seconds", type=float, default=MAX_STOP_SECONDS)
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps (default: 4 per kill, at least 16)")
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the runs")
  parser.add_argument("--root", default="", help="working folder (default: a temporary one)")
  args = parser.parse_args()
  unknown = [name for name in args.signal.split(",") if name.strip() not in SIGNALS]
  if unknown:
    parser.error(f"--signal: unknown {', '.join(unknown)} (choose from "
                 f"{', '.join(sorted(SIGNALS))})")
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only managers
  if args.platform == "cpu":  # read the runs' 8-device checkpoints with as many devices
    os.environ["XLA_FLAGS"] = subprocess_env(None)["XLA_FLAGS"]
  num_steps = args.steps or max(16, 4 * args.kills)
  root = args.root or tempfile.mkdtemp(prefix="cope-soak-")
  rope_dir, prepared_dir = make_dataset(os.path.join(root, "data"))
  result = run_soak(prepared_dir, rope_dir, root, args.kills, num_steps, args.checkpoint_every,
                    args.seed, cache_dir=os.path.join(root, "jax-cache"),
                    platform=args.platform, signal_name=args.signal,
                    max_stop_seconds=args.max_stop_seconds)
  print_table(result)
  suffix = "" if args.signal == "KILL" else "-" + args.signal.lower().replace(",", "-")
  args.out = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", f"soak{suffix}.json")
  result["machine"] = common.machine(jax_platforms=args.platform)
  common.write_result(args.out, result)
  print(f"logs of each run under {root}/logs")
  if not result["identical"] or result["all_stopped_cleanly"] is False:
    sys.exit(1)


if __name__ == "__main__":
  main()
