r"""Ark+6 (Nature 2025): Swin-L/768, window 12, pretrained on six chest X-ray sets.

  --config=configs/arkplus6_swin_large_768.py        the published recipe (ARK_SPEC.md section 3)
  --config=configs/arkplus6_swin_large_768.py:smoke  the same run shrunk for a 2-core CPU

Batch 50 (global: it splits over 2, 5 or 10 devices, not 8; use
--config.batch_size=48 or 56 there), SGD Nesterov lr 0.3, 20 warmup epochs then
cosine over 200 cyclic epochs, one EMA update per dataset pass. Images stored at
R=896; the teacher sees the whole image resized to S=768. Init: set
--config.init.from_pytorch to Microsoft's swin_large_patch4_window12_384_22kto1k.pth
(window 12 at 384 and 768 alike, so the bias tables load unchanged).
"""

import ml_collections

from configs import common


def arkplus_config(datasets, num_classes) -> ml_collections.ConfigDict:
  """The Ark+ recipe over `datasets` (Ark+6 and Ark+5 differ only there)."""
  model = common.model_config('swin_large', img_size=768, window_size=12)
  model.projector_mlp = False  # the Ark+ zero-shot notebook loads a linear projector
  model.remat = True  # 768 px activations: recompute each block in the backward
  model.dtype = 'bfloat16'  # compute dtype; parameters and optimizer stay float32
  return common.ark_config(model, datasets, num_classes, batch_size=50, image_size=896,
                           lr=0.3)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = arkplus_config(common.ARK6_DATASETS, common.ARK6_NUM_CLASSES)
  if arg == 'smoke':
    return common.shrink_for_smoke(c)
  if arg:
    raise ValueError(f'Unknown config argument {arg!r}; use none or smoke.')
  return c
