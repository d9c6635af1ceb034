"""Device mesh, logical-axis rules and sharding helpers.

One mesh with axes ('data', 'model'). Parameters carry logical axis names
(`nn.with_logical_partitioning`); `config.mesh.rules` maps those names to mesh
axes, so the same model runs data-parallel, FSDP-style or with the class
centres sharded over every device, by changing the rules only.

On multi-slice TPU (devices with a `slice_index`, more than one slice) the 'data'
axis spans the slices (`config.mesh.dcn_data` of them, over the data-centre
network) and each slice's chips (over ICI): the mesh is built with
`mesh_utils.create_hybrid_device_mesh`, so neighbours along 'data' within a slice
are ICI neighbours and only the slice-to-slice part of a reduction crosses DCN.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'model') mesh over `devices` (default: all devices).

  Args:
    mesh_config: `config.mesh` with integer `data` and `model`; at most one may
      be -1, meaning all the devices the other axis leaves; and `dcn_data`, the
      slices the 'data' axis spans (-1: as many as the devices come in).
    devices: devices to use, e.g. `jax.devices()`.

  Returns:
    A Mesh with Auto axis types (the mode Linen's logical partitioning uses);
    over several slices, a hybrid (DCN x ICI) one.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  num_slices = len({getattr(device, "slice_index", 0) for device in devices})
  dcn_data = int(mesh_config.dcn_data)
  if dcn_data == -1:
    dcn_data = num_slices
  if dcn_data != num_slices:
    raise ValueError(
        f"config.mesh.dcn_data={dcn_data}: the {num_devices} devices come in "
        f"{num_slices} slice(s); set it to {num_slices} or -1")
  sizes = {"data": int(mesh_config.data), "model": int(mesh_config.model)}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(
          f"config.mesh.{axis}: must be a positive size or -1, got {size}")
  if sizes["data"] == -1 and sizes["model"] == -1:
    raise ValueError(
        "config.mesh.data and config.mesh.model: at most one may be -1")
  for axis, other in (("data", "model"), ("model", "data")):
    if sizes[axis] == -1:
      if num_devices % sizes[other]:
        raise ValueError(
            f"config.mesh.{other}={sizes[other]} does not divide the "
            f"{num_devices} devices")
      sizes[axis] = num_devices // sizes[other]
  if sizes["data"] * sizes["model"] != num_devices:
    raise ValueError(
        f"config.mesh.data={sizes['data']} x config.mesh.model="
        f"{sizes['model']} does not match the {num_devices} devices")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices == 1:
    return jax.make_mesh((sizes["data"], sizes["model"]), MESH_AXES,
                         axis_types=axis_types, devices=devices)
  if sizes["data"] % num_slices:
    raise ValueError(
        f"config.mesh.data={sizes['data']} is not divisible by the {num_slices} "
        "slices (config.mesh.dcn_data) it spans")
  hybrid = mesh_utils.create_hybrid_device_mesh(
      (sizes["data"] // num_slices, sizes["model"]), (num_slices, 1), devices)
  return Mesh(hybrid, MESH_AXES, axis_types=axis_types)


def logical_axis_rules(mesh_config) -> LogicalRules:
  """`config.mesh.rules` as the tuple `nn.logical_axis_rules` expects.

  Each rule is (logical axis name, mesh axis | tuple of mesh axes | None).
  """
  rules = []
  for i, rule in enumerate(mesh_config.rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(
          f"config.mesh.rules[{i}]: expected (logical_name, mesh_axes), got "
          f"{rule!r}")
    name, mesh_axes = rule
    if isinstance(mesh_axes, (list, tuple)):
      mesh_axes = tuple(mesh_axes)
      targets = mesh_axes
    else:
      targets = () if mesh_axes is None else (mesh_axes,)
    unknown = [axis for axis in targets if axis not in MESH_AXES]
    if unknown:
      raise ValueError(
          f"config.mesh.rules[{i}] ({name!r}): unknown mesh axis "
          f"{unknown[0]!r}; expected one of {', '.join(MESH_AXES)}")
    rules.append((name, mesh_axes))
  return tuple(rules)


def param_shardings(abstract_variables: Any, mesh: Mesh,
                    rules: LogicalRules) -> Any:
  """NamedShardings for a (boxed) variables tree.

  Args:
    abstract_variables: output of `jax.eval_shape(model.init, ...)` or real
      variables, with `nn.LogicallyPartitioned` boxes where the model declared
      logical axis names.
    mesh: the device mesh.
    rules: logical axis rules (see `logical_axis_rules`).

  Returns:
    A pytree shaped like the unboxed variables with a NamedSharding per leaf;
    leaves without partitioning metadata are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                   *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` so that its outputs are created already sharded.

  The shapes come from `jax.eval_shape`; `init_fn` then runs under `jax.jit`
  with those shardings as `out_shardings`, so no device ever holds a full
  copy of a sharded parameter. Works for anything `init_fn` returns (model
  variables, a train state with optimiser state, ...); leaves without
  partitioning metadata are replicated. To shard optimiser state like the
  parameters, call `optimizer.init` on the still-boxed params inside `init_fn`:
  optax keeps the `nn.LogicallyPartitioned` boxes on the moments.

  Returns:
    (values, shardings): `init_fn`'s outputs with the partitioning boxes
    removed (`nn.meta.unbox`), and the matching tree of NamedShardings.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    values = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.meta.unbox(values), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def host_batch_to_global(batch: Mapping[str, np.ndarray],
                         mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over 'data'.

  Each process passes its own rows (`global_batch // process_count`); the
  result has the global batch as leading dimension. Entries that are not
  numeric or boolean arrays (e.g. numpy object arrays of ids) stay on the host
  and are left out of the result.

  Args:
    batch: dict name -> [B_local, ...] numpy array.
    mesh: the device mesh.

  Returns:
    dict name -> [B_global, ...] jax.Array with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  global_batch = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
      continue
    if value.ndim == 0:
      raise ValueError(
          f"batch[{name!r}]: expected a leading batch axis, got a scalar")
    global_batch[name] = jax.make_array_from_process_local_data(sharding, value)
  return global_batch
