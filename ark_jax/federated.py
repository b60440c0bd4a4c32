"""Federated Ark (ARK_SPEC.md section 6, FedArk): private clients, their own teachers.

Each client owns some of the configured datasets and keeps them, its teacher
and its optimizer state; only weights travel. A round:

  1. every active client (`start_round[i] <= round`) starts its student from
     the server model and trains on its own datasets with the Ark loss against
     its own EMA teacher: `local_passes` passes over each of them (the
     reference's one pass per round), or exactly `local_steps` steps;
  2. the server averages backbone and projector over the active clients
     ('equal' weights as the reference, or by their training 'size', the
     FedAvg convention) and takes each dataset's head from the client that
     owns it (a head whose owner has not joined yet stays as it was).

Two ways to run it (`--mode=train` with a config that has a `federated` section):

- faithful (`federated.parallel=False`): the clients one after another, each
  with its own compiled step. With one client owning every dataset and one
  local pass per round this is plain Ark training, step for step
  (tests/test_federated.py compares metrics.jsonl and the AUCs).
- parallel (`federated.parallel=True`): the clients' train states stacked on a
  leading axis, sharded over a 'client' mesh axis, and trained at once by one
  vmapped step with `local_steps` steps per round: K clients on K device groups
  cost about one client's wall time.

Choices, where the reference differs:

- Each client keeps its own optimizer state (momentum of its own data); the
  reference carries one optimizer state from client to client, which mixes
  momentum of other hospitals' gradients into a client's first steps of a
  round and would leak information between clients in a real deployment.
  `federated.shared_optimizer=True` restores the reference's behaviour.
- A client's EMA teacher follows the plain trainer's schedule over the
  client's own passes (or steps), so a one-client federation is plain Ark;
  the reference indexes the momentum by the round.
- Client i's random streams (its teacher's init, augmentation, drop path)
  come from `seed + i`; client 0 keeps the run's seed for the same reason.
  Every client's data order follows the run's seed and the dataset's name, as
  in plain training.

Who owns what and the server's update: ark_jax/federation.py; parallel mode:
ark_jax/federated_parallel.py.

Files: DIR/clients/<i>/metrics.jsonl (and TensorBoard), one per client with
the client's own step count; DIR/checkpoints (server, every client's state,
and the position: round, client, step within the client's round, batches
each client has read); DIR/eval/round_R.json: the server on every dataset and
each client's teacher on its own; DIR/rounds.jsonl: wall time of each round.
"""

import dataclasses
import json
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ark_jax import checkpoint
from ark_jax import evaluate
from ark_jax import federation
from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state as train_state_lib
from input_pipeline import pipeline



# ------------------------------------------------------------------------------ clients


@dataclasses.dataclass
class Client:
  """One client's fixed parts: its config, data and compiled functions.

  config: the run's config restricted to the client's datasets, with its seed
    (seed + i) and its optimizer and EMA schedules resolved over its own steps.
  dataset_ids: the client's dataset index -> head index (host batches are
    re-labelled with it).
  steps_per_round: optimizer steps it takes in each round it is active in.
  batches: its whole stream of host batches (a Grain MapDataset).
  """
  index: int
  config: Any
  dataset_ids: np.ndarray
  steps_per_round: int
  batches: Any
  step_fn: Any = None
  ema_update: Any = None
  writer: Any = None


def client_config(config, plan: federation.Plan, i: int, total_steps: int | None = None):
  """Client i's config: its datasets, its seed, its schedules over its own steps.

  Args:
    config: the run's config.
    plan: the federation.
    i: the client.
    total_steps: the LR schedule's length when it is not the client's own
      steps (shared_optimizer: the whole federation's).

  Returns:
    (config, steps_per_round, num_steps): num_steps is what the client trains
    over the whole run.
  """
  f = config.federated
  c = config.copy_and_resolve_references()
  ids = plan.clients[i]
  with c.unlocked():
    c.seed = config.seed + i
    c.data.datasets = tuple(config.data.datasets[d] for d in ids)
    c.data.num_classes = tuple(config.data.num_classes[d] for d in ids)
    if config.data.get('weights'):
      c.data.weights = tuple(config.data.weights[d] for d in ids)
  rounds = f.rounds - plan.start_round[i]
  steps_per_epoch = pipeline.steps_per_epoch(c.data, config.batch_size)
  if f.local_steps:
    steps_per_round = f.local_steps
    with c.unlocked():
      c.num_epochs = 0  # an unbounded stream, cut into rounds of local_steps
  else:
    steps_per_round = f.local_passes * steps_per_epoch
    with c.unlocked():
      c.num_epochs = rounds * f.local_passes  # the pass-wise EMA's horizon (train.ema_total)
  num_steps = rounds * steps_per_round
  c = train.resolve_schedule(c, steps_per_epoch, total_steps or num_steps)
  return c, steps_per_round, num_steps


