r"""Fine-tuning / probing the demo model on one demo dataset (ark_jax/finetune.py).

  python -m ark_jax.main --config=configs/finetune_demo.py --workdir=DIR \
      --config.data.data_dir=DATA --config.init.from_checkpoint=PRETRAIN_DIR

Variants: `configs/finetune_demo.py:full` (the default: every weight trained),
`configs/finetune_demo.py:frozen` (only the new head), and
`configs/finetune_demo.py:linear_probe` (a Linear on the teacher's cached
projector embeddings). Without config.init the run starts from random weights
(the baseline). `--config.trials=3` reports mean ± std over seeds;
`--config.finetune.few_shot=0.1` (a fraction) or `=100` (a count) trains on a
seeded subset.
"""

import ml_collections

from ark_jax import finetune
from ark_jax import sharding
from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode = arg or 'full'
  if mode not in finetune.MODES:
    raise ValueError(f'configs/finetune_demo.py:{arg!r} is unknown; use one of {finetune.MODES}.')
  c = ml_collections.ConfigDict()
  c.seed = 0  # trial k uses seed + k (head init, data order, augmentation, few-shot subset)
  c.trials = 1  # independent runs; the results give mean ± std over them
  c.model = common.smoke_model_config(64)  # the pretraining model (configs/demo.py)

  c.finetune = ml_collections.ConfigDict()
  c.finetune.dataset = 'demo_binary'  # the target's TFDS name (any prepared builder)
  c.finetune.mode = mode  # 'full' | 'frozen' | 'linear_probe'
  c.finetune.few_shot = 0.0  # 0: all; a fraction < 1 or a count >= 1 of the training examples
  # Seed of the few-shot subset; None: each trial's own seed (a fixed int: one
  # subset for all trials, as the reference's random.Random(99)).
  c.finetune.few_shot_seed = ml_collections.config_dict.placeholder(int)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
  c.data.image_size = 64  # R, the stored side in pixels
  c.data.label_policies = ml_collections.ConfigDict({'demo_subset': 'ignore,zeros'})  # by name
  c.data.num_workers = 0  # Grain mp_prefetch processes; 0 reads in this process
  c.data.read_threads = 2  # decoding threads per reading process

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.7, 1.0)  # random resized crop's area range (configs/demo.py's)

  probe = mode == 'linear_probe'
  c.batch_size = 512 if probe else 64  # global; the reference: 64 (fine-tuning), 512 (probe)
  c.eval_batch_size = 64  # global; divisible by the device count
  c.max_epochs = 100 if probe else 30  # upper bound; early stopping ends most runs
  c.patience = 10 if probe else 5  # epochs without a lower validation loss before stopping
  c.ten_crop = False  # test view: 10 crops, probabilities averaged (the reference: on)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam' if probe else 'sgd'  # 'sgd' (Nesterov, the reference) | 'adam'
  c.optimizer.lr = 1e-3 if probe else 0.01  # constant LR
  c.optimizer.momentum = 0.9  # sgd only
  c.optimizer.weight_decay = 0.0  # the reference's

  # Starting weights (at most one); neither = random initialisation.
  c.init = ml_collections.ConfigDict()
  c.init.from_checkpoint = ml_collections.config_dict.placeholder(str)  # an ark_jax workdir
  c.init.from_pytorch = ml_collections.config_dict.placeholder(str)  # .pth/.pth.tar/.safetensors
  # Entry of a dict checkpoint; None: the first of 'teacher', 'state_dict', 'model'.
  # With from_checkpoint: 'teacher' (None) or 'student'.
  c.init.key = ml_collections.config_dict.placeholder(str)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1 = every device
  c.mesh.fsdp = 1  # parameter-sharding axis
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = sharding.REPLICATED_RULES  # logical axis -> mesh axis
  return c
