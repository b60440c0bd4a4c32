"""Ark+ pretraining: the jitted train step and the loop around it.

ARK_SPEC.md section 3; DESIGN.md section 1. One train step (donated state):

  rng = fold_in(state.rng, state.step)  -> a resumed run draws the same numbers
  teacher view (resize) -> teacher forward with ema_params, eval mode, no grad -> z_t
  student view (crop, shift-scale-rotate, colour) -> student forward, train mode
    (drop path) -> z_s, logits of every head -> each example's own head
  c = consistency_weight(ema_momentum(k, K))
    ema='pass': k = the batch's pass index (epoch * D + d), K = num_epochs * D
    ema='step': k = the step, K = optimizer.total_steps
  loss = (1 - c) task + c MSE(z_s, z_t); optax update
  ema='step': teacher <- m teacher + (1 - m) student inside the step;
  ema='pass': by a separate jitted call on the last batch of each dataset pass.
  skip_nonfinite: a non-finite loss or gradient keeps the old params, optimizer
    state and teacher (selected on the device); otherwise the log raises.

Around it: evaluation (ark_jax/evaluate.py) every eval_every_steps and at the
end, TensorBoard scalars, a progress bar, SIGTERM -> checkpoint and return.
"""

from collections.abc import Mapping, Sequence
import json
import os
import signal
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from tensorboard import summary as tb_summary
import tqdm

from ark_jax import augment
from ark_jax import checkpoint
from ark_jax import evaluate
from ark_jax import interop
from ark_jax import losses
from ark_jax import plots
from ark_jax import schedules
from ark_jax import sharding
from ark_jax import train_state as train_state_lib
from ark_jax.models import ark
from ark_jax.models import registry
from input_pipeline import datasets
from input_pipeline import pipeline

EMA_MODES = ('pass', 'step')
# Host-batch fields the step reads (index and pass_end stay on the host).
STEP_FIELDS = ('image', 'labels', 'label_mask', 'dataset_id', 'valid', 'pass_index')


def ema_total(config) -> int:
  """K, the length of the EMA momentum cosine: passes ('pass') or steps ('step')."""
  if config.ema == 'pass':
    return config.num_epochs * len(config.data.datasets)
  return config.optimizer.total_steps


def check_config(config, num_devices: int) -> None:
  """train_state.check_config plus the trainer's own keys; ValueError naming the key."""
  train_state_lib.check_config(config, num_devices)
  if config.ema not in EMA_MODES:
    raise ValueError(f'config.ema={config.ema!r} is unknown; use one of {EMA_MODES}.')
  if config.ema == 'pass' and config.data.get('schedule', 'cyclic') != 'cyclic':
    raise ValueError("config.ema='pass' needs config.data.schedule='cyclic' (mixed batches "
                     "have no dataset passes); use config.ema='step'.")
  if config.max_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('Set config.num_epochs > 0 or config.max_steps > 0.')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise ValueError(f'config.{key}={config[key]} must be >= 1.')
  # The evaluations (periodic, final, --mode=eval) would fail only after training.
  sharding.check_batch_divisible(config.get('eval_batch_size') or config.batch_size,
                                 num_devices, key='config.eval_batch_size')
  if config.data.image_size < config.model.img_size:
    raise ValueError(f'config.data.image_size={config.data.image_size} (the stored side) is '
                     f'below config.model.img_size={config.model.img_size}: both views would '
                     'upsample; prepare the data at model.img_size or larger.')
  if not isinstance(config.get('skip_nonfinite', False), bool):
    raise ValueError(f'config.skip_nonfinite={config.skip_nonfinite!r}: use True or False.')


