"""The device mesh and logical axis rules: where every array of a run lives.

Mesh axes ('data', 'fsdp'), both Auto (GSPMD) axis types (DESIGN.md section 4,
decision 7). The batch is split over both axes; parameters are replicated or
FSDP-sharded over 'fsdp' by rules held in the config, so one switch changes the
layout of a whole run:

  config.mesh.data      devices along 'data' (-1: all the devices left over)
  config.mesh.fsdp      devices along 'fsdp' (-1: all the devices left over)
  config.sharding.rules (logical name, mesh axis | tuple of axes | None) pairs;
                        REPLICATED_RULES or FSDP_RULES below.

Parameters carry logical axis names in their `out_sharding` metadata
(ark_jax/models/layers.py); activations use the 'act_*' names through
layers.constrain under `nnx.logical_axis_rules(rules)`. A logical name without
a rule, and a dimension that the mesh axes do not divide (a [14] bias over
fsdp=4), stay replicated rather than fail: small tensors are not worth sharding.
"""

from collections.abc import Sequence
import math

from flax import nnx
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device

# Activation names of layers.constrain: batch over all devices, the rest whole.
_ACTIVATION_RULES = (
    ('act_batch', BATCH_AXES),
    ('act_len', None),
    ('act_height', None),
    ('act_width', None),
    ('act_emb', None),
)
_PARAM_AXES = ('embed', 'mlp', 'heads', 'patch', 'norm', 'proj', 'proj_out', 'dataset',
               'classes')

# Every parameter on every device (pure data parallelism; Swin-B fits).
REPLICATED_RULES = _ACTIVATION_RULES + tuple((name, None) for name in _PARAM_AXES)

# The residual width ('embed') of every kernel and vector that has it split over
# 'fsdp' (ZeRO-3 style: each matmul gathers its weight). For Swin-L at 768 px.
FSDP_RULES = _ACTIVATION_RULES + (('embed', 'fsdp'),) + tuple(
    (name, None) for name in _PARAM_AXES if name != 'embed')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """Resolves `config.mesh` (data, fsdp; -1 = the rest) against the device count.

  Raises:
    ValueError: naming config.mesh.data / config.mesh.fsdp when they cannot
      tile `num_devices` devices.
  """
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
  where = f'config.mesh.data={data}, config.mesh.fsdp={fsdp}'
  if data == -1 and fsdp == -1:
    raise ValueError(f'{where}: at most one of them may be -1 ("all remaining devices").')
  for name, size in (('data', data), ('fsdp', fsdp)):
    if size == 0 or size < -1:
      raise ValueError(f'{where}: config.mesh.{name} must be a positive size or -1.')
    if size > num_devices:
      raise ValueError(f'{where}: config.mesh.{name}={size} exceeds the {num_devices} '
                       'devices available.')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise ValueError(f'{where}: {num_devices} devices cannot be split into groups of '
                       f'{known}.')
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise ValueError(f'{where}: config.mesh.data x config.mesh.fsdp = {data * fsdp} but there '
                     f'are {num_devices} devices (jax.device_count()); use -1 for one of them.')
  return data, fsdp


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh`, Auto axis types, over all devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical_axes, shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules) -> P:
  """PartitionSpec of an array with these logical axis names under `rules`.

  The first rule of a name wins (as in Flax). Unknown names, None, a mesh axis
  already used by an earlier dimension, and a dimension the mesh axes do not
  divide all give an unsharded dimension.
  """
  if logical_axes is None:
    return P()
  mapping = {}
  for name, axes in rules:
    mapping.setdefault(name, axes)
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    axes = mapping.get(name) if name is not None else None
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = math.prod(mesh.shape[a] for a in names)
    if not names or used & set(names) or dim % size:
      spec.append(None)
      continue
    used |= set(names)
    spec.append(axes if isinstance(axes, str) else tuple(axes))
  return P(*spec)


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings of an nnx.State (abstract or concrete) from its logical names.

  Args:
    abstract_state: nnx.State of Variables holding arrays or ShapeDtypeStructs.
    mesh: the device mesh.
    rules: (logical name, mesh axes) pairs, e.g. config.sharding.rules.

  Returns:
    The same nnx.State structure with a NamedSharding in place of each value,
    usable as (part of) jax.jit's out_shardings / in_shardings.
  """
  def sharding(variable):
    value = variable.get_value()
    logical = variable.get_metadata().get('out_sharding')
    return variable.replace(NamedSharding(mesh, logical_to_spec(logical, value.shape, mesh,
                                                                rules)))

  return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over every device, other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_divisible(global_batch: int, mesh_or_num_devices,
                          key: str = 'config.batch_size') -> None:
  """Raises a ValueError naming `key` unless `global_batch` splits over the devices."""
  num_devices = (mesh_or_num_devices if isinstance(mesh_or_num_devices, int)
                 else mesh_or_num_devices.size)
  if global_batch % num_devices:
    raise ValueError(f'{key}={global_batch} (global) is not divisible by the '
                     f'{num_devices} devices the batch is split over; use a multiple of '
                     f'{num_devices}.')
