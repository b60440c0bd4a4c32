"""Mesh resolution, logical rules -> shardings, the batch layout, clear errors."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import ml_collections
import pytest

from ark_jax import sharding
import ark_jax.models  # noqa: F401  (switches Flax eager sharding off)


def mesh_cfg(data, fsdp):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp})


class Tiny(nnx.Module):
  """Params whose shapes do and do not divide fsdp=4."""

  def __init__(self):
    self.kernel = nnx.Param(jnp.zeros((8, 14)), out_sharding=('embed', 'mlp'))
    self.bias = nnx.Param(jnp.zeros((14,)), out_sharding=('embed',))
    self.table = nnx.Param(jnp.zeros((8, 3)), out_sharding=('unknown_name', None))
    self.square = nnx.Param(jnp.zeros((8, 8)), out_sharding=('embed', 'embed'))
    self.plain = nnx.Param(jnp.zeros((8,)))


def test_make_mesh_resolves_minus_one_and_is_auto():
  mesh = sharding.make_mesh(mesh_cfg(-1, 1))
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert dict(sharding.make_mesh(mesh_cfg(2, -1)).shape) == {'data': 2, 'fsdp': 4}
  assert dict(sharding.make_mesh(mesh_cfg(2, 4)).shape) == {'data': 2, 'fsdp': 4}


@pytest.mark.parametrize('data,fsdp,key', [(1, 16, 'config.mesh.fsdp'), (3, 2, 'config.mesh.data'),
                                           (-1, 3, 'config.mesh.fsdp'), (-1, -1, 'config.mesh')])
def test_bad_mesh_names_the_config_key(data, fsdp, key):
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    sharding.make_mesh(mesh_cfg(data, fsdp))


def test_fsdp_rules_shard_embed_and_fall_back_to_replicated():
  mesh = sharding.make_mesh(mesh_cfg(2, 4))
  sh = sharding.param_shardings(nnx.state(Tiny()), mesh, sharding.FSDP_RULES)
  spec = lambda v: v.get_value().spec
  assert spec(sh['kernel']) == P('fsdp', None)
  assert spec(sh['bias']) == P(None)  # 14 % 4 != 0: replicated, not an error
  assert spec(sh['table']) == P(None, None)  # unknown logical name
  assert spec(sh['square']) == P('fsdp', None)  # one mesh axis used once per array
  assert spec(sh['plain']) == P()  # no logical names
  assert sh['kernel'].get_metadata()['out_sharding'] == ('embed', 'mlp')  # metadata kept


def test_replicated_rules_replicate_every_param():
  mesh = sharding.make_mesh(mesh_cfg(2, 4))
  sh = sharding.param_shardings(nnx.state(Tiny()), mesh, sharding.REPLICATED_RULES)
  for s in jax.tree.leaves(sh):
    assert s.is_fully_replicated


def test_tuple_rule_and_batch_sharding():
  mesh = sharding.make_mesh(mesh_cfg(2, 4))
  assert sharding.logical_to_spec(('act_batch', 'act_emb'), (16, 5), mesh,
                                  sharding.FSDP_RULES) == P(('data', 'fsdp'), None)
  # 12 rows do not split over 8 devices: that dimension stays whole.
  assert sharding.logical_to_spec(('act_batch',), (12,), mesh, sharding.FSDP_RULES) == P(None)
  x = jax.device_put(jnp.zeros((16, 3)), sharding.batch_sharding(mesh))
  assert x.sharding.spec == P(('data', 'fsdp'))
  assert x.addressable_shards[0].data.shape == (2, 3)


def test_check_batch_divisible_names_batch_size():
  mesh = sharding.make_mesh(mesh_cfg(-1, 1))
  sharding.check_batch_divisible(16, mesh)
  with pytest.raises(ValueError, match=r'config\.batch_size=12.*8 devices'):
    sharding.check_batch_divisible(12, mesh)
