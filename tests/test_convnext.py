"""ConvNeXt parity with timm: pooled features, weight round trip, MACs, config errors."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from ark_jax import interop
from ark_jax.models import convnext

MODEL_NAME = 'convnext_tiny'
ATOL = 1e-4


def _perturb_(model: torch.nn.Module, seed: int):
  """Random LayerNorm weights, layer scales and biases, so none is trivially 1, 0 or 1e-6."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith(('bias', 'gamma')):
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.5 * torch.randn(p.shape, generator=gen))


def _random_backbone(cfg, seed: int, **kwargs):
  """A ConvNeXt with numpy-random weights, built abstractly (no init to compile).

  Kernels ~ N(0, 0.02), LayerNorm scales ~ 1 + N(0, 0.5), everything else ~ N(0, 0.5).
  """
  abstract = nnx.eval_shape(lambda: convnext.ConvNeXt(cfg, rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  gen = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(state):
    std, base = {'kernel': (0.02, 0.0), 'scale': (0.5, 1.0)}.get(path[-1], (0.5, 0.0))
    value = base + std * gen.standard_normal(var.shape, dtype=np.float32)
    leaves.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@nnx.jit(static_argnames='train')
def _forward(model, x, rng=None, train=False):
  return model(x, train=train, rng=rng)


@nnx.jit
def _eval_and_train(model, x, rng):
  """Eval without and with an rng, then training under two rngs: one compile."""
  return (model(x), model(x, train=False, rng=rng), model(x, train=True, rng=rng),
          model(x, train=True, rng=jax.random.fold_in(rng, 1)))


def _nhwc(x_nchw: torch.Tensor) -> jax.Array:
  return jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))


def _to_torch(sd: dict) -> dict:
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


@pytest.fixture(scope='module')
def reference():
  """timm model with random weights, its state dict, an input and its output."""
  torch.manual_seed(0)
  model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=0).eval()
  _perturb_(model, seed=1)
  x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = model(x).numpy()
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return sd, x, out


@pytest.fixture(scope='module')
def loaded(reference):
  sd, x, _ = reference
  backbone = interop.load_backbone(sd, MODEL_NAME)
  return backbone, np.asarray(_forward(backbone, _nhwc(x)))


def test_pooled_features_match_timm(reference, loaded):
  _, _, expected = reference
  backbone, got = loaded
  assert got.shape == expected.shape == (2, backbone.num_features) == (2, 768)
  assert got.dtype == np.float32
  assert np.abs(expected).max() > 0.1  # not a comparison between zeros
  np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_state_dict_round_trip_loads_strictly_into_timm(reference, loaded):
  sd, x, expected = reference
  exported = interop.backbone_state_dict(loaded[0], layout='timm')
  assert sorted(exported) == sorted(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  fresh = timm.create_model(MODEL_NAME, pretrained=False, num_classes=0).eval()
  fresh.load_state_dict(_to_torch(exported), strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(fresh(x).numpy(), expected, rtol=0, atol=ATOL)


def test_classifier_fc_is_skipped_on_load(reference):
  sd, _, _ = reference
  with_fc = dict(sd, **{'head.fc.weight': np.ones((1000, 768), np.float32),
                        'head.fc.bias': np.ones((1000,), np.float32)})
  exported = interop.backbone_state_dict(interop.load_backbone(with_fc, MODEL_NAME))
  assert sorted(exported) == sorted(sd)


def test_small_custom_config_without_layer_scale_matches_timm():
  """A 'custom' ConvNeXt (ls_init_value=None: no gamma) exported into timm's class."""
  cfg = convnext.ConvNextConfig(img_size=64, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32),
                                ls_init_value=None)
  backbone = _random_backbone(cfg, seed=3)
  sd = interop.backbone_state_dict(backbone)
  assert not any(k.endswith('gamma') for k in sd)
  reference = timm.models.convnext.ConvNeXt(depths=cfg.depths, dims=cfg.dims, num_classes=0,
                                            ls_init_value=None).eval()
  reference.load_state_dict(_to_torch(sd), strict=True)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    expected = reference(x).numpy()
  np.testing.assert_allclose(np.asarray(_forward(backbone, _nhwc(x))), expected, rtol=0, atol=ATOL)


def test_drop_path_only_when_training_and_remat_is_exact():
  cfg = convnext.ConvNextConfig(img_size=64, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                                drop_path_rate=0.5)
  backbone = _random_backbone(cfg, seed=5)
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  rng = jax.random.key(1)
  eval_out, eval_with_rng, train_out, train_other = _eval_and_train(backbone, x, rng)
  np.testing.assert_array_equal(eval_with_rng, eval_out)
  assert not np.allclose(train_out, eval_out)
  assert not np.allclose(train_other, train_out)  # the rng picks the dropped blocks
  remat = _random_backbone(cfg, seed=5, remat=True)
  np.testing.assert_allclose(_forward(remat, x, rng, train=True), train_out, rtol=0, atol=1e-6)


def test_forward_macs_match_published():
  # timm's model card figures: convnext_tiny 4.5 GMACs, convnext_base 15.4.
  assert convnext.ConvNextConfig.from_variant('tiny').forward_macs() / 1e9 == pytest.approx(
      4.5, rel=0.02)
  assert convnext.ConvNextConfig.from_variant('base').forward_macs() / 1e9 == pytest.approx(
      15.4, rel=0.02)


def test_bad_configs_and_inputs_raise(loaded):
  with pytest.raises(ValueError, match=r"Unknown ConvNeXt variant 'xlarge'.*'base'"):
    convnext.ConvNextConfig.from_variant('xlarge')
  with pytest.raises(ValueError, match='img_size=100 must be divisible by 32.*96 or 128'):
    convnext.ConvNextConfig(img_size=100).validate()
  with pytest.raises(ValueError, match='differ in length'):
    convnext.ConvNextConfig(depths=(3, 3, 9), dims=(96, 192, 384, 768)).validate()
  with pytest.raises(ValueError, match='divisible by 32'):
    interop.load_backbone({}, MODEL_NAME, img_size=100)
  with pytest.raises(ValueError, match=r'Expected NHWC images \[B, 224, 224, 3\]'):
    loaded[0](jnp.zeros((1, 3, 224, 224)))
