"""Every configs/*.py loads, names registered datasets and passes the trainer's checks.

The configs are found by glob and their arguments read from their docstrings
(`--config=configs/NAME.py:ARG`), so a new config or a newly documented
variant is tested without editing this file.
"""

import glob
import importlib
import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ark_jax import train
from ark_jax.models import registry
from configs import common
from input_pipeline import datasets
from input_pipeline import labels

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
STEMS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
               if not os.path.basename(p).startswith('_') and not p.endswith('common.py'))
# Keys the trainer, scripts and tests read from every run config (DESIGN.md section 2),
# beyond the ones configs/demo.py has.
RUN_KEYS = ('eval_every_steps', 'eval_split', 'eval_batch_size', 'ten_crop', 'init.from_pytorch',
            'init.from_checkpoint', 'optimizer.warmup_epochs')


def _module(stem):
  return importlib.import_module(f'configs.{stem}')


def _documented_args(stem):
  doc = _module(stem).__doc__ or ''
  return [None] + sorted(set(re.findall(rf'configs/{stem}\.py:([\w,.]+)', doc)))


CASES = [(stem, arg) for stem in STEMS for arg in _documented_args(stem)]
CASE_IDS = [f'{stem}:{arg}' for stem, arg in CASES]
SMOKE_STEMS = [stem for stem in STEMS if 'smoke' in _documented_args(stem)]


def _flat(c, prefix=''):
  """Leaf keys -> values; label_policies is one leaf (its keys are dataset names)."""
  out = {}
  for key, value in c.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and key != 'label_policies':
      out.update(_flat(value, name + '.'))
    else:
      out[name] = value
  return out


def _num_devices(config):
  # Full runs: 8 accelerators where the batch splits over them (Ark+'s 50 does
  # not: 2 of them); smoke runs: the 2 CPU cores.
  if config.batch_size <= 8:
    return 2
  return next(n for n in (8, 2) if config.batch_size % n == 0)


@pytest.fixture(scope='module')
def demo_flat():
  return _flat(_module('demo').get_config())


def test_the_glob_finds_the_published_recipes():
  for stem in ('demo', 'ark6', 'ark6_swin_base_224', 'arkplus6_swin_large_768',
               'arkplus5_swin_large_768'):
    assert stem in STEMS
  assert ('ark6_swin_base_224', 'smoke') in CASES and ('demo', 'mixed') in CASES


@pytest.mark.parametrize('stem,arg', CASES, ids=CASE_IDS)
def test_config_loads_and_passes_the_trainer_checks(stem, arg, demo_flat):
  config = _module(stem).get_config(arg)
  train.check_config(config, _num_devices(config))
  assert train.ema_total(config) > 0 or config.optimizer.total_steps <= 0

  names, num_classes = tuple(config.data.datasets), tuple(config.data.num_classes)
  assert len(names) == len(num_classes) == len(set(names))
  assert tuple(datasets.metadata(n).num_classes for n in names) == num_classes
  for name in names:
    labels.policy_for(name, config.data.get('label_policies') or {})  # raises on a bad policy
  assert set(config.data.get('label_policies') or {}) <= set(names)

  # Every key of the demo exists, with the same type, so scripts and
  # --config.KEY overrides work on any config.
  flat = _flat(config)
  for key, value in demo_flat.items():
    assert key in flat, f'{stem}:{arg} lacks {key}'
    if value is not None and flat[key] is not None:
      assert type(flat[key]) is type(value), (key, flat[key], value)
  for key in RUN_KEYS:
    assert key in flat, f'{stem}:{arg} lacks {key}'


def test_ark6_is_the_published_recipe():
  c = _module('ark6_swin_base_224').get_config()
  assert (c.model.name, c.model.variant, c.model.img_size, c.model.window_size) == (
      'swin', 'base', 224, 7)
  assert c.data.datasets == ('mimic_cxr', 'chexpert', 'chestxray14', 'rsna_pneumonia',
                             'vindr_cxr', 'shenzhen_cxr')
  assert c.data.num_classes == (14, 14, 14, 3, 6, 1)
  assert (c.batch_size, c.data.image_size, c.num_epochs) == (200, 256, 200)
  o = c.optimizer
  assert (o.name, o.lr, o.momentum, o.weight_decay) == ('sgd', 0.3, 0.9, 0.0)
  assert (o.warmup_epochs, o.warmup_steps, o.total_steps) == (20.0, 0, -1)
  assert (c.ema, c.teacher_init, c.data.schedule) == ('pass', 'independent', 'cyclic')
  assert (c.model.projector_dim, c.model.projector_mlp) == (1376, True)
  assert dict(c.data.label_policies) == {'chexpert': 'lsr_ones,zeros', 'mimic_cxr': 'ones,zeros'}
  # Cadences follow the reference's epochs: a checkpoint each, a test every 10.
  assert c.checkpoint_every_steps == common.steps_per_epoch(c.data.datasets, 200) == 3525
  assert c.eval_every_steps == 10 * 3525
  assert (c.eval_split, c.eval_batch_size, c.ten_crop) == ('test', 100, False)
  assert c.init.from_pytorch is None and c.init.from_checkpoint is None
  # configs/ark6.py with no argument is the same run.
  assert _module('ark6').get_config().to_dict() == c.to_dict()


