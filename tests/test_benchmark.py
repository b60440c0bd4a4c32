"""ark_jax/benchmark.py on the smoke config: real timings, FLOPs, MFU and memory."""

import pytest

from ark_jax import benchmark
from configs import ark6


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
