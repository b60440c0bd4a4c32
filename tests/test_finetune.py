"""Fine-tuning and linear probing (ark_jax/finetune.py) on the tiny demo model."""

import hashlib
import json
import os

from flax import nnx
import jax
import numpy as np
import pytest
import torch

from ark_jax import finetune
from ark_jax import interop
from ark_jax import sharding
from ark_jax import train
from configs import finetune_demo
from tests import test_interop
from tests.conftest import DEMO_R
from tests.conftest import tiny_demo_config

TINY_SWIN = dict(img_size=DEMO_R, window_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2])
PRETRAIN_CLASSES = [10, 5, 1, 3]  # the demo's heads: the Ark file carries them, unused here


def tiny_config(data_dir, mode='full', **overrides):
  """configs/finetune_demo.py with tiny_demo_config's model, 64 training examples, 3 epochs."""
  c = finetune_demo.get_config(mode)
  tiny = tiny_demo_config(data_dir)
  c.model = tiny.model
  c.data.data_dir, c.data.image_size, c.data.read_threads = data_dir, DEMO_R, 1
  c.batch_size = 64 if mode == 'linear_probe' else 16
  c.eval_batch_size = 64
  c.finetune.few_shot = 64.0
  c.max_epochs, c.patience = 3, 3
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def ark_file(tmp_path_factory):
  """An Ark-layout .pth.tar from random weights: {'teacher': {'module.' + k: v}} of a timm 0.5.4
  Swin + projector + omni_heads (tests/ark_reference_model.py), and that model's features."""
  path = tmp_path_factory.mktemp('ark_file')
  x_nchw = np.random.default_rng(1).standard_normal((3, 3, DEMO_R, DEMO_R)).astype(np.float32)
  out = test_interop.run_reference(path, x_nchw, swin=TINY_SWIN, projector_dim=16,
                                   num_classes=PRETRAIN_CLASSES, save_state=str(path / 'sd.npz'))
  sd = dict(np.load(path / 'sd.npz'))
  # The 0.5.4 layout: buffers, PatchMerging at the end of stage 0, the ImageNet head.
  assert {'layers.0.blocks.0.attn.relative_position_index', 'layers.0.downsample.reduction.weight',
          'head.weight', 'projector.weight', 'omni_heads.3.weight'} <= set(sd)
  file = str(path / 'ark_teacher.pth.tar')
  teacher = {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()}
  torch.save({'epoch': 3, 'teacher': teacher, 'state_dict': teacher}, file)
  return file, x_nchw, out