def host_batch(batch, dataset_ids: np.ndarray, width: int) -> dict[str, np.ndarray]:
  """A client's host batch in the run's terms: head indices, labels padded to the run's width."""
  b = dict(batch)
  b['dataset_id'] = dataset_ids[np.asarray(b['dataset_id'])]
  for key in ('labels', 'label_mask'):
    x = np.asarray(b[key])
    b[key] = np.pad(x, ((0, 0), (0, width - x.shape[1])))
  return b


def iterator(client: Client, start: int):
  """The client's batches from batch `start` on (a resumed run reads on exactly)."""
  return pipeline.to_iterator(client.batches, client.config.data, start)


# New buffers: the train step donates its state, which must not free the server's.
_copy_jit = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


# ------------------------------------------------------------------------------ evaluation


def evaluate_round(config, graphdef, mesh, predict, plan: federation.Plan, server, teachers):
  """The server on every dataset, each client's teacher on its own.

  Returns:
    (results, scores): results[dataset] = {'labels', 'client', 'server': ...,
    'teacher': ...} (entries as evaluate.dataset_results).
  """
  names = list(config.data.datasets)
  results, scores = evaluate.evaluate(config, graphdef, {'server': server}, mesh, predict)
  for i, ids in enumerate(plan.clients):
    own = [names[d] for d in ids]
    r, s = evaluate.evaluate(config, graphdef, {'teacher': teachers[i]}, mesh, predict, names=own)
    for name in own:
      results[name] = {**results[name], 'client': i, 'teacher': r[name]['teacher']}
      scores[name] = {**scores[name], 'teacher': s[name]['teacher']}
  return results, scores


