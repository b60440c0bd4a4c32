r"""Ablation (a): pretraining on one dataset alone vs Ark over several, judged downstream.

  python -m ark_jax.main --config=configs/ablations/single_vs_ark.py:single --workdir=DIR
  python -m ark_jax.main --config=configs/ablations/single_vs_ark.py:ark --workdir=DIR

demo_binary ("contains a shirt") is held out of both: the two pretrained
teachers (and a random initialisation) are then fine-tuned on it
(configs/finetune_demo.py, scripts/ablations.py) and compared by its test AUC.
`single` pretrains on demo_multilabel, the richest label set; `ark` on
demo_multilabel, demo_subset and demo_count with their own heads.
"""

import ml_collections

from configs import demo
from configs.ablations import base

HELD_OUT = 'demo_binary'  # the fine-tuning target, seen by no pretraining run
VARIANTS = {
    'single': ('demo_multilabel',),
    'ark': ('demo_multilabel', 'demo_subset', 'demo_count'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'ark'
  if arg not in VARIANTS:
    raise ValueError(f'configs/ablations/single_vs_ark.py:{arg!r} is unknown; use one of '
                     f'{tuple(VARIANTS)}.')
  c = base.get_config()
  # Twice the other ablations' epochs: the pretrained model is what (a) compares,
  # and two epochs leave 86% (one dataset) / 69% (three) of the pass-EMA
  # teacher's random initialisation in it; four leave 77% / 51%.
  c.num_epochs = 2 * base.ABLATION_EPOCHS
  names = VARIANTS[arg]
  classes = dict(zip(demo.DEMO_DATASETS, demo.DEMO_NUM_CLASSES))
  c.data.datasets = names
  c.data.num_classes = tuple(classes[n] for n in names)
  c.data.label_policies = ml_collections.ConfigDict(
      {k: v for k, v in c.data.label_policies.items() if k in names})
  return c
