"""Parallel federated Ark: every client's train state on a leading axis, one step for all.

`federated.parallel=True` (ark_jax/federated.py runs it). The K clients'
TrainStates are stacked into one ([K, ...] leaves) and sharded over a 'client'
mesh axis: the device mesh becomes ('client', 'data', 'fsdp') with K x
(devices / K). One jitted `vmap` of the plain train step (spmd_axis_name
'client', so the model's activation constraints gain the client axis) trains
every client on its own batch at once; a round is `local_steps` such steps (the
usual FedAvg simulation), then `federation.aggregate_stacked` on the server.

Clients run the same program, so they must share its constants: the same
number of steps (no late joiners) and the same optimizer schedule; federation.make_plan
and `prepare` refuse anything else. Batches: each client's host batch, its
rows stacked into [K, B, ...] and split as P('client', ('data', 'fsdp')).
"""

import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ark_jax import federated
from ark_jax import federation
from ark_jax import sharding
from ark_jax import train

CLIENT_AXIS = 'client'  # the mesh axis the clients' states are split over


def client_mesh(num_clients: int, mesh_cfg) -> jax.sharding.Mesh:
  """('client', 'data', 'fsdp'): K groups of devices / K, each a ('data', 'fsdp') mesh."""
  num_devices = jax.device_count()
  per_client = num_devices // num_clients
  data, fsdp = sharding.mesh_shape(mesh_cfg, per_client)
  return jax.make_mesh((num_clients, data, fsdp), (CLIENT_AXIS,) + sharding.MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3)


def _on(mesh, sh: NamedSharding, stacked: bool) -> NamedSharding:
  """A sharding of the run's mesh on the client mesh (with the client axis first if stacked)."""
  return NamedSharding(mesh, P(CLIENT_AXIS, *sh.spec) if stacked else sh.spec)


def prepare(config, plan, clients, graphdef, fed, fed_sh, num_classes, is_multiclass):
  """Stacks the clients' states onto the client mesh and compiles the vmapped step.

  Returns:
    (fed, fed_shardings, loop): the state {'server', 'clients' (stacked)}, its
    shardings, and the round loop (federated._train_faithful's signature).
  """
  optimizers = {c.index: c.config.optimizer.to_dict() for c in clients}
  if any(o != optimizers[0] for o in optimizers.values()):
    raise ValueError('config.federated.parallel: the clients resolve to different optimizer '
                     f'schedules {optimizers} (e.g. warmup_epochs over different data); set '
                     'config.optimizer.warmup_steps instead.')
  mesh = client_mesh(plan.num_clients, config.mesh)
  state_sh = jax.tree.map(lambda s: _on(mesh, s, True), fed_sh['clients'][0])
  server_sh = jax.tree.map(lambda s: _on(mesh, s, False), fed_sh['server'])
  stack = jax.jit(lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                  out_shardings=state_sh)
  fed = {'server': jax.device_put(fed['server'], server_sh), 'clients': stack(fed['clients'])}

  # Every client runs client 0's program: only data, seed and datasets differ,
  # and those live in the state and the batch.
  step_fn = train.make_train_step(graphdef, clients[0].config, num_classes, is_multiclass)
  batch_sh = NamedSharding(mesh, P(CLIENT_AXIS, sharding.BATCH_AXES))
  step = jax.jit(jax.vmap(step_fn, spmd_axis_name=CLIENT_AXIS),
                 in_shardings=(state_sh, {k: batch_sh for k in train.STEP_FIELDS}),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
  start_round = jax.jit(
      lambda states, server: states.replace(params=jax.tree.map(
          lambda x: jnp.broadcast_to(x, (plan.num_clients,) + x.shape), server)),
      out_shardings=state_sh, donate_argnums=(0,))
  weights_K = jnp.asarray(plan.weights(range(plan.num_clients), config.federated.aggregation),
                          jnp.float32)
  owner_D = jnp.asarray(plan.owner, jnp.int32)
  aggregate = jax.jit(lambda server, params_K: federation.aggregate_stacked(
      server, params_K, weights_K, owner_D), out_shardings=server_sh)
  split = jax.jit(lambda m: [jax.tree.map(lambda x, i=i: x[i], m)
                             for i in range(plan.num_clients)])

  def loop(config, plan, clients, fed, position, save, run_eval, workdir):
    f = config.federated
    width = max(config.data.num_classes)
    server, states, results = fed['server'], fed['clients'], None
    for r in range(position.round, f.rounds):
      started, steps_before = time.perf_counter(), position.global_step
      with jax.set_mesh(mesh):
        if position.client == 0 and position.step == 0:
          states = start_round(states, server)
        its = [federated.iterator(c, position.consumed[c.index]) for c in clients]
        try:
          # client == K: this round's steps are done (a resume before its aggregation).
          todo = f.local_steps if position.client < plan.num_clients else 0
          for _ in range(position.step, todo):
            hosts = [federated.host_batch(next(it), c.dataset_ids, width)
                     for it, c in zip(its, clients)]
            batch = {k: jax.device_put(np.stack([np.asarray(h[k]) for h in hosts]), batch_sh)
                     for k in train.STEP_FIELDS}
            states, metrics = step(states, batch)
            position.step += 1
            position.global_step += 1
            for c, m, h in zip(clients, split(metrics), hosts):
              position.consumed[c.index] += 1
              position.client_steps[c.index] += 1
              c.writer.add(position.client_steps[c.index], m, h['dataset_id'][h['valid']])
              if position.client_steps[c.index] % config.log_every_steps == 0:
                c.writer.flush()
            if position.step == f.local_steps:
              position.client, position.step = plan.num_clients, 0
            fed = {'server': server, 'clients': states}
            if federated.checkpoint_or_stop(config, position, save, fed):
              return fed, position, True, results
        finally:
          for it in its:
            it.close()
        server = aggregate(server, states.params)
      position.round, position.client, position.step = r + 1, 0, 0
      save({'server': server, 'clients': states}, position, force=True)
      federated.round_log(workdir, r, time.perf_counter() - started,
                           position.global_step - steps_before)
      if federated.eval_due(config, r):
        results = run_eval({'server': server, 'clients': states}, r)
    return {'server': server, 'clients': states}, position, False, results

  return fed, {'server': server_sh, 'clients': state_sh}, loop
