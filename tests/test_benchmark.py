"""ark_jax/benchmark.py on tiny configs: real timings, FLOPs, MFU, memory and the step split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ark_jax import benchmark
from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from configs import ark6
from configs import demo
from input_pipeline import datasets


def _smoke_macs_by_hand() -> int:
  """Multiply-accumulates of the smoke Ark model, written out layer by layer.

  configs/common.py smoke_model_config: 64 px, patch 4, window 4, embed 32,
  one block per stage, MLP ratio 4, projector 32*8=256 -> 64, six heads padded
  to 14 classes.
  """
  macs = (64 // 4) ** 2 * (4 * 4 * 3) * 32  # patch-embed conv: 256 tokens, 48 -> 32
  # (tokens, width, tokens per window): windows clamp to the grid at 4x4 and 2x2.
  for stage, (tokens, width, window_tokens) in enumerate(
      [(256, 32, 16), (64, 64, 16), (16, 128, 16), (4, 256, 4)]):
    if stage:
      macs += tokens * (2 * width) * width  # patch merging: Linear(4 * width/2 -> width)
    macs += tokens * width * 3 * width  # qkv
    macs += 2 * tokens * window_tokens * width  # q @ k^T and attn @ v, over all heads
    macs += tokens * width * width  # attention output projection
    macs += 2 * tokens * width * 4 * width  # MLP fc1 and fc2
  macs += 256 * 64  # projector
  macs += 6 * 64 * 14  # heads, each padded to the widest (14 classes)
  return macs


def test_forward_reports_real_measurements():
  config = ark6.get_config('smoke')
  result = benchmark.run(config, 'forward', steps=3, warmup=1)

  assert result['img_per_s'] > 0
  assert 0 < result['step_time_s_min'] <= result['step_time_s_median'] <= result['step_time_s_max']
  assert result['img_per_s'] == pytest.approx(config.batch_size / result['step_time_s_median'])
  assert 0 < result['mfu'] < 1
  assert result['gflops_per_image'] == pytest.approx(2 * _smoke_macs_by_hand() / 1e9, rel=1e-12)
  assert result['peak_memory_bytes'] > 0
  assert result['compile_s'] > 0
  assert result['batch_size'] == config.batch_size
  assert result['img_size'] == 64
  assert result['model'] == 'swin_custom'
  assert result['param_count'] > 0


def test_unknown_mode_names_the_known_modes():
  with pytest.raises(ValueError, match=r"Unknown benchmark mode 'backward'.*forward"):
    benchmark.run(ark6.get_config('smoke'), 'backward', steps=1, warmup=0)


def _tiny_step_config(**overrides):
  """configs/demo.py shrunk as tests/test_train.py does: 2-stage Swin width 16, 32 px, batch 16.

  ema='step' puts the EMA update in the step, so every variant is a step.
  """
  c = demo.get_config()
  c.ema = 'step'
  c.batch_size = 16
  c.model.img_size, c.model.window_size = 32, 4
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (1, 1), (1, 2)
  c.model.projector_dim = 16
  c.data.image_size = 32
  c.update_from_flattened_dict(overrides)
  return c


def test_step_mode_times_the_train_step_and_splits_it():
  config = _tiny_step_config()
  result = benchmark.run(config, 'step', steps=2, warmup=1)

  assert result['mode'] == 'step'
  assert result['img_per_s'] > 0
  assert result['img_per_s'] == pytest.approx(config.batch_size / result['step_time_s_median'])
  assert 0 < result['step_time_s_min'] <= result['step_time_s_median'] <= result['step_time_s_max']
  assert 0 < result['mfu'] < 1.5
  # 3x student (forward + backward) + 1x teacher forward, 2 FLOPs per MAC.
  model = benchmark.random_model(config)
  assert result['gflops_per_image'] == pytest.approx(
      8 * benchmark.ark_forward_macs(model) / 1e9, rel=1e-12)
  assert set(result['split']) == {'augment', 'teacher', 'ema', 'rest'}
  for share in result['split'].values():
    assert -0.2 <= share <= 1.2
  assert sum(result['split'].values()) == pytest.approx(1.0)
  assert set(result['variant_step_time_s_median']) == {'full', 'augment', 'teacher', 'ema'}
  assert result['compile_s'] > 0 and result['peak_memory_bytes'] > 0


def test_skipping_nothing_is_the_trainers_step():
  # The same config as above: its programs come from the compilation cache.
  config = _tiny_step_config()
  mesh = sharding.make_mesh(config.mesh)
  num_classes = tuple(config.data.num_classes)
  is_multiclass = [datasets.metadata(n).task == 'multiclass' for n in config.data.datasets]
  graphdef, state, shardings = train_state.create_train_state(
      config, num_classes, mesh, config.sharding.rules)
  batch = benchmark.synthetic_batches(config, num_classes, is_multiclass, 1, mesh)[0]

  def one_step(**skip):
    step = train.jit_train_step(
        train.make_train_step(graphdef, config, num_classes, is_multiclass, **skip),
        shardings, mesh)
    with jax.set_mesh(mesh):
      new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
    return jax.device_get(metrics), jax.device_get(new_state.params)

  default_metrics, default_params = one_step()
  metrics, params = one_step(skip=frozenset())
  for key in default_metrics:
    np.testing.assert_array_equal(metrics[key], default_metrics[key], err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, params, default_params)
  # The argument does act: without the teacher the consistency target is 0.
  no_teacher, _ = one_step(skip=frozenset({'teacher'}))
  assert no_teacher['consistency_loss'] != default_metrics['consistency_loss']
  assert no_teacher['task_loss'] == default_metrics['task_loss']


def test_unknown_part_to_skip_is_an_error():
  config = _tiny_step_config()
  with pytest.raises(ValueError, match=r"unknown parts to skip \['optimizer'\]"):
    train.make_train_step(None, config, config.data.num_classes, [False] * 4,
                          skip=frozenset({'optimizer'}))
