"""Two processes x 2 CPU devices (gloo over loopback) train and evaluate like one with 4 devices."""

import json
import os

import numpy as np
import portpicker
import pytest

import demo_runs

STEPS = 4


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_runs.prepare_small_demo(str(tmp_path_factory.mktemp('multiprocess_demo_data')))


def test_two_processes_log_the_losses_of_one(data_dir, tmp_path):
  cache = str(tmp_path / 'jax_cache')
  overrides = {'data.data_dir': data_dir, 'num_epochs': 1, 'max_steps': STEPS,
               'checkpoint_every_steps': STEPS, 'eval_every_steps': 0, 'eval_batch_size': 8}
  port = portpicker.pick_unused_port()
  one = str(tmp_path / 'one_process')
  two = str(tmp_path / 'two_processes')
  runs = [demo_runs.Run(demo_runs.command(one, overrides), demo_runs.env(cache, 4),
                        str(tmp_path / 'logs' / 'one_process.log'))]
  for i in range(2):
    flags = (f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}')
    runs.append(demo_runs.Run(demo_runs.command(two, overrides, flags=flags),
                              demo_runs.env(cache, 2), str(tmp_path / 'logs' / f'process_{i}.log')))
  codes = [r.wait() for r in runs]
  assert codes == [0, 0, 0], '\n\n'.join(r.describe() for r in runs)

  expected, got = demo_runs.read_metrics(one), demo_runs.read_metrics(two)
  assert [m['step'] for m in got] == list(range(1, STEPS + 1))
  for e, g in zip(expected, got):
    for key in demo_runs.EXACT_FIELDS:
      np.testing.assert_allclose(g[key], e[key], rtol=0, atol=1e-5, err_msg=f'{key} {g} {e}')
  # One line per step: process 0 alone writes metrics.jsonl (into the shared workdir).
  # Both processes wrote their parts of the final checkpoint, which committed.
  assert demo_runs.committed_steps(two) == [STEPS]
  assert 'JAX process 1 of 2, 4 devices' in runs[2].log()

  # The final evaluation gathers every process's rows: the same AUCs over the same n.
  def results(workdir):
    with open(os.path.join(workdir, 'eval', f'step_{STEPS}.json')) as f:
      return json.load(f)['results']

  expected, got = results(one), results(two)
  assert list(got) == list(expected)
  for name, entry in expected.items():
    for model in ('student', 'teacher'):
      assert got[name][model]['n'] == entry[model]['n'] == 16
      assert got[name][model]['auc'].keys() == entry[model]['auc'].keys()
      for label, auc in entry[model]['auc'].items():
        assert got[name][model]['auc'][label] == pytest.approx(auc, abs=1e-6), (name, label)
