"""The federation: which client owns which dataset, and how the server combines them.

ARK_SPEC.md section 6. `make_plan` checks `config.federated` against the
configured datasets (every dataset owned by exactly one client; the round
and step keys consistent) before anything is read or built; `aggregate` and
`aggregate_stacked` are the server's update: a weighted mean of the clients'
backbone and projector, each dataset's head from its owner. ark_jax/federated.py
runs the rounds.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

AGGREGATIONS = ('equal', 'size')


# ------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """The federation, resolved and checked against the configured datasets.

  clients: per client, the indices (head order) of the datasets it owns.
  owner: per dataset, the client that owns it.
  start_round: per client, the first round it trains in.
  sizes: per client, its training examples (all its datasets).
  """
  clients: tuple[tuple[int, ...], ...]
  owner: tuple[int, ...]
  start_round: tuple[int, ...]
  sizes: tuple[int, ...]

  @property
  def num_clients(self) -> int:
    return len(self.clients)

  def active(self, round_index: int) -> list[int]:
    return [i for i, s in enumerate(self.start_round) if s <= round_index]

  def weights(self, active: Sequence[int], aggregation: str) -> list[float]:
    """Aggregation weights of the active clients (they sum to 1)."""
    if aggregation == 'equal':
      return [1.0 / len(active)] * len(active)
    total = sum(self.sizes[i] for i in active)
    return [self.sizes[i] / total for i in active]


def make_plan(config, num_devices: int, sizes: Sequence[int] | None = None) -> Plan:
  """Checks `config.federated` against config.data.datasets; ValueError naming the key.

  Args:
    config: the run's ConfigDict with a `federated` section.
    num_devices: devices of the run (parallel mode splits them over clients).
    sizes: training examples per dataset (head order); None counts nothing
      (every client size 0: only for checks).
  """
  f, names = config.federated, list(config.data.datasets)
  clients = [tuple(c) for c in f.clients]
  where = 'config.federated.clients'
  if not clients:
    raise ValueError(f'{where} is empty: name at least one client (a tuple of datasets).')
  owner: dict[str, int] = {}
  for i, client in enumerate(clients):
    if not client:
      raise ValueError(f'{where}[{i}] owns no dataset; every client needs at least one.')
    for name in client:
      if name not in names:
        raise ValueError(f'{where}[{i}] names {name!r}, which is not in config.data.datasets '
                         f'{tuple(names)}.')
      if name in owner:
        raise ValueError(f'{where}: dataset {name!r} is owned by clients {owner[name]} and {i}; '
                         'each dataset belongs to exactly one client.')
      owner[name] = i
  if missing := [n for n in names if n not in owner]:
    raise ValueError(f'{where}: dataset(s) {missing} of config.data.datasets belong to no client.')
  start = tuple(f.get('start_round') or (0,) * len(clients))
  if len(start) != len(clients) or any(s < 0 or s >= f.rounds for s in start):
    raise ValueError(f'config.federated.start_round={start} needs one round in [0, '
                     f'{f.rounds}) per client ({len(clients)} clients).')
  _check_keys(config, len(clients), num_devices, start)
  sizes = sizes or [0] * len(names)
  return Plan(clients=tuple(tuple(names.index(n) for n in c) for c in clients),
              owner=tuple(owner[n] for n in names), start_round=start,
              sizes=tuple(sum(sizes[names.index(n)] for n in c) for c in clients))


def _check_keys(config, num_clients: int, num_devices: int, start_round) -> None:
  f = config.federated
  if f.rounds <= 0:
    raise ValueError(f'config.federated.rounds={f.rounds} must be > 0.')
  if f.aggregation not in AGGREGATIONS:
    raise ValueError(f'config.federated.aggregation={f.aggregation!r} is unknown; use one of '
                     f'{AGGREGATIONS}.')
  if f.local_steps < 0 or (f.local_steps == 0 and f.local_passes <= 0):
    raise ValueError(f'config.federated: local_steps={f.local_steps}, local_passes='
                     f'{f.local_passes}; set local_passes > 0 or local_steps > 0.')
  if f.local_steps and config.ema != 'step':
    raise ValueError('config.federated.local_steps > 0 cuts passes, so the pass-wise EMA has no '
                     "schedule; set config.ema='step'.")
  if config.max_steps > 0:
    raise ValueError('config.max_steps: a federated run is sized by config.federated.rounds; '
                     'set max_steps=0.')
  if config.model.get('head_labels') is not None:
    raise ValueError('config.model.head_labels: a consolidated head has no single owner; '
                     'federated runs need per-dataset heads.')
  if f.parallel:
    if not f.local_steps:
      raise ValueError('config.federated.parallel=True trains every client for the same number '
                       'of steps: set config.federated.local_steps > 0.')
    if any(start_round):
      raise ValueError('config.federated.start_round: late joiners need parallel=False.')
    if f.shared_optimizer:
      raise ValueError('config.federated.shared_optimizer hands one state from client to '
                       'client, which parallel=True cannot; use parallel=False.')
    if num_devices % num_clients:
      raise ValueError(f'config.federated.parallel: {num_clients} clients do not divide the '
                       f'{num_devices} devices.')
    if jax.process_count() > 1:
      raise ValueError('config.federated.parallel runs in one process (multi-host: use '
                       'parallel=False).')


# ------------------------------------------------------------------------------ aggregation


def _is_head(path) -> bool:
  first = path[0]
  return getattr(first, 'key', getattr(first, 'name', None)) == 'heads'


def aggregate(server, client_params: Sequence[Any], weights: Sequence[float],
              head_source: Sequence[int]):
  """The new server parameters from the clients'.

  Args:
    server: the server's parameters (a pytree: nnx.State of the ArkModel).
    client_params: the active clients' parameters, same structure.
    weights: one per client, summing to 1.
    head_source: per dataset d, the position in `client_params` of the client
      that owns it, or -1 to keep the server's head d.

  Returns:
    Every leaf outside `heads`: sum_i weights[i] * client_params[i] (summed in
    client order, the first term first, so one client with weight 1 returns
    its parameters exactly); each `heads` leaf ([D, ...]): row d from its owner.
  """
  def leaf(path, s, *cs):
    if _is_head(path):
      rows = [s[d] if k < 0 else cs[k][d] for d, k in enumerate(head_source)]
      return jnp.stack(rows)
    total = weights[0] * cs[0]
    for w, c in zip(weights[1:], cs[1:]):
      total = total + w * c
    return total.astype(s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, server, *client_params)


def aggregate_stacked(server, params_K, weights_K, head_owner_D):
  """`aggregate` over clients stacked on a leading axis (parallel mode; every client active)."""
  def leaf(path, s, c_K):
    if _is_head(path):
      return c_K[head_owner_D, jnp.arange(c_K.shape[1])]
    w = weights_K.reshape((-1,) + (1,) * (c_K.ndim - 1))
    return jnp.sum(w * c_K, axis=0).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, server, params_K)
