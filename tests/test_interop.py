"""Weights interop: timm layouts, the Ark reference (timm 0.5.4) in both directions, errors."""

import json
import os
import re
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from ark_jax import interop
from ark_jax.models import ark
from ark_jax.models import registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_054 = os.path.join(REPO_ROOT, '.venv', 'timm054')
SWIN_T = 'swin_tiny_patch4_window7_224'
# Swin-T geometry at 64 px / window 4: small enough for the subprocess to be quick,
# and it exercises shifted, unshifted and clamped stages.
SMALL = dict(img_size=64, window_size=4)
SMALL_054 = dict(SMALL, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
NUM_CLASSES = (14, 14, 14, 3, 6, 1)


@pytest.fixture(scope='module')
def timm_swin():
  torch.manual_seed(0)
  model = timm.create_model(SWIN_T, num_classes=0, **SMALL).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def x_nchw():
  return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def nhwc(x_nchw):
  return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


# One jitted function, so models of the same structure share one compilation.
_apply = jax.jit(lambda m, x: m(x))


def forward(model, x_nchw):
  return np.asarray(_apply(model, nhwc(x_nchw)))


def to_old_layout(state_dict):
  """Current timm keys -> timm 0.5.4 keys (PatchMerging at the end of the previous stage)."""
  out = {}
  for key, value in state_dict.items():
    m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', key)
    out[f'layers.{int(m[1]) - 1}.downsample.{m[2]}' if m else key] = value
  return out


def run_reference(tmp_path, x_nchw, **spec):
  """Runs tests/ark_reference_model.py under timm 0.5.4; returns its output arrays."""
  assert os.path.isdir(TIMM_054), (
      f'timm 0.5.4 (the Ark reference dependency) is missing at {TIMM_054}; run `make install-test`.')
  np.save(tmp_path / 'x.npy', x_nchw)
  spec = dict(spec, input=str(tmp_path / 'x.npy'), output=str(tmp_path / 'out.npz'))
  (tmp_path / 'spec.json').write_text(json.dumps(spec))
  env = dict(os.environ, PYTHONPATH=TIMM_054)
  subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tests', 'ark_reference_model.py'),
                  str(tmp_path / 'spec.json')], check=True, env=env, capture_output=True)
  return dict(np.load(tmp_path / 'out.npz'))


# ----------------------------------------------------------------------------- timm layout


def test_timm_round_trip_is_exact(timm_swin):
  sd = {k: v.numpy() for k, v in timm_swin.state_dict().items()}
  back = interop.backbone_state_dict(interop.load_backbone(sd, SWIN_T, **SMALL))
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_timm_export_loads_strictly_and_reproduces_outputs(timm_swin, x_nchw):
  ours = interop.load_backbone(timm_swin.state_dict(), SWIN_T, **SMALL)
  fresh = timm.create_model(SWIN_T, num_classes=0, **SMALL).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                         interop.backbone_state_dict(ours).items()}, strict=True)
  with torch.no_grad():
    want = timm_swin(torch.from_numpy(x_nchw)).numpy()
    got = fresh(torch.from_numpy(x_nchw)).numpy()
  np.testing.assert_array_equal(got, want)
  assert np.abs(forward(ours, x_nchw) - want).max() < 1e-4


def test_old_layout_and_module_prefix_load_to_the_same_model(timm_swin, x_nchw):
  sd = timm_swin.state_dict()
  reference = forward(interop.load_backbone(sd, SWIN_T, **SMALL), x_nchw)
  old = {f'module.{k}': v for k, v in to_old_layout(sd).items()}
  np.testing.assert_array_equal(forward(interop.load_backbone(old, SWIN_T, **SMALL), x_nchw),
                                reference)


# ----------------------------------------------------------------------------- Ark reference


def test_timm054_checkpoint_loads_and_matches_the_reference(tmp_path, x_nchw):
  out = run_reference(tmp_path, x_nchw, swin=SMALL_054, save_state=str(tmp_path / 'sd.npz'))
  sd = dict(np.load(tmp_path / 'sd.npz'))
  assert any(k.endswith('attn_mask') for k in sd) and 'head.weight' in sd  # a real 0.5.4 dict
  ours = interop.load_backbone(sd, SWIN_T, **SMALL)
  assert np.abs(forward(ours, x_nchw) - out['features']).max() < 1e-4
  # ...and our 'ark' export reproduces its key set and buffers exactly.
  exported = interop.backbone_state_dict(ours, layout='ark')
  assert set(exported) == set(sd) - {'head.weight', 'head.bias'}
  for key in exported:
    np.testing.assert_array_equal(exported[key], sd[key], err_msg=key)


def small_ark_model(projector_mlp=False, num_classes=NUM_CLASSES, projector_dim=32):
  cfg = registry.backbone_config('swin', 'tiny', **SMALL)
  return registry.materialize(lambda: ark.ArkModel(
      registry.create_backbone('swin', cfg, rngs=nnx.Rngs(0)), num_classes,
      projector_dim=projector_dim, projector_mlp=projector_mlp, rngs=nnx.Rngs(1)))


