"""Every entry point goes through one command-line layer (`cope_jax/base/command_line.py`):
--help lists its own flags with their defaults, one line each; a typo'd config field is
named with the nearest valid fields (exit 1, one paragraph); a malformed command line is
a usage error (exit 2).

Entry points run in-process (`main(argv)` raises CommandExit instead of ending the
process), and once as programs (`python -m` through runpy, all in one subprocess) so that
their `__main__` blocks are covered too.
"""

import importlib
import os
import subprocess
import sys

import pytest

from cope_jax.base import command_line

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic_tiny.py")

# module -> (its own flags, required flags with a stand-in value). A config command's
# flags include --config; --workdir where the job reads or writes one.
ENTRY_POINTS = {
    "cope_jax.train": (("config", "workdir"), {}),
    "cope_jax.evaluate": (("config", "workdir"), {}),
    "cope_jax.export": (("config", "workdir", "out", "split", "rope_dir", "resume", "format"),
                        {"out": "OUT"}),
    "cope_jax.convert": (("config", "torch_checkpoint", "kind", "out", "allow_missing",
                          "ignore_unused"),
                         {"torch_checkpoint": "model.pt", "kind": "cope", "out": "OUT"}),
    "cope_jax.report": (("config", "workdir"), {}),
    "cope_jax.serving": (("config", "workdir", "out", "batch_size", "platforms", "domains"),
                         {"out": "OUT"}),
    "cope_jax.compare": (("reference", "candidate", "rope_dir", "split", "out",
                          "one_shot_draws"), {}),
    "data_pipelines.prepare": (("rope_dir", "out", "splits", "num_frames", "workers"), {}),
    "data_pipelines.download": (("rope_dir", "url_prefix", "split", "out", "workers",
                                 "timeout", "retries"), {}),
    "data_pipelines.synthetic": (("out", "products", "test_products", "seed",
                                  "inject_faults"), {}),
}
CONFIG_COMMANDS = [name for name, (own, _) in ENTRY_POINTS.items() if "config" in own]
COMMON_FLAGS = ("traceback", "verbosity")


def _main(module_name: str):
  return importlib.import_module(module_name).main


def _prog(module_name: str) -> str:
  return f"python -m {module_name}"


def _flag_lines(help_text: str) -> list[str]:
  return help_text.split("\nflags:\n", 1)[1].splitlines()


@pytest.mark.parametrize("module_name", sorted(ENTRY_POINTS))
def test_help_lists_the_commands_own_flags_with_defaults(module_name, capsys):
  _main(module_name)(["--help"])  # returns: exit status 0
  printed = capsys.readouterr().out
  assert printed.startswith(f"usage: {_prog(module_name)} ")
  own, _ = ENTRY_POINTS[module_name]
  lines = _flag_lines(printed)
  assert all(line.startswith("  --") for line in lines), lines  # one line per flag
  named = {line.split()[0].split("=")[0].replace("--[no]", "--") for line in lines}
  for flag in own + COMMON_FLAGS:
    assert f"--{flag}" in named, (flag, printed)
  # Only its own: none of absl's or JAX's flags.
  assert not named & {"--flagfile", "--undefok", "--logtostderr", "--only_check_args",
                      "--pdb_post_mortem", "--helpfull", "--log_dir"}, named
  assert "--jax_" not in printed and len(named) < 25
  if "workdir" in own:
    assert any(line.startswith("  --workdir=DIR (required)") for line in lines)
  if "config" in own:
    assert any(line.startswith("  --config.FIELD=VALUE") for line in lines)


def test_help_shows_defaults(capsys):
  _main("data_pipelines.download")(["--help"])
  lines = _flag_lines(capsys.readouterr().out)
  assert any(line.startswith("  --workers=32 ") for line in lines)
  assert any(line.startswith("  --split=all ") for line in lines)
  assert any(line.startswith("  --rope_dir=VALUE (required) ") for line in lines)
  _main("cope_jax.convert")(["--help"])
  lines = _flag_lines(capsys.readouterr().out)
  assert any(line.startswith("  --config=configs/rope_vitb16.py ") for line in lines)
  assert any(line.startswith("  --[no]allow_missing=false ") for line in lines)


