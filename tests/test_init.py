"""Starting weights (config.init) and checkpoints that do not fit the config: errors before compiling."""

import os

from flax import nnx
import jax
import numpy as np
import pytest
import torch

from ark_jax import interop
from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from ark_jax.models import registry
from tests.conftest import tiny_demo_config


def _tiny_model(config, seed, num_classes=None):
  return registry.create_model(config.model, num_classes or config.data.num_classes,
                               rngs=nnx.Rngs(seed))


def _state(config):
  mesh = sharding.make_mesh(config.mesh)
  init = train.load_init_params(config, config.data.num_classes, mesh)
  graphdef, state, _ = train_state.create_train_state(config, config.data.num_classes, mesh,
                                                      config.sharding.rules, init_params=init)
  return graphdef, state


def _assert_loaded(graphdef, params, model, parts=('backbone', 'projector', 'omni_heads')):
  """Equal weights as the reference layout has them (heads unpadded)."""
  got = interop.ark_state_dict(nnx.merge(graphdef, jax.device_get(params)), 'timm')
  want = interop.ark_state_dict(model, 'timm')
  keys = [k for k in want if k.split('.')[0] in parts or
          (parts[0] == 'backbone' and k.split('.')[0] not in ('projector', 'omni_heads'))]
  assert len(keys) > 10
  for k in keys:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_from_pytorch_loads_an_ark_checkpoint_into_student_and_teacher(demo_data_dir, tmp_path):
  config = tiny_demo_config(demo_data_dir)
  model = _tiny_model(config, seed=7)
  sd = {k: torch.from_numpy(v) for k, v in interop.ark_state_dict(model, 'ark').items()}
  path = str(tmp_path / 'ark.pth.tar')
  torch.save({'teacher': sd, 'state_dict': sd}, path)
  config.init.from_pytorch = path
  graphdef, state = _state(config)
  _assert_loaded(graphdef, state.params, model)
  _assert_loaded(graphdef, state.ema_params, model)


def test_from_pytorch_with_other_heads_is_refused_unless_heads_are_left_out(demo_data_dir,
                                                                           tmp_path):
  config = tiny_demo_config(demo_data_dir)
  other = _tiny_model(config, seed=3, num_classes=(14, 3))
  path = str(tmp_path / 'other.pth')
  torch.save({k: torch.from_numpy(v) for k, v in interop.ark_state_dict(other, 'ark').items()},
             path)
  config.init.from_pytorch = path
  mesh = sharding.make_mesh(config.mesh)
  with open(path, 'rb') as f:
    before = f.read()
  with pytest.raises(interop.WeightsMismatchError, match=r'other\.pth.*\(14, 3\).*\(10, 5, 1, 3\)'):
    train.load_init_params(config, config.data.num_classes, mesh)
  with open(path, 'rb') as f:
    assert f.read() == before  # the refused checkpoint is left as it was
  config.init.load_heads = False
  graphdef, state = _state(config)
  _assert_loaded(graphdef, state.params, other, parts=('backbone', 'projector'))
  # The heads are the run's own fresh ones, as without any init.
  config.init.from_pytorch = None
  _, scratch = _state(config)
  np.testing.assert_array_equal(np.asarray(state.params['heads']['kernel']),
                                np.asarray(scratch.params['heads']['kernel']))


def test_from_checkpoint_starts_both_models_from_the_runs_teacher(demo_data_dir, tmp_path):
  source = str(tmp_path / 'source')
  first = train.train_and_evaluate(tiny_demo_config(demo_data_dir, max_steps=3), source)
  config = tiny_demo_config(demo_data_dir)
  config.init.from_checkpoint = source
  _, state = _state(config)
  teacher = jax.device_get(first.ema_params)
  for loaded in (state.params, state.ema_params):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), teacher)
  assert not np.array_equal(np.asarray(first.params['projector']['fc1']['kernel']),
                            np.asarray(teacher['projector']['fc1']['kernel']))
  # init.key='student' takes the run's student instead; an unknown key is named.
  mesh = sharding.make_mesh(config.mesh)
  config.init.key = 'student'
  loaded = train.load_init_params(config, config.data.num_classes, mesh)
  np.testing.assert_array_equal(np.asarray(loaded['projector']['fc1']['kernel'].get_value()),
                                np.asarray(first.params['projector']['fc1']['kernel']))
  config.init.key = 'model'
  with pytest.raises(ValueError, match=r"config\.init\.key='model'.*\['student', 'teacher'\]"):
    train.load_init_params(config, config.data.num_classes, mesh)

  # The same source for a run over other datasets: refused before anything is built.
  config = tiny_demo_config(demo_data_dir, **{'data.datasets': ('demo_binary', 'demo_count'),
                                              'data.num_classes': (1, 3)})
  config.init.from_checkpoint = source
  with pytest.raises(ValueError, match=r"from_checkpoint.*demo_multilabel.*\('demo_binary', "
                                       r"'demo_count'\).*load_heads=False"):
    train.load_init_params(config, config.data.num_classes, sharding.make_mesh(config.mesh))


def test_a_workdir_of_other_datasets_or_model_fails_before_compiling(demo_data_dir, tmp_path,
                                                                    monkeypatch):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_demo_config(demo_data_dir, max_steps=3), workdir)

  def no_compile(*args, **kwargs):
    raise AssertionError('create_train_state reached: the check came too late')

  monkeypatch.setattr(train.train_state_lib, 'create_train_state', no_compile)
  fewer = tiny_demo_config(demo_data_dir, **{'data.datasets': ('demo_multilabel', 'demo_subset',
                                                               'demo_binary'),
                                             'data.num_classes': (10, 5, 1)})
  with pytest.raises(ValueError, match=r'checkpoints holds heads for datasets .*demo_count.*'
                                       r'num_classes=\(10, 5, 1\)'):
    train.train_and_evaluate(fewer, workdir)
  wider = tiny_demo_config(demo_data_dir, **{'model.embed_dim': 32})
  with pytest.raises(ValueError, match=r'model.embed_dim=16, the config has model.embed_dim=32'):
    train.train_and_evaluate(wider, workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
