"""Checkpointer on 8 fake CPU devices: retention, resharding, iterator, damage, SIGTERM."""

import os
import pathlib
import signal

import grain
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from ark_jax import checkpoint


def _mesh(shape, names):
  return jax.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(shape))])


def _state(seed=0):
  """A P('data')-sharded matrix, a replicated vector and a scalar on a (data=8) mesh."""
  mesh = _mesh((8,), ('data',))
  rng = np.random.default_rng(seed)
  return {
      'w': jax.device_put(rng.standard_normal((64, 96), np.float32), NamedSharding(mesh, P('data'))),
      'b': jax.device_put(rng.standard_normal((96,), np.float32), NamedSharding(mesh, P())),
      'step': jax.device_put(np.int32(seed), NamedSharding(mesh, P())),
  }


def _abstract(state, shardings=None):
  shardings = shardings or jax.tree.map(lambda x: x.sharding, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _data():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def test_keeps_last_steps_and_interval(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_every_steps=10) as ckpt:
    assert not ckpt.save(5, state, None, {})  # off the interval
    for step in (10, 20, 30):
      assert ckpt.save(step, state, None, {'step': step})
    assert ckpt.save(35, state, None, {}, force=True)
    assert not ckpt.save(35, state, None, {}, force=True)  # already saved
    ckpt.wait()
    assert ckpt.all_steps() == [30, 35]
    assert ckpt.latest_step() == 35


def test_restore_onto_other_mesh_with_iterator_and_meta(tmp_path):
  state = _state(seed=1)
  it = _data()
  for _ in range(3):
    next(it)
  meta = {'config': {'batch_size': 4, 'datasets': ['a', 'b']}, 'pass': 2, 'lr': 1e-3}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(3, state, it, meta)
    expected = [next(it) for _ in range(3)]  # advancing right after save must not leak in

  mesh = _mesh((2, 4), ('data', 'fsdp'))
  targets = {'w': NamedSharding(mesh, P(None, ('data', 'fsdp'))),
             'b': NamedSharding(mesh, P('fsdp')),
             'step': NamedSharding(mesh, P())}
  fresh = _data()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, restored_meta = ckpt.restore(None, _abstract(state, targets), fresh)
  assert restored_meta == meta
  for key in state:
    assert restored[key].sharding == targets[key], key
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


def test_checksum_is_sharding_invariant_and_sensitive():
  state = _state(seed=2)
  mesh = _mesh((2, 4), ('data', 'fsdp'))
  moved = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in state.items()}
  sums = checkpoint.state_checksums(state)
  assert sums == checkpoint.state_checksums(moved)
  assert set(sums) == {"['w']", "['b']", "['step']"}
  w = np.asarray(state['w'])
  swapped = w.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checkpoint.state_checksums({'w': swapped}) != checkpoint.state_checksums({'w': w})


def _largest_file(directory):
  return max((p for p in pathlib.Path(directory).rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_step_is_detected_and_skipped(tmp_path, damage):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(1, _state(seed=1), _data(), {'n': 1})
    ckpt.save(2, _state(seed=2), _data(), {'n': 2})

  victim = _largest_file(tmp_path / '2' / 'state')
  raw = bytearray(victim.read_bytes())
  if damage == 'flip':
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
  else:
    raw = raw[:len(raw) // 2]
  victim.write_bytes(bytes(raw))

  abstract = _abstract(_state())
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2  # Orbax alone cannot tell
    if damage == 'flip':
      # The file still reads, as wrong numbers: only the checksum notices.
      with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 2: leaf \['w'\]"):
        ckpt.restore(2, abstract)
    else:
      with pytest.raises(Exception):  # TensorStore's read error
        ckpt.restore(2, abstract)
    step, state, meta = ckpt.restore_latest_intact(abstract, _data())
  assert (step, meta) == (1, {'n': 1})
  np.testing.assert_array_equal(np.asarray(state['w']), np.asarray(_state(seed=1)['w']))


def test_checksum_mismatch_names_step_and_leaf():
  state = _state()
  record = {'checksum_method': checkpoint.CHECKSUM_METHOD, 'checksums': checkpoint.state_checksums(state)}
  record['checksums']["['b']"][1] ^= 1
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 7: leaf \['b'\]"):
    checkpoint._verify(7, state, record)  # pylint: disable=protected-access


def test_nothing_intact(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest_intact(_abstract(_state())) is None
    ckpt.save(1000, _state(), None, {})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    wrong = {'w': jax.ShapeDtypeStruct((3,), np.float32, sharding=_state()['b'].sharding)}
    with pytest.raises(checkpoint.CorruptCheckpointError, match='None of the checkpoint steps'):
      ckpt.restore_latest_intact(wrong)


def test_unfinished_save_is_ignored(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(1, _state(), None, {})
  # What a save killed by SIGKILL leaves behind.
  (tmp_path / '2.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    assert ckpt.restore_latest_intact(_abstract(_state()))[0] == 1


def test_sigterm_sets_flag_only():
  calls = []
  previous = checkpoint.install_sigterm_handler(calls.append)
  try:
    checkpoint.clear_preemption_request()
    assert not checkpoint.preemption_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoint.preemption_requested()
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
    checkpoint.clear_preemption_request()


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer('relative/ckpt', save_every_steps=1, async_save=False) as ckpt:
    assert ckpt.directory == str(tmp_path / 'relative' / 'ckpt')
    assert ckpt.save(1, {'w': jnp.arange(3.0)}, None, {'note': 'x'})
    assert ckpt.latest_step() == 1
