"""ark_jax/benchmark.py on tiny configs: real timings, FLOPs, MFU, memory and the step split."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ark_jax import benchmark
from ark_jax import pipeline_benchmark
from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from ark_jax.models import registry
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
  assert result['step_time_s'] == result['step_time_s_median']
  assert 0 < result['mfu'] < 1.5
  # 3x student (forward + backward) + 1x teacher forward, 2 FLOPs per MAC.
  model = benchmark.random_model(config)
  assert result['gflops_per_image'] == pytest.approx(
      8 * benchmark.ark_forward_macs(model) / 1e9, rel=1e-12)
  assert set(result['split']) == {'augment', 'teacher', 'ema', 'rest'}
  median = result['variant_step_time_s_median']
  assert set(median) == {'full', 'augment', 'teacher', 'ema'}
  assert min(median.values()) > 0 and median['full'] == result['step_time_s_median']
  # Shares are what the medians say (not bounded: 2 steps on a loaded machine
  # can time a variant at twice the full step).
  for part in ('augment', 'teacher', 'ema'):
    assert result['split'][part] == pytest.approx((median['full'] - median[part]) / median['full'])
  assert sum(result['split'].values()) == pytest.approx(1.0)
  assert result['compile_s'] > 0 and result['peak_memory_bytes'] > 0
  # In-process (no re-execution): glibc's defaults, whatever they make of the step.
  assert result['glibc_tunables'] == os.environ.get('GLIBC_TUNABLES', '')
  assert isinstance(result['page_faults_per_step'], int) and result['page_faults_per_step'] >= 0


def test_heads_mode_times_both_programs_and_their_ratio():
  # heads_factor=1 keeps this test cheap: the "wide" program is the step
  # test's own, so both come from the compilation cache. The measurements of
  # BENCHMARKS.md run factor 10; test_widened_... checks the widened heads.
  config = _tiny_step_config()
  result = benchmark.run(config, 'heads', steps=2, warmup=0, heads_factor=1)

  assert result['mode'] == 'heads'
  assert (result['heads'], result['heads_wide']) == (4, 4)
  assert result['step_time_s'] == result['step_time_s_median'] > 0
  assert result['step_time_s_median_wide'] > 0
  assert result['heads_ratio'] == pytest.approx(
      result['step_time_s_median_wide'] / result['step_time_s_median'])
  assert result['heads_ratio_paired'] > 0
  assert result['img_per_s'] == pytest.approx(config.batch_size / result['step_time_s_median'])
  assert result['img_per_s_wide'] == pytest.approx(
      config.batch_size / result['step_time_s_median_wide'])
  # The same program twice: XLA counts the same work.
  assert result['xla_flops_ratio'] == 1 and result['xla_bytes_accessed_ratio'] == 1
  assert result['param_count_wide'] == result['param_count'] > 0
  assert 'heads' in benchmark.summary_lines(result)[-1]


def test_widened_repeats_the_heads_under_new_names():
  config = demo.get_config()
  wide = benchmark.widened(config, 3)
  assert len(set(wide.data.datasets)) == 12
  assert wide.data.datasets[4] == 'demo_multilabel_1'
  assert wide.data.num_classes == demo.DEMO_NUM_CLASSES * 3

  def param_count(c):
    model = nnx.eval_shape(lambda: registry.create_model(c.model, c.data.num_classes,
                                                         rngs=nnx.Rngs(0)))
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

  # Eight more heads, each P=64 x C=10 weights and 10 biases (padded to the widest).
  assert param_count(wide) - param_count(config) == 8 * (64 * 10 + 10)


def test_pipeline_mode_times_the_train_iterator(tmp_path):
  config = demo.get_config()
  config.batch_size, config.data.image_size = 4, 32
  result = pipeline_benchmark.run(config, steps=3, warmup=1, workdir=str(tmp_path), num_images=8)

  assert result['mode'] == 'pipeline'
  assert result['img_per_s'] > 0
  assert result['img_per_s'] == pytest.approx(3 * 4 / (3 * result['step_time_s']))
  assert result['img_per_s_per_core'] == pytest.approx(result['img_per_s'] / result['cores'])
  # CPU time is counted in clock ticks (10 ms): 3 tiny batches may take none.
  assert result['img_per_cpu_s'] == (pytest.approx(12 / result['cpu_s']) if result['cpu_s'] > 0
                                     else None)
  assert (result['workers'], result['read_threads']) == (0, 2)
  assert result['mfu'] is None and result['compile_s'] is None
  assert result['peak_memory_bytes'] > 0
  assert 'img/s per core' in benchmark.summary_lines(result)[1]


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
