"""ViT parity with timm: pooled features, weight round trip, MACs, config errors."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from ark_jax import interop
from ark_jax.models import vit
import timm_parity

MODEL_NAME = 'vit_small_patch16_224'
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
  assert got.shape == expected.shape == (2, backbone.num_features) == (2, 384)
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


def test_classifier_head_is_skipped_on_load(reference):
  sd, _, _ = reference
  with_head = dict(sd, **{'head.weight': np.ones((1000, 384), np.float32),
                          'head.bias': np.ones((1000,), np.float32)})
  exported = interop.backbone_state_dict(interop.load_backbone(with_head, MODEL_NAME))
  assert sorted(exported) == sorted(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_avg_pool_uses_fc_norm_like_timm():
  """global_pool='avg': timm drops `norm` for `fc_norm` after the mean over patches."""
  cfg = vit.VitConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, global_pool='avg')
  backbone = timm_parity.random_backbone(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)), seed=3)
  sd = interop.backbone_state_dict(backbone)
  assert 'fc_norm.weight' in sd and 'norm.weight' not in sd
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0,
      global_pool='avg').eval()
  reference.load_state_dict(timm_parity.to_torch(sd), strict=True)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    expected = reference(x).numpy()
  np.testing.assert_allclose(np.asarray(timm_parity.forward(backbone, timm_parity.nhwc(x))), expected, rtol=0, atol=ATOL)


def test_drop_path_only_when_training_and_remat_is_exact():
  cfg = vit.VitConfig(img_size=32, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.5)
  backbone = timm_parity.random_backbone(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)), seed=5)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  rng = jax.random.key(1)
  eval_out, eval_with_rng, train_out, train_other = timm_parity.eval_and_train(backbone, x, rng)
  np.testing.assert_array_equal(eval_with_rng, eval_out)
  assert not np.allclose(train_out, eval_out)
  assert not np.allclose(train_other, train_out)  # the rng picks the dropped blocks
  remat = timm_parity.random_backbone(lambda: vit.VisionTransformer(cfg, remat=True, rngs=nnx.Rngs(0)), seed=5)
  np.testing.assert_allclose(timm_parity.forward(remat, x, rng, train=True), train_out, rtol=0, atol=1e-6)


def test_forward_macs_match_published():
  # timm's model card figures: vit_small_patch16_224 4.6 GMACs, vit_base_patch16_224 17.6.
  assert vit.VitConfig.from_variant('small').forward_macs() / 1e9 == pytest.approx(4.6, rel=0.02)
  assert vit.VitConfig.from_variant('base').forward_macs() / 1e9 == pytest.approx(17.6, rel=0.02)


def test_bad_configs_and_inputs_raise(loaded):
  with pytest.raises(ValueError, match=r"Unknown ViT variant 'huge'.*'base'"):
    vit.VitConfig.from_variant('huge')
  with pytest.raises(ValueError, match='img_size=225 must be divisible by patch_size=16.*224'):
    vit.VitConfig(img_size=225).validate()
  with pytest.raises(ValueError, match='embed_dim=100 is not divisible by num_heads=3'):
    vit.VitConfig(embed_dim=100).validate()
  with pytest.raises(ValueError, match="global_pool='max'"):
    vit.VitConfig(global_pool='max').validate()
  with pytest.raises(ValueError, match='divisible by patch_size'):
    interop.load_backbone({}, 'vit_small_patch16_225')
  with pytest.raises(ValueError, match=r'Expected NHWC images \[B, 224, 224, 3\]'):
    loaded[0](jnp.zeros((1, 3, 224, 224)))
