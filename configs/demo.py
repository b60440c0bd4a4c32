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

  c.augment = ml_collections.ConfigDict()
  # The student crop's area range. The reference's (0.08, 1) suits X-rays, whose
  # findings fill the image; a mosaic's labels name items in every quadrant,
  # which an 8% crop would cut away while keeping their labels.
  c.augment.crop_scale = (0.7, 1.0)

  c.num_epochs = 4  # epochs (cyclic: one pass over each dataset per epoch)
  c.max_steps = 0  # stop after this many optimizer steps when > 0
  c.log_every_steps = 10  # steps between lines of workdir/metrics.jsonl
  c.checkpoint_every_steps = 200  # steps between checkpoints (and one at the end)
  c.eval_every_steps = 0  # steps between evaluations; 0 = at the end only, -1 = never
  c.eval_split = 'test'  # the split evaluate.py scores (demo: 1000 images per dataset)
  c.eval_batch_size = 64  # global; divisible by the device count
  c.ten_crop = False  # the reference's test view (10 crops, probabilities averaged)
  c.bootstrap_samples = 1000  # resamples behind each eval AUC's 95% CI; 0 = no CIs
  c.bootstrap_seed = 233  # their seed (the reference's zero-shot CIs: 1000, 233)
  c.progress_bar = True  # tqdm on stderr (process 0)
  # Multiplies the consistency weight c of (1 - c) * task + c * consistency;
  # 0 is the ablation without the teacher's term (the teacher still trains).
  c.consistency_scale = 1.0
  c.teacher_init = 'independent'  # 'independent' (the reference) | 'copy' of the student
  # 'pass': one EMA update per dataset pass, momentum indexed by the pass (the
  # reference); 'step': one per optimizer step, indexed by the step.
  c.ema = 'pass' if c.data.schedule == 'cyclic' else 'step'
  # True: a step with a non-finite loss or gradient leaves params, optimizer and
  # teacher as they were and is counted (metrics.jsonl skipped_steps); False: it
  # stops the run at the next log, naming the step and its datasets.
  c.skip_nonfinite = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # Nesterov momentum 0.9 (the reference) | 'adamw'
  # Lower than the reference's 0.3 (Swin-B, batch 200) and clipped: at 0.1 this
  # small Swin met a NaN (step 227 of a cyclic run); AdamW at 3e-3 collapsed to
  # constant outputs, at 1e-3 trained unsteadily (README, "The demo").
  c.optimizer.lr = 0.05  # peak LR
  c.optimizer.warmup_steps = 50  # linear warmup, in optimizer steps
  c.optimizer.warmup_epochs = ml_collections.config_dict.placeholder(float)  # overrides steps
  c.optimizer.total_steps = -1  # end of the cosine (warmup included); <= 0: the whole run
  c.optimizer.weight_decay = 0.0  # the reference's
  c.optimizer.clip_grad_norm = 1.0  # global-norm clipping when > 0 (the reference: none)

  # Starting weights when the workdir has no checkpoint (DESIGN.md section 2).
  c.init = ml_collections.ConfigDict()
  c.init.from_pytorch = ml_collections.config_dict.placeholder(str)  # .pth/.pth.tar/.safetensors
  # Entry of a dict checkpoint; None: the first of 'teacher', 'state_dict', 'model'.
  # With from_checkpoint: 'teacher' (None) or 'student'.
  c.init.key = ml_collections.config_dict.placeholder(str)
  c.init.from_checkpoint = ml_collections.config_dict.placeholder(str)  # an ark_jax workdir
  c.init.load_heads = True  # False: backbone and projector only (other datasets)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1 = every device not in fsdp
  c.mesh.fsdp = 1  # parameter-sharding axis
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = sharding.REPLICATED_RULES  # logical axis -> mesh axis
  return c