def test_ark_export_key_names_and_head_shapes():
  linear = interop.ark_state_dict(small_ark_model())
  assert linear['projector.weight'].shape == (32, 768)
  assert linear['head.weight'].shape == (1000, 768)  # the reference's unused ImageNet head
  assert [linear[f'omni_heads.{k}.weight'].shape for k in range(6)] == [(n, 32) for n in NUM_CLASSES]
  assert [linear[f'omni_heads.{k}.bias'].shape for k in range(6)] == [(n,) for n in NUM_CLASSES]
  mlp = interop.ark_state_dict(small_ark_model(projector_mlp=True))
  assert mlp['projector.0.weight'].shape == (32, 768) and mlp['projector.2.weight'].shape == (32, 32)
  assert not any(k.startswith('projector.fc') for k in mlp)


def test_ark_export_loads_strictly_into_the_reference_model(tmp_path, x_nchw):
  model = small_ark_model()
  sd = interop.ark_state_dict(model)
  np.savez(tmp_path / 'ark.npz', **sd)
  out = run_reference(tmp_path, x_nchw, swin=SMALL_054, projector_dim=32,
                      num_classes=list(NUM_CLASSES), load=str(tmp_path / 'ark.npz'), strict=True)
  ours = _apply(model, nhwc(x_nchw))
  assert np.abs(np.asarray(ours['z']) - out['z']).max() < 1e-4
  for k, n in enumerate(NUM_CLASSES):
    np.testing.assert_allclose(np.asarray(ours['logits'])[:, k, :n], out[f'logits_{k}'],
                               atol=1e-4)


def test_reference_downstream_recipe_accepts_the_ark_export(tmp_path, x_nchw):
  """Strip module., drop head.* and attn_mask, load non-strictly: nothing of the backbone missing."""
  model = small_ark_model()
  sd = {f'module.{k}': v for k, v in interop.ark_state_dict(model).items()}
  np.savez(tmp_path / 'ark.npz', **sd)
  out = run_reference(tmp_path, x_nchw, swin=SMALL_054, load=str(tmp_path / 'ark.npz'),
                      strict=False)
  # Missing: only the new task head, and the attn_mask buffers the recipe drops
  # (the model keeps the ones it computed itself).
  assert {'head.bias', 'head.weight'} <= set(out['missing'])
  assert all(k.startswith('head.') or k.endswith('.attn_mask') for k in out['missing'])
  assert all(k.startswith(('projector.', 'omni_heads.')) for k in out['unexpected'])
  assert np.abs(forward(model.backbone, x_nchw) - out['features']).max() < 1e-4


def test_ark_model_round_trip():
  model = small_ark_model(projector_mlp=True)
  sd = interop.ark_state_dict(model)
  loaded = interop.load_ark_model(sd, SWIN_T, NUM_CLASSES, **SMALL)
  assert loaded.num_classes == NUM_CLASSES
  back = interop.ark_state_dict(loaded)
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  # Real head columns equal the source's; padded ones are zero-filled on load.
  mask_1xPxC = np.ones((1, 32, 1), bool) & model.class_mask()[:, None, :]
  kernel_DxPxC, source_DxPxC = np.asarray(loaded.heads.kernel[...]), np.asarray(model.heads.kernel[...])
  np.testing.assert_array_equal(kernel_DxPxC[mask_1xPxC], source_DxPxC[mask_1xPxC])
  assert np.all(kernel_DxPxC[~mask_1xPxC] == 0)


def test_ark_model_head_sizes_must_agree():
  model = small_ark_model(num_classes=(3, 2), projector_dim=8)
  with pytest.raises(interop.WeightsMismatchError, match=r'checkpoint omni_heads have \(3, 2\)'):
    interop.load_ark_model(interop.ark_state_dict(model), SWIN_T, (3, 4), **SMALL)


# ----------------------------------------------------------------------------- errors


def test_missing_extra_and_misshapen_keys_are_listed(timm_swin):
  sd = dict(timm_swin.state_dict())
  del sd['layers.2.blocks.0.mlp.fc1.bias']
  sd['layers.0.blocks.0.extra.weight'] = torch.zeros(3)
  sd['norm.weight'] = torch.zeros(5)
  with pytest.raises(interop.WeightsMismatchError) as error:
    interop.load_backbone(sd, SWIN_T, **SMALL)
  message = str(error.value)
  assert 'missing' in message and 'layers.2.blocks.0.mlp.fc1.bias [1536]' in message
  assert 'unexpected' in message and 'layers.0.blocks.0.extra.weight [3]' in message
  assert 'norm.weight: checkpoint [5], model [768]' in message


def test_window_mismatch_names_the_bias_table(timm_swin):
  with pytest.raises(interop.WeightsMismatchError, match='relative_position_bias_table'):
    interop.load_backbone(timm_swin.state_dict(), SWIN_T, img_size=64, window_size=2)


