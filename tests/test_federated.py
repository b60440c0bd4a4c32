"""Federated Ark: aggregation by hand, bad federations named, a one-client federation is
plain Ark, parallel mode equals the sequential one, and a run stopped mid-round resumes
exactly. In-process on conftest's 8 CPU devices, the tiny model, demo data of 24 train
examples per dataset (demo_runs: a cyclic pass is two steps of 16).
"""

import json

import jax
import numpy as np
import pytest

import demo_runs
from ark_jax import checkpoint
from ark_jax import federated
from ark_jax import federation
from ark_jax import train
from configs import federated_demo

NAMES = ('demo_multilabel', 'demo_subset', 'demo_binary', 'demo_count')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_runs.prepare_small_demo(str(tmp_path_factory.mktemp('federated_demo_data')))


def make_config(data_dir, clients, **overrides):
  """configs/federated_demo.py with the tiny model, every step logged, 2 rounds of 1 pass."""
  c = federated_demo.get_config()
  c.update_from_flattened_dict({**demo_runs.TINY, 'data.data_dir': data_dir, 'num_epochs': 2,
                                'checkpoint_every_steps': 1000, 'bootstrap_samples': 0,
                                'eval_every_steps': 0,
                                'eval_batch_size': 16, 'federated.rounds': 2,
                                'federated.eval_every_rounds': 0})
  c.federated.clients = clients
  c.update_from_flattened_dict(overrides)
  return c


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ aggregation


def hand_params(backbone, projector, heads_Dx2):
  return {'backbone': {'w': np.asarray(backbone, np.float32)},
          'projector': {'b': np.asarray(projector, np.float32)},
          'heads': {'kernel': np.asarray(heads_Dx2, np.float32)}}


def test_aggregation_equal_and_size_by_hand():
  server = hand_params([0., 0.], [0.], [[9., 9.], [9., 9.], [9., 9.]])
  a = hand_params([1., 2.], [3.], [[1., 1.], [2., 2.], [3., 3.]])
  b = hand_params([5., 6.], [7.], [[4., 4.], [5., 5.], [6., 6.]])
  # Client a owns dataset 0, b owns 1, and dataset 2's owner has not joined (-1).
  equal = federation.aggregate(server, [a, b], [0.5, 0.5], [0, 1, -1])
  np.testing.assert_array_equal(equal['backbone']['w'], [3., 4.])
  np.testing.assert_array_equal(equal['projector']['b'], [5.])
  np.testing.assert_array_equal(equal['heads']['kernel'], [[1., 1.], [5., 5.], [9., 9.]])

  plan = federation.Plan(clients=((0,), (1, 2)), owner=(0, 1, 1), start_round=(0, 0),
                        sizes=(100, 300))
  weights = plan.weights([0, 1], 'size')
  assert weights == [0.25, 0.75]
  by_size = federation.aggregate(server, [a, b], weights, [0, 1, 1])
  np.testing.assert_allclose(by_size['backbone']['w'], [0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * 6])
  np.testing.assert_allclose(by_size['projector']['b'], [0.25 * 3 + 0.75 * 7])
  # Heads come from their owners untouched, whatever the weights.
  np.testing.assert_array_equal(by_size['heads']['kernel'], [[1., 1.], [5., 5.], [6., 6.]])

  stacked = federation.aggregate_stacked(
      server, jax.tree.map(lambda *xs: np.stack(xs), a, b), np.asarray(weights, np.float32),
      np.asarray([0, 1, 1]))
  for leaf, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(by_size)):
    np.testing.assert_allclose(leaf, want, rtol=1e-6)


def test_one_client_with_weight_one_is_returned_exactly():
  a = hand_params([0.1, -0.0], [1e-30], [[0.3, 0.7]])
  out = federation.aggregate(hand_params([0., 0.], [0.], [[0., 0.]]), [a], [1.0], [0])
  for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(a)):
    assert np.asarray(leaf).tobytes() == want.tobytes()


@pytest.mark.parametrize('clients, message', [
    ((('demo_multilabel', 'demo_subset'), ('demo_subset', 'demo_binary', 'demo_count')),
     "'demo_subset' is owned by clients 0 and 1"),
    ((('demo_multilabel', 'demo_subset'), (), ('demo_binary', 'demo_count')),
     r'clients\[1\] owns no dataset'),
    ((('demo_multilabel', 'demo_subset'), ('demo_binary',)),
     r"\['demo_count'\] of config.data.datasets belong to no client"),
    ((('demo_multilabel', 'padchest'), ('demo_subset', 'demo_binary', 'demo_count')),
     r"clients\[0\] names 'padchest'"),
])
def test_bad_federations_are_named(clients, message):
  c = make_config('/nonexistent', clients)
  with pytest.raises(ValueError, match=message):
    federation.make_plan(c, 8)


