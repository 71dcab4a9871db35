"""Device mesh and shardings from the config (t5x/MaxText-style logical axes).

Parameters carry logical axis names (`model.logical_axes`: embed, mlp, heads, vocab, ...), and key
activations are constrained to (batch, length, embed|mlp). A short rules list in the config maps
logical names to mesh axes (data, fsdp, tensor), so changing the parallelism is a config edit.
The default mesh puts every device on `data` (pure data parallelism); a dimension that a mesh axis
does not divide stays replicated, so any rules work with any model size.
"""
import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bipft_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# logical name -> mesh axes. Batch over data and fsdp (ZeRO-3 style: fsdp also splits the weights'
# embed dimension); tensor parallelism splits heads, FFN and vocab. Unlisted names are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(shape: dict, devices: Sequence = None) -> Mesh:
  """A mesh with axes data, fsdp, tensor; one size may be -1 (all remaining devices). Without -1, a
  single process uses the first devices the sizes need; several processes must use them all."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise UserError(f"unknown mesh axes {unknown}; the mesh axes are {', '.join(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh shape {dict(shape)} must have positive sizes and at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"mesh shape {dict(shape)} does not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  needed = int(np.prod(sizes))
  if needed > len(devices) or (needed < len(devices) and jax.process_count() > 1):
    raise UserError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {needed} devices, but {len(devices)} "
                    "are available; use -1 for one axis to fill the rest")
  devices = devices[:needed]  # one process may run on fewer devices than it has (data=1: one device)
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(sizes, devices)  # topology-aware on TPU/GPU
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.array(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


def _mesh_axes(logical: Any, rules: Sequence) -> tuple:
  return tuple(nn.logical_to_mesh_axes(logical, rules)) if logical else ()


def spec_for(shape: tuple, logical: PartitionSpec, mesh: Mesh, rules: Sequence) -> PartitionSpec:
  """The mesh PartitionSpec of an array of `shape` with logical names `logical`; dimensions the
  mesh axes do not divide are replicated."""
  axes = list(_mesh_axes(logical, rules)) + [None] * (len(shape) - len(logical or ()))
  for i, (dim, axis) in enumerate(zip(shape, axes)):
    size = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ())]))
    if dim % size:
      axes[i] = None
  return PartitionSpec(*axes[:len(shape)])


def boxed_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence) -> Any:
  """A NamedSharding per leaf of a tree of boxed (logically partitioned) leaves, e.g. a train state
  whose optimizer moments were made from boxed parameters: a box's sharding from its axis names,
  any other leaf (step counts, scalars) replicated."""
  def pick(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for(leaf.value.shape, PartitionSpec(*leaf.names), mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(pick, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@contextlib.contextmanager
def on_mesh(mesh: Mesh, rules: Sequence):
  """The mesh and the logical-axis rules in force: what tracing the model (its activation
  constraints) and running its jitted functions need."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
  """Examples split over the mesh axes the `batch` rule names, other dimensions whole."""
  return NamedSharding(mesh, PartitionSpec(_mesh_axes(("batch",), rules)[0]))


def batch_divisor(mesh: Mesh, rules: Sequence) -> int:
  """How many shards a batch is split into: the batch size must be a multiple of it."""
  axis = _mesh_axes(("batch",), rules)[0]
  return int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ())]))


def rules_from_config(rules: Any) -> tuple:
  """The config's rules as a tuple of (logical name, mesh axes) pairs, checked."""
  checked = []
  for rule in rules:
    if len(rule) != 2:
      raise UserError(f"a sharding rule is (logical name, mesh axis or axes or None), got {rule!r}")
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"sharding rule {rule!r} names unknown mesh axis {axis!r}; mesh axes: "
                        f"{', '.join(MESH_AXES)}")
    checked.append((name, axes))
  return tuple(checked)