def make_train_step(graphdef, config, num_classes, is_multiclass, *,
                    skip: frozenset[str] = frozenset()):
  """The pure train step `(state, batch) -> (state, metrics)`.

  Args:
    graphdef: the student's NNX graphdef (the teacher runs through it too).
    config: the run's ConfigDict.
    num_classes: class count of each head, in head order.
    is_multiclass: per head, True for softmax-CE (multi-class) datasets.
    skip: parts to leave out, for ark_jax/benchmark.py's time split only:
      'augment' (both views are the plain resized image), 'teacher' (z_t = 0,
      no teacher forward), 'ema' (no in-step EMA update). Empty for training.

  Returns:
    The step; `batch` holds the STEP_FIELDS as global arrays; metrics are
    device scalars (plus task_loss_D / count_D, one entry per dataset). With
    config.skip_nonfinite, a step whose loss or gradient norm is not finite
    keeps params, opt_state and ema_params as they were (state.step still
    advances) and reports metrics['skipped'] = 1 (else 0).
  """
  tx = train_state_lib.create_optimizer(config)
  o = config.optimizer
  lr_fn = schedules.lr_schedule(o.lr, o.warmup_steps, o.total_steps,
                                warmup_init=o.get('warmup_init', 1e-6), end_lr=o.get('end_lr', 1e-5))
  num_classes_D = np.asarray(num_classes, np.int32)
  is_multiclass_D = np.asarray(is_multiclass, bool)
  size, total, rules = config.model.img_size, ema_total(config), config.sharding.rules
  # RandomResizedCrop's area range: the reference's (0.08, 1) unless configured.
  crop_scale = tuple(config.get('augment', {}).get('crop_scale', augment.CROP_SCALE))
  if unknown := set(skip) - {'augment', 'teacher', 'ema'}:
    raise ValueError(f'make_train_step: unknown parts to skip {sorted(unknown)}.')
  consistency_scale = float(config.get('consistency_scale', 1.0))
  skip_nonfinite = bool(config.get('skip_nonfinite', False))

  def teacher_forward(ema_params, x):
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(ema_params))
    return teacher(x, train=False)['z']

  def student_forward(params, x, rng):
    return nnx.merge(graphdef, params)(x, train=True, rng=rng)

  def step_fn(state, batch):
    with nnx.logical_axis_rules(rules):
      rng = jax.random.fold_in(state.rng, state.step)
      view_rng, drop_rng = jax.random.split(rng)
      k = batch['pass_index'][0] if config.ema == 'pass' else state.step
      momentum = schedules.ema_momentum(k, total)
      # consistency_scale = 0 is the ablation without the teacher's term.
      c = consistency_scale * schedules.consistency_weight(momentum)
      valid = batch['valid']

      x_t = augment.teacher_view(batch['image'], size)
      z_t = (None if 'teacher' in skip else
             jax.named_call(teacher_forward, name='teacher')(state.ema_params, x_t))
      x_s = x_t if 'augment' in skip else augment.student_view(batch['image'], size, view_rng,
                                                               crop_scale)

      def loss_fn(params):
        out = jax.named_call(student_forward, name='student')(params, x_s, drop_rng)
        logits = ark.select_head(out['logits'], batch['dataset_id'])
        task, task_D, count_D = losses.task_loss(logits, batch['labels'], batch['label_mask'],
                                                 batch['dataset_id'], is_multiclass_D,
                                                 num_classes_D, valid)
        target = jnp.zeros_like(out['z']) if z_t is None else z_t
        cons = losses.consistency_loss(out['z'], target, valid)
        loss = losses.ark_loss(task, cons, c)
        return loss, dict(task_loss=task, consistency_loss=cons, task_loss_D=task_D,
                          count_D=count_D)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema_params = state.ema_params
      if config.ema == 'step' and 'ema' not in skip:
        ema_params = schedules.ema_update(ema_params, params, momentum)
      metrics = dict(loss=loss, lr=lr_fn(state.step), ema_momentum=momentum,
                     consistency_weight=c, grad_norm=grad_norm, **aux)
      if skip_nonfinite:
        # A selection on the device, not a host check: the host keeps running ahead.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, ema_params = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state, ema_params),
            (state.params, state.opt_state, state.ema_params))
        metrics['skipped'] = jnp.logical_not(finite).astype(jnp.int32)
      new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                opt_state=opt_state)
      return new_state, metrics

  return step_fn


