r"""Federated Ark on the demo: three clients (hospitals) over the four demo datasets.

  python -m ark_jax.main --config=configs/federated_demo.py --workdir=DIR \
      --config.data.data_dir=DATA

Each client trains on its own datasets with its own teacher; the server
averages backbone and projector and takes each head from its owner
(ark_jax/federated.py). Variants:

  :size      weights the average by the clients' training examples (FedAvg)
  :steps     four clients, one dataset each, `local_steps` steps per round, one
             after another (the sequential run parallel mode is measured against)
  :parallel  the same four clients trained at once, vmapped over a 'client'
             mesh axis; needs a device count divisible by 4 (on a CPU:
             JAX_NUM_CPU_DEVICES=8)
"""

import ml_collections

from configs import demo

THREE_CLIENTS = (('demo_multilabel',), ('demo_subset', 'demo_binary'), ('demo_count',))
FOUR_CLIENTS = tuple((name,) for name in demo.DEMO_DATASETS)
VARIANTS = ('size', 'steps', 'parallel')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg is not None and arg not in VARIANTS:
    raise ValueError(f'configs/federated_demo.py: unknown variant {arg!r}; use one of {VARIANTS}.')
  c = demo.get_config()
  c.federated = ml_collections.ConfigDict()
  c.federated.clients = THREE_CLIENTS  # per client, the datasets it owns (each exactly once)
  c.federated.rounds = c.num_epochs  # rounds; as many as the centralized demo's epochs
  c.federated.local_passes = 1  # passes over each own dataset per round (the reference: 1)
  c.federated.local_steps = 0  # > 0: exactly this many steps per round instead of passes
  c.federated.aggregation = 'equal'  # 'equal' (the reference) | 'size' (FedAvg)
  # Per client, the round it joins in (late joiners); None = all from round 0.
  c.federated.start_round = ml_collections.config_dict.placeholder(tuple)
  # True: one optimizer state handed from client to client (the reference);
  # False: each client keeps its own (ark_jax/federated.py says why).
  c.federated.shared_optimizer = False
  c.federated.parallel = False  # True: all clients at once on a 'client' mesh axis
  c.federated.eval_every_rounds = 1  # evaluate every N rounds; 0 = after the last only, -1 = never
  if arg == 'size':
    c.federated.aggregation = 'size'
  elif arg in ('steps', 'parallel'):
    c.federated.clients = FOUR_CLIENTS
    c.federated.local_steps = 63  # one pass of a demo dataset (2000 mosaics) at batch 32
    c.federated.parallel = arg == 'parallel'
    c.ema = 'step'  # fixed step counts cut passes: one EMA update per step
  return c