def _sha(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_an_ark_pth_tar_initialises_fine_tuning_with_the_torch_features(demo_data_dir, ark_file):
  file, x_nchw, out = ark_file
  config = tiny_config(demo_data_dir, **{'init.from_pytorch': file})
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    graphdef, init, loaded = finetune.classifier_init(config, 1, mesh)
    params = init(jax.random.PRNGKey(5), loaded)
  features = jax.jit(lambda p, x: nnx.merge(graphdef, p).backbone(x))
  ours = np.asarray(features(params, x_nchw.transpose(0, 2, 3, 1)))
  classifier = nnx.merge(graphdef, jax.device_get(params))
  assert np.abs(ours - out['features']).max() < 1e-4
  assert np.abs(out['features']).max() > 0.1  # not trivially small
  # A new head: trunc-normal 0.02 weights, zero bias; the projector is not part of it.
  kernel = np.asarray(classifier.head.kernel.get_value())
  assert kernel.shape == (32, 1) and 0 < np.abs(kernel).max() < 0.1
  assert not np.asarray(classifier.head.bias.get_value()).any()
  # The linear probe reads the same file's projector: z equals torch's.
  probe = finetune.load_source(config, mesh, projector=True)
  np.testing.assert_allclose(np.asarray(probe['projector']['fc1']['kernel'].get_value()).T,
                             np.load(os.path.join(os.path.dirname(file), 'sd.npz'))[
                                 'projector.weight'])


def test_full_fine_tuning_selects_on_validation_and_stops_early(demo_data_dir, ark_file,
                                                               tmp_path):
  """Two trials from the Ark file; patience 1 stops a run whose loss stops falling."""
  file = ark_file[0]
  digest = _sha(file)
  config = tiny_config(demo_data_dir, **{'init.from_pytorch': file, 'trials': 2,
                                         'max_epochs': 4, 'patience': 1,
                                         'optimizer.lr': 0.05})
  results = finetune.run(config, str(tmp_path))
  assert _sha(file) == digest
  saved = json.loads((tmp_path / 'finetune_results.json').read_text())
  assert saved['summary'] == json.loads(json.dumps(results['summary']))
  trials = results['trials']
  assert [t['seed'] for t in trials] == [0, 1] and [t['n_train'] for t in trials] == [64, 64]
  for t in trials:
    val_losses = [h['val_loss'] for h in t['history']]
    # The best epoch is the one of lowest validation loss, and its loss is reported.
    assert t['best_epoch'] == int(np.argmin(val_losses))
    assert t['val_loss'] == min(val_losses)
    # Patience 1: stopped at the first epoch without improvement (or at max_epochs).
    first_worse = next((i for i in range(1, len(val_losses))
                        if val_losses[i] >= min(val_losses[:i])), None)
    assert t['epochs_run'] == (first_worse + 1 if first_worse else 4)
    assert set(t['test']) >= {'auc_mean', 'auc', 'n'} and t['test']['n'] == 300
    assert set(t['test']['auc']) == {'shirt'}
    assert os.path.exists(tmp_path / f'trial_{t["trial"]}' / 'best.npz')
  # Two seeds, two different runs; the summary is their mean and std.
  aucs = [t['test']['auc_mean'] for t in trials]
  assert aucs[0] != aucs[1]
  s = results['summary']['test_auc_mean']
  assert s['mean'] == pytest.approx(np.mean(aucs)) and s['std'] == pytest.approx(np.std(aucs))
  assert s['values'] == aucs
  # Learning happened: the training loss fell over the first trial.
  history = trials[0]['history']
  assert history[-1]['train_loss'] < history[0]['train_loss'] or trials[0]['epochs_run'] < 3


def test_linear_probe_caches_embeddings_and_beats_chance(demo_data_dir, ark_file, tmp_path,
                                                        monkeypatch):
  """The probe on the projector embeddings of the (random-weight) Ark file."""
  config = tiny_config(demo_data_dir, 'linear_probe', **{
      'finetune.dataset': 'demo_count', 'finetune.few_shot': 0.0,
      'init.from_pytorch': ark_file[0], 'batch_size': 256, 'max_epochs': 20, 'patience': 3,
      'optimizer.lr': 0.01})
  workdir = str(tmp_path / 'probe')
  first = finetune.run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'embeddings'))) == [
      'test.npz', 'train.npz', 'validation.npz']
  with np.load(os.path.join(workdir, 'embeddings', 'train.npz')) as cached:
    assert cached['z'].shape == (2000, 16) and cached['labels'].shape == (2000, 3)
  t = first['trials'][0]
  assert t['n_train'] == 2000 and 'accuracy' in t['test']
  # Three balanced classes (one, two, three or four items): chance is 0.5 AUC, 1/3 accuracy.
  assert t['test']['auc_mean'] > 0.6, t['test']

  # A second run reads the cache: nothing is embedded (nor any weight read) again.
  def no_embedding(*args, **kwargs):
    raise AssertionError('embeddings recomputed')
  monkeypatch.setattr(finetune, 'compute_embeddings', no_embedding)
  second = finetune.run(config, workdir)
  assert second['trials'][0]['test'] == t['test']
  # Another source (here: random weights) invalidates the cache.
  config.init.from_pytorch = None
  with pytest.raises(AssertionError, match='embeddings recomputed'):
    finetune.run(config, workdir)