def test_arkplus_configs_are_the_published_recipes():
  c6 = _module('arkplus6_swin_large_768').get_config()
  c5 = _module('arkplus5_swin_large_768').get_config()
  for c in (c6, c5):
    assert (c.model.name, c.model.variant, c.model.img_size, c.model.window_size) == (
        'swin', 'large', 768, 12)
    assert (c.data.image_size, c.batch_size, c.optimizer.lr, c.num_epochs) == (896, 50, 0.3, 200)
    assert (c.model.remat, c.model.dtype, c.model.projector_mlp) == (True, 'bfloat16', False)
    assert c.optimizer.warmup_epochs == 20.0 and c.ema == 'pass'
  assert c6.data.datasets == common.ARK6_DATASETS
  assert c5.data.datasets == ('chexpert', 'chestxray14', 'rsna_pneumonia', 'vindr_cxr',
                              'shenzhen_cxr')
  assert c5.data.num_classes == (14, 14, 3, 6, 1)
  assert 'mimic_cxr' not in c5.data.label_policies
  # Apart from the data, Ark+5 is Ark+6.
  d6, d5 = c6.to_dict(), c5.to_dict()
  for d in (d6, d5):
    for key in ('data', 'checkpoint_every_steps', 'eval_every_steps'):
      d.pop(key)
  assert d6 == d5
  # About 14.1k steps an epoch at batch 50 (ARK_SPEC.md section 3).
  assert c6.checkpoint_every_steps == 14090


@pytest.mark.parametrize('stem', SMOKE_STEMS)
def test_smoke_keeps_the_experiment_but_fits_a_cpu(stem):
  full, smoke = _module(stem).get_config(), _module(stem).get_config('smoke')
  assert smoke.data.datasets == full.data.datasets
  assert (smoke.ema, smoke.teacher_init) == (full.ema, full.teacher_init)
  assert smoke.batch_size == 8 and 0 < smoke.max_steps <= 10
  assert smoke.model.img_size == 64 and smoke.model.variant == 'custom'
  train.check_config(smoke, 1)


def test_unknown_dataset_is_named():
  config = _module('ark6_swin_base_224').get_config('smoke')
  config.data.datasets = config.data.datasets + ('padchest',)
  with pytest.raises(ValueError, match=r"unknown dataset 'padchest'.*registered.*chexpert"):
    for name in config.data.datasets:
      datasets.metadata(name)


def test_batch_not_divisible_by_the_devices_names_batch_size():
  config = _module('arkplus6_swin_large_768').get_config()
  with pytest.raises(ValueError, match=r'config\.batch_size=50 .*8 devices'):
    train.check_config(config, 8)


def test_unknown_ema_mode_is_named():
  config = _module('ark6_swin_base_224').get_config('smoke')
  config.ema = 'epoch'
  with pytest.raises(ValueError, match=r"config\.ema='epoch' is unknown"):
    train.check_config(config, 1)


def test_unknown_config_argument_is_named():
  with pytest.raises(ValueError, match="'swin_large'"):
    _module('arkplus6_swin_large_768').get_config('swin_large')


def _forward(config, x_Bx64x64x3):
  """The smoke model's forward, jitted alone: random parameters filled in numpy.

  Initialisation compiled with the forward doubles the compile time on a
  2-core CPU; the real initialisers are tested in tests/test_ark.py.
  """
  abstract = nnx.eval_shape(lambda: registry.create_model(
      config.model, tuple(config.data.num_classes), rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(s.dtype), abstract_state)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return forward.lower(state, x_Bx64x64x3).compile(
      compiler_options={'xla_backend_optimization_level': 0})(state, x_Bx64x64x3)


# One per distinct smoke model: MLP projector in float32 (Ark-6), linear
# projector in bfloat16 with remat (Ark+); Ark+5 differs from Ark+6 in head count.
@pytest.mark.parametrize('stem', ['ark6_swin_base_224', 'arkplus6_swin_large_768'])
def test_smoke_model_runs(stem):
  config = _module(stem).get_config('smoke')
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  out = _forward(config, x)
  d, c = len(config.data.datasets), max(config.data.num_classes)
  assert out['z'].shape == (2, config.model.projector_dim)
  assert out['logits'].shape == (2, d, c)
  for value in (out['z'], out['logits']):
    assert bool(jnp.all(jnp.isfinite(value)))
  # Two different images give different embeddings.
  assert float(jnp.abs(out['z'][0] - out['z'][1]).max()) > 1e-4


@pytest.mark.parametrize('stem', SMOKE_STEMS)
def test_smoke_model_shapes(stem):
  config = _module(stem).get_config('smoke')
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

  def run(x):
    model = registry.create_model(config.model, tuple(config.data.num_classes),
                                  rngs=nnx.Rngs(0))
    return model(x)
  out = jax.eval_shape(run, x)
  assert out['z'].shape == (2, config.model.projector_dim)
  assert out['logits'].shape == (2, len(config.data.datasets), max(config.data.num_classes))
  assert np.dtype(out['logits'].dtype) == np.float32
