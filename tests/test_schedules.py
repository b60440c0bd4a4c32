"""Schedules at their first, middle and last points; EMA update on a small pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ark_jax import schedules

BASE_LR, WARMUP, TOTAL = 0.3, 20, 220


def test_learning_rate_key_points():
  jitted = jax.jit(lambda step: schedules.learning_rate(step, BASE_LR, WARMUP, TOTAL))
  lr = lambda step: float(jitted(step))
  np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1e-6 + (BASE_LR - 1e-6) / 2, rtol=1e-6)
  np.testing.assert_allclose(lr(WARMUP), BASE_LR, rtol=1e-6)
  # Middle of the cosine: halfway between base and end.
  np.testing.assert_allclose(lr((WARMUP + TOTAL) // 2), (BASE_LR + 1e-5) / 2, rtol=1e-6)
  np.testing.assert_allclose(lr(TOTAL), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(lr(TOTAL + 50), 1e-5, rtol=1e-5)
  steps = np.arange(TOTAL)
  values = np.asarray(jitted(steps))
  assert np.all(np.diff(values[:WARMUP + 1]) > 0) and np.all(np.diff(values[WARMUP:]) < 0)


def test_lr_schedule_drives_optax():
  schedule = schedules.lr_schedule(BASE_LR, WARMUP, TOTAL)
  steps = jnp.array([0, 7, WARMUP, 77, 120, TOTAL - 1, TOTAL, TOTAL + 3])
  want = jax.jit(lambda s: schedules.learning_rate(s, BASE_LR, WARMUP, TOTAL))(steps)
  np.testing.assert_array_equal(jax.jit(schedule)(steps), want)
  # optax's own curve, up to its float32 rounding of the warmup.
  reference = optax.warmup_cosine_decay_schedule(1e-6, BASE_LR, WARMUP, TOTAL, 1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(reference))(steps), want, rtol=1e-5, atol=2e-8)
  # Plain SGD with the schedule: the second update is -lr(1) * grad.
  opt = optax.sgd(schedule)
  params = {'w': jnp.ones(3)}
  state = opt.init(params)
  grads = {'w': jnp.array([1.0, -2.0, 0.5])}
  update = jax.jit(opt.update)
  _, state = update(grads, state, params)
  updates, _ = update(grads, state, params)
  np.testing.assert_allclose(updates['w'], -schedule(1) * grads['w'], rtol=1e-6)
  np.testing.assert_allclose(schedules.learning_rate(0, 0.01, 0, 100), 0.01, rtol=1e-6)


def test_ema_momentum_and_consistency_weight():
  total = 12  # e.g. 2 epochs x 6 datasets
  m = [float(schedules.ema_momentum(k, total)) for k in (0, total // 2, total)]
  np.testing.assert_allclose(m, [0.9, 0.95, 1.0], atol=1e-7)
  c = [float(schedules.consistency_weight(x)) for x in m]
  np.testing.assert_allclose(c, [0.0, 0.25, 0.5], atol=1e-6)
  # c = 0.25 (1 - cos(pi k / K)) at every k.
  k = np.arange(total + 1)
  np.testing.assert_allclose(schedules.consistency_weight(schedules.ema_momentum(k, total)),
                             0.25 * (1 - np.cos(np.pi * k / total)), atol=1e-6)
  assert float(schedules.consistency_weight(0.8)) == 0.0


def test_ema_update_is_the_convex_combination():
  teacher = {'a': jnp.array([1.0, -2.0, 3.0]), 'b': {'c': jnp.full((2, 2), 4.0)}}
  student = {'a': jnp.array([0.5, 6.0, -1.0]), 'b': {'c': jnp.arange(4.0).reshape(2, 2)}}
  # m = 0.75: every product and sum below is exact in float32.
  new = schedules.ema_update(teacher, student, 0.75)
  for t, s, n in zip(jax.tree.leaves(teacher), jax.tree.leaves(student), jax.tree.leaves(new)):
    assert n.dtype == jnp.float32
    np.testing.assert_array_equal(n, 0.75 * np.asarray(t) + 0.25 * np.asarray(s))
  # A scheduled (traced) momentum under jit.
  m = schedules.ema_momentum(3, 12)
  new = jax.jit(schedules.ema_update)(teacher, student, m)
  m = float(m)
  np.testing.assert_allclose(new['a'], m * teacher['a'] + (1 - m) * student['a'], rtol=1e-6)
  # bfloat16 student leaves still give float32 teacher leaves.
  new = schedules.ema_update(teacher, jax.tree.map(lambda x: x.astype(jnp.bfloat16), student), 0.5)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
