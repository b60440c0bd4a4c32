"""The sharded train state: layouts, teacher init, determinism, optimizers, errors."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from ark_jax import schedules
from ark_jax import sharding
from ark_jax import train_state
from configs import demo

QKV = ('backbone', 'layers', 0, 'blocks', 0, 'attn', 'qkv', 'kernel')  # [32, 96] embed x heads


def make_config(**overrides):
  c = demo.get_config()
  c.batch_size = 16
  # Two Swin stages instead of four: half the init program to compile.
  c.model.img_size, c.model.depths, c.model.num_heads = 32, (1, 1), (1, 2)
  # teacher_init 'independent', mesh (data=-1, fsdp=1) and REPLICATED_RULES
  # come from configs/demo.py.
  c.optimizer = ml_collections.ConfigDict({
      'name': 'sgd', 'lr': 0.1, 'warmup_steps': 2, 'total_steps': 10, 'weight_decay': 0.0,
      'clip_grad_norm': 0.0})
  c.update_from_flattened_dict(overrides)  # 'optimizer.lr'-style keys
  return c


def create(config, init_params=None):
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, shardings = train_state.create_train_state(
      config, config.data.num_classes, mesh, config.sharding.rules, init_params=init_params)
  return mesh, graphdef, state, shardings


def leaf(tree, path):
  return dict(nnx.to_flat_state(tree))[path].get_value()


def assert_placed_as(state, shardings):
  arrays, specs = jax.tree.leaves(state), jax.tree.leaves(shardings)
  assert len(arrays) == len(specs)
  for x, s in zip(arrays, specs):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope='module')
def replicated():
  return create(make_config())


@pytest.fixture(scope='module')
def fsdp(replicated):
  # Backbones from an init state (the replicated run's teacher backbone); the
  # projector and heads are left to the fresh init.
  init = nnx.State({'backbone': replicated[2].ema_params['backbone']})
  return create(make_config(**{'mesh.data': 2, 'mesh.fsdp': 4,
                               'sharding.rules': sharding.FSDP_RULES}), init_params=init)


def test_replicated_state_layout(replicated):
  mesh, _, state, shardings = replicated
  assert_placed_as(state, shardings)
  for x in jax.tree.leaves(state):
    assert x.sharding.is_fully_replicated and x.sharding.mesh == mesh
  assert state.step.dtype == jnp.int32 and state.step.shape == ()
  assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32


def test_fsdp_state_layout(fsdp):
  _, _, state, shardings = fsdp
  assert_placed_as(state, shardings)
  assert leaf(state.params, QKV).sharding.spec == P('fsdp', None)
  assert leaf(state.ema_params, QKV).sharding.spec == P('fsdp', None)
  # [D, C] = [4, 10] heads bias: 'dataset'/'classes' have no mesh axis.
  assert state.params['heads']['bias'].get_value().sharding.is_fully_replicated
  # The SGD momentum of every param lives where the param does; the step count is replicated.
  same = optax.tree_map_params(
      train_state.create_optimizer(make_config()), lambda m, p: m.sharding == p.sharding,
      state.opt_state, state.params, transform_non_params=lambda x: x.sharding.is_fully_replicated)
  assert all(jax.tree.leaves(same))
  momenta = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (32, 96)]
  assert momenta and all(m.sharding.spec == P('fsdp', None) for m in momenta)


def test_init_params_go_into_both_backbones(replicated, fsdp):
  rep, fs = replicated[2], fsdp[2]
  assert_trees_equal(fs.params['backbone'], rep.ema_params['backbone'])
  assert_trees_equal(fs.ema_params['backbone'], rep.ema_params['backbone'])
  # Same seed, other mesh: the fresh projector and heads are the same numbers.
  assert_trees_equal(fs.params['projector'], rep.params['projector'])
  assert_trees_equal(fs.ema_params['heads'], rep.ema_params['heads'])


def test_independent_teacher_differs_copy_equals_and_same_seed_repeats(replicated):
  rep = replicated[2]
  for part in ('projector', 'heads', 'backbone'):
    for s, t in zip(jax.tree.leaves(rep.params[part]), jax.tree.leaves(rep.ema_params[part])):
      if s.ndim > 1:  # (norm scales and zero biases are equal by construction)
        assert not np.array_equal(s, t)
  _, _, copy, _ = create(make_config(teacher_init='copy'))
  assert_trees_equal(copy.ema_params, copy.params)
  # Same seed, a second creation: the same student, optimizer state and key.
  assert_trees_equal(copy.params, rep.params)
  assert_trees_equal((copy.opt_state, copy.rng, copy.step), (rep.opt_state, rep.rng, rep.step))


def test_sgd_is_nesterov():
  config = make_config()
  tx = train_state.create_optimizer(config)
  lr = lambda step: schedules.learning_rate(step, 0.1, 2, 10)
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array(0.5)}
  grads = [{'w': jnp.array([0.3, 0.1]), 'b': jnp.array(-1.0)},
           {'w': jnp.array([-0.2, 0.4]), 'b': jnp.array(2.0)}]
  opt_state = tx.init(params)
  expected, v = dict(params), jax.tree.map(jnp.zeros_like, params)
  for step, g in enumerate(grads):
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    v = jax.tree.map(lambda v, g: 0.9 * v + g, v, g)
    expected = jax.tree.map(lambda p, g, v: p - lr(step) * (g + 0.9 * v), expected, g, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)


def test_adamw_builds_and_skips_decay_on_biases():
  config = make_config(**{'optimizer.name': 'adamw', 'optimizer.weight_decay': 0.5,
                          'optimizer.clip_grad_norm': 1.0, 'optimizer.warmup_steps': 0})
  tx = train_state.create_optimizer(config)
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,)), 'bias_table': jnp.ones((2, 2))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * params['kernel'], rtol=1e-6)
  np.testing.assert_array_equal(updates['bias'], 0.0)
  np.testing.assert_array_equal(updates['bias_table'], 0.0)


@pytest.mark.parametrize('overrides,key', [
    ({'batch_size': 12}, 'config.batch_size'),
    ({'mesh.fsdp': 16}, 'config.mesh.fsdp'),
    ({'optimizer.name': 'lamb'}, 'config.optimizer.name'),
    ({'teacher_init': 'ema'}, 'config.teacher_init'),
])
def test_bad_config_names_the_key(overrides, key):
  config = make_config(**overrides)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    train_state.check_config(config, 8)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):  # before any compile
    train_state.create_train_state(config, config.data.num_classes,
                                   sharding.make_mesh(make_config().mesh), sharding.REPLICATED_RULES)


def test_init_params_that_do_not_fit_are_refused():
  config = make_config()
  mesh = sharding.make_mesh(config.mesh)
  bad_shape = nnx.State({'projector': {'fc1': {'bias': nnx.Param(jnp.zeros((3,)))}}})
  with pytest.raises(ValueError, match=r'projector\.fc1\.bias has shape \(3,\)'):
    train_state.create_train_state(config, config.data.num_classes, mesh,
                                   config.sharding.rules, init_params=bad_shape)
  unknown = nnx.State({'decoder': {'bias': nnx.Param(jnp.zeros((3,)))}})
  with pytest.raises(ValueError, match='decoder.bias, which the model does not have'):
    train_state.create_train_state(config, config.data.num_classes, mesh,
                                   config.sharding.rules, init_params=unknown)


def test_clip_grad_norm_scales_the_gradient_before_the_momentum():
  """optimizer.clip_grad_norm=c: the step uses g * min(1, c / |g|) (torch's clip_grad_norm_
  before SGD), so the first update's global norm is lr (1 + m) min(|g|, c)."""
  config = make_config(**{'optimizer.clip_grad_norm': 0.5, 'optimizer.warmup_steps': 0})
  tx = train_state.create_optimizer(config)
  lr = [float(schedules.learning_rate(step, 0.1, 0, 10)) for step in (0, 1)]
  f32 = lambda *x: np.array(x, np.float32)
  params = {'w': f32(1.0, -2.0, 0.5), 'b': f32(0.5)}
  grads = [{'w': f32(3.0, 0.0, -4.0), 'b': f32(0.0)},  # |g| = 5: clipped to 0.5
           {'w': f32(0.1, 0.2, 0.0), 'b': f32(-0.2)}]  # |g| = 0.3: left as is
  opt_state, update = tx.init(params), jax.jit(tx.update)  # one compile for both steps
  updates, opt_state = update(grads[0], opt_state, params)
  np.testing.assert_allclose(np.linalg.norm(np.concatenate(
      [np.ravel(u) for u in jax.tree.leaves(updates)])), lr[0] * 1.9 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates['w'], -lr[0] * 1.9 * 0.1 * grads[0]['w'], rtol=1e-6)
  params = jax.tree.map(lambda p, u: p + np.asarray(u), params, updates)
  updates, _ = update(grads[1], opt_state, params)
  # The momentum holds the clipped first gradient: v = 0.9 * 0.1 g_0 + g_1.
  v = jax.tree.map(lambda g0, g1: 0.9 * 0.1 * g0 + g1, grads[0], grads[1])
  want = jax.tree.map(lambda g, v: -lr[1] * (g + 0.9 * v), grads[1], v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates, want)