def summary_table(results) -> str:
  """Dataset, owner, the server's and the owner's teacher's mean AUC; their means."""
  lines = [f'{"dataset":<24} {"client":>6} {"server AUC":>11} {"teacher AUC":>12}']
  for name, e in results.items():
    lines.append(f'{name:<24} {e["client"]:>6} {e["server"]["auc_mean"]:>11.4f} '
                 f'{e["teacher"]["auc_mean"]:>12.4f}')
  means = [np.mean([e[m]['auc_mean'] for e in results.values()]) for m in ('server', 'teacher')]
  lines.append(f'{"mean":<24} {"":>6} {means[0]:>11.4f} {means[1]:>12.4f}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Position:
  """Where a run is: client `client` (in client order) has done `step` steps of
  round `round`, the clients before it all of theirs. client == num_clients:
  the round's clients are done, its aggregation is next. `consumed[i]`: batches
  client i has read; `client_steps[i]`: its optimizer steps; `holder`: the client
  whose optimizer state is the shared one (shared_optimizer)."""
  round: int = 0
  client: int = 0
  step: int = 0
  global_step: int = 0
  consumed: list[int] = dataclasses.field(default_factory=list)
  client_steps: list[int] = dataclasses.field(default_factory=list)
  holder: int = 0


def run(config, workdir: str):
  """--mode=train for a config with a `federated` section (see the module docstring).

  Returns:
    {'server': the server's parameters, 'clients': the clients' TrainStates
    (parallel: stacked on a leading axis)}.
  """
  # ----------------------------------------------------------------------------
  # Mesh, datasets, the federation and every client's schedule: errors first.
  # ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  train.check_config(config, mesh.size)
  is_main = jax.process_index() == 0
  names = list(config.data.datasets)
  _, num_classes, is_multiclass = train.dataset_heads(config)
  plan = federation.make_plan(config, mesh.size, pipeline.dataset_sizes(config.data))
  f = config.federated
  resolved = [client_config(config, plan, i) for i in range(plan.num_clients)]
  if f.shared_optimizer:  # one LR schedule over the whole federation's steps
    total = sum(n for _, _, n in resolved)
    resolved = [client_config(config, plan, i, total) for i in range(plan.num_clients)]
  clients = []
  for i, (c, steps_per_round, _) in enumerate(resolved):
    batches = pipeline.train_batches(c.data, config.batch_size, config.seed,
                                     num_epochs=c.num_epochs or None)
    clients.append(Client(i, c, np.asarray(plan.clients[i], np.int32), steps_per_round, batches))
  ckpt, init_params = train.open_workdir(
      config, workdir, num_classes, mesh,
      check_saved=lambda saved, directory: _check_federation_fits(saved, config, directory))

  # ----------------------------------------------------------------------------
  # States: the server (client 0's initial student, which is plain Ark's) and
  # every client's TrainState (its own teacher, optimizer state and streams).
  # ----------------------------------------------------------------------------
  states, shardings = [], []
  for client in clients:
    graphdef, state, state_sh = train_state_lib.create_train_state(
        client.config, num_classes, mesh, config.sharding.rules, init_params=init_params)
    states.append(state)
    shardings.append(state_sh)
  server = _copy_jit(states[0].params)
  predict = evaluate.make_predict_fn(graphdef, config, mesh, num_classes, is_multiclass)
  fed = {'server': server, 'clients': states}
  fed_sh = {'server': shardings[0].params, 'clients': shardings}
  if f.parallel:
    # Imported here: federated_parallel builds on this module's helpers.
    from ark_jax import federated_parallel  # pylint: disable=g-import-not-at-top
    fed, fed_sh, loop = federated_parallel.prepare(config, plan, clients, graphdef, fed, fed_sh,
                                                   num_classes, is_multiclass)
  else:
    # Clients differ in their step program only by the EMA horizon and the LR
    # schedule; those that agree share one compiled step.
    compiled = {}
    for client, state_sh in zip(clients, shardings):
      key = (train.ema_total(client.config),
             json.dumps(client.config.optimizer.to_dict(), sort_keys=True))
      if key not in compiled:
        compiled[key] = (
            train.jit_train_step(train.make_train_step(graphdef, client.config, num_classes,
                                                       is_multiclass), state_sh, mesh),
            train.make_ema_update(client.config, state_sh, mesh) if config.ema == 'pass'
            else None)
      client.step_fn, client.ema_update = compiled[key]
    loop = _train_faithful

  # ----------------------------------------------------------------------------
  # Restore the newest intact checkpoint: states and the position in the rounds.
  # ----------------------------------------------------------------------------
  position = Position(consumed=[0] * plan.num_clients, client_steps=[0] * plan.num_clients)
  restored = ckpt.restore_latest_intact(train._abstract(fed, fed_sh))  # pylint: disable=protected-access
  if restored is not None:
    step, fed, saved_meta = restored
    position = Position(**saved_meta['position'])
    logging.info('Resumed from step %d of %s at %s.', step, ckpt.directory, position)
  for client in clients:
    client.writer = train.MetricsWriter(os.path.join(workdir, 'clients', str(client.index)),
                                        names, config.batch_size, is_main)
    client.writer.truncate_after(position.client_steps[client.index])
  ckpt_meta = {'config': json.loads(config.to_json_best_effort())}

  def save(fed, position, force=False):
    """Flushes every writer (a non-finite loss is never saved), then checkpoints."""
    for client in clients:
      client.writer.flush()
    return ckpt.save(position.global_step, fed, None,
                     {**ckpt_meta, 'position': dataclasses.asdict(position)}, force=force)

  def run_eval(fed, round_index):
    server_params, teachers = _eval_params(fed, plan, mesh, shardings[0].params, f.parallel)
    results, scores = evaluate_round(config, graphdef, mesh, predict, plan, server_params,
                                     teachers)
    if is_main:
      evaluate.write(workdir, position.global_step, results, scores,
                     stem=f'round_{round_index}', extra={'round': round_index})
      logging.info('Round %d:\n%s', round_index, summary_table(results))
    return results

  checkpoint.clear_preemption_request()
  previous_sigterm = checkpoint.install_sigterm_handler(
      lambda signum: logging.warning('SIGTERM: checkpointing at the end of this step.'))
  results = None
  try:
    with jax.set_mesh(mesh):
      fed, position, preempted, results = loop(config, plan, clients, fed, position, save,
                                               run_eval, workdir)
  finally:
    signal.signal(signal.SIGTERM, previous_sigterm)
    ckpt.close()
    for client in clients:
      client.writer.close()
  if not preempted and results is not None and is_main:
    print(f'Federated Ark after {f.rounds} rounds ({config.get("eval_split", "test")} split, '
          f'mean AUC):\n' + summary_table(results), flush=True)
  return fed


def _check_federation_fits(saved_config, config, directory) -> None:
  """A checkpoint of another federation (clients, mode, optimizer sharing) is refused."""
  saved = saved_config.get('federated') or {}
  for key in ('clients', 'parallel', 'shared_optimizer'):
    ours = train._tuples(config.federated.get(key))  # pylint: disable=protected-access
    theirs = train._tuples(saved.get(key))  # pylint: disable=protected-access
    if theirs != ours:
      raise ValueError(f'The checkpoint in {directory} was written with federated.{key}='
                       f'{theirs!r}, the config has {ours!r}: use another --workdir.')


def _eval_params(fed, plan: federation.Plan, mesh, param_sh, parallel: bool):
  """The server's and each client's teacher's parameters, on the evaluation mesh."""
  if not parallel:
    return fed['server'], [s.ema_params for s in fed['clients']]
  teachers_K = fed['clients'].ema_params
  server = jax.device_put(fed['server'], param_sh)
  return server, [jax.device_put(jax.tree.map(lambda x, i=i: x[i], teachers_K), param_sh)
                  for i in range(plan.num_clients)]


def eval_due(config, round_index: int) -> bool:
  every = config.federated.get('eval_every_rounds', 0)  # 0: at the end only; < 0: never
  last = round_index == config.federated.rounds - 1
  return every >= 0 and (last or (every > 0 and (round_index + 1) % every == 0))


def round_log(workdir: str, round_index: int, seconds: float, steps: int):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'rounds.jsonl'), 'a') as fp:
      fp.write(json.dumps({'round': round_index, 'seconds': seconds, 'steps': steps}) + '\n')


