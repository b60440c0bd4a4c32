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
import timm_parity

MODEL_NAME = 'convnext_tiny'
ATOL = 1e-4


@pytest.fixture(scope='module')
def reference():
  """timm model with random weights: its state dict, an input and its output."""
  return timm_parity.timm_reference(MODEL_NAME)


@pytest.fixture(scope='module')
def loaded(reference):
  sd, x, _ = reference
  backbone = interop.load_backbone(sd, MODEL_NAME)
  return backbone, np.asarray(timm_parity.forward(backbone, timm_parity.nhwc(x)))


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
  fresh.load_state_dict(timm_parity.to_torch(exported), strict=True)
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
  backbone = timm_parity.random_backbone(lambda: convnext.ConvNeXt(cfg, rngs=nnx.Rngs(0)), seed=3)
  sd = interop.backbone_state_dict(backbone)
  assert not any(k.endswith('gamma') for k in sd)
  reference = timm.models.convnext.ConvNeXt(depths=cfg.depths, dims=cfg.dims, num_classes=0,
                                            ls_init_value=None).eval()
  reference.load_state_dict(timm_parity.to_torch(sd), strict=True)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    expected = reference(x).numpy()
  np.testing.assert_allclose(np.asarray(timm_parity.forward(backbone, timm_parity.nhwc(x))), expected, rtol=0, atol=ATOL)


def test_drop_path_only_when_training_and_remat_is_exact():
  cfg = convnext.ConvNextConfig(img_size=64, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                                drop_path_rate=0.5)
  backbone = timm_parity.random_backbone(lambda: convnext.ConvNeXt(cfg, rngs=nnx.Rngs(0)), seed=5)
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  rng = jax.random.key(1)
  eval_out, eval_with_rng, train_out, train_other = timm_parity.eval_and_train(backbone, x, rng)
  np.testing.assert_array_equal(eval_with_rng, eval_out)
  assert not np.allclose(train_out, eval_out)
  assert not np.allclose(train_other, train_out)  # the rng picks the dropped blocks
  remat = timm_parity.random_backbone(lambda: convnext.ConvNeXt(cfg, remat=True, rngs=nnx.Rngs(0)), seed=5)
  np.testing.assert_allclose(timm_parity.forward(remat, x, rng, train=True), train_out, rtol=0, atol=1e-6)


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
