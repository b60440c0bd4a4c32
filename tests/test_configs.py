"""Every configs/*.py loads, names registered datasets and passes the trainer's checks.

The configs are found by glob and their arguments read from their docstrings
(`--config=configs/NAME.py:ARG`), so a new config or a newly documented
variant is tested without editing this file.
"""

import glob
import importlib
import json
import os
import re
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ark_jax import finetune
from ark_jax import train
from ark_jax.models import registry
from configs import common
from input_pipeline import datasets
from input_pipeline import labels

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# 'demo', ..., and 'ablations/heads', ... (configs/ablations/base.py is their shared base).
STEMS = sorted(os.path.relpath(p, CONFIG_DIR)[:-3]
               for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
               + glob.glob(os.path.join(CONFIG_DIR, 'ablations', '*.py'))
               if not os.path.basename(p).startswith('_')
               and os.path.basename(p) not in ('common.py', 'base.py'))
# Keys the trainer, scripts and tests read from every run config (DESIGN.md section 2),
# beyond the ones configs/demo.py has.
RUN_KEYS = ('eval_every_steps', 'eval_split', 'eval_batch_size', 'ten_crop', 'init.from_pytorch',
            'init.from_checkpoint', 'optimizer.warmup_epochs')


def _module(stem):
  return importlib.import_module(f'configs.{stem.replace("/", ".")}')


def _documented_args(stem):
  doc = _module(stem).__doc__ or ''
  return [None] + sorted(set(re.findall(rf'configs/{stem}\.py:([\w,.]+)', doc)))


def _is_finetune(stem):
  return 'finetune' in _module(stem).get_config()


# Fine-tuning configs (a `finetune` section) are checked by finetune.check_config.
FINETUNE_CASES = [(stem, arg) for stem in STEMS if _is_finetune(stem)
                  for arg in _documented_args(stem)]
CASES = [(stem, arg) for stem in STEMS if not _is_finetune(stem) for arg in _documented_args(stem)]
CASE_IDS = [f'{stem}:{arg}' for stem, arg in CASES]
SMOKE_STEMS = [stem for stem, _ in CASES if 'smoke' in _documented_args(stem)]
SMOKE_STEMS = sorted(set(SMOKE_STEMS))


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
  for stem, arg in (('ablations/heads', 'consolidated'), ('ablations/consistency', 'c0'),
                    ('ablations/schedule', 'mixed'), ('ablations/single_vs_ark', 'single')):
    assert (stem, arg) in CASES


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


def test_the_glob_finds_the_finetune_configs_and_their_variants():
  assert ('finetune_demo', 'linear_probe') in FINETUNE_CASES
  assert ('finetune_demo', 'frozen') in FINETUNE_CASES
  assert ('finetune_ark6', 'rsna_pneumonia') in FINETUNE_CASES


# Keys of configs/finetune_demo.py that every fine-tuning config has, with their types.
@pytest.mark.parametrize('stem,arg', FINETUNE_CASES, ids=[f'{s}:{a}' for s, a in FINETUNE_CASES])
def test_finetune_config_loads_and_passes_the_checks(stem, arg):
  config = _module(stem).get_config(arg)
  finetune.check_config(config, 8 if config.batch_size % 8 == 0 else 2)
  assert config.finetune.mode in finetune.MODES
  assert datasets.metadata(config.finetune.dataset).num_classes >= 1
  assert set(config.data.get('label_policies') or {}) <= {config.finetune.dataset, 'demo_subset'}
  for name, policy in (config.data.get('label_policies') or {}).items():
    labels.policy_for(name, {name: policy})
  reference = _flat(_module('finetune_demo').get_config())
  flat = _flat(config)
  for key, value in reference.items():
    assert key in flat, f'{stem}:{arg} lacks {key}'
    if value is not None and flat[key] is not None:
      assert type(flat[key]) is type(value), (key, flat[key], value)
  registry.backbone_config(config.model.name, config.model.variant)  # a known model


def test_finetune_ark6_is_the_reference_recipe():
  c = _module('finetune_ark6').get_config('rsna_pneumonia')
  assert c.finetune.dataset == 'rsna_pneumonia' and c.finetune.mode == 'full'
  o = c.optimizer
  assert (o.name, o.lr, o.momentum, o.weight_decay) == ('sgd', 0.01, 0.9, 0.0)
  assert (c.batch_size, c.patience, c.max_epochs, c.ten_crop) == (64, 10, 200, True)
  assert (c.model.variant, c.model.img_size, c.model.projector_dim) == ('base', 224, 1376)
  assert c.init.from_pytorch is None and c.init.from_checkpoint is None


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
  assert (c.eval_split, c.eval_batch_size, c.ten_crop) == ('test', 200, False)
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


def test_ablations_change_one_thing_each():
  base = _flat(_module('ablations/heads').get_config('per_dataset'))
  # The per-dataset, with-teacher and cyclic rows are one run (scripts/ablations.py).
  for stem, arg in (('ablations/consistency', 'with_teacher'), ('ablations/schedule', 'cyclic')):
    assert _flat(_module(stem).get_config(arg)) == base
  for stem, arg, changed in (
      ('ablations/heads', 'consolidated', {'model.head_labels'}),
      ('ablations/consistency', 'c0', {'consistency_scale'}),
      ('ablations/schedule', 'mixed', {'data.schedule', 'ema'}),
      ('ablations/single_vs_ark', 'ark', {'data.datasets', 'data.num_classes', 'num_epochs'})):
    flat = _flat(_module(stem).get_config(arg))
    assert {k for k in base if flat[k] != base[k]} == changed, (stem, arg)
  # demo_binary, the fine-tuning target of ablation (a), is in no pretraining set.
  for arg in ('single', 'ark'):
    assert 'demo_binary' not in _module('ablations/single_vs_ark').get_config(arg).data.datasets
  consolidated = _module('ablations/heads').get_config('consolidated')
  for names, name in zip(consolidated.model.head_labels, consolidated.data.datasets):
    assert tuple(names) == datasets.metadata(name).label_names


