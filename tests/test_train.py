"""The trainer: the step learns, the loop logs and checkpoints, resume is exact, NaN stops it."""

import json
import os

import jax
import numpy as np
import pytest

from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from input_pipeline import datasets
from input_pipeline import pipeline
from tests.conftest import tiny_demo_config as make_config  # a 2-stage Swin at 32 px, batch 16

FIELDS = ('step', 'loss', 'task_loss', 'consistency_loss', 'lr', 'ema_momentum',
          'consistency_weight', 'img_per_s')


@pytest.fixture
def data_dir(demo_data_dir):
  return demo_data_dir


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_on_first_batch(config, data_dir, steps: int = 8):
  """`steps` train steps on the config's first batch: (state, shardings, mesh, host_batch, metrics)."""
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, shardings = train_state.create_train_state(
      config, config.data.num_classes, mesh, config.sharding.rules)
  it = pipeline.train_iterator(config.data, config.batch_size, config.seed)
  host_batch = next(it)
  it.close()
  is_multiclass = [datasets.metadata(n, data_dir).task == 'multiclass'
                   for n in config.data.datasets]
  step = train.jit_train_step(
      train.make_train_step(graphdef, config, config.data.num_classes, is_multiclass), shardings,
      mesh)
  history = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, train._to_global(host_batch, mesh))
      history.append(metrics)
  return state, shardings, mesh, host_batch, jax.device_get(history)


def test_step_on_a_fixed_batch_lowers_the_loss(data_dir):
  # The config of the loop tests: the step program comes from the compilation cache.
  config = make_config(data_dir)
  state, shardings, mesh, _, history = train_on_first_batch(config, data_dir)
  losses = np.asarray([m['task_loss'] for m in history])
  assert np.all(np.isfinite(losses))
  assert int(state.step) == 8
  assert losses[-1] < losses[0] - 0.05, losses

  # ema='pass': the teacher moves only in the end-of-pass call, m_0 = 0.9.
  student, teacher = jax.device_get((state.params, state.ema_params))
  state = train.make_ema_update(config, shardings, mesh)(state, np.int32(0))
  jax.tree.map(lambda new, t, s: np.testing.assert_allclose(new, 0.9 * t + 0.1 * s, rtol=1e-5,
                                                            atol=1e-6),
               jax.device_get(state.ema_params), teacher, student)


def test_train_writes_metrics_and_checkpoints_and_resumes_exactly(data_dir, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(make_config(data_dir), straight)
  lines = read_metrics(straight)
  assert [m['step'] for m in lines] == [1, 2, 3, 4, 5, 6]
  for m in lines:
    assert set(FIELDS) <= set(m), m
    assert all(np.isfinite(m[k]) for k in FIELDS), m
  assert lines[0]['task_loss/demo_multilabel'] > 0
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == ['3', '6']
  assert json.load(open(os.path.join(straight, 'config.json')))['max_steps'] == 6

  # 3 steps, then a fresh run continuing to 6 from the step-3 checkpoint.
  train.train_and_evaluate(make_config(data_dir, max_steps=3), resumed)
  train.train_and_evaluate(make_config(data_dir), resumed)
  again = read_metrics(resumed)
  assert [m['step'] for m in again] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(lines, again):
    a.pop('img_per_s'), b.pop('img_per_s')
    assert a == b


def test_non_finite_loss_names_the_step(data_dir, tmp_path):
  config = make_config(data_dir, **{'optimizer.lr': 1e30, 'optimizer.warmup_steps': 0,
                                    'max_steps': 4})
  with pytest.raises(FloatingPointError, match=r'at step 2 .*demo_multilabel'):
    train.train_and_evaluate(config, str(tmp_path))
  # Nothing non-finite reached a checkpoint.
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '3'))


def test_consolidated_head_without_consistency_learns_from_labels_alone(data_dir):
  # The ablations' variants (configs/ablations): one head over the union of the
  # label names, and c = 0; a mixed batch routes rows of every dataset through it.
  config = make_config(data_dir)
  config.data.schedule, config.ema = 'mixed', 'step'
  config.model.head_labels = tuple(datasets.metadata(n, data_dir).label_names
                                   for n in config.data.datasets)
  config.consistency_scale = 0.0
  state, _, _, host_batch, history = train_on_first_batch(config, data_dir)
  assert state.params['head']['kernel'].shape == (16, 13)  # 10 items + 3 counts
  assert len(set(host_batch['dataset_id'].tolist())) > 1
  for m in history:
    assert m['consistency_weight'] == 0 and m['loss'] == m['task_loss']
    assert m['consistency_loss'] > 0  # still measured, only not weighted
  assert history[-1]['task_loss'] < history[0]['task_loss'] - 0.05


def test_head_labels_that_do_not_name_the_datasets_labels_are_refused(data_dir, tmp_path):
  config = make_config(data_dir)
  config.model.head_labels = (('a',) * 10, ('b',) * 5, ('shirt',), ('one', 'two', 'three'))
  with pytest.raises(ValueError, match=r"config\.model\.head_labels\[0\]=.*'demo_multilabel'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_the_loop_fetches_from_the_devices_only_to_log_and_checkpoint(data_dir, tmp_path,
                                                                      monkeypatch):
  # Every device-to-host copy of a jax.Array goes through ArrayImpl._value
  # (np.asarray, float(), jax.device_get); from the first step's metrics on,
  # count the ones the loop makes outside the metrics flush and the checkpoint
  # save. (The loop also runs under jax.transfer_guard('disallow'), which
  # catches implicit host-to-device transfers everywhere and device-to-host ones
  # on accelerators; on CPU the arrays already live in host memory, hence this
  # count.) Before the loop, compiling the initialiser reads constants: not counted.
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top
  from ark_jax import checkpoint  # pylint: disable=g-import-not-at-top
  inside, outside, allowed, looping = [], [], [], []
  original_value = array_lib.ArrayImpl._value

  def counted(self):
    if looping:
      (inside if allowed else outside).append(1)
    return original_value.fget(self)

  def allowing(method):
    def wrapped(*args, **kwargs):
      allowed.append(1)
      try:
        return method(*args, **kwargs)
      finally:
        allowed.pop()
    return wrapped

  original_add = train.MetricsWriter.add

  def add(self, *args):
    looping.append(1)
    return original_add(self, *args)

  monkeypatch.setattr(array_lib.ArrayImpl, '_value', property(counted))
  monkeypatch.setattr(train.MetricsWriter, 'add', add)
  monkeypatch.setattr(train.MetricsWriter, 'flush', allowing(train.MetricsWriter.flush))
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', allowing(checkpoint.Checkpointer.save))
  config = make_config(data_dir, **{'log_every_steps': 3, 'eval_every_steps': -1})
  train.train_and_evaluate(config, str(tmp_path))
  assert len(looping) == 6
  assert [m['step'] for m in read_metrics(str(tmp_path))] == [3, 6]
  assert inside and not outside, (len(inside), len(outside))
