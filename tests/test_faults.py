"""Fault matrix of the training run: what a restart recovers from, and how.

test_resume covers SIGKILL after a committed checkpoint and SIGTERM; this
module covers the rest of RELIABILITY.md's "Training faults": SIGKILL inside
an async save, the disk filling up during a save, and damaged or deleted
checkpoints found at restart. Each fault runs the real command in
subprocesses (demo_runs) and ends with metrics.jsonl equal, bit for bit, to
one uninterrupted run per schedule, shared by the module. The last two run
in-process, at the Checkpointer level: every file of a step damaged in turn,
and a write failing in Orbax's background thread. A full disk is a small tmpfs,
mounted here: the tests need root (CAP_SYS_ADMIN), as in the project's containers.
"""

import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import grain
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import demo_runs
from ark_jax import checkpoint

STEPS = 12
EVERY = 4  # checkpoint interval: steps 4, 8, 12 are saved (max_to_keep=3 keeps all)
DEVICES = 2
SCHEDULES = {
    'cyclic': ('configs/demo.py', {'ema': 'pass'}),
    'mixed': ('configs/demo.py:mixed', {'ema': 'step'}),
}
TMP_STEP = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_runs.prepare_small_demo(str(tmp_path_factory.mktemp('faults_demo_data')))


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """One compilation cache for every run (shared with test_resume): only the first compiles."""
  return demo_runs.shared_cache_dir(tmp_path_factory)


def _start(schedule, workdir, log_path, data_dir, cache_dir) -> demo_runs.Run:
  config, overrides = SCHEDULES[schedule]
  overrides = {**overrides, 'data.data_dir': data_dir, 'num_epochs': 2, 'max_steps': STEPS,
               'checkpoint_every_steps': EVERY}
  return demo_runs.Run(demo_runs.command(str(workdir), overrides, config),
                       demo_runs.env(cache_dir, DEVICES), str(log_path))


@pytest.fixture(scope='module')
def reference(data_dir, cache_dir, tmp_path_factory):
  """{schedule: workdir} of one uninterrupted run per schedule (both run at once)."""
  root = tmp_path_factory.mktemp('faults_reference')
  runs = {s: _start(s, root / s, root / f'{s}.log', data_dir, cache_dir) for s in SCHEDULES}
  for schedule, run in runs.items():
    run.wait_ok()
    assert demo_runs.committed_steps(str(root / schedule)) == [4, 8, 12], run.describe()
  return {s: root / s for s in SCHEDULES}


def _assert_same_metrics(workdir, reference_workdir, run):
  expected = demo_runs.exact(demo_runs.read_metrics(str(reference_workdir)))
  got = demo_runs.exact(demo_runs.read_metrics(str(workdir)))
  assert [m['step'] for m in expected] == list(range(1, STEPS + 1))
  assert [m['step'] for m in got] == [m['step'] for m in expected], run.describe()
  for e, g in zip(expected, got):
    assert g == e  # bit-identical floats (JSON round-trips them exactly)


def _resumed_from(run) -> int | None:
  found = re.findall(r'Resumed from step (\d+) of ', run.log())
  return int(found[-1]) if found else None


def _saved_checksums(workdir, step) -> dict:
  """The per-leaf checksums a committed step's meta item holds (read as plain JSON)."""
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)['checksums']


# ------------------------------------------------------------------ SIGKILL inside a save


def _in_flight_saves(directory, after: int) -> list[int]:
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [int(m.group(1)) for m in map(TMP_STEP.match, names) if m and int(m.group(1)) > after]


def _wait_stopped(pid: int):
  """Until every thread of pid is stopped (SIGSTOP is delivered asynchronously)."""
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    states = []
    for task in os.listdir(f'/proc/{pid}/task'):
      with contextlib.suppress(FileNotFoundError):
        with open(f'/proc/{pid}/task/{task}/stat') as f:
          states.append(f.read().rsplit(')', 1)[1].split()[0])
    if all(s in 'TtZX' for s in states):
      return
    time.sleep(0.001)
  raise AssertionError(f'Process {pid} did not stop: thread states {states}.')