def test_few_shot_takes_the_stated_number_seeded():
  fraction = finetune.few_shot_indices(2000, 0.1, seed=0)
  assert len(fraction) == 200 and len(set(fraction)) == 200 and fraction.max() < 2000
  count = finetune.few_shot_indices(2000, 64, seed=0)
  assert len(count) == 64
  np.testing.assert_array_equal(count, finetune.few_shot_indices(2000, 64, seed=0))
  assert not np.array_equal(count, finetune.few_shot_indices(2000, 64, seed=1))
  assert finetune.few_shot_indices(2000, 0, seed=0) is None
  with pytest.raises(ValueError, match=r'few_shot=2001.*2001 of the 2000'):
    finetune.few_shot_indices(2000, 2001, seed=0)
  with pytest.raises(ValueError, match=r'few_shot=0.0001 asks for 0'):
    finetune.few_shot_indices(2000, 0.0001, seed=0)


def test_config_errors_name_the_key(demo_data_dir, tmp_path):
  for override, pattern in ((('finetune.mode', 'probe'), r"finetune\.mode='probe' is unknown"),
                            (('finetune.dataset', 'padchest'),
                             r"finetune\.dataset='padchest'.*unknown dataset"),
                            (('finetune.few_shot', -1.0), r'few_shot=-1\.0'),
                            (('finetune.few_shot', 2.5), r'few_shot=2\.5'),
                            (('finetune.few_shot', 5000.0), r'asks for 5000 of the 2000')):
    config = tiny_config(demo_data_dir, **dict([override]))
    with pytest.raises(ValueError, match=pattern):
      finetune.run(config, str(tmp_path))


class Payload:
  """A pickled instance that would run code on a full unpickle."""

  def __reduce__(self):
    return (os.system, ('touch PWNED',))


def test_bad_init_files_fail_clearly_and_stay_untouched(demo_data_dir, ark_file, tmp_path,
                                                        monkeypatch):
  monkeypatch.chdir(tmp_path)
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint\n')
  unsafe = tmp_path / 'unsafe.pth.tar'
  torch.save({'teacher': Payload()}, unsafe)  # torch's own format, with a code-running pickle
  for path, pattern in ((text, r'notes\.pth: not a PyTorch checkpoint'),
                        (unsafe, r'unsafe\.pth\.tar: refused for safety.*system.*Nothing was '
                                 r'executed')):
    digest = _sha(path)
    config = tiny_config(demo_data_dir, **{'init.from_pytorch': str(path)})
    with pytest.raises(ValueError, match=pattern):
      finetune.run(config, str(tmp_path / 'run'))
    assert _sha(path) == digest
  assert not (tmp_path / 'PWNED').exists()
  # Pretraining from an Ark file whose heads are not the configured datasets'.
  file = ark_file[0]
  digest = _sha(file)
  config = tiny_demo_config(demo_data_dir, **{'data.datasets': ('demo_binary', 'demo_count'),
                                              'data.num_classes': (1, 3)})
  config.init.from_pytorch = file
  with pytest.raises(interop.WeightsMismatchError,
                     match=r'ark_teacher\.pth\.tar.*\(10, 5, 1, 3\).*\(1, 3\)'):
    train.load_init_params(config, (1, 3), sharding.make_mesh(config.mesh))
  assert _sha(file) == digest


def test_frozen_trains_the_head_only(demo_data_dir, ark_file, tmp_path):
  file, _, _ = ark_file
  config = tiny_config(demo_data_dir, 'frozen', **{'init.from_pytorch': file, 'max_epochs': 1})
  results = finetune.run(config, str(tmp_path))
  assert results['trials'][0]['best_epoch'] == 0
  with np.load(tmp_path / 'trial_0' / 'best.npz') as best:
    best = dict(best)
  sd = np.load(os.path.join(os.path.dirname(file), 'sd.npz'))
  # The backbone is the file's, bit for bit, after training; the head moved from its init.
  np.testing.assert_array_equal(best['backbone.norm.scale'], sd['norm.weight'])
  np.testing.assert_array_equal(best['backbone.layers.0.blocks.0.attn.qkv.kernel'],
                                sd['layers.0.blocks.0.attn.qkv.weight'].T)
  assert best['head.kernel'].shape == (32, 1) and best['head.bias'].any()
