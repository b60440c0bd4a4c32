r"""Ablation (d): cyclic passes (the reference) vs mixed batches (its "Concurrent" ablation).

  python -m ark_jax.main --config=configs/ablations/schedule.py:cyclic --workdir=DIR
  python -m ark_jax.main --config=configs/ablations/schedule.py:mixed --workdir=DIR

cyclic: one dataset per pass, one EMA update per pass; mixed: every batch
draws from all datasets (in proportion to their sizes), one EMA update per
step. Same epochs, so the same images seen.
"""

import ml_collections

from configs.ablations import base

VARIANTS = ('cyclic', 'mixed')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'cyclic'
  if arg not in VARIANTS:
    raise ValueError(f'configs/ablations/schedule.py:{arg!r} is unknown; use one of {VARIANTS}.')
  return base.get_config(arg)
