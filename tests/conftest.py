"""Test setup: 8 fake CPU devices, strict rank promotion, the repo on sys.path."""

import os
import sys

import jax

# Before any JAX computation: multi-device code is tested on fake CPU devices.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


# ------------------------------------------------------------------ shared demo fixtures

import pytest  # pylint: disable=g-import-not-at-top

DEMO_R = 32  # the side the tests prepare the demo datasets at


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session: tests that build the same
  step (the tiny demo config) compile it once."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = [getattr(jax.config, n) for n in names]
  for n, v in zip(names, (str(tmp_path_factory.mktemp('jax_cache')), 0, 0)):
    jax.config.update(n, v)
  yield
  for n, v in zip(names, saved):
    jax.config.update(n, v)


@pytest.fixture(scope='session')
def demo_data_dir(tmp_path_factory):
  """The four demo datasets at R=32 from the shipped subset, prepared once per session."""
  from input_pipeline import prepare  # pylint: disable=g-import-not-at-top
  from input_pipeline.datasets import fashion_mosaic  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('demo_data'))
  for name in fashion_mosaic.BUILDERS:
    prepare.prepare(prepare.create_builder(name, data_dir=path, image_size=DEMO_R,
                                           source='subset'), None)
  return path


def tiny_demo_config(data_dir, **overrides):
  """The demo config shrunk: a 2-stage Swin of width 16 at 32 px, batch 16, 6 steps."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.batch_size = 16
  c.model.img_size, c.model.window_size = DEMO_R, 4
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (1, 1), (1, 2)
  c.model.projector_dim = 16
  c.data.data_dir, c.data.image_size = data_dir, DEMO_R
  c.data.read_threads = 1
  c.num_epochs, c.max_steps = 1, 6
  c.log_every_steps, c.checkpoint_every_steps = 1, 3
  c.eval_every_steps, c.eval_batch_size, c.progress_bar = -1, 64, False
  c.optimizer = ml_collections.ConfigDict({
      'name': 'sgd', 'lr': 0.1, 'warmup_steps': 2, 'total_steps': 20, 'weight_decay': 0.0,
      'clip_grad_norm': 0.0})
  c.update_from_flattened_dict(overrides)  # 'optimizer.lr'-style keys
  return c


@pytest.fixture(scope='session')
def trained(demo_data_dir, tmp_path_factory):
  """A 3-step tiny demo run shared by the export and predict tests (one training):
  (config, workdir, graphdef, final state). Tests copy the config to change it."""
  from ark_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('trained_run'))
  config = tiny_demo_config(demo_data_dir, max_steps=3)
  state = train.train_and_evaluate(config, workdir)
  graphdef = train.restore_checkpoint(config, workdir, purpose='test')[0]
  return config, workdir, graphdef, jax.device_get(state)
