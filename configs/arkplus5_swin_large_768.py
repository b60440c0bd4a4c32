r"""Ark+5: Ark+6 without MIMIC-CXR (five sets, 335,484 training images).

  --config=configs/arkplus5_swin_large_768.py        the published recipe
  --config=configs/arkplus5_swin_large_768.py:smoke  the same run shrunk for a 2-core CPU

Everything else as configs/arkplus6_swin_large_768.py; the heads keep the
reference's order with MIMIC-CXR left out.
"""

import ml_collections

from configs import arkplus6_swin_large_768
from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = arkplus6_swin_large_768.arkplus_config(common.ARK5_DATASETS, common.ARK5_NUM_CLASSES)
  if arg == 'smoke':
    return common.shrink_for_smoke(c)
  if arg:
    raise ValueError(f'Unknown config argument {arg!r}; use none or smoke.')
  return c
