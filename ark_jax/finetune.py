r"""Fine-tuning and linear probing on one target dataset (ARK_SPEC.md sections 2 and 5).

  python -m ark_jax.main --config=configs/finetune_demo.py[:MODE] --workdir=DIR \
      [--config.init.from_checkpoint=PRETRAIN_DIR | --config.init.from_pytorch=FILE]

Starting weights (`config.init`), as the reference loads them for downstream:
  from_checkpoint  an ark_jax workdir: its newest teacher (`ema_params`), or
                   its student with `config.init.key='student'`;
  from_pytorch     an Ark `.pth.tar` (entry `config.init.key`, by default
                   'teacher'; `module.` prefixes stripped), a timm or a Microsoft
                   Swin file; read with weights_only / safetensors only;
  neither          random initialisation from the trial's seed (the baseline a
                   pretrained start is compared with): an explicit choice, not
                   an error.
Pretraining heads (`omni_heads`) are never loaded. The projector is discarded
for 'full' and 'frozen' (the reference loads non-strictly into a plain timm
Swin) and is what 'linear_probe' reads.

Modes (`config.finetune.mode`):
  full          backbone + a new head Linear(F -> C) (trunc-normal 0.02, bias 0,
                timm's head) on the pooled features, all trained.
  frozen        the same model, only the head trained (the reference's
                --freeze_encoder); the backbone is not differentiated at all.
  linear_probe  the teacher's projector embeddings z [N, P] of train,
                validation and test, computed ONCE (centre view, no
                augmentation) and cached in DIR/embeddings/{split}.npz with a
                fingerprint of the weights, model, data and split (a changed
                source recomputes them); then a Linear(P -> C) trained on them.

Recipe (the reference's fine-tuning): SGD-Nesterov (momentum 0.9), lr 0.01,
weight decay 0, batch 64, a constant LR (the reference steps its scheduler with
the validation loss, which keeps it constant in effect); after every epoch the
validation loss (centre view) decides: the best epoch's parameters are kept (in
memory and in DIR/trial_K/best.npz, written atomically) and training stops
after `patience` epochs without improvement. The test split is scored once, with
the best parameters (`config.ten_crop`: the reference's TenCrop). The linear
probe follows the same selection: the reference's probe picks its epoch on the
TEST set and uses a rising LR (ARK_SPEC.md pitfall 18); here it is Adam with a
constant LR (configs: 1e-3, batch 512) in float32 (the reference: float64),
selected on validation loss like fine-tuning. Nothing is ever selected on test.

Augmentation of 'full'/'frozen' training: augment.student_view (random resized
crop of the stored R x R image with `config.augment.crop_scale`, shift-scale-
rotate, brightness/contrast/gamma) and a horizontal flip. The reference crops
the full-resolution image and rotates by up to 7 degrees without colour
changes; the on-device view is the pretraining one plus the flip. As in the
reference, the backbone runs in train mode (stochastic depth) in both modes.

Loss: BCE for multi-label and binary sets, softmax CE for multi-class ones,
with the label mask (losses.task_loss). AUC per label as evaluate.py computes
it (labels without a positive left out, CheXpert's 5 labels for the mean),
argmax accuracy for multi-class sets.

Few-shot (`config.finetune.few_shot`): 0 = all training examples; a fraction
f < 1 takes int(f N) of them, a count n >= 1 takes n, after a seeded shuffle:
`few_shot_seed` None draws each trial's subset from its own seed (so the spread
over trials includes the choice of examples); an integer fixes one subset for
every trial (the reference: random.Random(99)). Validation and test are whole.

Trials (`config.trials` = N): seeds seed, seed + 1, ...; one compiled train
step and evaluation serve every trial. DIR/finetune_results.json holds each
trial and the mean +- std (numpy's std, ddof=0) over trials.

Shape suffixes: B batch, R stored side, S model input side, F pooled features,
P projector width, C classes, N examples.
"""

