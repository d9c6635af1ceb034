"""TPU, without a TPU: the pinned libtpu, and the tiny step compiled for a TPU topology.

libtpu's compiler runs on this CPU host through `jax.experimental.topologies` topology
descriptions: steps are lowered over abstract arrays sharded on a mesh of those devices
and compiled for TPU, while the CPU stays the backend that runs everything else.
"""

import importlib.metadata
import pathlib
import re

import jax
from jax.sharding import PartitionSpec as P
from packaging.requirements import Requirement
import pytest

from benchmarks import tpu_compile
from benchmarks.tpu import collectives
from benchmarks.tpu import memory
from cope_jax import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(path: pathlib.Path) -> dict[str, str]:
  """name -> version of the `name==version` lines of a requirements file."""
  pins = {}
  for line in path.read_text().splitlines():
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s#;]+)", line)
    if match:
      pins[match.group(1).lower()] = match.group(2)
  return pins


def test_libtpu_pin_is_the_one_the_pinned_jax_asks_for():
  jax_pin = _pins(REPO_ROOT / "requirements.txt")["jax"]
  libtpu_pin = _pins(REPO_ROOT / "requirements-tpu.txt")["libtpu"]
  # The installed jax is the pinned one, so its metadata is the pin's.
  assert importlib.metadata.version("jax") == jax_pin
  tpu_extra = [Requirement(r) for r in importlib.metadata.requires("jax")
               if Requirement(r).name == "libtpu"
               and Requirement(r).marker is not None
               and Requirement(r).marker.evaluate({"extra": "tpu"})]
  assert tpu_extra, "jax declares no libtpu requirement for its [tpu] extra"
  for requirement in tpu_extra:
    assert requirement.specifier.contains(libtpu_pin), (
        f"requirements-tpu.txt pins libtpu=={libtpu_pin}; jax=={jax_pin}[tpu] asks for "
        f"libtpu{requirement.specifier}")
  assert importlib.metadata.version("libtpu") == libtpu_pin
  assert "-r requirements-tpu.txt" in (REPO_ROOT / "requirements-dev.txt").read_text()
  assert "libtpu" not in (REPO_ROOT / "requirements.txt").read_text()


# ---- the tiny training step compiled for a v5e 2x2 ------------------------------------

SCHEDULER_OPTION = "xla_tpu_scheduler_percent_shared_memory_limit=80"


@pytest.fixture(scope="module")
def tiny_v5e_step():
  """The tiny config's train step on a v5e 2x2 description: data 2 x model 2, so that
  the batch splits over 'data' and the MLP and attention kernels over 'model'."""
  devices = tpu_compile.topology_devices("v5e:2x2")
  config = tpu_compile.make_config("tiny", global_batch=4, layout="dp_mp2")
  # A TPU compiler option through the config, as a user sets it (README, TPU).
  config.train.compiler_options = SCHEDULER_OPTION
  mesh = sharding.make_mesh(config.mesh, devices)
  lowered, abstract = tpu_compile.lower_train_step(config, mesh)
  return lowered.compile(), abstract, mesh


@pytest.mark.slow
def test_the_config_compiler_options_reach_the_compiler():
  """The option the TPU compile above accepts is unknown to the CPU compiler: compiling
  the tiny step for the CPU with it fails naming it, so the option is passed."""
  devices = jax.devices("cpu")[:1]
  config = tpu_compile.make_config("tiny", global_batch=2)
  config.train.compiler_options = SCHEDULER_OPTION
  mesh = sharding.make_mesh(config.mesh, devices)
  lowered, _ = tpu_compile.lower_train_step(config, mesh)
  with pytest.raises(Exception, match="xla_tpu_scheduler_percent_shared_memory_limit"):
    lowered.compile()


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_v5e_topology(tiny_v5e_step):
  compiled, abstract, mesh = tiny_v5e_step
  assert dict(mesh.shape) == {"data": 2, "model": 2}
  assert {d.platform for d in mesh.devices.flat} == {"tpu"}
  assert jax.default_backend() == "cpu"  # the host still runs on the CPU
  memory = compiled.memory_analysis()
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "peak_memory_in_bytes"):
    assert getattr(memory, field) > 0, field
  assert memory.temp_size_in_bytes >= 0
  assert 0 < compiled.cost_analysis()["flops"]

  state_out, metrics_out = compiled.output_shardings
  # The new state keeps the shardings the state came in with (params, Adam moments).
  for got, leaf in zip(jax.tree.leaves(state_out), jax.tree.leaves(abstract)):
    assert got.is_equivalent_to(leaf.sharding, len(leaf.shape)), (got, leaf.sharding)
  block = abstract.params["model"]["visual_encoder"]["visual"]["transformer"]["resblocks_0"]
  assert block["mlp"]["c_fc"]["kernel"].sharding.spec == P(None, "model")
  assert block["attn"]["in_proj"]["kernel"].sharding.spec == P(None, None, "model", None)
  for value in jax.tree.leaves(metrics_out):
    assert value.is_fully_replicated
  batch_in = compiled.input_shardings[0][1]
  assert batch_in["page_image"].spec == P("data")
  # Data parallelism: the gradients are summed over 'data' by all-reduces.
  assert collectives.collectives(compiled.as_text(), 4)["all-reduce"]["count"] > 0


