"""benchmarks/gpu.sh and gpu_suite.py: the plan a lent GPU runs, here on the CPU with tiny models."""

import io
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import ark_torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpu_suite  # pylint: disable=g-import-not-at-top,wrong-import-position


def _search(fits_up_to: int, start: int, smallest: int = 8, largest: int = 256,
            budget_runs: int = 100) -> list[tuple[int, str]]:
  """batch_search against a device where batches up to `fits_up_to` run."""
  tried = []

  def try_batch(batch):
    outcome = gpu_suite.Outcome('ark+ large', 'jax', batch)
    if len(tried) >= budget_runs:
      outcome.status = 'skipped: time budget spent'
    elif batch <= fits_up_to:
      outcome.result = {'img_per_s': 1.0}
    else:
      outcome.status = 'out of memory'
    tried.append(batch)
    return outcome

  return [(o.batch_size, o.status) for o in gpu_suite.batch_search(try_batch, start, smallest,
                                                                   largest)]


def test_batch_search_doubles_until_a_batch_fails():
  assert _search(fits_up_to=100, start=32) == [(32, 'ok'), (64, 'ok'), (128, 'out of memory')]


def test_batch_search_halves_after_a_failure_until_one_runs():
  assert _search(fits_up_to=20, start=64) == [
      (64, 'out of memory'), (32, 'out of memory'), (16, 'ok')]


def test_batch_search_stays_within_its_bounds_and_budget():
  assert _search(fits_up_to=1000, start=64, largest=128) == [(64, 'ok'), (128, 'ok')]
  assert _search(fits_up_to=4, start=16) == [(16, 'out of memory'), (8, 'out of memory')]
  assert _search(fits_up_to=1000, start=64, budget_runs=2) == [
      (64, 'ok'), (128, 'ok'), (256, 'skipped: time budget spent')]


def test_a_failed_run_is_a_row_that_says_why():
  log = io.StringIO()
  deadline = gpu_suite.Deadline(60)
  oom = gpu_suite.run_json(
      [sys.executable, '-c', 'import sys; sys.stderr.write("jaxlib.xla_extension.'
       'XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 5 GiB"); sys.exit(1)'],
      gpu_suite.Outcome('step', 'jax', 512), deadline, 30, log)
  crash = gpu_suite.run_json([sys.executable, '-c', 'raise ValueError("bad config key")'],
                             gpu_suite.Outcome('step', 'jax', 8), deadline, 30, log)
  slow = gpu_suite.run_json([sys.executable, '-c', 'import time; time.sleep(30)'],
                            gpu_suite.Outcome('step', 'torch', 8), deadline, 1, log, min_run_s=0)
  spent = gpu_suite.run_json([sys.executable, '-c', 'print(1)'],
                             gpu_suite.Outcome('step', 'torch', 8), gpu_suite.Deadline(5), 30,
                             log)
  assert (oom.result, oom.status) == (None, 'out of memory')
  assert crash.status == 'failed: ValueError: bad config key'
  assert slow.status == 'timeout after 1 s' and 1 <= slow.wall_s < 10
  assert spent.status == 'skipped: time budget spent'
  rows = gpu_suite.table_lines([oom, crash, slow, spent])[2:]
  assert [row.split(' | ')[-1] for row in rows] == [
      'out of memory |', 'failed: ValueError: bad config key |', 'timeout after 1 s |',
      'skipped: time budget spent |']


