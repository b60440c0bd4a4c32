r"""Ark-6 as published (MICCAI 2023): Swin-B/224 pretrained on six chest X-ray sets.

  --config=configs/ark6_swin_base_224.py        the published recipe (ARK_SPEC.md section 3)
  --config=configs/ark6_swin_base_224.py:smoke  the same run shrunk for a 2-core CPU

Batch 200, SGD Nesterov lr 0.3, 20 warmup epochs then cosine over 200 cyclic
epochs, one EMA update per dataset pass, teacher built independently. Stored at
R=256, the teacher view is the whole image resized to S=224. Init: set
--config.init.from_pytorch to Microsoft's swin_base_patch4_window7_224_22kto1k.pth.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model = common.model_config('swin_base', img_size=224, window_size=7)
  # The released file is ark6_teacher_ep200_swinb_projector1376_mlp: the MLP projector.
  model.projector_mlp = True
  c = common.ark_config(model, common.ARK6_DATASETS, common.ARK6_NUM_CLASSES,
                        batch_size=200, image_size=256, lr=0.3)
  if arg == 'smoke':
    return common.shrink_for_smoke(c)
  if arg:
    raise ValueError(f'Unknown config argument {arg!r}; use none or smoke.')
  return c
