r"""Command line of ark_jax (DESIGN.md section 2).

  python -m ark_jax.main --config=configs/demo.py --workdir=DIR \
      [--mode=train|eval|predict|export] [--config.KEY=VALUE ...]

`train` trains (resuming from DIR/checkpoints); `eval` evaluates the newest
checkpoint of DIR into DIR/eval/step_N.json; `predict --images=GLOB
--output=FILE.csv` writes the teacher's probabilities for every head on every
image (ark_jax/predict.py); `export --export_format=ark|timm --output=FILE`
writes it as PyTorch weights (ark_jax/export.py). A config with a `finetune`
section (configs/finetune_*.py) makes `train` fine-tune or probe instead
(ark_jax/finetune.py); one with a `federated` section trains
clients and a server (ark_jax/federated.py). On TPU pods and SLURM,
jax.distributed finds its peers itself; --coordinator_address, --num_processes
and --process_id are for anything else.
"""

if __name__ == '__main__':
  # Before JAX starts: XLA's CPU buffers stay mapped between steps (ark_jax/host_memory.py).
  from ark_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_tuned_malloc()

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ark_jax import export
from ark_jax import federated
from ark_jax import finetune
from ark_jax import predict
from ark_jax import train

MODES = ('train', 'eval', 'predict', 'export')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
_MODE = flags.DEFINE_string('mode', 'train', f'What to do: one of {MODES}.')
_EXPORT_FORMAT = flags.DEFINE_enum('export_format', 'ark', list(export.FORMATS),
                                   'export: ark (.pth.tar, reference layout) | timm (safetensors).')
_EXPORT_MODEL = flags.DEFINE_enum('export_model', 'teacher', list(export.MODELS),
                                  'export, timm format: which backbone.')
_OUTPUT = flags.DEFINE_string('output', None, 'export, predict: the file to write.')
_IMAGES = flags.DEFINE_string('images', None,
                              "predict: a glob of image files ('**' recurses; quote it).")
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process only).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0-based.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MODE.value not in MODES:
    raise app.UsageError(f'--mode={_MODE.value!r} is unknown; use one of {MODES}.')
  given = {k: v for k, v in (('coordinator_address', _COORDINATOR.value),
                             ('num_processes', _NUM_PROCESSES.value),
                             ('process_id', _PROCESS_ID.value)) if v is not None}
  if given:
    jax.distributed.initialize(**given)
  logging.info('JAX process %d of %d, %d devices', jax.process_index(), jax.process_count(),
               jax.device_count())
  if _MODE.value == 'train' and 'finetune' in _CONFIG.value:
    # A config with a `finetune` section (configs/finetune_*.py) fine-tunes or probes.
    finetune.run(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == 'train' and 'federated' in _CONFIG.value:
    # A config with a `federated` section (configs/federated_*.py): clients and a server.
    federated.run(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == 'train':
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == 'eval':
    train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == 'predict':
    if not _IMAGES.value or not _OUTPUT.value:
      raise app.UsageError('--mode=predict needs --images=GLOB and --output=FILE.csv.')
    path = predict.predict(_CONFIG.value, _WORKDIR.value, _IMAGES.value, _OUTPUT.value)
    if jax.process_index() == 0:  # the one that wrote it
      print(f'Wrote {path}')
  else:
    if not _OUTPUT.value:
      raise app.UsageError('--mode=export needs --output=FILE.')
    path = export.export(_CONFIG.value, _WORKDIR.value, _EXPORT_FORMAT.value, _OUTPUT.value,
                         _EXPORT_MODEL.value)
    print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