def jit_train_step(step_fn, state_shardings, mesh):
  """jit with explicit shardings: state as created, batch split over every device."""
  batch_shardings = {name: sharding.batch_sharding(mesh) for name in STEP_FIELDS}
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def make_ema_update(config, state_shardings, mesh):
  """The end-of-pass teacher update (ema='pass'): jitted `(state, k) -> state`.

  m = ema_momentum(k, K) with k the pass that just ended; theta_T <- m theta_T +
  (1 - m) theta_S over every parameter (ARK_SPEC.md section 3).
  """
  total = ema_total(config)

  def update(state, k):
    momentum = schedules.ema_momentum(k, total)
    return state.replace(ema_params=schedules.ema_update(state.ema_params, state.params,
                                                         momentum))

  return jax.jit(update, in_shardings=(state_shardings, sharding.replicated(mesh)),
                 out_shardings=state_shardings, donate_argnums=(0,))


def _to_global(host_batch, mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the mesh (STEP_FIELDS only)."""
  sh = sharding.batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sh, np.asarray(host_batch[name]))
          for name in STEP_FIELDS}


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class MetricsWriter:
  """Buffers device metrics of the steps since the last log; writes metrics.jsonl.

  The buffer is fetched once per log (one host sync per log_every_steps), each
  step's loss and gradient norm checked for finiteness; the line holds the
  logged step's values and the throughput over the window. The same scalars go
  to TensorBoard. Steps the train step skipped (config.skip_nonfinite: metric
  'skipped') do not raise; the line counts them since step 0 as skipped_steps.
  """

  def __init__(self, workdir: str, dataset_names, batch_size: int, write: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.names, self.batch_size, self.write = list(dataset_names), batch_size, write
    # TensorBoard event files without TensorFlow (STACK_NOTES.md section 10).
    self.tensorboard = tb_summary.Writer(os.path.join(workdir, 'tensorboard')) if write else None
    self.pending: list[tuple[int, dict[str, jax.Array], np.ndarray]] = []
    self.window_start = time.perf_counter()
    self.skipped_steps = 0  # running total, restored from the log on resume

  def truncate_after(self, step: int):
    """Drops lines beyond `step` (logged by a run that died before its next checkpoint)."""
    if not (self.write and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)
    # Every checkpoint step has a line (the loop flushes before saving).
    if lines:
      self.skipped_steps = json.loads(lines[-1]).get('skipped_steps', 0)

  def add(self, step: int, metrics, dataset_id_B: np.ndarray):
    self.pending.append((step, metrics, dataset_id_B))

  def flush(self) -> dict[str, Any] | None:
    """Fetches the buffered metrics, raises on a non-finite step, writes one line."""
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m, _ in self.pending])
    now = time.perf_counter()
    for (step, _, ids), m in zip(self.pending, fetched):
      if m.get('skipped'):
        self.skipped_steps += 1
        logging.warning('Step %d skipped (config.skip_nonfinite): non-finite loss %s or '
                        'gradient norm %s on a batch of dataset(s) %s.', step, m['loss'],
                        m['grad_norm'], sorted({self.names[i] for i in np.unique(ids)}))
      elif not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        present = sorted({self.names[i] for i in np.unique(ids)})
        raise FloatingPointError(
            f'Non-finite loss {float(m["loss"])} or gradient norm {float(m["grad_norm"])} at '
            f'step {step} (task_loss {float(m["task_loss"])}, consistency_loss '
            f'{float(m["consistency_loss"])}) on a batch of dataset(s) {present}. '
            'config.skip_nonfinite=True would skip such steps instead.')
    step, m = self.pending[-1][0], fetched[-1]
    line: dict[str, Any] = {'step': step}
    for key in ('loss', 'task_loss', 'consistency_loss', 'lr', 'ema_momentum',
                'consistency_weight', 'grad_norm'):
      line[key] = float(m[key])
    if 'skipped' in m:
      line['skipped_steps'] = self.skipped_steps
    for name, loss, count in zip(self.names, m['task_loss_D'], m['count_D']):
      if count > 0:
        line[f'task_loss/{name}'] = float(loss)
    # The first window includes compilation.
    line['img_per_s'] = len(self.pending) * self.batch_size / max(now - self.window_start, 1e-9)
    if self.write:
      with open(self.path, 'a') as f:
        f.write(json.dumps(line) + '\n')
      self.scalars(step, {f'train/{k}': v for k, v in line.items() if k != 'step'})
    logging.info('step %d: %s', step, line)
    self.pending, self.window_start = [], time.perf_counter()
    return line

  def scalars(self, step: int, values: Mapping[str, float]):
    if self.tensorboard is None:
      return
    for key, value in values.items():
      self.tensorboard.add_scalar(key, value, step=step)
    self.tensorboard.flush()

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()


# ------------------------------------------------------------------------------ setup helpers


def resolve_schedule(config, steps_per_epoch: int, num_steps: int):
  """Epoch-denominated schedule keys -> steps, in a copy of `config`.

  optimizer.warmup_epochs (when set) gives warmup_steps; optimizer.total_steps
  <= 0 means the whole run (`num_steps`).
  """
  config = config.copy_and_resolve_references()
  o = config.optimizer
  with config.unlocked():
    if o.get('warmup_epochs') is not None:
      o.warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
    if o.total_steps <= 0:
      o.total_steps = int(num_steps)
  if o.warmup_steps >= o.total_steps:
    raise ValueError(f'config.optimizer.warmup_steps={o.warmup_steps} (from warmup_epochs='
                     f'{o.get("warmup_epochs")}) is not below total_steps={o.total_steps}.')
  return config


def dataset_heads(config):
  """(metadata, class counts, multi-class flags) of the configured datasets, in head order.

  Raises a ValueError when config.data.num_classes disagrees with the prepared data.
  """
  names = list(config.data.datasets)
  meta = [datasets.metadata(n, config.data.get('data_dir')) for n in names]
  num_classes = tuple(config.data.num_classes)
  if num_classes != tuple(m.num_classes for m in meta):
    raise ValueError(f'config.data.num_classes={num_classes} but the datasets {names} have '
                     f'{tuple(m.num_classes for m in meta)} classes.')
  return meta, num_classes, [m.task == 'multiclass' for m in meta]


def check_head_labels(config, meta: Sequence[datasets.DatasetMetadata]) -> None:
  """A consolidated head's `config.model.head_labels` must name each dataset's labels."""
  head_labels = config.model.get('head_labels')
  if head_labels is None:
    return
  if len(head_labels) != len(meta):
    raise ValueError(f'config.model.head_labels names {len(head_labels)} label sets for '
                     f'{len(meta)} datasets {[m.name for m in meta]}.')
  for d, (names, m) in enumerate(zip(head_labels, meta)):
    if tuple(names) != tuple(m.label_names):
      raise ValueError(f'config.model.head_labels[{d}]={tuple(names)} but dataset {m.name!r} '
                       f'has labels {tuple(m.label_names)}.')


# Model keys that change parameter shapes: a checkpoint must agree on them.
_SHAPE_KEYS = ('name', 'variant', 'img_size', 'window_size', 'patch_size', 'embed_dim', 'depths',
               'depth', 'num_heads', 'dims', 'projector_dim', 'projector_mlp', 'head_labels')


def check_checkpoint_fits(saved_config: Mapping[str, Any], config, where: str,
                          heads: bool = True) -> None:
  """Raises a ValueError naming what differs between a checkpoint's config and ours.

  Called on the checkpoint's metadata, before any state is built or compiled.
  """
  saved_data = saved_config.get('data', {})
  if heads:
    saved = (tuple(saved_data.get('datasets', ())), tuple(saved_data.get('num_classes', ())))
    ours = (tuple(config.data.datasets), tuple(config.data.num_classes))
    if saved != ours:
      raise ValueError(
          f'{where} holds heads for datasets {saved[0]} with {saved[1]} classes, but '
          f'config.data.datasets={ours[0]} with num_classes={ours[1]}: heads are per dataset '
          'and in order. Use another --workdir, or for config.init.from_checkpoint set '
          'config.init.load_heads=False to start new heads.')
  saved_model = saved_config.get('model', {})
  named = config.model.variant != 'custom' and saved_model.get('variant') != 'custom'
  for key in _SHAPE_KEYS:
    if named and key in registry.CUSTOM_SIZE_KEYS:
      continue  # a named variant fixes these (registry.create_model ignores them)
    mine, theirs = _tuples(config.model.get(key)), _tuples(saved_model.get(key))
    if key in saved_model and mine != theirs:
      raise ValueError(f'{where} was trained with model.{key}={theirs!r}, the config has '
                       f'model.{key}={mine!r}.')


def _tuples(value):
  """Lists (as a config reads back from JSON) as tuples, recursively."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _init_source(config) -> tuple[str, str] | None:
  init = config.get('init') or {}
  given = [(k, init.get(k)) for k in ('from_pytorch', 'from_checkpoint') if init.get(k)]
  if len(given) > 1:
    raise ValueError('Set at most one of config.init.from_pytorch and config.init.from_checkpoint.')
  return given[0] if given else None


def load_init_params(config, num_classes, mesh) -> Any:
  """The weights config.init names, as an nnx.State for create_train_state (or None).

  from_pytorch: a PyTorch/safetensors file (Ark: its `config.init.key` entry,
  by default 'teacher'; timm or Microsoft Swin: the backbone). from_checkpoint: an
  ark_jax workdir or checkpoints folder: its newest teacher (or its student with
  `config.init.key='student'`). Either way the same weights start student and
  teacher, as the reference loads them into both.
  """
  source = _init_source(config)
  if source is None:
    return None
  kind, path = source
  load_heads = config.init.get('load_heads', True)
  abstract = nnx.eval_shape(lambda: registry.create_model(config.model, num_classes,
                                                          rngs=nnx.Rngs(0)))
  if kind == 'from_pytorch':
    if not os.path.exists(path):
      raise FileNotFoundError(f'config.init.from_pytorch={path!r} does not exist.')
    state_dict = interop.read_state_dict(path, key=config.init.get('key'))
    if not load_heads:
      state_dict = {k: v for k, v in state_dict.items() if 'omni_heads.' not in k}
    try:
      return interop.init_params(state_dict, abstract)
    except interop.WeightsMismatchError as e:
      raise interop.WeightsMismatchError(f'config.init.from_pytorch={path!r}: {e}') from e
  directory = path if os.path.basename(os.path.normpath(path)) == 'checkpoints' else os.path.join(
      path, 'checkpoints')
  with checkpoint.Checkpointer(directory, max_to_keep=None) as source_ckpt:
    step = source_ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'config.init.from_checkpoint={path!r}: no checkpoint in {directory}.')
    check_checkpoint_fits(source_ckpt.read_meta(step).get('config', {}), config,
                          f'config.init.from_checkpoint={path!r} (step {step})', heads=load_heads)
    _, abstract_params = nnx.split(abstract, nnx.Param)
    if not load_heads:
      abstract_params = nnx.State({k: v for k, v in abstract_params.items()
                                   if k not in ('heads', 'head')})
    replicated = sharding.replicated(mesh)
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_params)
    # The released model of a run is its teacher (ARK_SPEC.md section 5).
    field = _CHECKPOINT_MODELS.get(config.init.get('key') or 'teacher')
    if field is None:
      raise ValueError(f'config.init.key={config.init.key!r}: with from_checkpoint, use one of '
                       f'{sorted(_CHECKPOINT_MODELS)}.')
    return source_ckpt.restore_field(step, field, abstract_params)