def checkpoint_or_stop(config, position: Position, save, fed) -> bool:
  """After a step: checkpoints at the interval, or on SIGTERM and then says stop (True)."""
  preempted = train._stop_requested(position.global_step, config.log_every_steps)  # pylint: disable=protected-access
  if preempted or position.global_step % config.checkpoint_every_steps == 0:
    save(fed, position, force=True)
  if preempted:
    logging.warning('Stopped by SIGTERM at step %d; the checkpoint is saved.', position.global_step)
  return preempted


def _train_faithful(config, plan: federation.Plan, clients, fed, position: Position, save, run_eval,
                    workdir):
  """The clients one after another, round after round (see the module docstring)."""
  f, mesh = config.federated, sharding.make_mesh(config.mesh)
  replicated = sharding.replicated(mesh)
  width = max(config.data.num_classes)
  states, server, results = list(fed['clients']), fed['server'], None
  for r in range(position.round, f.rounds):
    started, steps_before = time.perf_counter(), position.global_step
    active = plan.active(r)
    for i in active:
      if i < position.client:
        continue
      client, state = clients[i], states[i]
      if position.step == 0:  # the client starts its round from the server
        opt_state = state.opt_state
        if f.shared_optimizer and position.holder != i:
          opt_state = _copy_jit(states[position.holder].opt_state)
        state = state.replace(params=_copy_jit(server), opt_state=opt_state)
      it = iterator(client, position.consumed[i])
      try:
        for _ in range(position.step, client.steps_per_round):
          host = host_batch(next(it), client.dataset_ids, width)
          batch = train._to_global(host, mesh)  # pylint: disable=protected-access
          state, metrics = client.step_fn(state, batch)
          if client.ema_update is not None and bool(host['pass_end'][0]):
            state = client.ema_update(state, jax.device_put(np.int32(host['pass_index'][0]),
                                                            replicated))
          position.step += 1
          position.global_step += 1
          position.consumed[i] += 1
          position.client_steps[i] += 1
          client.writer.add(position.client_steps[i], metrics, host['dataset_id'][host['valid']])
          if position.client_steps[i] % config.log_every_steps == 0:
            client.writer.flush()
          states[i] = state
          if position.step == client.steps_per_round:
            position.client, position.step = i + 1, 0
            position.holder = i
          if checkpoint_or_stop(config, position, save, {'server': server, 'clients': states}):
            return {'server': server, 'clients': states}, position, True, results
      finally:
        it.close()
      client.writer.flush()
    # Every active client is done: aggregate on the server.
    head_source = [active.index(o) if o in active else -1 for o in plan.owner]
    server = _aggregate_jit(server, [states[i].params for i in active],
                            tuple(plan.weights(active, f.aggregation)), tuple(head_source))
    position.round, position.client, position.step = r + 1, 0, 0
    save({'server': server, 'clients': states}, position, force=True)
    round_log(workdir, r, time.perf_counter() - started, position.global_step - steps_before)
    if eval_due(config, r):
      results = run_eval({'server': server, 'clients': states}, r)
  return {'server': server, 'clients': states}, position, False, results


_aggregate_jit = jax.jit(federation.aggregate, static_argnums=(2, 3))
