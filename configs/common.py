"""Pieces shared by the experiment configs: model, optimizer, mesh, the Ark recipe.

A model is named '<family>_<variant>' ('swin_base', 'vit_small', 'convnext_base',
'swin_custom'); ark_jax/models/registry.py decodes the variant into sizes, so no
config repeats a table of widths and depths.
"""

import ml_collections

from ark_jax import sharding

# The Ark+6 datasets in the reference's head order (checkpoint-compatible), with
# the class count of each head (ARK_SPEC.md section 4).
ARK6_DATASETS = ('mimic_cxr', 'chexpert', 'chestxray14', 'rsna_pneumonia', 'vindr_cxr',
                 'shenzhen_cxr')
ARK6_NUM_CLASSES = (14, 14, 14, 3, 6, 1)

# Ark+5: the six without MIMIC-CXR, the rest in the same order (ARK_SPEC.md
# section 6: the head order follows the command line).
ARK5_DATASETS = ARK6_DATASETS[1:]
ARK5_NUM_CLASSES = ARK6_NUM_CLASSES[1:]

# Training-split sizes of the reference (ARK_SPEC.md section 4); they only size
# the step cadences below, the trainer counts the prepared examples itself.
ARK_TRAIN_SIZES = {'mimic_cxr': 368_879, 'chexpert': 223_414, 'chestxray14': 75_312,
                   'rsna_pneumonia': 21_295, 'vindr_cxr': 15_000, 'shenzhen_cxr': 463}

# The reference's uncertain/blank handling as 'UNCERTAIN,BLANK' (input_pipeline/
# labels.py): CheXpert -1 -> U(0.55, 0.85) drawn once, MIMIC -1 -> 1, blank -> 0.
ARK_LABEL_POLICIES = {'chexpert': 'lsr_ones,zeros', 'mimic_cxr': 'ones,zeros'}


def model_config(name: str = 'swin_base', img_size: int = 224,
                 window_size: int | None = None) -> ml_collections.ConfigDict:
  """The `model` section: backbone, sizes, projector and compute dtype."""
  family, _, variant = name.partition('_')
  c = ml_collections.ConfigDict()
  c.name = family  # 'swin' | 'vit' | 'convnext'
  c.variant = variant or 'base'  # 'tiny' | 'small' | 'base' | 'large' | 'custom'
  c.img_size = img_size  # S, the network's input side in pixels
  c.window_size = window_size or (7 if img_size == 224 else 12)  # Swin only
  c.patch_size = 16  # ViT only (Swin and ConvNeXt fix their own)
  # Sizes for variant='custom' (None = the family default); Swin: embed_dim,
  # depths, num_heads; ViT: embed_dim, depth, num_heads; ConvNeXt: depths, dims.
  c.embed_dim = ml_collections.config_dict.placeholder(int)
  c.depths = ml_collections.config_dict.placeholder(tuple)
  c.depth = ml_collections.config_dict.placeholder(int)
  c.num_heads = ml_collections.config_dict.placeholder(tuple)
  c.dims = ml_collections.config_dict.placeholder(tuple)
  c.drop_path_rate = 0.1  # stochastic depth at the last block (timm's Swin default)
  c.projector_dim = 1376  # P, the embedding the consistency loss compares
  c.projector_mlp = False  # Linear-ReLU-Linear projector (reference --use_mlp)
  # Per dataset, its label names: ONE head over their union instead of one per
  # dataset (the MedIA label-consolidation ablation); None = per-dataset heads.
  c.head_labels = ml_collections.config_dict.placeholder(tuple)
  c.remat = False  # rematerialise each block in the backward (memory for 768 px)
  c.dtype = 'float32'  # computation dtype; 'bfloat16' on GPU/TPU (params stay f32)
  return c


def smoke_model_config(img_size: int = 64) -> ml_collections.ConfigDict:
  """A Swin small enough to train on a laptop CPU in seconds (tests, demos)."""
  c = model_config('swin_custom', img_size, window_size=4)
  c.embed_dim = 32
  c.depths = (1, 1, 1, 1)
  c.num_heads = (1, 2, 4, 8)
  c.projector_dim = 64
  return c