# config.init.key with from_checkpoint -> the TrainState field it loads.
_CHECKPOINT_MODELS = {'teacher': 'ema_params', 'student': 'params'}


def open_workdir(config, workdir: str, num_classes, mesh, check_saved=None):
  """Writes workdir/config.json (process 0) and opens workdir/checkpoints.

  Resume order: this workdir's checkpoint > config.init > scratch. A checkpoint's
  saved config must fit `config` (check_checkpoint_fits, and `check_saved(saved_config,
  directory)` when given), read from its metadata before anything is built.

  Returns:
    (the Checkpointer, the config.init weights or None).
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 save_every_steps=config.checkpoint_every_steps)
  if ckpt.latest_step() is None:
    return ckpt, load_init_params(config, num_classes, mesh)
  saved = ckpt.read_meta().get('config', {})
  check_checkpoint_fits(saved, config, f'The checkpoint in {ckpt.directory}')
  if check_saved is not None:
    check_saved(saved, ckpt.directory)
  return ckpt, None


# ------------------------------------------------------------------------------ the run


def train_and_evaluate(config, workdir: str):
  """Trains Ark+ as `config` says, resuming from workdir/checkpoints if there is one.

  Writes workdir/config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/
  (every eval_every_steps and at the end) and the plots. SIGTERM saves a
  checkpoint at the current step and returns.

  Returns:
    The final TrainState.
  """
  # ----------------------------------------------------------------------------
  # Mesh, data sizes and config checks: every error before any compilation.
  # ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh.size)
  is_main = jax.process_index() == 0
  names = list(config.data.datasets)
  meta, num_classes, is_multiclass = dataset_heads(config)
  check_head_labels(config, meta)
  steps_per_epoch = pipeline.steps_per_epoch(config.data, config.batch_size)
  num_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    num_steps = min(num_steps, config.max_steps) if config.num_epochs > 0 else config.max_steps
  config = resolve_schedule(config, steps_per_epoch, num_steps)
  ckpt, init_params = open_workdir(config, workdir, num_classes, mesh)

  # ----------------------------------------------------------------------------
  # Train state (created sharded), data and step functions.
  # ----------------------------------------------------------------------------
  graphdef, state, state_shardings = train_state_lib.create_train_state(
      config, num_classes, mesh, config.sharding.rules, init_params=init_params)
  train_iter = pipeline.train_iterator(config.data, config.batch_size, config.seed,
                                       num_epochs=config.num_epochs or None)
  train_step = jit_train_step(make_train_step(graphdef, config, num_classes, is_multiclass),
                              state_shardings, mesh)
  ema_update = make_ema_update(config, state_shardings, mesh) if config.ema == 'pass' else None
  predict = evaluate.make_predict_fn(graphdef, config, mesh, num_classes, is_multiclass)
  replicated = sharding.replicated(mesh)

  def run_eval(step, state):
    results, scores = evaluate.evaluate(config, graphdef, {'student': state.params,
                                                           'teacher': state.ema_params},
                                        mesh, predict)
    if is_main:
      evaluate.write(workdir, step, results, scores)
      writer.scalars(step, {f'eval/{d}/{m}_auc_mean': r[m]['auc_mean']
                            for d, r in results.items() for m in evaluate.MODELS})
      logging.info('Evaluation at step %d:\n%s', step, evaluate.summary_table(results))
    return results

  # ----------------------------------------------------------------------------
  # Restore: state AND data iterator from the newest intact checkpoint.
  # ----------------------------------------------------------------------------
  writer = MetricsWriter(workdir, names, config.batch_size, is_main)
  step = 0
  restored = ckpt.restore_latest_intact(_abstract(state, state_shardings), train_iter)
  if restored is not None:
    step, state, _ = restored
    logging.info('Resumed from step %d of %s.', step, ckpt.directory)
  writer.truncate_after(step)
  ckpt_meta = {'config': json.loads(config.to_json_best_effort())}
  checkpoint.clear_preemption_request()  # a SIGTERM handled by an earlier run in this process
  previous_sigterm = checkpoint.install_sigterm_handler(
      lambda signum: logging.warning('SIGTERM: checkpointing at the end of this step.'))
  progress = tqdm.tqdm(total=num_steps, initial=step, desc='train', unit='step',
                       disable=not (is_main and config.get('progress_bar', True)), mininterval=2)

  # ----------------------------------------------------------------------------
  # Loop. The host step counter mirrors state.step without reading it back.
  # ----------------------------------------------------------------------------
  preempted, results = False, None
  eval_every = config.get('eval_every_steps', 0)  # 0: at the end only; < 0: never
  try:
    with jax.set_mesh(mesh):
      while step < num_steps:
        try:
          host_batch = next(train_iter)
        except StopIteration:
          break
        # The host only dispatches here and runs ahead of the devices; values come
        # back once per log (writer.flush). Inputs are placed explicitly first,
        # and an implicit transfer in the dispatch, a hidden sync, is an error.
        global_batch = _to_global(host_batch, mesh)
        pass_end = ema_update is not None and bool(host_batch['pass_end'][0])
        if pass_end:
          pass_index = jax.device_put(np.int32(host_batch['pass_index'][0]), replicated)
        with jax.transfer_guard('disallow'):
          state, metrics = train_step(state, global_batch)
          if pass_end:
            state = ema_update(state, pass_index)
        step += 1
        progress.update()
        writer.add(step, metrics, host_batch['dataset_id'][host_batch['valid']])
        preempted = _stop_requested(step, config.log_every_steps)
        # Flush (and so check the loss) before any checkpoint: never save a NaN state.
        if (step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0
            or step == num_steps or preempted):
          line = writer.flush()
          if line:
            progress.set_postfix(loss=f'{line["loss"]:.4f}', refresh=False)
        ckpt.save(step, state, train_iter, ckpt_meta, force=step == num_steps or preempted)
        if preempted:
          ckpt.wait()
          logging.warning('Stopped by SIGTERM at step %d; the checkpoint is saved.', step)
          break
        if eval_every > 0 and step % eval_every == 0 and step < num_steps:
          results = run_eval(step, state)
      if not preempted:
        writer.flush()
        ckpt.save(step, state, train_iter, ckpt_meta, force=True)
  finally:
    progress.close()
    signal.signal(signal.SIGTERM, previous_sigterm)
    ckpt.close()
    train_iter.close()
  if not preempted and eval_every >= 0:
    results = run_eval(step, state)
    if is_main:
      plots.plot_auc_history(workdir)
      plots.plot_roc_curves(workdir, step)
      plots.plot_subgroup_auc(results, os.path.join(workdir, 'eval', f'subgroups_step_{step}.png'))
      print(f'Evaluation at step {step} ({config.get("eval_split", "test")} split, mean AUC):\n'
            + evaluate.summary_table(results), flush=True)
  writer.close()
  return state


def _stop_requested(step: int, every: int) -> bool:
  """SIGTERM seen; with several processes, by any (agreed at log steps so all stop together)."""
  if jax.process_count() == 1:
    return checkpoint.preemption_requested()
  if step % every:
    return False
  flag = np.asarray(checkpoint.preemption_requested())
  return bool(np.any(multihost_utils.process_allgather(flag)))


def restore_checkpoint(config, workdir: str, step: int | None = None, *, purpose: str):
  """The newest (or given) checkpoint of workdir, checked against config first.

  Args:
    config: the run's ConfigDict (its datasets and model must match the checkpoint's).
    workdir: the run's directory.
    step: a committed step, or None for the newest.
    purpose: the flag named in errors ('--mode=eval', ...).

  Returns:
    (graphdef, TrainState, step, mesh).
  """
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh.size)
  names = list(config.data.datasets)
  meta = [datasets.metadata(n, config.data.get('data_dir')) for n in names]
  num_classes = tuple(m.num_classes for m in meta)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=None)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{purpose}: no checkpoint in {ckpt.directory}.')
    check_checkpoint_fits(ckpt.read_meta(step).get('config', {}), config,
                          f'The checkpoint {ckpt.directory}/{step}')
    graphdef, abstract, shardings = train_state_lib.abstract_train_state(
        config, num_classes, mesh, config.sharding.rules)
    state, _ = ckpt.restore(step, _abstract(abstract, shardings))
  finally:
    ckpt.close()
  return graphdef, state, step, mesh


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict[str, Any]:
  """--mode=eval: the newest (or given) checkpoint of workdir, evaluated and written."""
  graphdef, state, step, mesh = restore_checkpoint(config, workdir, step, purpose='--mode=eval')
  results, scores = evaluate.evaluate(config, graphdef, {'student': state.params,
                                                         'teacher': state.ema_params}, mesh)
  if jax.process_index() == 0:
    evaluate.write(workdir, step, results, scores)
    plots.plot_auc_history(workdir)
    plots.plot_roc_curves(workdir, step)
    plots.plot_subgroup_auc(results, os.path.join(workdir, 'eval', f'subgroups_step_{step}.png'))
    print(f'Evaluation of step {step} ({config.get("eval_split", "test")} split, mean AUC):\n'
          + evaluate.summary_table(results), flush=True)
  return results
