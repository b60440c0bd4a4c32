r"""Ark-6's recipe with another backbone: model sweeps over the six datasets.

  --config=configs/ark6.py                  Ark-6 as published (= configs/ark6_swin_base_224.py)
  --config=configs/ark6.py:swin_tiny,128,4  Swin-T at 128 px, window 4
  --config=configs/ark6.py:vit_small        ViT-S/16 at 224 px
  --config=configs/ark6.py:convnext_tiny    ConvNeXt-T at 224 px
  --config=configs/ark6.py:smoke            Ark-6 smoke with a linear projector (tests)

The argument is MODEL[,S[,WINDOW]]; the stored side R keeps Ark-6's ratio 256/224.
Ark+ (Swin-L/768) is configs/arkplus6_swin_large_768.py.
"""

import ml_collections

from configs import ark6_swin_base_224
from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg is None:
    return ark6_swin_base_224.get_config()
  if arg == 'smoke':
    c = ark6_swin_base_224.get_config('smoke')
    # The linear projector: tests/test_benchmark.py counts this model's MACs by hand.
    c.model = common.smoke_model_config()
    return c
  c = ark6_swin_base_224.get_config()
  name, *sizes = arg.split(',')
  img_size = int(sizes[0]) if sizes else 224
  window = int(sizes[1]) if len(sizes) > 1 else None
  c.model = common.model_config(name, img_size, window)
  c.data.image_size = img_size * 8 // 7  # R, as 256 is to 224
  return c