def _config_command(module_name: str, tmp_path, *extra: str) -> list[str]:
  _, required = ENTRY_POINTS[module_name]
  argv = [f"--config={CONFIG}"]
  if "workdir" in ENTRY_POINTS[module_name][0]:
    argv.append(f"--workdir={tmp_path}")
  return argv + [f"--{name}={value}" for name, value in required.items()] + list(extra)


@pytest.mark.parametrize("module_name", CONFIG_COMMANDS)
@pytest.mark.parametrize("override, nearest", [
    ("--config.train.batch_sise=4", "--config.train.batch_size"),
    ("--config.optim.lr_factor.text=2", "--config.optim.lr_factors.text"),
])
def test_a_typod_config_field_is_named_with_the_nearest_fields(module_name, override, nearest,
                                                               tmp_path, capsys):
  with pytest.raises(command_line.CommandExit) as ended:
    _main(module_name)(_config_command(module_name, tmp_path, override))
  assert ended.value.code == 1
  printed = capsys.readouterr().err.strip().splitlines()
  assert len(printed) == 2, printed  # one paragraph: the error, then how to see more
  field = override.split("=")[0]
  assert printed[0].startswith(f"error: ConfigFieldError: {field}: the config has no field")
  assert f"did you mean {nearest}" in printed[0]
  assert "Traceback" not in printed[0] and "--traceback" in printed[1]
  assert os.listdir(tmp_path) == []  # nothing ran


@pytest.mark.parametrize("module_name", sorted(ENTRY_POINTS))
def test_a_malformed_command_line_is_a_usage_error(module_name, tmp_path, capsys):
  own, _ = ENTRY_POINTS[module_name]
  typo = f"--{own[-1]}x=1"  # a flag name one letter off
  with pytest.raises(command_line.CommandExit) as ended:
    _main(module_name)([typo])
  assert ended.value.code == 2
  printed = capsys.readouterr().err.strip().splitlines()
  assert printed[0].startswith("usage error: Unknown command line flag")
  assert f"Did you mean: {own[-1]}" in printed[0]
  assert printed[1] == f"(`{_prog(module_name)} --help` lists the flags)"
  with pytest.raises(command_line.CommandExit) as ended:  # a required flag missing
    _main(module_name)([])
  assert ended.value.code == 2
  assert capsys.readouterr().err.startswith("usage error: missing --")


RUN_AS_PROGRAMS = """
import runpy, sys
for module in sys.argv[1:]:
  sys.argv = ["-m", "--help"]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
  print("== end of", module, flush=True)
"""


def test_every_entry_point_runs_as_a_program():
  modules = sorted(ENTRY_POINTS)
  result = subprocess.run([sys.executable, "-c", RUN_AS_PROGRAMS, *modules], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for module in modules:
    assert f"usage: {_prog(module)} " in result.stdout and f"== end of {module}" in result.stdout
  typo = subprocess.run([sys.executable, "-m", "cope_jax.train", f"--config={CONFIG}",
                         "--workdir=unused", "--config.train.batch_sise=4"], cwd=REPO_ROOT,
                        env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert typo.returncode == 1 and len(typo.stderr.strip().splitlines()) == 2, typo.stderr
  assert "did you mean --config.train.batch_size" in typo.stderr


def test_traceback_flag_prints_the_traceback_instead(tmp_path, capsys):
  with pytest.raises(command_line.CommandExit) as ended:
    _main("cope_jax.train")(_config_command("cope_jax.train", tmp_path,
                                            "--config.train.batch_sise=4", "--traceback"))
  assert ended.value.code == 1
  printed = capsys.readouterr().err
  assert printed.startswith("Traceback (most recent call last):")
  assert "ConfigFieldError: --config.train.batch_sise" in printed