def steps_per_epoch(datasets, batch_size: int) -> int:
  """Optimizer steps of one cyclic epoch: one pass per dataset, last batch kept."""
  return sum(-(-ARK_TRAIN_SIZES[name] // batch_size) for name in datasets)


def optimizer_config(lr: float, warmup_epochs: float = 20.0) -> ml_collections.ConfigDict:
  """The reference's optimizer: SGD Nesterov, warmup then cosine over the run."""
  c = ml_collections.ConfigDict()
  c.name = 'sgd'  # Nesterov momentum (the reference's timm 'sgd') | 'adamw'
  c.lr = lr  # peak LR
  c.momentum = 0.9  # SGD momentum
  # Linear warmup in epochs (the trainer rounds it to steps); None: warmup_steps.
  c.warmup_epochs = ml_collections.config_dict.placeholder(float)
  c.warmup_epochs = warmup_epochs
  c.warmup_steps = 0  # linear warmup in steps, used when warmup_epochs is None
  c.total_steps = -1  # end of the cosine (warmup included), in steps; <= 0: the whole run
  c.warmup_init = 1e-6  # LR at step 0 (timm's warmup_lr_init)
  c.end_lr = 1e-5  # LR at the end of the cosine (timm's lr_min)
  c.weight_decay = 0.0  # the reference's
  c.clip_grad_norm = 0.0  # global-norm clipping when > 0 (the reference: none)
  return c


def parallel_config(c: ml_collections.ConfigDict) -> None:
  """Adds the `mesh` and `sharding` sections: data parallel, parameters replicated."""
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1 = every device not in fsdp
  c.mesh.fsdp = 1  # parameter-sharding axis (with sharding.FSDP_RULES)
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = sharding.REPLICATED_RULES  # logical axis -> mesh axis


def ark_config(model: ml_collections.ConfigDict, datasets, num_classes, *, batch_size: int,
               image_size: int, lr: float = 0.3,
               num_epochs: int = 200) -> ml_collections.ConfigDict:
  """An Ark/Ark+ pretraining run as the reference trains it (ARK_SPEC.md section 3).

  Args:
    model: the `model` section (model_config).
    datasets: TFDS names in head order.
    num_classes: classes per head, same order.
    batch_size: global batch.
    image_size: R, the stored side; the teacher view resizes it to model.img_size.
    lr: peak LR.
    num_epochs: cyclic epochs (one pass over each dataset per epoch).

  Returns:
    The whole config; the step cadences follow the reference's epochs.
  """
  epoch = steps_per_epoch(datasets, batch_size)
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything random derives from it
  c.batch_size = batch_size  # global, over all devices and hosts
  c.model = model

  c.data = ml_collections.ConfigDict()
  c.data.datasets = tuple(datasets)  # TFDS names, in head order
  c.data.num_classes = tuple(num_classes)  # classes per head, same order
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
  c.data.image_size = image_size  # R, the stored side in pixels
  c.data.schedule = 'cyclic'  # one dataset per pass, in head order (the reference)
  c.data.weights = ml_collections.config_dict.placeholder(tuple)  # mixed; None = sizes
  c.data.label_policies = ml_collections.ConfigDict(
      {k: v for k, v in ARK_LABEL_POLICIES.items() if k in datasets})
  c.data.num_workers = 8  # Grain mp_prefetch processes; 0 reads in the trainer
  c.data.read_threads = 4  # decoding threads per reading process

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.08, 1.0)  # the student crop's area range (albumentations default)

  c.num_epochs = num_epochs  # epochs (the reference's --epochs, also its LR horizon)
  c.max_steps = 0  # stop after this many optimizer steps when > 0
  c.log_every_steps = 100  # steps between lines of workdir/metrics.jsonl
  c.checkpoint_every_steps = epoch  # the reference saves once an epoch
  c.eval_every_steps = 10 * epoch  # the reference tests every 10 epochs (test_epoch); 0 = at the end
  c.eval_split = 'test'  # split the periodic evaluation reads
  # Global. The reference tests at B/2, but B/2 need not split over the devices
  # that B does (200/2 over 8, 50/2 over 2); the scores do not depend on it.
  c.eval_batch_size = batch_size
  c.ten_crop = False  # test-time TenCrop(S) of the R image (the reference: on)
  c.bootstrap_samples = 1000  # resamples behind each eval AUC's 95% CI; 0 = no CIs
  c.bootstrap_seed = 233  # their seed (the reference's zero-shot CIs: 1000, 233)
  c.progress_bar = True  # tqdm on stderr (process 0)
  c.consistency_scale = 1.0  # multiplies c; 0 = the ablation without the teacher's term
  c.teacher_init = 'independent'  # built separately, as the reference | 'copy' of the student
  c.ema = 'pass'  # one EMA update per dataset pass, momentum indexed by the pass
  # True: a step with a non-finite loss or gradient changes no weights and is
  # counted (metrics.jsonl skipped_steps); False: the run stops, naming the step.
  c.skip_nonfinite = False

  c.optimizer = optimizer_config(lr)
  parallel_config(c)

  # Starting weights when the workdir has no checkpoint (DESIGN.md section 2).
  c.init = ml_collections.ConfigDict()
  c.init.from_pytorch = ml_collections.config_dict.placeholder(str)  # .pth/.pth.tar/.safetensors
  # Entry of a dict checkpoint; None: the first of 'teacher', 'state_dict', 'model'.
  # With from_checkpoint: 'teacher' (None) or 'student'.
  c.init.key = ml_collections.config_dict.placeholder(str)
  c.init.from_checkpoint = ml_collections.config_dict.placeholder(str)  # an ark_jax workdir
  c.init.load_heads = True  # False: backbone and projector only (other datasets)
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment (datasets, recipe) small enough for a 2-core CPU."""
  model = smoke_model_config(64)
  model.projector_mlp = c.model.projector_mlp
  model.remat = c.model.remat
  model.head_labels = c.model.head_labels
  model.dtype = c.model.dtype
  c.model = model
  c.batch_size = 8
  c.eval_batch_size = 8
  c.data.image_size = 64  # R = S: the fake test sets are prepared at 64
  c.data.num_workers = 0
  c.data.read_threads = 2
  c.num_epochs = 1
  c.max_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.eval_every_steps = 0
  c.optimizer.warmup_epochs = None
  c.optimizer.warmup_steps = 2
  c.optimizer.total_steps = 6
  return c