def test_inconsistent_federated_keys_are_named():
  four = tuple((n,) for n in NAMES)
  with pytest.raises(ValueError, match='set config.federated.local_steps > 0'):
    federation.make_plan(make_config('/x', four, **{'federated.parallel': True}), 8)
  with pytest.raises(ValueError, match="set config.ema='step'"):
    federation.make_plan(make_config('/x', four, **{'federated.local_steps': 2}), 8)
  with pytest.raises(ValueError, match='3 clients do not divide the 8 devices'):
    federation.make_plan(make_config('/x', four[:2] + (NAMES[2:],), **{
        'federated.parallel': True, 'federated.local_steps': 2, 'ema': 'step'}), 8)
  with pytest.raises(ValueError, match=r'start_round=\(0, 2\)'):
    federation.make_plan(make_config('/x', (NAMES[:2], NAMES[2:]),
                                    **{'federated.start_round': (0, 2)}), 8)


# ------------------------------------------------------------------------------ whole runs


def test_one_client_federation_is_plain_ark(data_dir, tmp_path):
  config = make_config(data_dir, (NAMES,))
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    del plain['federated']
  train.train_and_evaluate(plain, str(tmp_path / 'plain'))
  federated.run(config, str(tmp_path / 'fed'))

  expected = demo_runs.exact(demo_runs.read_metrics(str(tmp_path / 'plain')))
  got = demo_runs.exact(read_lines(str(tmp_path / 'fed' / 'clients' / '0' / 'metrics.jsonl')))
  assert len(expected) == 16  # 2 epochs of 4 passes of 2 steps, every step logged
  assert got == expected  # bit for bit (JSON round-trips floats exactly)
  plain_eval = read_json(str(tmp_path / 'plain' / 'eval' / 'step_16.json'))['results']
  fed_eval = read_json(str(tmp_path / 'fed' / 'eval' / 'round_1.json'))['results']
  for name in NAMES:
    assert fed_eval[name]['server']['auc'] == plain_eval[name]['student']['auc']
    assert fed_eval[name]['teacher']['auc'] == plain_eval[name]['teacher']['auc']


def test_parallel_clients_equal_the_sequential_run(data_dir, tmp_path):
  overrides = {'federated.local_steps': 3, 'federated.rounds': 1, 'ema': 'step',
               'eval_every_steps': -1, 'federated.eval_every_rounds': -1}
  four = tuple((n,) for n in NAMES)
  sequential = federated.run(make_config(data_dir, four, **overrides), str(tmp_path / 'seq'))
  parallel = federated.run(make_config(data_dir, four, **{**overrides, 'federated.parallel': True}),
                           str(tmp_path / 'par'))
  leaves_seq = jax.tree.leaves(jax.device_get(sequential['server']))
  leaves_par = jax.tree.leaves(jax.device_get(parallel['server']))
  assert len(leaves_seq) == len(leaves_par)
  for s, p in zip(leaves_seq, leaves_par):
    np.testing.assert_allclose(p, s, atol=1e-5, rtol=0)
  # The round did train: the server moved from client 0's initial student.
  init = jax.tree.leaves(jax.device_get(sequential['clients'][0].ema_params))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(leaves_seq, init))
  assert moved > 1e-3
  for c in range(4):  # each client's own teacher and step count
    seq_t = jax.tree.leaves(jax.device_get(sequential['clients'][c].ema_params))
    par_t = jax.tree.leaves(jax.device_get(jax.tree.map(lambda x, c=c: x[c],
                                                        parallel['clients'].ema_params)))
    for s, p in zip(seq_t, par_t):
      np.testing.assert_allclose(p, s, atol=1e-5, rtol=0)
  rounds = read_lines(str(tmp_path / 'par' / 'rounds.jsonl'))
  assert [r['steps'] for r in rounds] == [3]


def test_stopped_mid_round_resumes_exactly(data_dir, tmp_path, monkeypatch):
  clients = (NAMES[:2], NAMES[2:])
  config = make_config(data_dir, clients, **{'federated.eval_every_rounds': -1})
  straight = federated.run(config, str(tmp_path / 'straight'))

  # SIGTERM during client 1's first round (global step 6 of 8 in round 0).
  calls = {'n': 0}

  def stop_at_six(step, every):
    del every
    calls['n'] += 1
    return step == 6

  monkeypatch.setattr(train, '_stop_requested', stop_at_six)
  federated.run(config, str(tmp_path / 'resumed'))
  with checkpoint.Checkpointer(str(tmp_path / 'resumed' / 'checkpoints')) as ckpt:
    assert ckpt.all_steps() == [6]
    assert ckpt.read_meta()['position']['client'] == 1
  monkeypatch.setattr(train, '_stop_requested', lambda step, every: False)
  resumed = federated.run(config, str(tmp_path / 'resumed'))

  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(
      jax.device_get(resumed))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  for c in ('0', '1'):
    want = demo_runs.exact(read_lines(str(tmp_path / 'straight' / 'clients' / c / 'metrics.jsonl')))
    got = demo_runs.exact(read_lines(str(tmp_path / 'resumed' / 'clients' / c / 'metrics.jsonl')))
    assert got == want and len(want) == 8


@pytest.mark.parametrize('arg', [None, 'size', 'steps', 'parallel'])
def test_federated_demo_variants_pass_the_checks(arg):
  c = federated_demo.get_config(arg)
  train.check_config(c, 8)
  plan = federation.make_plan(c, 8)
  assert sorted(d for client in plan.clients for d in client) == [0, 1, 2, 3]
  assert plan.owner == ((0, 1, 1, 2) if arg in (None, 'size') else (0, 1, 2, 3))
