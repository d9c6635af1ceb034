"""Tests for cope_jax.sharding on 8 fake CPU devices."""

import os

# Must be set before JAX initialises its backend.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
  os.environ["XLA_FLAGS"] = (
      _FLAGS + " --xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cope_jax import sharding


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: set XLA_FLAGS="
                "--xla_force_host_platform_device_count=8 before JAX starts")


def _mesh_config(data, model, rules=()):
  return ml_collections.ConfigDict({"data": data, "model": model, "dcn_data": -1,
                                    "rules": rules})


@pytest.mark.parametrize("data, model, want", [
    (8, 1, (8, 1)), (4, 2, (4, 2)), (-1, 1, (8, 1)), (-1, 2, (4, 2)),
    (2, -1, (2, 4)),
])
def test_make_mesh_shapes(data, model, want):
  mesh = sharding.make_mesh(_mesh_config(data, model))
  assert mesh.axis_names == ("data", "model")
  assert (mesh.shape["data"], mesh.shape["model"]) == want
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_uses_given_devices():
  mesh = sharding.make_mesh(_mesh_config(-1, 2), devices=jax.devices()[:4])
  assert (mesh.shape["data"], mesh.shape["model"]) == (2, 2)


@pytest.mark.parametrize("data, model, field", [
    (-1, 3, r"config\.mesh\.model=3"),
    (3, -1, r"config\.mesh\.data=3"),
    (4, 4, r"config\.mesh\.data=4 x config\.mesh\.model=4"),
    (0, 1, r"config\.mesh\.data"),
    (-1, -1, r"config\.mesh\.data and config\.mesh\.model"),
])
def test_make_mesh_bad_sizes_name_the_field(data, model, field):
  with pytest.raises(ValueError, match=field):
    sharding.make_mesh(_mesh_config(data, model))


def test_logical_axis_rules_from_config():
  config = _mesh_config(-1, 1, rules=(("batch", "data"),
                                      ("classes", ("data", "model")),
                                      ("embed", None)))
  rules = sharding.logical_axis_rules(config)
  assert rules == (("batch", "data"), ("classes", ("data", "model")),
                   ("embed", None))
  with pytest.raises(ValueError, match=r"config\.mesh\.rules\[1\].*'tensor'"):
    sharding.logical_axis_rules(
        _mesh_config(-1, 1, rules=(("batch", "data"), ("mlp", "tensor"))))


class _TinyMlp(nn.Module):
  """Two logically partitioned dense layers and one unannotated bias."""

  @nn.compact
  def __call__(self, x):  # x: [B, 4]
    x = nn.Dense(
        16, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("mlp",)))(x)
    x = nn.relu(x)
    x = nn.Dense(
        4, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")))(x)
    return x + self.param("offset", nn.initializers.zeros, (4,))


_REPLICATED_RULES = (("embed", None), ("mlp", None))
_MODEL_PARALLEL_RULES = (("embed", None), ("mlp", "model"))


def _expected_specs(rules):
  mlp = dict(rules)["mlp"]
  return {
      ("Dense_0", "kernel"): PartitionSpec(None, mlp),
      ("Dense_0", "bias"): PartitionSpec(mlp),
      ("Dense_1", "kernel"): PartitionSpec(mlp, None),
      ("Dense_1", "bias"): PartitionSpec(),
      ("offset",): PartitionSpec(),
  }


def _by_path(tree, is_leaf=None):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(key.key for key in path): value for path, value in flat}


def _same_sharding(a, b, ndim):
  return a.is_equivalent_to(b, ndim)


@pytest.mark.parametrize("rules", [_REPLICATED_RULES, _MODEL_PARALLEL_RULES])
def test_param_shardings_follow_the_rules(rules):
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  abstract = jax.eval_shape(_TinyMlp().init, jax.random.key(0),
                            jnp.zeros((2, 4)))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  got = _by_path(shardings["params"],
                 is_leaf=lambda x: isinstance(x, NamedSharding))
  assert set(got) == set(_expected_specs(rules))
  for path, spec in _expected_specs(rules).items():
    assert got[path].mesh == mesh
    assert got[path].spec == spec, path


@pytest.mark.parametrize("rules", [_REPLICATED_RULES, _MODEL_PARALLEL_RULES])
def test_create_sharded_makes_arrays_with_those_shardings(rules):
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  model = _TinyMlp()
  optimizer = optax.adam(1e-3)

  def init_fn(rng, x):
    params = model.init(rng, x)["params"]
    # Initialised from the boxed params, the optimiser state carries their
    # partitioning metadata too.
    return {"params": params, "opt_state": optimizer.init(params)}

  values, shardings = sharding.create_sharded(
      init_fn, mesh, rules, jax.random.key(0), jnp.zeros((2, 4)))

  want = _expected_specs(rules)
  params = _by_path(values["params"])
  assert set(params) == set(want)
  for path, spec in want.items():
    array = params[path]
    assert isinstance(array, jax.Array), path
    assert _same_sharding(array.sharding, NamedSharding(mesh, spec),
                          array.ndim), (path, array.sharding)
  # Values match an ordinary (unsharded) init.
  reference = _by_path(
      model.init(jax.random.key(0), jnp.zeros((2, 4)))["params"],
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, array in params.items():
    np.testing.assert_array_equal(array, nn.meta.unbox(reference[path]))
  # Adam's moments have their parameter's sharding.
  mu = _by_path(values["opt_state"][0].mu)
  for path, spec in want.items():
    assert _same_sharding(mu[path].sharding, NamedSharding(mesh, spec),
                          mu[path].ndim), path
  # The returned shardings describe the returned arrays.
  for array, named in zip(jax.tree.leaves(values), jax.tree.leaves(shardings)):
    assert _same_sharding(array.sharding, named, array.ndim)


def test_model_parallel_params_are_split_across_devices():
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  values, _ = sharding.create_sharded(
      _TinyMlp().init, mesh, _MODEL_PARALLEL_RULES, jax.random.key(0),
      jnp.zeros((2, 4)))
  kernel = values["params"]["Dense_0"]["kernel"]  # [4, 16], 'mlp' on 'model'
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(4, 8)}


def test_batch_sharding_and_replicated():
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  assert sharding.batch_sharding(mesh).spec == PartitionSpec("data")
  assert sharding.replicated(mesh).spec == PartitionSpec()


def test_host_batch_to_global_shapes_and_sharding():
  mesh = sharding.make_mesh(_mesh_config(4, 2))
  rng = np.random.default_rng(0)
  batch = {
      "product_index": np.arange(8, dtype=np.int32),
      "video_frames": rng.integers(0, 255, (8, 2, 4, 4, 3), dtype=np.uint8),
      "valid": np.ones(8, bool),
      "id": np.array([f"v{i}" for i in range(8)], dtype=object),
  }
  global_batch = sharding.host_batch_to_global(batch, mesh)
  assert set(global_batch) == {"product_index", "video_frames", "valid"}
  for name, array in global_batch.items():
    # Single process: the global batch is this process's batch.
    assert array.shape == batch[name].shape
    assert array.dtype == batch[name].dtype
    assert array.sharding.is_equivalent_to(sharding.batch_sharding(mesh),
                                           array.ndim)
    np.testing.assert_array_equal(array, batch[name])
  # Rows are split over the 4 'data' slices, replicated over 'model'.
  rows = {shard.data.shape[0] for shard in
          global_batch["video_frames"].addressable_shards}
  assert rows == {2}