def _kill_inside_a_save(run, workdir, after: int) -> int:
  """SIGKILLs `run` while Orbax writes a step > `after`; returns that step.

  Polls for the step's `<step>.orbax-checkpoint-tmp` folder, freezes the
  process (SIGSTOP), and kills it only if the folder is still there, i.e. the
  save is still in flight; a save that committed meanwhile lets it go on to
  the next one. No hook in the product: the timing comes from outside.
  """
  directory = os.path.join(workdir, 'checkpoints')
  deadline = time.monotonic() + demo_runs.TIMEOUT_S
  while time.monotonic() < deadline:
    if _in_flight_saves(directory, after):
      run.kill(signal.SIGSTOP)
      _wait_stopped(run.proc.pid)
      if in_flight := _in_flight_saves(directory, after):
        run.kill(signal.SIGKILL)
        return in_flight[0]
      run.kill(signal.SIGCONT)  # that save committed in between: catch the next
    if run.proc.poll() is not None:
      raise AssertionError(f'No save of a step > {after} caught in flight:\n{run.describe()}')
    time.sleep(0.002)
  run.kill(signal.SIGKILL)
  run.wait()
  raise AssertionError(f'No save in flight after {demo_runs.TIMEOUT_S} s:\n{run.describe()}')


def test_sigkill_inside_an_async_save(reference, data_dir, cache_dir, tmp_path):
  # One schedule: what is under test is Orbax's uncommitted step folder, which the
  # schedule does not touch (tests/test_resume.py kills both schedules' runs).
  schedule = 'cyclic'
  workdir = tmp_path / 'run'
  killed = _start(schedule, workdir, tmp_path / 'killed.log', data_dir, cache_dir)
  demo_runs.wait_for_checkpoint(killed, str(workdir), EVERY)
  step = _kill_inside_a_save(killed, str(workdir), EVERY)
  assert killed.wait() == -signal.SIGKILL, killed.describe()
  names = os.listdir(workdir / 'checkpoints')
  assert any(n.startswith(f'{step}.orbax-checkpoint-tmp') for n in names), names
  committed = demo_runs.committed_steps(str(workdir))
  assert committed and committed[-1] < step, (committed, step)

  restarted = _start(schedule, workdir, tmp_path / 'restarted.log', data_dir, cache_dir)
  restarted.wait_ok()
  assert _resumed_from(restarted) == committed[-1], restarted.describe()
  _assert_same_metrics(workdir, reference[schedule], restarted)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '4', '8']  # the tmp folder is gone


# ------------------------------------------------------------------ disk full during a save


@contextlib.contextmanager
def _tmpfs(path, size: str):
  """A tmpfs mounted at `path`, unmounted at the end: a file system that really fills
  (ENOSPC from the kernel, in whatever thread writes). Needs CAP_SYS_ADMIN."""
  os.makedirs(path, exist_ok=True)
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                         capture_output=True, text=True, check=False)
  assert mount.returncode == 0, f'mount -t tmpfs (needs CAP_SYS_ADMIN) failed: {mount.stderr}'
  try:
    yield
  finally:
    subprocess.run(['umount', '--lazy', str(path)], check=True, capture_output=True)


