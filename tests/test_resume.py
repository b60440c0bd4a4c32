"""Resume is exact: after SIGKILL, after SIGTERM, in both schedules, and onto another mesh.

The interruptions run the real command in subprocesses (demo_runs); the mesh
change runs train_and_evaluate in-process on conftest's 8 CPU devices.
"""

import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import demo_runs
from ark_jax import sharding
from ark_jax import train
from configs import demo

STEPS = 12
EVERY = 4  # checkpoint interval
DEVICES = 2
# cyclic: 2 steps per dataset pass (16 + 8 examples), so passes (and the pass-EMA
# update) end at every even step; mixed: 6 steps per epoch, EMA every step.
SCHEDULES = {
    'cyclic': ('configs/demo.py', {'ema': 'pass'}),
    'mixed': ('configs/demo.py:mixed', {'ema': 'step'}),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_runs.prepare_small_demo(str(tmp_path_factory.mktemp('resume_demo_data')))


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """One compilation cache for every run (shared with test_faults): only the first compiles."""
  return demo_runs.shared_cache_dir(tmp_path_factory)


def _wait_for_first_step(run):
  """Polls the run's own log until its loop has logged a step (so SIGTERM meets the loop)."""
  deadline = time.monotonic() + demo_runs.TIMEOUT_S
  while time.monotonic() < deadline:
    if re.search(r'\] step \d+: ', run.log()):
      return
    assert run.proc.poll() is None, f'Exited before its first step:\n{run.describe()}'
    time.sleep(0.01)
  run.kill(signal.SIGKILL)
  run.wait()
  raise AssertionError(f'No step logged in time:\n{run.describe()}')


@pytest.mark.parametrize('schedule', sorted(SCHEDULES))
def test_killed_and_preempted_runs_resume_exactly(schedule, data_dir, cache_dir, tmp_path):
  config, overrides = SCHEDULES[schedule]
  overrides = {**overrides, 'data.data_dir': data_dir, 'num_epochs': 2, 'max_steps': STEPS,
               'checkpoint_every_steps': EVERY}
  environ = demo_runs.env(cache_dir, DEVICES)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  logs = tmp_path / 'logs'

  def start(workdir, name):
    return demo_runs.Run(demo_runs.command(workdir, overrides, config), environ,
                         str(logs / f'{name}.log'))

  uninterrupted = start(straight, 'straight')  # runs alongside the interrupted ones

  # SIGKILL once a checkpoint is committed: no chance to save anything more.
  killed = start(resumed, 'killed')
  demo_runs.wait_for_checkpoint(killed, resumed, EVERY)
  killed.kill(signal.SIGKILL)
  assert killed.wait() == -signal.SIGKILL, killed.describe()
  kept = demo_runs.committed_steps(resumed)
  assert kept and kept[-1] < STEPS, (kept, killed.describe())

  # Restarted, then SIGTERM: it finishes its step, checkpoints it and exits 0.
  preempted = start(resumed, 'preempted')
  _wait_for_first_step(preempted)
  preempted.kill(signal.SIGTERM)
  preempted.wait_ok()
  stopped = demo_runs.committed_steps(resumed)[-1]
  assert kept[-1] < stopped < STEPS, (kept, stopped, preempted.describe())
  assert demo_runs.read_metrics(resumed)[-1]['step'] == stopped, preempted.describe()

  # Restarted again, to the end.
  demo_runs.run_ok(demo_runs.command(resumed, overrides, config), environ,
                   str(logs / 'finished.log'))
  uninterrupted.wait_ok()
  expected = demo_runs.exact(demo_runs.read_metrics(straight))
  assert [m['step'] for m in expected] == list(range(1, STEPS + 1))
  got = demo_runs.exact(demo_runs.read_metrics(resumed))
  assert [m['step'] for m in got] == [m['step'] for m in expected]
  for e, g in zip(expected, got):
    assert g == e  # bit-identical floats (JSON round-trips them exactly)
  if schedule == 'cyclic':  # the teacher momentum moved with the passes
    assert len({m['ema_momentum'] for m in expected}) == STEPS // 2


def _in_process_config(data_dir, **overrides):
  c = demo.get_config()
  c.update_from_flattened_dict({**demo_runs.TINY, 'data.data_dir': data_dir, 'num_epochs': 1,
                                'max_steps': 3, 'checkpoint_every_steps': 2, **overrides})
  return c


def test_checkpoint_restores_onto_an_fsdp_mesh(data_dir, tmp_path):
  assert jax.device_count() == 8
  straight, moved = str(tmp_path / 'data8'), str(tmp_path / 'data2_fsdp4')
  train.train_and_evaluate(_in_process_config(data_dir, **{'mesh.data': 8, 'mesh.fsdp': 1}),
                           straight)
  assert demo_runs.committed_steps(straight) == [2, 3]
  shutil.copytree(os.path.join(straight, 'checkpoints', '2'),
                  os.path.join(moved, 'checkpoints', '2'))

  config = _in_process_config(data_dir, **{'mesh.data': 2, 'mesh.fsdp': 4})
  config.sharding.rules = sharding.FSDP_RULES
  state = train.train_and_evaluate(config, moved)
  # The run really sharded parameters over fsdp.
  specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert any('fsdp' in jax.tree.leaves(tuple(s)) for s in specs), specs

  expected, got = demo_runs.read_metrics(straight)[-1], demo_runs.read_metrics(moved)
  assert [m['step'] for m in got] == [3]
  for key in demo_runs.EXACT_FIELDS:
    np.testing.assert_allclose(got[0][key], expected[key], rtol=0, atol=1e-5, err_msg=key)
