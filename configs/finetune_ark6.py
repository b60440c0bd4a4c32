r"""Fine-tuning Ark-6 (Swin-B/224) on a chest X-ray target: the reference's recipe.

  python -m ark_jax.main --config=configs/finetune_ark6.py:chestxray14 --workdir=DIR \
      --config.data.data_dir=DATA --config.init.from_pytorch=ark6_teacher.pth.tar \
      [--config.finetune.mode=frozen|linear_probe] [--config.trials=5]

The argument is the target's TFDS name: `configs/finetune_ark6.py:chestxray14`
(the default), `configs/finetune_ark6.py:rsna_pneumonia`,
`configs/finetune_ark6.py:shenzhen_cxr`, or any other prepared builder
(ARK_SPEC.md section 5: SGD-Nesterov lr 0.01, batch 64, wd 0, constant LR,
early stopping on validation loss with patience 10, the best epoch tested
with TenCrop). The Ark-6 release has the MLP projector of width 1376, which
only the linear probe reads.
"""

import ml_collections

from configs import common
from configs import finetune_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = finetune_demo.get_config('full')
  c.finetune.dataset = arg or 'chestxray14'  # the target's TFDS name
  c.model = common.model_config('swin_base', 224)  # the pretrained model's architecture
  c.model.projector_mlp = True  # the Ark-6 release (ark6_teacher_..._projector1376_mlp)
  c.data.image_size = 256  # R: prepared at 256, centre crop / random crop to 224
  c.data.label_policies = ml_collections.ConfigDict(
      {k: v for k, v in common.ARK_LABEL_POLICIES.items() if k == c.finetune.dataset})
  c.data.num_workers = 8  # Grain mp_prefetch processes
  c.data.read_threads = 4  # decoding threads per reading process
  c.augment.crop_scale = (0.08, 1.0)  # torchvision RandomResizedCrop's default (the reference)
  c.batch_size = 64  # global (the reference's)
  c.eval_batch_size = 64  # global
  c.max_epochs = 200  # the reference's --epochs
  c.patience = 10  # the reference's early stopping on validation loss
  c.ten_crop = True  # the reference tests the best checkpoint with TenCrop
  c.trials = 1  # the reference's --trial; mean ± std over trials
  return c
