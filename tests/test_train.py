"""The trainer: the step learns, the loop logs and checkpoints, resume is exact, NaN stops it."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from configs import demo
from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import prepare
from input_pipeline.datasets import fashion_mosaic as fm

R = 32
FIELDS = ('step', 'loss', 'task_loss', 'consistency_loss', 'lr', 'ema_momentum',
          'consistency_weight', 'img_per_s')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the runs of one config share programs."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = [getattr(jax.config, n) for n in names]
  for n, v in zip(names, (str(tmp_path_factory.mktemp('jax_cache')), 0, 0)):
    jax.config.update(n, v)
  yield
  for n, v in zip(names, saved):
    jax.config.update(n, v)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The four demo datasets at R=32 from the shipped subset, prepared once."""
  path = str(tmp_path_factory.mktemp('train_demo_data'))
  for name in fm.BUILDERS:
    prepare.prepare(prepare.create_builder(name, data_dir=path, image_size=R, source='subset'),
                    None)
  return path


def make_config(data_dir, **overrides):
  """The demo config shrunk: a 2-stage Swin of width 16 at 32 px, batch 16."""
  c = demo.get_config()
  c.batch_size = 16
  c.model.img_size, c.model.window_size = R, 4
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (1, 1), (1, 2)
  c.model.projector_dim = 16
  c.data.data_dir, c.data.image_size = data_dir, R
  c.data.read_threads = 1
  c.num_epochs, c.max_steps = 1, 6
  c.log_every_steps, c.checkpoint_every_steps = 1, 3
  c.optimizer = ml_collections.ConfigDict({
      'name': 'sgd', 'lr': 0.1, 'warmup_steps': 2, 'total_steps': 20, 'weight_decay': 0.0,
      'clip_grad_norm': 0.0})
  c.update_from_flattened_dict(overrides)  # 'optimizer.lr'-style keys
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_step_on_a_fixed_batch_lowers_the_loss(data_dir):
  # The config of the loop tests: the step program comes from the compilation cache.
  config = make_config(data_dir)
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
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(8):
      state, metrics = step(state, train._to_global(host_batch, mesh))
      losses.append(metrics['task_loss'])
  losses = np.asarray(jax.device_get(losses))
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
