"""Swin backbone: numerical parity with timm, stochastic depth, remat, bf16, FLOPs, bad input."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from ark_jax import interop
from ark_jax.models import registry
from ark_jax.models import swin


def random_timm(model_name, seed=0, **kwargs):
  """A timm model with random weights, LayerNorms perturbed away from ones/zeros."""
  torch.manual_seed(seed)
  model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def compare_with_timm(model_name, batch, img_size=None, **kwargs):
  """Max abs difference of pooled features, ours vs timm, on one random batch."""
  tm = random_timm(model_name, img_size=img_size, **kwargs) if img_size else random_timm(model_name)
  ours = interop.load_backbone(tm.state_dict(), model_name, img_size=img_size, **kwargs)
  size = img_size or 224
  x_nchw = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = tm(x_nchw).numpy()
  got = np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))))
  assert got.shape == want.shape
  return np.abs(got - want).max(), np.abs(want).max()


@pytest.mark.parametrize('model_name, batch, kwargs', [
    ('swin_tiny_patch4_window7_224', 2, {}),
    ('swin_base_patch4_window7_224', 1, {}),
    ('swin_tiny_patch4_window7_224', 1, {'img_size': 256, 'window_size': 8}),
    # 64 px, window 4: stage grids 16/8/4/2, so stage 2 loses its shift and
    # stage 3's window is clamped to 2 (timm's rule).
    ('swin_tiny_patch4_window7_224', 2, {'img_size': 64, 'window_size': 4}),
])
def test_pooled_features_match_timm(model_name, batch, kwargs):
  diff, scale = compare_with_timm(model_name, batch, **kwargs)
  assert scale > 0.1  # the comparison is not between zeros
  assert diff < 1e-4


def test_window_clamping():
  cfg = swin.SwinConfig.from_variant('tiny', img_size=64, window_size=4)
  assert cfg.stage_windows() == [(4, 2), (4, 2), (4, 0), (2, 0)]
  assert swin.SwinConfig.from_variant('large', img_size=768, window_size=12).stage_windows() == [
      (12, 6)] * 4
  assert swin.SwinConfig.from_variant('base').stage_windows()[-1] == (7, 0)


def test_shift_mask_blocks_cross_region_attention():
  mask = swin.shifted_window_mask(8, 4, 2)  # [nW=4, N=16, N=16]
  assert mask.shape == (4, 16, 16)
  assert np.all(mask[0] == 0)  # the top-left window holds one region only
  assert set(np.unique(mask[3])) == {0.0, -100.0}  # the corner window mixes four
  np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))


def small_swin(**kwargs):
  cfg = swin.SwinConfig.from_variant('tiny', img_size=64, window_size=4, depths=(1, 1, 2, 1),
                                     drop_path_rate=0.5)
  return registry.materialize(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0), **kwargs))


# One jitted function per mode, reused across models of the same structure
# (eager NNX calls would compile every op separately).
_eval = jax.jit(lambda m, x: m(x))
_train = jax.jit(lambda m, x, rng: m(x, train=True, rng=rng))


def test_drop_path_only_when_training():
  model = small_swin()
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  eval_a = _eval(model, x)
  eval_b = jax.jit(lambda m, x, rng: m(x, train=False, rng=rng))(model, x, jax.random.key(1))
  np.testing.assert_array_equal(eval_a, eval_b)
  train_1 = _train(model, x, jax.random.key(1))
  train_1_again = _train(model, x, jax.random.key(1))
  train_2 = _train(model, x, jax.random.key(2))
  np.testing.assert_array_equal(train_1, train_1_again)  # same key, same dropped paths
  assert np.abs(train_1 - eval_a).max() > 1e-3
  assert np.abs(train_1 - train_2).max() > 1e-3


def test_remat_gives_the_same_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

  def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    def loss(state):
      return jnp.square(nnx.merge(graphdef, state)(x, train=True, rng=jax.random.key(3))).mean()

    return jax.jit(jax.value_and_grad(loss))(state)

  plain_loss, plain_grads = loss_and_grads(small_swin())
  remat_loss, remat_grads = loss_and_grads(small_swin(remat=True))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  model32 = small_swin()
  model16 = small_swin(dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model16)))
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  out32 = _eval(model32, x)
  out16 = _eval(model16, x)
  assert out16.dtype == jnp.float32
  rel = np.abs(out16 - out32).max() / np.abs(out32).max()
  assert 0 < rel < 0.05


def test_forward_flops_match_timm_published():
  # timm lists Swin-B/224 at 15.4 GMACs (30.9 GFLOPs); Swin-L/224 at 34.5.
  macs = swin.SwinConfig.from_variant('base').forward_macs()
  assert 15.4e9 <= macs <= 15.5e9
  assert 34.4e9 <= swin.SwinConfig.from_variant('large').forward_macs() <= 34.6e9


@pytest.mark.parametrize('kwargs, message', [
    ({'img_size': 200}, 'divisible by 32'),
    ({'img_size': 224, 'window_size': 8}, 'not divisible by the window'),
    ({'num_heads': (3, 6, 12)}, 'differ in length'),
])
def test_bad_sizes_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    swin.SwinConfig.from_variant('tiny', **kwargs).validate()


def test_unknown_variant_and_wrong_input_shape():
  with pytest.raises(ValueError, match="Unknown Swin variant 'huge'"):
    swin.SwinConfig.from_variant('huge')
  with pytest.raises(ValueError, match=r'Expected NHWC images \[B, 64, 64, 3\]'):
    small_swin()(jnp.zeros((1, 3, 64, 64)))


def test_layer_norm_backward_equals_autodiff():
  """layers.layer_norm's closed-form backward gives autodiff's gradients of the plain formula."""
  from ark_jax.models import layers
  kx, ks, kb, kw = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 5, 7, 24)) * 3.0 + 1.5
  scale, bias = 1.0 + 0.3 * jax.random.normal(ks, (24,)), jax.random.normal(kb, (24,))
  weights = jax.random.normal(kw, x.shape)

  def plain(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale[None, None, None] + bias[None, None, None]

  def loss(fn):
    return lambda *args: (fn(*args) * weights).sum()

  ours = jax.value_and_grad(loss(lambda *a: layers.layer_norm(*a, 1e-5)), argnums=(0, 1, 2))
  ref = jax.value_and_grad(loss(plain), argnums=(0, 1, 2))
  (value, grads), (value_ref, grads_ref) = ours(x, scale, bias), ref(x, scale, bias)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    assert float(jnp.abs(g_ref).max()) > 0.1
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_linear_matmul_backward_equals_autodiff():
  """layers.matmul's backward (flattened weight gradient) gives autodiff's gradients,
  for rank-2/4 inputs and under vmap (the stacked Ark heads)."""
  from ark_jax.models import layers
  hi = jax.lax.Precision.HIGHEST

  def check(x, kernel, weights, vmapped=False):
    def plain(x, kernel):
      return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=hi)

    def ours(x, kernel):
      return layers.matmul(x, kernel, hi)

    def loss(fn):
      fn = jax.vmap(fn, in_axes=(None, 0), out_axes=1) if vmapped else fn
      return lambda x, k: (jnp.sin(fn(x, k)) * weights).sum()

    value, grads = jax.value_and_grad(loss(ours), argnums=(0, 1))(x, kernel)
    value_ref, grads_ref = jax.value_and_grad(loss(plain), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
      assert g.shape == g_ref.shape and float(jnp.abs(g_ref).max()) > 0.1
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)

  kx, kk, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 3, 4, 24))
  check(x, jax.random.normal(kk, (24, 40)) * 0.2, jax.random.normal(kw, (2, 3, 4, 40)))
  check(x[:, 0, 0], jax.random.normal(kk, (24, 40)) * 0.2, jax.random.normal(kw, (2, 40)))
  # Six heads over one projection, as ArkModel.head_logits vmaps them.
  check(x[:, 0, 0], jax.random.normal(kk, (6, 24, 5)), jax.random.normal(kw, (2, 6, 5)),
        vmapped=True)
  # nnx.Linear built by layers.linear routes through it.
  from flax import nnx
  dense = layers.linear(24, 40, ('embed', 'mlp'), rngs=nnx.Rngs(0))
  assert dense.dot_general is layers.linear_dot_general
