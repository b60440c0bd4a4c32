r"""Ark+6: one model pretrained on the six public chest X-ray datasets.

  --config=configs/ark6.py                      Swin-B/224 (Ark-6, MICCAI 2023)
  --config=configs/ark6.py:swin_large,768,12    Swin-L/768 (Ark+, the headline model)
  --config=configs/ark6.py:swin_tiny,128,4      Swin-T at 128 px (fits a laptop CPU)
  --config=configs/ark6.py:smoke                a tiny Swin for tests
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything random derives from it
  c.batch_size = 200  # global, over all devices and hosts (reference: 200 Ark-6, 50 Ark+)

  if arg == 'smoke':
    c.model = common.smoke_model_config()
    c.batch_size = 8
  else:
    name, *sizes = (arg or 'swin_base,224').split(',')
    img_size = int(sizes[0]) if sizes else 224
    window = int(sizes[1]) if len(sizes) > 1 else None
    c.model = common.model_config(name, img_size, window)

  c.data = ml_collections.ConfigDict()
  c.data.datasets = common.ARK6_DATASETS  # TFDS names, in head order
  c.data.num_classes = common.ARK6_NUM_CLASSES  # classes per head, same order
  return c