@pytest.mark.slow  # a compile of its own with XLA's dumps (~15 s on 2 cores)
def test_the_readers_of_xla_dumps_read_a_real_one(tmp_path):
  """The dump formats tests/test_tpu_parsers.py writes by hand are XLA's: a row compiled
  with a dump folder lists buffers, and the live ranges give a peak with values."""
  row = tpu_compile.compile_row("tiny", "v5e:2x2", "dp", "train", 1, dump_dir=str(tmp_path))
  assert row["fits"] and row["largest_buffers"]
  assert all(entry["mib"] >= 0 and "[" in entry["shapes"] for entry in row["largest_buffers"])
  live = memory.live_at_peak(str(tmp_path), min_bytes=0)
  assert live["instruction"] and live["values"] and live["peak_gib"] >= 0
  assert sum(value["mib"] for value in live["values"]) > 0
  assert row["collectives"]["all-reduce"]["count"] > 0
  assert row["projection"]["bound_by"] in ("compute", "HBM", "ICI", "DCN")


# ---- multi-slice: the 'data' axis over DCN and ICI -----------------------------------


def test_data_axis_spans_the_slices_of_a_multi_slice_topology():
  devices = tpu_compile.topology_devices("v5e:2x2", num_slices=2)
  config = tpu_compile.make_config("tiny", global_batch=8)
  mesh = sharding.make_mesh(config.mesh, devices)  # dcn_data -1: the devices' 2 slices
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  assert [d.slice_index for d in mesh.devices[:, 0]] == [0] * 4 + [1] * 4
  config.mesh.dcn_data = 1
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_data=1.*2 slice"):
    sharding.make_mesh(config.mesh, devices)


def test_dcn_data_off_multi_slice_devices_is_refused():
  config = tpu_compile.make_config("tiny")
  config.mesh.dcn_data = 2
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_data=2.*1 slice"):
    sharding.make_mesh(config.mesh, jax.devices())
  config.mesh.dcn_data = -1
  assert dict(sharding.make_mesh(config.mesh, jax.devices()).shape) == {"data": 8, "model": 1}


@pytest.mark.slow
def test_two_slice_train_step_reduces_over_ici_then_dcn():
  """Compiled for 2 slices of v5e 2x2: the gradient reduction is split into collectives
  within each slice (ICI, groups of its 4 chips) and transfers between the slices (DCN,
  the megascale runtime's all-reduce)."""
  devices = tpu_compile.topology_devices("v5e:2x2", num_slices=2)
  config = tpu_compile.make_config("tiny", global_batch=8)
  lowered, _ = tpu_compile.lower_train_step(config, sharding.make_mesh(config.mesh, devices))
  hlo = lowered.compile().as_text()
  found = collectives.collectives(hlo, 8)
  assert found["dcn-all-reduce"]["count"] > 0 and found["dcn-all-reduce"]["sent_bytes"] > 0
  assert found["all-reduce"]["count"] + found.get("reduce-scatter", {"count": 0})["count"] > 0
  groups = re.findall(r" (?:all-reduce|all-gather|reduce-scatter)\(.*?replica_groups=\{\{([\d,]*)\}",
                      hlo)
  assert groups and {len(g.split(",")) for g in groups} == {4}  # never across the slices


@pytest.mark.parametrize("start, threshold, want", [(16, 23, 23), (16, 5, 5), (4, 300, 256),
                                                     (16, 0, 0)])
def test_largest_batch_bisects_over_compiles(monkeypatch, start, threshold, want):
  """With a step that fits up to `threshold` per chip, the search finds it."""
  compiled = []

  def fake_compile_row(shape, topology, layout, step, batch, overrides=None):
    compiled.append(batch)
    return {"per_chip_batch": batch, "fits": batch <= threshold}

  monkeypatch.setattr(tpu_compile, "compile_row", fake_compile_row)
  fits, fails, rows = tpu_compile.largest_batch("stage2", "v5e:2x4", "dp", start, 256, 20,
                                                lambda row: None)
  assert fits == want
  assert fails == (None if threshold >= 256 else want + 1)
  assert len(rows) == len(compiled) <= 12
  assert all(b <= 256 for b in compiled)


def test_largest_batch_starts_inside_a_known_bracket_and_reports_an_unfinished_one(
    monkeypatch):
  compiled = []

  def fake_compile_row(shape, topology, layout, step, batch, overrides=None):
    compiled.append(batch)
    return {"per_chip_batch": batch, "fits": batch <= 21}

  monkeypatch.setattr(tpu_compile, "compile_row", fake_compile_row)
  fits, fails, _ = tpu_compile.largest_batch("stage2", "v5e:2x4", "dp", 16, 256, 20,
                                             lambda row: None, known_fits=16, known_fails=32)
  assert (fits, fails) == (21, 22)
  assert compiled == [24, 20, 22, 21]  # never 16 or 32 again
  compiled.clear()
  fits, fails, _ = tpu_compile.largest_batch("stage2", "v5e:2x4", "dp", 16, 256, 2,
                                             lambda row: None, known_fits=16, known_fails=32)
  assert (fits, fails) == (20, 24) and compiled == [24, 20]  # a bracket, not an answer
  with pytest.raises(ValueError, match="known_fits"):
    tpu_compile.largest_batch("stage2", "v5e:2x4", "dp", 16, 256, 2, lambda row: None,
                              known_fits=32, known_fails=16)


def test_attention_auto_is_xla_on_tpu():
  from cope_jax.models import layers  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  assert layers.resolve_attention("auto", jnp.bfloat16, "tpu") == "xla"
  assert layers.resolve_attention("auto", jnp.float32, "tpu") == "xla"