from collections.abc import Mapping
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ark_jax import augment
from ark_jax import evaluate
from ark_jax import interop
from ark_jax import losses
from ark_jax import metrics
from ark_jax import sharding
from ark_jax import train
from ark_jax.models import layers
from ark_jax.models import registry
from input_pipeline import datasets
from input_pipeline import pipeline

MODES = ('full', 'frozen', 'linear_probe')
OPTIMIZERS = ('sgd', 'adam')
SPLITS = ('train', 'validation', 'test')
_HEAD_INIT, _BACKBONE_INIT, _TRAIN = 0, 1, 2  # streams folded out of a trial's seed


# ------------------------------------------------------------------------------ config


def check_config(config, num_devices: int) -> None:
  """Raises a ValueError naming the key, before anything is read or compiled."""
  f = config.finetune
  if f.mode not in MODES:
    raise ValueError(f'config.finetune.mode={f.mode!r} is unknown; use one of {MODES}.')
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={config.optimizer.name!r} is unknown; use one of '
                     f'{OPTIMIZERS}.')
  for key in ('trials', 'max_epochs', 'patience', 'batch_size', 'eval_batch_size'):
    if config[key] < 1:
      raise ValueError(f'config.{key}={config[key]} must be >= 1.')
  few = f.few_shot
  if few < 0 or (few >= 1 and few != int(few)):
    raise ValueError(f'config.finetune.few_shot={few}: use 0 (all), a fraction in (0, 1) or a '
                     'whole count >= 1 of the training examples.')
  train._init_source(config)  # pylint: disable=protected-access  # at most one source
  if f.mode != 'linear_probe':
    sharding.check_batch_divisible(config.batch_size, num_devices)
  sharding.check_batch_divisible(config.eval_batch_size, num_devices, key='config.eval_batch_size')
  try:
    datasets.metadata(f.dataset, config.data.get('data_dir'))
  except ValueError as e:
    raise ValueError(f'config.finetune.dataset={f.dataset!r}: {e}') from e


def data_config(config) -> ml_collections.ConfigDict:
  """The pipeline's `data` section for the target alone (head 0)."""
  d = config.data
  meta = datasets.metadata(config.finetune.dataset, d.get('data_dir'))
  policies = {k: v for k, v in (d.get('label_policies') or {}).items() if k == meta.name}
  return ml_collections.ConfigDict(dict(
      datasets=(config.finetune.dataset,), num_classes=(meta.num_classes,),
      data_dir=d.get('data_dir'), image_size=d.image_size, schedule='cyclic',
      label_policies=policies, num_workers=d.get('num_workers', 0),
      read_threads=d.get('read_threads', 2)))


def few_shot_indices(num_train: int, few_shot: float, seed: int) -> np.ndarray | None:
  """The training examples a trial uses (sorted indices), or None for all of them.

  Raises:
    ValueError: a request of no example, or of more than the split holds.
  """
  if not few_shot:
    return None
  count = int(num_train * few_shot) if few_shot < 1 else int(few_shot)
  if not 1 <= count <= num_train:
    raise ValueError(f'config.finetune.few_shot={few_shot} asks for {count} of the '
                     f'{num_train} training examples.')
  return np.sort(np.random.default_rng(seed).permutation(num_train)[:count])


# ------------------------------------------------------------------------------ model and weights