def test_unknown_model_name_and_bad_size():
  with pytest.raises(ValueError, match="Unknown model_name 'resnet50'"):
    interop.load_backbone({}, 'resnet50')
  with pytest.raises(ValueError, match='divisible by 32'):
    interop.load_backbone({}, SWIN_T, img_size=100)


# ----------------------------------------------------------------------------- files


def test_read_state_dict_from_torch_and_safetensors_files(tmp_path, timm_swin, x_nchw):
  from safetensors.numpy import save_file
  sd = {k: v.clone() for k, v in timm_swin.state_dict().items()}
  want = forward(interop.load_backbone(sd, SWIN_T, **SMALL), x_nchw)
  # Microsoft's release wraps the weights in {'model': ...}; Ark in {'teacher': ..., 'state_dict': ...}.
  torch.save({'model': to_old_layout(sd)}, tmp_path / 'ms.pth')
  torch.save({'teacher': {f'module.{k}': v for k, v in sd.items()}, 'state_dict': {},
              'epoch': 3}, tmp_path / 'ark.pth.tar')
  save_file(interop.backbone_state_dict(interop.load_backbone(sd, SWIN_T, **SMALL)),
            str(tmp_path / 'timm.safetensors'))
  for name in ('ms.pth', 'ark.pth.tar', 'timm.safetensors'):
    loaded = interop.load_backbone(interop.read_state_dict(str(tmp_path / name)), SWIN_T, **SMALL)
    np.testing.assert_array_equal(forward(loaded, x_nchw), want, err_msg=name)
  with pytest.raises(ValueError, match="no entry 'student'"):
    interop.read_state_dict(str(tmp_path / 'ark.pth.tar'), key='student')


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_pickles_that_run_code_are_refused(tmp_path):
  import pickle
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    pickle.dump({'model': _RunsCode()}, f)
  with pytest.raises(ValueError, match='weights-only'):
    interop.read_state_dict(str(path))


def test_safetensors_of_wrong_dtypes_or_shapes_are_refused_naming_each_tensor(tmp_path,
                                                                             timm_swin):
  """Integer, boolean and float64 tensors are not cast into float parameters: refused by name."""
  from safetensors.numpy import save_file
  good = {k: v.numpy() for k, v in timm_swin.state_dict().items()}
  bad = dict(good)
  bad['norm.weight'] = np.round(good['norm.weight']).astype(np.int32)
  bad['layers.0.blocks.0.attn.qkv.weight'] = good['layers.0.blocks.0.attn.qkv.weight'].astype(
      np.float64)
  bad['patch_embed.proj.bias'] = good['patch_embed.proj.bias'] > 0
  bad['norm.bias'] = np.zeros(5, np.float32)
  save_file(bad, str(tmp_path / 'bad.safetensors'))
  with pytest.raises(interop.WeightsMismatchError) as error:
    interop.load_backbone(interop.read_state_dict(str(tmp_path / 'bad.safetensors')), SWIN_T,
                          **SMALL)
  message = str(error.value)
  assert '4 wrong shape or dtype' in message
  for line in ('norm.weight: checkpoint int32, model wants one of float16, bfloat16, float32',
               'layers.0.blocks.0.attn.qkv.weight: checkpoint float64',
               'patch_embed.proj.bias: checkpoint bool',
               'norm.bias: checkpoint [5], model [768]'):
    assert line in message, (line, message)

  # Float16 and bfloat16 are weight dtypes: loaded, exactly, into float32 parameters.
  half = dict(good, **{'norm.weight': good['norm.weight'].astype(np.float16),
                       'norm.bias': good['norm.bias'].astype(jnp.bfloat16)})
  save_file(half, str(tmp_path / 'half.safetensors'))
  loaded = interop.load_backbone(interop.read_state_dict(str(tmp_path / 'half.safetensors')),
                                 SWIN_T, **SMALL)
  for param, key in ((loaded.norm.scale, 'norm.weight'), (loaded.norm.bias, 'norm.bias')):
    assert param[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(param[...]), half[key].astype(np.float32))

  # The heads of an Ark file (init_params, config.init.from_pytorch) too.
  abstract = nnx.eval_shape(lambda: ark.ArkModel(
      registry.create_backbone('swin', registry.backbone_config('swin', 'tiny', **SMALL),
                               rngs=nnx.Rngs(0)), (3, 2), projector_dim=8, rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(0)
  ark_sd = dict(good, **{
      'projector.weight': rng.normal(size=(8, 768)).astype(np.float32),
      'projector.bias': np.zeros(8, np.float32),
      'omni_heads.0.weight': rng.integers(-3, 3, (3, 8)).astype(np.int32),
      'omni_heads.0.bias': np.zeros(3, np.float32),
      'omni_heads.1.weight': rng.normal(size=(2, 8)).astype(np.float32),
      'omni_heads.1.bias': np.zeros(2, np.float32)})
  save_file(ark_sd, str(tmp_path / 'ark.safetensors'))
  with pytest.raises(interop.WeightsMismatchError,
                     match=r'omni_heads\.0\.weight: checkpoint int32'):
    interop.init_params(interop.read_state_dict(str(tmp_path / 'ark.safetensors')), abstract)
