r"""Ablation (c): the Ark loss with and without the teacher's consistency term.

  python -m ark_jax.main --config=configs/ablations/consistency.py:with_teacher --workdir=DIR
  python -m ark_jax.main --config=configs/ablations/consistency.py:c0 --workdir=DIR

`c0` sets the consistency weight to 0 (consistency_scale = 0): the student
learns from the labels alone while the EMA teacher still follows it, so the
comparison isolates what the teacher's knowledge returned through the loss adds.
"""

import ml_collections

from configs.ablations import base

VARIANTS = ('with_teacher', 'c0')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'with_teacher'
  if arg not in VARIANTS:
    raise ValueError(f'configs/ablations/consistency.py:{arg!r} is unknown; use one of {VARIANTS}.')
  c = base.get_config()
  c.consistency_scale = 0.0 if arg == 'c0' else 1.0
  return c
