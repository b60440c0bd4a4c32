r"""Command line of ark_jax (DESIGN.md section 2).

  python -m ark_jax.main --config=configs/demo.py --workdir=DIR \
      [--mode=train|eval] [--config.KEY=VALUE ...]

`train` trains (resuming from DIR/checkpoints); `eval` evaluates the newest
checkpoint of DIR into DIR/eval/step_N.json (predict and export are to come). On TPU pods
and SLURM, jax.distributed finds its peers itself; --coordinator_address,
--num_processes and --process_id are for anything else.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ark_jax import train

MODES = ('train', 'eval')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
_MODE = flags.DEFINE_string('mode', 'train', f'What to do: one of {MODES}.')
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
  if _MODE.value == 'train':
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
