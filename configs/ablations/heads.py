r"""Ablation (b): one head per dataset (Ark) vs one consolidated head over the union of labels.

  python -m ark_jax.main --config=configs/ablations/heads.py:per_dataset --workdir=DIR
  python -m ark_jax.main --config=configs/ablations/heads.py:consolidated --workdir=DIR

The MedIA paper's "label consolidation" ablation (ARK_SPEC.md section 6,
SingleHead): the demo's four label sets share one Linear over the 13 names of
their union (demo_subset's five items and demo_binary's 'shirt' are columns of
demo_multilabel's ten; demo_count adds three), each dataset reading its own
columns. Labels are matched by exact name.
"""

import ml_collections

from configs.ablations import base
from input_pipeline.datasets import fashion_mosaic

VARIANTS = ('per_dataset', 'consolidated')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'per_dataset'
  if arg not in VARIANTS:
    raise ValueError(f'configs/ablations/heads.py:{arg!r} is unknown; use one of {VARIANTS}.')
  c = base.get_config()
  if arg == 'consolidated':
    c.model.head_labels = tuple(fashion_mosaic.SPECS[name].label_names
                                for name in c.data.datasets)
  return c
