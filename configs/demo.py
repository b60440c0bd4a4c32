r"""The offline demo: a tiny Swin on Fashion-MNIST mosaics (four label sets).

Prepare the four datasets once (seconds; no download, no manual_dir):

  for d in demo_multilabel demo_subset demo_binary demo_count; do
    python -m input_pipeline.prepare --dataset=$d --data_dir=DATA --image_size=64
  done

then train with --config=configs/demo.py --config.data.data_dir=DATA.
`--config=configs/demo.py:mixed` interleaves the datasets in every batch instead
of the reference's one-dataset-at-a-time passes.
"""

import ml_collections

from ark_jax import sharding
from configs import common

DEMO_DATASETS = ('demo_multilabel', 'demo_subset', 'demo_binary', 'demo_count')
DEMO_NUM_CLASSES = (10, 5, 1, 3)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything random derives from it
  c.batch_size = 32  # global, over all devices and hosts
  c.model = common.smoke_model_config(64)

  c.data = ml_collections.ConfigDict()
  c.data.datasets = DEMO_DATASETS  # TFDS names, in head order
  c.data.num_classes = DEMO_NUM_CLASSES  # classes per head, same order
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
  c.data.image_size = 64  # R, the stored side in pixels
  c.data.schedule = arg or 'cyclic'  # 'cyclic' (one dataset per pass) | 'mixed'
  c.data.weights = ml_collections.config_dict.placeholder(tuple)  # mixed; None = sizes
  # demo_subset stores uncertain (-1) and blank (NaN) labels; 'ignore' keeps
  # them out of the loss ('ones' | 'zeros' | 'lsr_ones' are the alternatives).
  c.data.label_policies = ml_collections.ConfigDict({'demo_subset': 'ignore,zeros'})
  c.data.num_workers = 0  # Grain mp_prefetch processes; 0 reads in the trainer
  c.data.read_threads = 2  # decoding threads per reading process

  c.num_epochs = 20  # epochs (cyclic: one pass over each dataset per epoch)
  c.max_steps = 0  # stop after this many optimizer steps when > 0
  c.log_every_steps = 10  # steps between lines of workdir/metrics.jsonl
  c.checkpoint_every_steps = 200  # steps between checkpoints (and one at the end)
  c.teacher_init = 'independent'  # 'independent' (the reference) | 'copy' of the student
  # 'pass': one EMA update per dataset pass, momentum indexed by the pass (the
  # reference); 'step': one per optimizer step, indexed by the step.
  c.ema = 'pass'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # Nesterov momentum 0.9 (the reference) | 'adamw'
  c.optimizer.lr = 0.1  # peak LR
  c.optimizer.warmup_steps = 50  # linear warmup, in optimizer steps
  c.optimizer.total_steps = 2000  # end of the cosine (warmup included), in steps
  c.optimizer.weight_decay = 0.0  # the reference's
  c.optimizer.clip_grad_norm = 0.0  # global-norm clipping when > 0 (the reference: none)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1 = every device not in fsdp
  c.mesh.fsdp = 1  # parameter-sharding axis
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = sharding.REPLICATED_RULES  # logical axis -> mesh axis
  return c