# ------------------------------------------------------------------ errors before compiling


@pytest.mark.parametrize('flag,named', [
    ('--config.optimizer.lrr=0.1', "'lrr'"),  # an unknown key
    ('--config.batch_size=3.5', r'--config\.batch_size=3\.5'),  # a float for an int key
])
def test_command_line_overrides_of_unknown_keys_or_wrong_types_fail_naming_them(tmp_path, flag,
                                                                                  named):
  """ml_collections' override flags (lock_config=True) refuse them while parsing the
  command line, before ark_jax.main runs: the workdir is not even created."""
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'ark_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       flag], cwd=os.path.dirname(CONFIG_DIR), capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=os.path.dirname(CONFIG_DIR)))
  assert result.returncode != 0
  assert re.search(named, result.stderr), result.stderr[-2000:]
  assert not workdir.exists()


def _demo(**overrides):
  config = _module('demo').get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize('overrides,named', [
    ({'data.schedule': 'mixed'}, r"config\.ema='pass' needs config\.data\.schedule='cyclic'"),
    ({'mesh.fsdp': 16}, r'config\.mesh\.fsdp=16 exceeds the 8 devices'),
    ({'mesh.fsdp': 3}, r'config\.mesh\.fsdp=3: 8 devices cannot be split into groups of 3'),
    ({'batch_size': 12}, r'config\.batch_size=12 \(global\) is not divisible by the 8'),
    ({'eval_batch_size': 20}, r'config\.eval_batch_size=20 \(global\) is not divisible by the 8'),
    ({'model.img_size': 48}, r'config\.model \(.*model\.img_size=48.*must be divisible by 32'),
    ({'model.window_size': 5}, r'config\.model \(.*window_size=5.*not divisible by the window'),
    ({'model.variant': 'huge'}, r"config\.model \(model\.variant='huge'.*Unknown Swin variant"),
    ({'model.dtype': 'int8'}, r"config\.model\.dtype='int8': use a float dtype"),
    ({'data.image_size': 32}, r'config\.data\.image_size=32 .* below config\.model\.img_size=64'),
    ({'log_every_steps': 0}, r'config\.log_every_steps=0 must be >= 1'),
], ids=lambda x: next(iter(x)) if isinstance(x, dict) else '')
def test_inconsistent_configs_fail_before_compiling_naming_the_keys(overrides, named, tmp_path,
                                                                    monkeypatch):
  config = _demo(**overrides)
  with pytest.raises(ValueError, match=named):
    train.check_config(config, 8)

  # The trainer checks first: nothing is read, built or compiled.
  def no_compile(*args, **kwargs):
    raise AssertionError('compiled before the config check')

  monkeypatch.setattr(jax, 'jit', no_compile)
  monkeypatch.setattr(train.train_state_lib, 'create_train_state', no_compile)
  with pytest.raises(ValueError, match=named):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_in_process_overrides_of_unknown_keys_or_wrong_types_fail_naming_them():
  """The same through ml_collections in-process (a locked config, as main.py's flag has)."""
  config = _demo()
  config.lock()
  with pytest.raises(KeyError, match='"skip_nonfinit" does not exist'):
    config.update_from_flattened_dict({'skip_nonfinit': True})
  with pytest.raises(TypeError, match="'skip_nonfinite'.*cannot be casted"):
    config.skip_nonfinite = 1
  # A config file that sets a wrong type itself: the trainer's check names it.
  config = _demo()
  del config['skip_nonfinite']
  config.skip_nonfinite = 'yes'
  with pytest.raises(ValueError, match=r"config\.skip_nonfinite='yes': use True or False"):
    train.check_config(config, 8)


def test_warmup_not_below_total_steps_names_both():
  with pytest.raises(ValueError, match=r'warmup_steps=50 .*not below total_steps=40'):
    train.resolve_schedule(_demo(), steps_per_epoch=10, num_steps=40)
  with pytest.raises(ValueError,
                     match=r'warmup_steps=20 \(from warmup_epochs=2\.0\) .*total_steps=20'):
    train.resolve_schedule(_demo(**{'optimizer.warmup_epochs': 2.0}), steps_per_epoch=10,
                           num_steps=20)


def test_a_checkpoint_of_another_model_variant_or_family_is_refused_by_name():
  """check_checkpoint_fits runs on the checkpoint's saved config, before any state exists
  (tests/test_init.py shows where the trainer calls it: before create_train_state)."""
  config = _module('ark6_swin_base_224').get_config()
  saved = json.loads(config.to_json_best_effort())
  train.check_checkpoint_fits(saved, config, 'The checkpoint')  # itself: fits
  for key, theirs, pattern in (
      ('variant', 'tiny', r"model\.variant='tiny', the config has model\.variant='base'"),
      ('name', 'vit', r"model\.name='vit', the config has model\.name='swin'"),
      ('projector_mlp', False, r'model\.projector_mlp=False, the config has .*=True'),
      ('img_size', 256, r'model\.img_size=256, the config has model\.img_size=224')):
    other = json.loads(json.dumps(saved))
    other['model'][key] = theirs
    with pytest.raises(ValueError, match=r'The checkpoint was trained with ' + pattern):
      train.check_checkpoint_fits(other, config, 'The checkpoint')