def _tmpfs_bytes(directory) -> int:
  """What a folder's files take on a tmpfs: whole 4 KiB pages each."""
  return sum(-(-p.stat().st_size // 4096) * 4096
             for p in pathlib.Path(directory).rglob('*') if p.is_file())


def test_disk_full_during_a_save(reference, data_dir, cache_dir, tmp_path):
  schedule = 'mixed'
  workdir = tmp_path / 'run'
  directory = workdir / 'checkpoints'
  # Room for a step and a half: step 4 commits, step 8 runs out of space, whatever
  # the timing of the background writes (a disk filled from outside at a chosen
  # moment races them: on a quiet machine the loop reaches step 8 before step 4
  # has committed).
  room = _tmpfs_bytes(reference[schedule] / 'checkpoints' / '4') * 3 // 2
  with _tmpfs(directory, str(room)):
    full = _start(schedule, workdir, tmp_path / 'full.log', data_dir, cache_dir)
    assert full.wait() != 0, full.describe()
    # The traceback's line says it all: errno, step, directory, cause, what is left.
    # (Orbax's other failed writes are logged after it, as never-retrieved tasks.)
    errors = [line for line in full.log().splitlines()
              if line.startswith('ark_jax.checkpoint.CheckpointSaveError: ')]
    assert len(errors) == 1, full.describe()
    message = errors[0]
    assert message.startswith(
        f'ark_jax.checkpoint.CheckpointSaveError: [Errno 28] Checkpoint step 8 could not be '
        f'written to {directory}: '), full.describe()
    assert 'No space left on device' in message, message
    assert message.endswith('The committed steps [4] are untouched; a restart resumes from the '
                            'newest of them.'), message
    assert demo_runs.committed_steps(str(workdir)) == [4]

    # Space freed: the file system grown under the run's feet.
    subprocess.run(['mount', '-o', 'remount,size=64m', str(directory)], check=True,
                   capture_output=True)
    restarted = _start(schedule, workdir, tmp_path / 'restarted.log', data_dir, cache_dir)
    restarted.wait_ok()
    assert _resumed_from(restarted) == 4, restarted.describe()
    assert 'Skipping checkpoint step' not in restarted.log()  # step 4 was intact
    _assert_same_metrics(workdir, reference[schedule], restarted)
    assert sorted(os.listdir(directory)) == ['12', '4', '8']  # step 8's tmp folder is gone


# ------------------------------------------------------------------ damaged or deleted, restarted


def _largest_file(directory) -> pathlib.Path:
  return max((p for p in pathlib.Path(directory).rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path):
  raw = bytearray(path.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
  path.write_bytes(bytes(raw))


def _truncate(path: pathlib.Path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_damaged_newest_steps_are_skipped_and_rewritten(reference, data_dir, cache_dir, tmp_path):
  schedule = 'cyclic'
  workdir = tmp_path / 'run'
  shutil.copytree(reference[schedule], workdir)
  # Step 12: bytes flipped in array data. The file still decodes, to wrong
  # numbers: only the checksums can tell. Step 8: array data truncated.
  _flip(_largest_file(workdir / 'checkpoints' / '12' / 'state'))
  _truncate(_largest_file(workdir / 'checkpoints' / '8' / 'state'))

  restarted = _start(schedule, workdir, tmp_path / 'restarted.log', data_dir, cache_dir)
  restarted.wait_ok()
  log, directory = restarted.log(), workdir / 'checkpoints'
  assert re.search(rf'Skipping checkpoint step 12 in {directory}: CorruptCheckpointError: '
                   r'Checkpoint step 12: leaf \S+ checksum \[\d+, \d+\] != saved', log), log
  assert re.search(rf'Skipping checkpoint step 8 in {directory}: \w+: ', log), log
  assert _resumed_from(restarted) == 4, restarted.describe()
  _assert_same_metrics(workdir, reference[schedule], restarted)
  # Steps 8 and 12 written afresh, the damaged ones kept aside for a person.
  assert sorted(os.listdir(directory)) == ['12', '12.damaged', '4', '8', '8.damaged']
  assert re.search(rf'moved it to {directory}/12.damaged and writing step 12 afresh', log), log
  for step in (8, 12):
    assert _saved_checksums(workdir, step) == _saved_checksums(reference[schedule], step)


def test_deleted_checkpoint_directory_restarts_from_scratch(reference, data_dir, cache_dir,
                                                            tmp_path):
  """Documented behaviour: no checkpoint means step 0 (metrics.jsonl is rewritten from there)."""
  schedule = 'mixed'
  workdir = tmp_path / 'run'
  shutil.copytree(reference[schedule], workdir)
  shutil.rmtree(workdir / 'checkpoints')
  restarted = _start(schedule, workdir, tmp_path / 'restarted.log', data_dir, cache_dir)
  restarted.wait_ok()
  assert _resumed_from(restarted) is None, restarted.describe()
  _assert_same_metrics(workdir, reference[schedule], restarted)
  assert demo_runs.committed_steps(str(workdir)) == [4, 8, 12]


# ------------------------------------------------------------------ every file of a step


def _state(seed):
  mesh = jax.make_mesh((8,), ('data',))
  rng = np.random.default_rng(seed)
  return {'w': jax.device_put(rng.standard_normal((64, 96), np.float32),
                              NamedSharding(mesh, P('data'))),
          'b': jax.device_put(rng.standard_normal((96,), np.float32), NamedSharding(mesh, P()))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _data():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


# After a failed read, Orbax leaves coroutines and TensorStore callbacks on its
# closed event loop (harmless); collected below, so the warnings stay in this test.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_any_damaged_file_is_caught_or_harmless(tmp_path, caplog):
  """Flip or truncate any one file of the newest step: restore walks back, or reads it exactly."""
  pristine = tmp_path / 'pristine'
  states = {1: _state(1), 2: _state(2)}
  with checkpoint.Checkpointer(pristine, save_every_steps=1) as ckpt:
    for step, state in states.items():
      it = _data()
      for _ in range(step):
        next(it)
      ckpt.save(step, state, it, {'n': step})
  files = sorted(str(p.relative_to(pristine / '2')) for p in (pristine / '2').rglob('*')
                 if p.is_file())
  assert any(f.startswith('state/') for f in files) and 'meta/metadata' in files, files
  outcomes = {}
  for damage in (_flip, _truncate):
    for name in files:
      directory = tmp_path / f'{damage.__name__}_{len(outcomes)}'
      shutil.copytree(pristine, directory)
      damage(directory / '2' / name)
      caplog.clear()
      with caplog.at_level(logging.WARNING, logger='absl'):
        with checkpoint.Checkpointer(directory) as ckpt:
          assert ckpt.read_meta()['n'] in (1, 2)  # a damaged meta is passed over, not fatal
          it = _data()
          step, state, meta = ckpt.restore_latest_intact(_abstract(states[1]), it)
      assert meta == {'n': step}
      for key in states[step]:
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(states[step][key]))
      assert next(it)[0] == 4 * step  # the iterator is at the restored step's position
      if step == 1:
        assert 'Skipping checkpoint step 2 in ' in caplog.text, (damage, name)
      outcomes[damage.__name__, name] = step
  gc.collect()
  # The array data itself is never read silently: flipped, the checksum catches it.
  data_files = [n for n in files if re.fullmatch(r'state/(ocdbt\.process_0/)?d/\w+', n)]
  assert data_files and any(outcomes['_flip', n] == 1 for n in data_files), outcomes


def test_failed_background_write_is_reported_once(tmp_path):
  """A write failing in Orbax's thread surfaces at the next save; closing after it is quiet."""
  mesh = jax.make_mesh((8,), ('data',))
  big = {'w': jax.device_put(np.random.default_rng(0).standard_normal((256, 256), np.float32),
                             NamedSharding(mesh, P('data')))}  # 256 KiB, incompressible
  with _tmpfs(tmp_path, '640k'):  # room for two steps, not three
    ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt', save_every_steps=1)
    for step in (1, 2, 3):
      assert ckpt.save(step, big, None, {})  # step 3's write fails in the background
    with pytest.raises(checkpoint.CheckpointSaveError) as failure:
      ckpt.save(4, big, None, {})
    assert failure.value.errno == 28
    assert str(failure.value).startswith(
        f'[Errno 28] Checkpoint step 3 could not be written to {tmp_path / "ckpt"}: ')
    assert 'No space left on device' in str(failure.value)
    assert str(failure.value).endswith('The committed steps [1, 2] are untouched; a restart '
                                       'resumes from the newest of them.')
    with pytest.raises(checkpoint.CheckpointSaveError, match='No further checkpoint'):
      ckpt.save(5, big, None, {})
    ckpt.close()  # already reported: no second error
    assert checkpoint.Checkpointer(tmp_path / 'ckpt').all_steps() == [1, 2]