class Classifier(nnx.Module):
  """A backbone and a new Linear(F -> C) head on its pooled features (timm's head init)."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, dtype, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = layers.linear(backbone.num_features, num_classes, ('embed', 'classes'),
                              dtype=dtype, rngs=rngs)

  def __call__(self, x_BxSxSx3, *, train: bool = False, rng=None):
    return self.head(self.backbone(x_BxSxSx3, train=train, rng=rng)).astype(jnp.float32)


def _source_fingerprint(config) -> dict[str, Any]:
  """What the starting weights are, without reading them (for the embedding cache)."""
  source = train._init_source(config)  # pylint: disable=protected-access
  if source is None:
    return {'random_init_seed': config.seed}
  kind, path = source
  info: dict[str, Any] = {kind: os.path.abspath(path), 'key': config.init.get('key')}
  if kind == 'from_pytorch' and os.path.exists(path):
    stat = os.stat(path)
    info.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
  elif kind == 'from_checkpoint':
    directory = path if os.path.basename(os.path.normpath(path)) == 'checkpoints' else (
        os.path.join(path, 'checkpoints'))
    info['steps'] = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  return info


def load_source(config, mesh, *, projector: bool) -> nnx.State | None:
  """The starting weights config.init names: 'backbone' (and 'projector'), or None.

  Heads are never loaded; the projector only when `projector` (linear probing).

  Raises:
    FileNotFoundError, ValueError (not a checkpoint, refused for safety),
    interop.WeightsMismatchError: naming the file or key, before any compile.
  """
  source = train._init_source(config)  # pylint: disable=protected-access
  if source is None:
    return None
  kind, path = source
  if kind == 'from_checkpoint':
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init.load_heads = False
    with nnx.logical_axis_rules(config.sharding.rules):
      loaded = train.load_init_params(config, (1,), mesh)
    return loaded if projector else nnx.State({'backbone': loaded['backbone']})
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.init.from_pytorch={path!r} does not exist.')
  try:
    state_dict = interop.read_state_dict(path, key=config.init.get('key'))
  except ValueError as e:
    raise ValueError(f'config.init.from_pytorch: {e}') from e
  drop = ('omni_heads.',) if projector else ('omni_heads.', 'projector.')
  state_dict = {k: v for k, v in interop.strip_module_prefix(state_dict).items()
                if not k.startswith(drop)}
  if projector and not any(k.startswith('projector.') for k in state_dict):
    raise interop.WeightsMismatchError(
        f'config.init.from_pytorch={path!r} has no projector (projector.*): '
        "finetune.mode='linear_probe' reads the projector's embeddings; use 'frozen' or 'full'.")
  with nnx.logical_axis_rules(config.sharding.rules):
    abstract = nnx.eval_shape(lambda: registry.create_model(config.model, (1,),
                                                            rngs=nnx.Rngs(0)))
  try:
    return interop.init_params(state_dict, abstract)
  except interop.WeightsMismatchError as e:
    raise interop.WeightsMismatchError(f'config.init.from_pytorch={path!r}: {e}') from e


def classifier_init(config, num_classes: int, mesh):
  """The Classifier's graphdef, its compiled initialiser and the loaded weights.

  `init(key, loaded)` gives a trial's params (an nnx.State, replicated): the
  backbone from `loaded` (load_source's, read here once for every trial), or
  random from `key` when config.init names nothing; the head always new.
  Compiled once, without backend optimisation (registry.materialize says why).
  Call under jax.set_mesh(mesh).
  """
  loaded = load_source(config, mesh, projector=False)

  def create(key, loaded):
    model = Classifier(
        registry.backbone_from_config(
            config.model, rngs=nnx.Rngs(jax.random.fold_in(key, _BACKBONE_INIT))),
        num_classes, dtype=jnp.dtype(config.model.dtype),
        rngs=nnx.Rngs(jax.random.fold_in(key, _HEAD_INIT)))
    if loaded is not None:
      nnx.update(model.backbone, loaded['backbone'])
    return model

  with nnx.logical_axis_rules(config.sharding.rules):
    graphdef = nnx.split(nnx.eval_shape(lambda: create(jax.random.PRNGKey(0), None)),
                         nnx.Param)[0]
    init = jax.jit(lambda key, loaded: nnx.split(create(key, loaded), nnx.Param)[1],
                   out_shardings=sharding.replicated(mesh))
    compiled = init.lower(jax.random.PRNGKey(0), loaded).compile(
        compiler_options={'xla_backend_optimization_level': 0})
  return graphdef, compiled, loaded


def _optimizer(o) -> optax.GradientTransformation:
  """Constant-LR SGD-Nesterov (the reference's fine-tuning) or Adam (the probe)."""
  if o.name == 'sgd':
    return optax.chain(optax.add_decayed_weights(o.weight_decay) if o.weight_decay
                       else optax.identity(),
                       optax.sgd(o.lr, momentum=o.get('momentum', 0.9), nesterov=True))
  return optax.adamw(o.lr, weight_decay=o.weight_decay) if o.weight_decay else optax.adam(o.lr)


def _task_loss(logits_BxC, labels_BxC, mask_BxC, valid_B, multiclass: bool):
  """losses.task_loss for one dataset: (mean loss, sum of terms, term count)."""
  zeros_B = jnp.zeros(valid_B.shape, jnp.int32)
  loss, loss_D, count_D = losses.task_loss(logits_BxC, labels_BxC, mask_BxC, zeros_B,
                                           np.array([multiclass]),
                                           np.array([logits_BxC.shape[-1]], np.int32), valid_B)
  return loss, loss_D[0] * count_D[0], count_D[0]


def _probabilities(logits_BxC, multiclass: bool):
  zeros_B = jnp.zeros(logits_BxC.shape[:1], jnp.int32)
  return evaluate.head_probabilities(logits_BxC, zeros_B, np.array([multiclass]),
                                     np.array([logits_BxC.shape[-1]], np.int32))


# ------------------------------------------------------------------------------ full / frozen


def make_steps(graphdef, config, multiclass: bool):
  """Jitted `train_step(trainable, fixed, opt_state, batch, rng, step)` and eval functions.

  `trainable` and `fixed` split the Classifier's params ('full': fixed is
  empty; 'frozen': fixed is the backbone, never differentiated). eval_fns[v]
  maps (trainable, fixed, image, labels, mask, valid) to (loss sum, count,
  probs) for view v ('center' or 'ten_crop'; the loss is the centre view's).
  """
  size, rules, tx = config.model.img_size, config.sharding.rules, _optimizer(config.optimizer)
  crop_scale = tuple(config.augment.crop_scale)

  def train_step(trainable, fixed, opt_state, batch, rng, step):
    with nnx.logical_axis_rules(rules):
      view_rng, flip_rng, drop_rng = jax.random.split(jax.random.fold_in(rng, step), 3)
      x = augment.student_view(batch['image'], size, view_rng, crop_scale)
      flip_B = jax.random.bernoulli(flip_rng, 0.5, x.shape[:1])
      x_BxSxSx3 = jnp.where(flip_B[:, None, None, None], x[:, :, ::-1], x)

      def loss_fn(trainable):
        logits = nnx.merge(graphdef, trainable, fixed)(x_BxSxSx3, train=True, rng=drop_rng)
        return _task_loss(logits, batch['labels'], batch['label_mask'], batch['valid'],
                          multiclass)[0]

      loss, grads = jax.value_and_grad(loss_fn)(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

  def make_eval(ten_crop: bool):
    def eval_fn(trainable, fixed, image, labels, mask, valid):
      with nnx.logical_axis_rules(rules):
        model = nnx.merge(graphdef, trainable, fixed)
        logits = model(evaluate.center_view(image, size))
        _, total, count = _task_loss(logits, labels, mask, valid, multiclass)
        if not ten_crop:
          return total, count, _probabilities(logits, multiclass)
        views = augment.ten_crop(image, size)
        probs = sum(_probabilities(model(views[t]), multiclass) for t in range(views.shape[0]))
        return total, count, probs / views.shape[0]
    return jax.jit(eval_fn)

  eval_fns = {'center': make_eval(False)}
  if config.get('ten_crop'):
    eval_fns['ten_crop'] = make_eval(True)
  return jax.jit(train_step, donate_argnums=(0, 2)), eval_fns, tx


def _global(host_batch, mesh, fields=('image', 'labels', 'label_mask', 'valid')):
  sh = sharding.batch_sharding(mesh)
  return {f: jax.make_array_from_process_local_data(sh, np.asarray(host_batch[f]))
          for f in fields}


def _host_rows(host, width: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Every process's valid-row mask, and the labels and mask of those rows."""
  gather = evaluate._gather  # pylint: disable=protected-access
  valid = gather(np.asarray(host['valid'], bool))
  return valid, {'labels': gather(np.asarray(host['labels'])[:, :width])[valid],
                 'mask': gather(np.asarray(host['label_mask'])[:, :width])[valid]}


def score_split(eval_fn, params, data_cfg, split, batch_size, mesh) -> dict[str, np.ndarray]:
  """One ordered pass: {'loss', 'probs', 'labels', 'mask'} over the split's examples."""
  total, count, chunks = 0.0, 0.0, {'probs': [], 'labels': [], 'mask': []}
  width = data_cfg.num_classes[0]
  it = pipeline.eval_iterator(data_cfg, data_cfg.datasets[0], split, batch_size)
  try:
    for host in it:
      b = _global(host, mesh)
      t, c, probs = eval_fn(*params, b['image'], b['labels'], b['label_mask'], b['valid'])
      total, count = total + float(t), count + float(c)
      valid, rows = _host_rows(host, width)
      chunks['probs'].append(np.asarray(probs)[valid, :width])
      for key, value in rows.items():
        chunks[key].append(value)
  finally:
    it.close()
  out = {k: np.concatenate(v) for k, v in chunks.items()}
  out['loss'] = total / max(count, 1.0)
  return out


def split_metrics(scores: Mapping[str, np.ndarray], meta) -> dict[str, Any]:
  """auc (per label), auc_mean, accuracy (multi-class), n: evaluate.py's rules."""
  auc = metrics.per_label_auc(scores['probs'], scores['labels'], meta.label_names, scores['mask'])
  out = {'auc_mean': metrics.mean_auc(auc, evaluate.EVAL_LABELS.get(meta.name)), 'auc': auc,
         'n': int(scores['probs'].shape[0])}
  if meta.task == 'multiclass':
    out['accuracy'] = metrics.accuracy(scores['probs'], scores['labels'])
  return out


# ------------------------------------------------------------------------------ linear probe


def compute_embeddings(config, data_cfg, split: str, mesh, params) -> dict[str, np.ndarray]:
  """The teacher's projector outputs z [N, P] of one split (centre view), with labels and mask."""
  with nnx.logical_axis_rules(config.sharding.rules):
    graphdef = nnx.split(nnx.eval_shape(
        lambda: registry.create_model(config.model, (1,), rngs=nnx.Rngs(0))))[0]
  size, width = config.model.img_size, data_cfg.num_classes[0]
  embed = jax.jit(lambda p, image: nnx.merge(graphdef, p)(evaluate.center_view(image, size))['z'])
  chunks = {'z': [], 'labels': [], 'mask': []}
  it = pipeline.eval_iterator(data_cfg, data_cfg.datasets[0], split, config.eval_batch_size)
  try:
    with nnx.logical_axis_rules(config.sharding.rules):
      for host in it:
        valid, rows = _host_rows(host, width)
        z_BxP = embed(params, _global(host, mesh, ('image',))['image'])
        chunks['z'].append(np.asarray(z_BxP)[valid])
        for key, value in rows.items():
          chunks[key].append(value)
  finally:
    it.close()
  return {k: np.concatenate(v) for k, v in chunks.items()}


def cached_embeddings(config, data_cfg, workdir: str, mesh, load_params) -> dict[str, dict]:
  """Every split's embeddings from DIR/embeddings when their fingerprint matches, else computed.

  `load_params()` gives the ArkModel params; it is called only when a split
  must be computed, so a cached run reads no weights.
  """
  directory = os.path.join(workdir, 'embeddings')
  os.makedirs(directory, exist_ok=True)
  params, out = None, {}
  for split in SPLITS:
    key = json.dumps({'source': _source_fingerprint(config), 'model': config.model.to_dict(),
                      'data': data_cfg.to_dict(), 'split': split}, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    path = os.path.join(directory, f'{split}.npz')
    if os.path.exists(path):
      with np.load(path) as cached:
        if str(cached['fingerprint']) == fingerprint:
          out[split] = {k: cached[k] for k in ('z', 'labels', 'mask')}
          logging.info('Embeddings of %s: cached in %s.', split, path)
          continue
    if params is None:
      params = load_params()
    out[split] = compute_embeddings(config, data_cfg, split, mesh, params)
    if jax.process_index() == 0:
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, fingerprint=np.array(fingerprint), **out[split])
      os.replace(path + '.tmp', path)
  return out


def make_probe_fns(config, multiclass: bool):
  """Jitted probe step `(params, opt_state, z, y, m, valid)` and eval `(params, z, y, m)`."""
  tx = _optimizer(config.optimizer)

  def logits(params, z_NxP):
    return (jnp.matmul(z_NxP, params['kernel'], precision=jax.lax.Precision.HIGHEST)
            + params['bias'][None, :])

  def step(params, opt_state, z, y, m, valid):
    loss, grads = jax.value_and_grad(
        lambda p: _task_loss(logits(p, z), y, m, valid, multiclass)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_fn(params, z, y, m):
    out = logits(params, z)
    _, total, count = _task_loss(out, y, m, jnp.ones(z.shape[:1], bool), multiclass)
    return total, count, _probabilities(out, multiclass)

  return jax.jit(step, donate_argnums=(0, 1)), jax.jit(eval_fn), tx


# ------------------------------------------------------------------------------ trials


def flat_arrays(params) -> dict[str, np.ndarray]:
  """Name -> array of a (trainable, fixed) pair or the probe's dict: 'head.kernel', ..."""
  out = {}
  for part in (params if isinstance(params, tuple) else (params,)):
    for path, value in jax.tree_util.tree_flatten_with_path(part)[0]:
      name = jax.tree_util.keystr(path, simple=True, separator='.')
      out[name.removesuffix('.value')] = np.asarray(value)
  return out


class _EarlyStopping:
  """Best validation loss so far, its epoch and parameters; the patience counter."""

  def __init__(self, patience: int, path: str | None):
    self.patience, self.path = patience, path
    self.best_loss, self.best_epoch, self.best, self.since = math.inf, -1, None, 0

  def update(self, epoch: int, loss: float, params) -> bool:
    """Records the epoch; True when training should stop."""
    if not np.isfinite(loss):
      raise FloatingPointError(f'Non-finite validation loss {loss} at epoch {epoch}.')
    if loss < self.best_loss:
      self.best_loss, self.best_epoch, self.since = loss, epoch, 0
      self.best = jax.device_get(params)
      if self.path and jax.process_index() == 0:
        with open(self.path + '.tmp', 'wb') as f:
          np.savez(f, **flat_arrays(self.best))
        os.replace(self.path + '.tmp', self.path)  # never half a file
      return False
    self.since += 1
    return self.since >= self.patience


def _trial_dir(workdir: str, trial: int) -> str:
  path = os.path.join(workdir, f'trial_{trial}')
  os.makedirs(path, exist_ok=True)
  return os.path.join(path, 'best.npz')


def _finetune_trial(ctx, trial: int, seed: int, subset) -> dict[str, Any]:
  config, mesh, data_cfg = ctx['config'], ctx['mesh'], ctx['data_cfg']
  key = jax.random.PRNGKey(seed)
  params = ctx['init'](key, ctx['loaded'])
  if config.finetune.mode == 'frozen':
    trainable = nnx.State({'head': params['head']})
    fixed = nnx.State({'backbone': params['backbone']})
  else:
    trainable, fixed = params, nnx.State({})
  opt_state = ctx['tx'].init(trainable)
  n_train = ctx['num_train'] if subset is None else len(subset)
  steps = max(1, math.ceil(n_train / config.batch_size))
  it = pipeline.train_iterator(data_cfg, config.batch_size, seed, num_epochs=config.max_epochs,
                               subsets=None if subset is None else {data_cfg.datasets[0]: subset})
  stopper = _EarlyStopping(config.patience, _trial_dir(ctx['workdir'], trial))
  rng, step, history = jax.random.fold_in(key, _TRAIN), 0, []
  try:
    for epoch in range(config.max_epochs):
      train_losses = []
      for _ in range(steps):
        trainable, opt_state, loss = ctx['step'](trainable, fixed, opt_state,
                                                 _global(next(it), mesh), rng, np.int32(step))
        train_losses.append(loss)
        step += 1
      val = score_split(ctx['eval']['center'], (trainable, fixed), data_cfg, 'validation',
                        config.eval_batch_size, mesh)
      history.append({'epoch': epoch,
                      'train_loss': float(np.mean(jax.device_get(train_losses))),
                      'val_loss': val['loss'],
                      'val_auc_mean': split_metrics(val, ctx['meta'])['auc_mean']})
      logging.info('trial %d epoch %d: %s', trial, epoch, history[-1])
      if stopper.update(epoch, val['loss'], (trainable, fixed)):
        break
  finally:
    it.close()
  best = jax.device_put(stopper.best, sharding.replicated(mesh))
  test = score_split(ctx['eval']['ten_crop' if config.get('ten_crop') else 'center'],
                     best, data_cfg, 'test', config.eval_batch_size, mesh)
  return dict(best_epoch=stopper.best_epoch, epochs_run=len(history), n_train=n_train,
              val_loss=stopper.best_loss, history=history, test=split_metrics(test, ctx['meta']))


def _probe_trial(ctx, trial: int, seed: int, subset) -> dict[str, Any]:
  config, emb = ctx['config'], ctx['embeddings']
  z, y, m = (emb['train'][k] for k in ('z', 'labels', 'mask'))
  if subset is not None:
    z, y, m = z[subset], y[subset], m[subset]
  dim, classes = z.shape[1], y.shape[1]
  init = layers.torch_default_uniform(dim)  # nn.Linear's default, as the reference's probe
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), _HEAD_INIT))
  params = {'kernel': init(k1, (dim, classes)), 'bias': init(k2, (classes,))}
  opt_state, b = ctx['tx'].init(params), config.batch_size
  order_rng = np.random.default_rng([seed, _TRAIN])
  stopper = _EarlyStopping(config.patience, _trial_dir(ctx['workdir'], trial))
  history = []

  def scores(split, params):
    s = emb[split]
    total, count, probs = ctx['eval'](params, s['z'], s['labels'], s['mask'])
    return {'loss': float(total) / max(float(count), 1.0), 'probs': np.asarray(probs),
            'labels': s['labels'], 'mask': s['mask']}

  for epoch in range(config.max_epochs):
    perm = order_rng.permutation(len(z))
    perm = np.concatenate([perm, np.zeros(-len(perm) % b, np.int64)])  # pad to whole batches
    valid = np.arange(len(perm)) < len(z)
    for i in range(0, len(perm), b):
      rows = perm[i:i + b]
      params, opt_state, _ = ctx['step'](params, opt_state, z[rows], y[rows], m[rows],
                                         valid[i:i + b])
    val = scores('validation', params)
    history.append({'epoch': epoch, 'val_loss': val['loss'],
                    'val_auc_mean': split_metrics(val, ctx['meta'])['auc_mean']})
    if stopper.update(epoch, val['loss'], params):
      break
  return dict(best_epoch=stopper.best_epoch, epochs_run=len(history), n_train=len(z),
              val_loss=stopper.best_loss, history=history,
              test=split_metrics(scores('test', stopper.best), ctx['meta']))


def summarize(trials) -> dict[str, Any]:
  """Mean and std (ddof=0) over trials of the test mean AUC (and accuracy), and val loss."""
  out = {}
  for name, get in (('test_auc_mean', lambda t: t['test']['auc_mean']),
                    ('test_accuracy', lambda t: t['test'].get('accuracy')),
                    ('val_loss', lambda t: t['val_loss'])):
    values = [get(t) for t in trials]
    if all(v is not None for v in values):
      out[name] = {'mean': float(np.mean(values)), 'std': float(np.std(values)),
                   'values': [float(v) for v in values]}
  return out


def summary_table(results: Mapping[str, Any]) -> str:
  lines = [f'{"trial":>5} {"seed":>6} {"n_train":>8} {"best_epoch":>10} {"val_loss":>9} '
           f'{"test_auc":>9}']
  for t in results['trials']:
    lines.append(f'{t["trial"]:>5} {t["seed"]:>6} {t["n_train"]:>8} {t["best_epoch"]:>10} '
                 f'{t["val_loss"]:>9.4f} {t["test"]["auc_mean"]:>9.4f}')
  s = results['summary']['test_auc_mean']
  line = (f'{results["dataset"]} ({results["mode"]}): test mean AUC '
          f'{s["mean"]:.4f} ± {s["std"]:.4f}')
  if 'test_accuracy' in results['summary']:
    a = results['summary']['test_accuracy']
    line += f', accuracy {a["mean"]:.4f} ± {a["std"]:.4f}'
  return '\n'.join(lines + [line + f' over {len(results["trials"])} trial(s)'])


# ------------------------------------------------------------------------------ the run


def run(config, workdir: str) -> dict[str, Any]:
  """Fine-tunes or probes as config.finetune says; writes DIR/finetune_results.json.

  Returns:
    The results: {'dataset', 'mode', 'init', 'trials': [...], 'summary': {...}}.
  """
  # Every check and every file read before anything is compiled.
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh.size)
  f, mode = config.finetune, config.finetune.mode
  data_cfg = data_config(config)
  meta = datasets.metadata(f.dataset, data_cfg.data_dir)
  multiclass = meta.task == 'multiclass'
  num_train = pipeline.dataset_sizes(data_cfg, 'train')[0]
  seeds = [config.seed + t for t in range(config.trials)]
  subsets = [few_shot_indices(num_train, f.few_shot,
                              s if f.get('few_shot_seed') is None else f.few_shot_seed)
             for s in seeds]
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as fh:
      fh.write(config.to_json_best_effort(indent=2))
  ctx: dict[str, Any] = dict(config=config, mesh=mesh, data_cfg=data_cfg, meta=meta,
                             num_train=num_train, workdir=workdir)

  with jax.set_mesh(mesh):
    if mode == 'linear_probe':
      def load_params():
        loaded = load_source(config, mesh, projector=True)
        with nnx.logical_axis_rules(config.sharding.rules):
          model = registry.materialize(lambda: registry.create_model(
              config.model, (1,), rngs=nnx.Rngs(config.seed)))
        if loaded is not None:
          nnx.update(model, loaded)
        return nnx.state(model, nnx.Param)
      ctx['embeddings'] = cached_embeddings(config, data_cfg, workdir, mesh, load_params)
      ctx['step'], ctx['eval'], ctx['tx'] = make_probe_fns(config, multiclass)
      run_trial = _probe_trial
    else:
      graphdef, ctx['init'], ctx['loaded'] = classifier_init(config, meta.num_classes, mesh)
      ctx['step'], ctx['eval'], ctx['tx'] = make_steps(graphdef, config, multiclass)
      run_trial = _finetune_trial
    trials = []
    for t, (seed, subset) in enumerate(zip(seeds, subsets)):
      trials.append(dict(trial=t, seed=seed, **run_trial(ctx, t, seed, subset)))

  results = {'dataset': f.dataset, 'mode': mode, 'few_shot': f.few_shot,
             'init': _source_fingerprint(config), 'trials': trials, 'summary': summarize(trials)}
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'finetune_results.json')
    with open(path + '.tmp', 'w') as fh:
      json.dump(results, fh, indent=1)
    os.replace(path + '.tmp', path)
    print(summary_table(results), flush=True)
  return results
