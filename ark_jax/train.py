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

Not here yet: evaluation (AUC) during training, TensorBoard, init from PyTorch.
"""

import json
import os
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np
import optax

from ark_jax import augment
from ark_jax import checkpoint
from ark_jax import losses
from ark_jax import schedules
from ark_jax import sharding
from ark_jax import train_state as train_state_lib
from ark_jax.models import ark
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


def make_train_step(graphdef, config, num_classes, is_multiclass):
  """The pure train step `(state, batch) -> (state, metrics)`.

  Args:
    graphdef: the student's NNX graphdef (the teacher runs through it too).
    config: the run's ConfigDict.
    num_classes: class count of each head, in head order.
    is_multiclass: per head, True for softmax-CE (multi-class) datasets.

  Returns:
    The step; `batch` holds the STEP_FIELDS as global arrays; metrics are
    device scalars (plus task_loss_D / count_D, one entry per dataset).
  """
  tx = train_state_lib.create_optimizer(config)
  o = config.optimizer
  lr_fn = schedules.lr_schedule(o.lr, o.warmup_steps, o.total_steps,
                                warmup_init=o.get('warmup_init', 1e-6), end_lr=o.get('end_lr', 1e-5))
  num_classes_D = np.asarray(num_classes, np.int32)
  is_multiclass_D = np.asarray(is_multiclass, bool)
  size, total, rules = config.model.img_size, ema_total(config), config.sharding.rules

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
      c = schedules.consistency_weight(momentum)
      valid = batch['valid']

      z_t = jax.named_call(teacher_forward, name='teacher')(
          state.ema_params, augment.teacher_view(batch['image'], size))
      x_s = augment.student_view(batch['image'], size, view_rng)

      def loss_fn(params):
        out = jax.named_call(student_forward, name='student')(params, x_s, drop_rng)
        logits = ark.select_head(out['logits'], batch['dataset_id'])
        task, task_D, count_D = losses.task_loss(logits, batch['labels'], batch['label_mask'],
                                                 batch['dataset_id'], is_multiclass_D,
                                                 num_classes_D, valid)
        cons = losses.consistency_loss(out['z'], z_t, valid)
        loss = losses.ark_loss(task, cons, c)
        return loss, dict(task_loss=task, consistency_loss=cons, task_loss_D=task_D,
                          count_D=count_D)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema_params = state.ema_params
      if config.ema == 'step':
        ema_params = schedules.ema_update(ema_params, params, momentum)
      metrics = dict(loss=loss, lr=lr_fn(state.step), ema_momentum=momentum,
                     consistency_weight=c, grad_norm=optax.global_norm(grads), **aux)
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
  step's loss checked for finiteness; the line holds the logged step's values
  and the throughput over the window.
  """

  def __init__(self, path: str, dataset_names, batch_size: int, write: bool):
    self.path, self.names, self.batch_size, self.write = path, list(dataset_names), batch_size, write
    self.pending: list[tuple[int, dict[str, jax.Array], np.ndarray]] = []
    self.window_start = time.perf_counter()

  def truncate_after(self, step: int):
    """Drops lines beyond `step` (logged by a run that died before its next checkpoint)."""
    if not (self.write and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def add(self, step: int, metrics, dataset_id_B: np.ndarray):
    self.pending.append((step, metrics, dataset_id_B))

  def flush(self):
    """Fetches the buffered metrics, raises on a non-finite loss, writes one line."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _ in self.pending])
    now = time.perf_counter()
    for (step, _, ids), m in zip(self.pending, fetched):
      if not np.isfinite(m['loss']):
        present = sorted({self.names[i] for i in np.unique(ids)})
        raise FloatingPointError(
            f'Non-finite loss {float(m["loss"])} at step {step} (task_loss '
            f'{float(m["task_loss"])}, consistency_loss {float(m["consistency_loss"])}) '
            f'on a batch of dataset(s) {present}.')
    step, m = self.pending[-1][0], fetched[-1]
    line: dict[str, Any] = {'step': step}
    for key in ('loss', 'task_loss', 'consistency_loss', 'lr', 'ema_momentum',
                'consistency_weight', 'grad_norm'):
      line[key] = float(m[key])
    for name, loss, count in zip(self.names, m['task_loss_D'], m['count_D']):
      if count > 0:
        line[f'task_loss/{name}'] = float(loss)
    # The first window includes compilation.
    line['img_per_s'] = len(self.pending) * self.batch_size / max(now - self.window_start, 1e-9)
    if self.write:
      with open(self.path, 'a') as f:
        f.write(json.dumps(line) + '\n')
    logging.info('step %d: %s', step, line)
    self.pending, self.window_start = [], time.perf_counter()


def train_and_evaluate(config, workdir: str):
  """Trains Ark+ as `config` says, resuming from workdir/checkpoints if there is one.

  Writes workdir/config.json, workdir/metrics.jsonl and workdir/checkpoints.

  Returns:
    The final TrainState.
  """
  # ----------------------------------------------------------------------------
  # Mesh and config checks.
  # ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh.size)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ----------------------------------------------------------------------------
  # Data: the host-batch stream; heads and their loss types from the metadata.
  # ----------------------------------------------------------------------------
  data_dir = config.data.get('data_dir')
  names = list(config.data.datasets)
  meta = [datasets.metadata(n, data_dir) for n in names]
  num_classes = tuple(config.data.num_classes)
  if num_classes != tuple(m.num_classes for m in meta):
    raise ValueError(f'config.data.num_classes={num_classes} but the datasets {names} have '
                     f'{tuple(m.num_classes for m in meta)} classes.')
  is_multiclass = [m.task == 'multiclass' for m in meta]
  num_steps = config.num_epochs * pipeline.steps_per_epoch(config.data, config.batch_size)
  if config.max_steps > 0:
    num_steps = min(num_steps, config.max_steps) if config.num_epochs > 0 else config.max_steps
  train_iter = pipeline.train_iterator(config.data, config.batch_size, config.seed,
                                       num_epochs=config.num_epochs or None)

  # ----------------------------------------------------------------------------
  # Train state, created sharded.
  # ----------------------------------------------------------------------------
  graphdef, state, state_shardings = train_state_lib.create_train_state(
      config, num_classes, mesh, config.sharding.rules)

  # ----------------------------------------------------------------------------
  # Step functions.
  # ----------------------------------------------------------------------------
  train_step = jit_train_step(make_train_step(graphdef, config, num_classes, is_multiclass),
                              state_shardings, mesh)
  ema_update = make_ema_update(config, state_shardings, mesh) if config.ema == 'pass' else None

  # ----------------------------------------------------------------------------
  # Restore: state AND data iterator from the newest intact checkpoint.
  # ----------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 save_every_steps=config.checkpoint_every_steps)
  writer = MetricsWriter(os.path.join(workdir, 'metrics.jsonl'), names, config.batch_size,
                         is_main)
  step = 0
  restored = ckpt.restore_latest_intact(_abstract(state, state_shardings), train_iter)
  if restored is not None:
    step, state, _ = restored
    logging.info('Resumed from step %d of %s.', step, ckpt.directory)
  writer.truncate_after(step)
  ckpt_meta = {'config': json.loads(config.to_json_best_effort())}

  # ----------------------------------------------------------------------------
  # Loop. The host step counter mirrors state.step without reading it back.
  # ----------------------------------------------------------------------------
  try:
    with jax.set_mesh(mesh):
      while step < num_steps:
        try:
          host_batch = next(train_iter)
        except StopIteration:
          break
        state, metrics = train_step(state, _to_global(host_batch, mesh))
        if ema_update is not None and bool(host_batch['pass_end'][0]):
          state = ema_update(state, np.int32(host_batch['pass_index'][0]))
        step += 1
        writer.add(step, metrics, host_batch['dataset_id'][host_batch['valid']])
        # Flush (and so check the loss) before any checkpoint: never save a NaN state.
        if (step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0
            or step == num_steps):
          writer.flush()
        ckpt.save(step, state, train_iter, ckpt_meta, force=step == num_steps)
      writer.flush()
      ckpt.save(step, state, train_iter, ckpt_meta, force=True)
  finally:
    ckpt.close()
    train_iter.close()
  return state