def test_verdict_compares_the_frameworks_at_each_batch_against_the_goal():
  def step(framework, batch, img_per_s, mfu):
    return gpu_suite.Outcome('step', framework, batch, {'img_per_s': img_per_s, 'mfu': mfu})

  lines = gpu_suite.verdict_lines([
      step('jax', 128, 2500.0, 0.31), step('torch', 128, 1000.0, 0.12),
      step('jax', 256, 2600.0, 0.32), step('torch', 256, 1400.0, 0.17),
      gpu_suite.Outcome('ark+ large', 'jax', 64, {'img_per_s': 40.0,
                                                  'peak_memory_bytes': 90 * 2**30}),
      gpu_suite.Outcome('ark+ large', 'jax', 128, None, 'out of memory')])
  assert lines == [
      '- step batch 128: JAX 2500.0 img/s (MFU 31.0%), PyTorch 1000.0 img/s (MFU 12.0%): '
      'JAX/PyTorch 2.50; goal 2400 img/s and 2x: met',
      '- step batch 256: JAX 2600.0 img/s (MFU 32.0%), PyTorch 1400.0 img/s (MFU 17.0%): '
      'JAX/PyTorch 1.86; goal 2400 img/s and 2x: not met',
      '- largest batch that ran for the large config: 64 (40.0 img/s, peak 90.0 GiB)']


def test_gpu_script_runs_the_whole_plan_on_a_cpu(tmp_path):
  """gpu.sh as a GPU session runs it, with a 4-block Swin in place of Swin-B/224 on both
  sides and the smoke config in place of Swin-L/768: every run real, the table and
  the ratio written, the compiled programs cached for the runs after."""
  out, cache = tmp_path / 'out', tmp_path / 'jax_cache'
  sizes = {'embed_dim': 32, 'depths': [1, 1, 1, 1], 'num_heads': [1, 2, 4, 8]}
  env = {**os.environ, 'OUT': str(out), 'PY': sys.executable, 'GPU_BUDGET_S': '900',
         'JAX_COMPILATION_CACHE_DIR': str(cache)}
  proc = subprocess.run(
      ['bash', 'benchmarks/gpu.sh', '--model=swin_custom', '--img_size=64', '--window_size=4',
       f'--sizes={json.dumps(sizes)}', '--batches=2', '--large_config=configs/ark6.py:smoke',
       '--large_start=2', '--large_min=1', '--large_max=2', '--steps=2', '--warmup=1',
       '--dtype=float32', '--no-split'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'jax devices: [CpuDevice' in (out / 'env.txt').read_text()

  runs = [json.loads(line) for line in (out / 'gpu.jsonl').read_text().splitlines()]
  assert [(r['label'], r['framework'], r['batch_size'], r['status']) for r in runs] == [
      ('step', 'jax', 2, 'ok'), ('step', 'torch', 2, 'ok'), ('ark+ large', 'jax', 2, 'ok')]
  for r in runs:
    result = r['result']
    assert result['batch_size'] == r['batch_size'] and result['img_per_s'] > 0
    assert 0 < result['mfu'] < 1.5 and result['peak_memory_bytes'] > 2**20
  jax_step, torch_step, large = (r['result'] for r in runs)
  # The same model on both sides. JAX stacks the D heads into one [D, P, C_max]
  # kernel (vmapped), which pads each head to the largest one's C_max classes:
  # that padding is the only difference in parameters.
  num_classes, projector_dim = ark_torch.ARK6_NUM_CLASSES, ark_torch.PROJECTOR_DIM
  padding = (len(num_classes) * max(num_classes) - sum(num_classes)) * (projector_dim + 1)
  assert jax_step['param_count'] - torch_step['param_count'] == padding > 0
  # And the FLOPs JAX counts analytically and torch's FLOP counter finds.
  assert abs(jax_step['gflops_per_image'] / torch_step['gflops_per_image'] - 1) < 0.05
  assert large['model'] == 'swin_custom' and large['param_count'] < jax_step['param_count']
  assert len(list(cache.iterdir())) > 2  # the runs' programs, for the ones after

  table = (out / 'gpu.md').read_text()
  ratio = jax_step['img_per_s'] / torch_step['img_per_s']
  assert f'JAX/PyTorch {ratio:.2f}' in table
  assert '- largest batch that ran for the large config: 2' in table
  assert table.strip() in proc.stdout  # printed last, as the device call returns the tail
