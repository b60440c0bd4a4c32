"""Checkpoints: train state + input iterator + metadata, one Orbax step each.

Each step directory holds three items:

- `state`: any pytree of (sharded) jax.Arrays, written by Orbax's
  StandardSave (OCDBT, asynchronously: `save` returns once the arrays are
  copied to host memory; the write runs in a background thread).
- `data`: the Grain iterator's state (`grain.checkpoint.CheckpointSave`), one
  `process_i-of-n.json` per process, captured during `save` itself, so the
  loop may advance the iterator as soon as `save` returns.
- `meta`: JSON: what the caller passes (config, pass counters, ...) plus a
  checksum of every array leaf of `state`.

What survives what. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*`
and renames it (and writes `commit_success.txt` where renames are not atomic)
only once every item is complete. A process killed mid-save (SIGKILL,
preemption without grace, OOM) leaves that tmp folder behind: `latest_step`
and `restore*` never see it, and it is deleted the next time a manager opens
the directory (`cleanup_tmp_directories`). Steps committed earlier are not
touched, except by `max_to_keep`, which deletes the oldest only after a newer
step has committed. What Orbax cannot see is a committed step damaged later
(a bad disk, a truncated copy, a partial rsync): loading then either fails
or, worse, yields wrong numbers. The checksums in `meta` catch the second
case; `restore_latest_intact` walks back over both, and a later `save` of a
step it skipped first moves the damaged folder aside (`<step>.damaged`, kept
for a person to look at; Orbax ignores the name) and writes the step afresh.

A write that fails (disk full, quota, permissions) fails in the background
thread. It is raised, as a CheckpointSaveError (an OSError naming the
directory, the step and the cause), by the next `save` that writes, or by
`wait`/`close`: at most one checkpoint interval later. The failed step stays
a tmp folder; steps committed before it are untouched.

Checksum (sharding-invariant, exact, cheap): each leaf's raw bits as uint32
words w_i (8/16-bit dtypes widened, 64-bit ones split into two words) give
`(sum_i w_i, sum_i w_i * (2i + 1)) mod 2**32`, i the row-major flat index.
Integer sums modulo 2**32 do not depend on reduction order, so the checksum
is the same on any mesh and any device count (a float sum would not be). Any
single changed word changes the first sum (and, since 2i + 1 is odd, the
second); the index weight catches permuted values. It guards against damage,
not against an adversary. One jitted program computes all leaves at once:
one read of the state in device memory plus a host fetch of 8 bytes per
leaf, at each save and each restore.

Preemption: `install_sigterm_handler` only sets a flag; the train loop polls
`preemption_requested()`, saves with `force=True`, waits and exits. Saving
inside a signal handler would run Orbax and JAX re-entrantly from an
arbitrary point of the loop. On several hosts, the processes must agree on
the step at which they stop (e.g. Orbax's `reached_preemption`, backed by
`jax.distributed`); SIGTERM alone reaches them at different steps.
"""

from collections.abc import Callable, Mapping
import os
import re
import signal
import threading
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKSUM_METHOD = 'u32sum+u32sum(2i+1)'

# Orbax writes a replicated array in slices, one per replica, to spread the
# write over devices. Each slice is a small XLA program compiled per leaf shape:
# for a Swin's hundreds of small leaves that is seconds of compilation at every
# first save and no faster writing. Slicing only arrays of 16 MiB and more
# keeps the parallel write where it pays (measured: a 4-client federated demo
# run on 8 CPU devices, cold compilation cache, 128 s -> 89 s).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 16 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL),
    override=True)


class CorruptCheckpointError(RuntimeError):
  """A committed checkpoint step failed to load or verify."""


class CheckpointSaveError(OSError):
  """A checkpoint step could not be written (errno set when the cause names one)."""


def _reason(e: BaseException, limit: int = 600) -> str:
  """`Type: first line` of an error and of its causes, each cut to about `limit` characters.

  Orbax wraps TensorStore's read errors in an Exception whose message embeds
  the whole TensorStore spec; the cause holds the useful line. A long line
  keeps its head and its tail (the OS error ends TensorStore's messages).
  """
  parts, seen = [], set()
  while e is not None and id(e) not in seen and len(parts) < 3:
    seen.add(id(e))
    line = (str(e).strip().splitlines() or [''])[0]
    line = line.split(' See full TensorStore details')[0]
    if len(line) > limit:
      line = f'{line[:limit // 2]} ... {line[-limit // 2:]}'
    part = f'{type(e).__name__}: {line}'
    if part not in parts:
      parts.append(part)
    e = e.__cause__ or e.__context__
  return ' <- '.join(parts)


def _errno(e: BaseException) -> int | None:
  """The errno of an OSError in e's chain, or TensorStore's `os_error_code='N'`."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    if m := re.search(r"os_error_code='?(\d+)", str(e)):
      return int(m.group(1))
    e = e.__cause__ or e.__context__
  return None


# ---------------------------------------------------------------- checksums


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """u32[2]: plain and index-weighted sums of x's bits, modulo 2**32."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  itemsize = x.dtype.itemsize
  if itemsize >= 4:
    # 64-bit words become a trailing axis of two uint32 words.
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif itemsize in (1, 2):
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * itemsize}')).astype(jnp.uint32)
  else:
    raise TypeError(f'Cannot checksum dtype {x.dtype}.')
  # Flat index from per-axis iotas: stays sharded like `words`, no reshape.
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  weight = index * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32)])


@jax.jit
def _checksums_on_device(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_checksum(x) for x in leaves]


def state_checksums(state: Any) -> dict[str, list[int]]:
  """Checksums of every array leaf of `state` (see the module docstring).

  Args:
    state: a pytree; leaves that are not arrays (Python numbers, None) are
      skipped.

  Returns:
    {jax.tree_util.keystr(path): [sum, weighted_sum]} (ints < 2**32). Blocks
    until computed.
  """
  paths_leaves = [(jax.tree_util.keystr(p), x)
                  for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                  if isinstance(x, (jax.Array, np.ndarray))]
  if not paths_leaves:
    return {}
  sums = jax.device_get(_checksums_on_device([x for _, x in paths_leaves]))
  return {path: [int(s[0]), int(s[1])] for (path, _), s in zip(paths_leaves, sums)}


# ---------------------------------------------------------------- manager


class Checkpointer:
  """Saves and restores (state, data iterator, meta) in one Orbax directory.

  Usage:
    ckpt = Checkpointer(workdir / 'checkpoints', save_every_steps=1000)
    restored = ckpt.restore_latest_intact(abstract_state, train_iter)
    ...
    ckpt.save(step, state, train_iter, {'config': config.to_dict(), ...},
              force=pass_ended or preemption_requested())
    ...
    ckpt.close()
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, save_every_steps: int = 1000,
               async_save: bool = True):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: where step folders live (a path or epath; gs:// works too).
      max_to_keep: committed steps to keep (oldest deleted first); None = all.
      save_every_steps: `save` without `force` writes only steps divisible by
        this.
      async_save: write arrays in a background thread (`save` returns after
        the device-to-host copy); `wait()` blocks until written.
    """
    if isinstance(directory, str) and '://' not in directory:
      directory = os.path.abspath(directory)  # Orbax refuses relative local paths
    self.directory = directory
    self.save_every_steps = save_every_steps
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # The interval is ours (`save`): Orbax's counts from the last
            # save and would always let the first one through.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        ))
    self._pending: int | None = None  # the step being written in the background
    self._failed: CheckpointSaveError | None = None  # a reported write failure
    self._skipped: dict[int, str] = {}  # steps restore_latest_intact skipped -> why

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: Mapping[str, Any],
           force: bool = False) -> bool:
    """Starts saving one step unless the interval says not to.

    Blocks for the checksums and the device-to-host copy; the disk write
    runs in the background when async.

    Args:
      step: the step number (the folder name).
      state: pytree of jax.Arrays (any sharding). It may be donated to the
        next train step once this returns.
      data_iterator: the Grain iterator (its state is captured now), or None.
      meta: JSON-serialisable dict (config, pass counters, ...).
      force: save even off the interval (pass end, preemption).

    Returns:
      Whether a save was started: False off the interval, or if `step` is
      already committed. A committed step that `restore_latest_intact` skipped
      as damaged is moved aside to `<step>.damaged` and written afresh.

    Raises:
      CheckpointSaveError: the previous save's background write failed, or
        this one could not start (names the directory, step and cause).
    """
    step = int(step)
    if not force and step % self.save_every_steps:
      return False
    exists = step in self._manager.all_steps()
    if exists and step not in self._skipped:
      return False
    self._finish_pending()
    if exists:  # and damaged: restore_latest_intact skipped it
      self._set_aside(step)
    record = {'step': step, 'meta': dict(meta), 'checksum_method': CHECKSUM_METHOD,
              'checksums': state_checksums(state)}
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(record)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:  # e.g. no space for the tmp folder or its metadata
      self._failed = self._save_error(step, e)
      raise self._failed from e
    self._pending = step if started else None
    return started

  def _finish_pending(self):
    """Waits for the background write; a failure becomes one CheckpointSaveError."""
    if self._failed is not None:
      raise CheckpointSaveError(
          f'{self._failed} No further checkpoint is written by this Checkpointer.')
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._failed = self._save_error(self._pending, e)
      raise self._failed from e
    finally:
      self._pending = None

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    committed = [s for s in self.all_steps() if s != step]
    message = (f'Checkpoint step {step} could not be written to {self.directory}: {_reason(e)}. '
               f'The committed steps {committed} are untouched; a restart resumes from the '
               'newest of them.')
    code = _errno(e)
    return CheckpointSaveError(code, message) if code else CheckpointSaveError(message)

  def _set_aside(self, step: int):
    """Renames a damaged committed step to `<step>.damaged[.N]` (one process renames)."""
    source = epath.Path(self.directory) / str(step)
    target, n = source.parent / f'{step}.damaged', 1
    while target.exists():
      target, n = source.parent / f'{step}.damaged.{n}', n + 1
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'Checkpointer.set_aside.{step}')
    self._manager.reload()
    logging.warning('Checkpoint step %d in %s did not restore (%s); moved it to %s and writing '
                    'step %d afresh.', step, self.directory, self._skipped.pop(step), target, step)

  def latest_step(self) -> int | None:
    """The newest committed step (tmp folders of unfinished saves ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The `meta` dict saved with a step, without reading arrays.

    Cheap: lets a caller check that a checkpoint fits the config (datasets,
    heads, model) before building and compiling anything.

    Args:
      step: a committed step, or None for the newest whose meta reads (a
        damaged newest step is logged and passed over, as
        `restore_latest_intact` will).

    Raises:
      FileNotFoundError: no committed step.
      CorruptCheckpointError: step None and no step's meta reads.
    """
    if step is not None:
      return self._read_meta(step)
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'No committed checkpoint in {self.directory}.')
    last_error = None
    for s in reversed(steps):
      try:
        return self._read_meta(s)
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning('Checkpoint step %d in %s: its meta does not read: %s', s, self.directory,
                        _reason(e))
        last_error = e
    raise CorruptCheckpointError(
        f'No meta of the checkpoint steps {steps} in {self.directory} reads.') from last_error

  def _read_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']['meta']

  def restore_field(self, step: int, field: str, abstract_subtree: Any) -> Any:
    """One field of a saved state object (e.g. a TrainState's 'ema_params'), verified.

    For starting another run from this one's weights (config.init.from_checkpoint):
    the optimizer state, which may have another structure, is not read.

    Args:
      step: a committed step.
      field: the attribute name of the saved state's field.
      abstract_subtree: ShapeDtypeStructs (with target shardings) of that field.

    Raises:
      CorruptCheckpointError: a leaf's checksum differs from the saved one.
    """
    manager = ocp.CheckpointManager(self.directory)  # fresh: a PyTree handler for 'state'
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore({field: abstract_subtree}, partial_restore=True),
          meta=ocp.args.JsonRestore()))
    finally:
      manager.close()
    subtree, record = restored['state'][field], restored['meta']
    expected = record.get('checksums') or {}
    for leaf, value in state_checksums(subtree).items():
      saved = expected.get(f'.{field}{leaf}')
      if saved is not None and saved != value:
        raise CorruptCheckpointError(
            f'Checkpoint step {step}: leaf .{field}{leaf} checksum {value} != saved {saved} '
            f'({CHECKSUM_METHOD}).')
    return subtree

  def restore(self, step: int | None, abstract_state: Any,
              data_iterator: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores one step onto the shardings `abstract_state` carries.

    Args:
      step: the step, or None for the newest.
      abstract_state: pytree of jax.ShapeDtypeStruct with the TARGET
        shardings (any mesh: Orbax reshards on read), e.g. from
        jax.eval_shape of the init plus the run's shardings.
      data_iterator: a Grain iterator set to the saved position in place;
        None leaves the data item unread.

    Returns:
      (state, meta) with meta the dict given to `save`.

    Raises:
      FileNotFoundError: no committed step.
      CorruptCheckpointError: a leaf's checksum differs (names step, leaf).
      Whatever Orbax raises when the files cannot be read or do not match
        `abstract_state`.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No committed checkpoint in {self.directory}.')
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    record = restored['meta']
    _verify(step, restored['state'], record)
    return restored['state'], record['meta']

  def restore_latest_intact(self, abstract_state: Any,
                            data_iterator: Any | None = None) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest step that loads and verifies, walking back.

    Each skipped step is logged (warning) with the reason, and remembered:
    `save` moves it aside when the run reaches that step again.

    Args:
      abstract_state: as for `restore`.
      data_iterator: as for `restore`; left at the restored step's position.

    Returns:
      (step, state, meta), or None when the directory has no committed step.

    Raises:
      CorruptCheckpointError: steps exist but none restores. Starting from
        scratch instead would quietly throw the run away (and `max_to_keep`
        would soon delete the evidence); a person should look. The last
        failure is chained.
    """
    steps = self.all_steps()
    last_error = None
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-exception-caught
        reason = _reason(e)
        logging.warning('Skipping checkpoint step %d in %s: %s', step, self.directory, reason)
        self._skipped[step] = reason
        last_error = e
        continue
      return step, state, meta
    if steps:
      raise CorruptCheckpointError(
          f'None of the checkpoint steps {steps} in {self.directory} restores.') from last_error
    return None

  def wait(self):
    """Blocks until pending saves are written and committed.

    Raises:
      CheckpointSaveError: a background write failed.
    """
    self._finish_pending()

  def close(self):
    """Waits for pending saves, then releases the manager.

    Raises:
      CheckpointSaveError: a background write failed (unless already raised:
        closing after a reported failure, e.g. in a `finally`, is quiet).
    """
    try:
      if self._failed is None:
        self._finish_pending()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if self._failed is None:
          raise
        # Orbax raises the failed write again; it is reported already.

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info):
    self.close()


def _verify(step: int, state: Any, record: Mapping[str, Any]):
  """Raises CorruptCheckpointError unless `state` matches the saved checksums."""
  expected = record.get('checksums')
  if expected is None or record.get('checksum_method') != CHECKSUM_METHOD:
    logging.warning('Checkpoint step %d has no %s checksums; not verified.', step, CHECKSUM_METHOD)
    return
  actual = state_checksums(state)
  for leaf in sorted(set(expected) | set(actual)):
    if expected.get(leaf) != actual.get(leaf):
      raise CorruptCheckpointError(
          f'Checkpoint step {step}: leaf {leaf} checksum {actual.get(leaf)} != saved '
          f'{expected.get(leaf)} ({CHECKSUM_METHOD}).')


# ---------------------------------------------------------------- preemption

_preemption = threading.Event()


def install_sigterm_handler(callback: Callable[[int], None] | None = None):
  """On SIGTERM, sets the flag `preemption_requested()` reads (main thread only).

  The handler does nothing else but call `callback(signum)` when given (keep
  it tiny: it runs between two bytecodes of whatever the loop is doing).

  Args:
    callback: optional, e.g. to log the signal.

  Returns:
    The previous handler, for signal.signal(signal.SIGTERM, previous).
  """
  def handler(signum, frame):
    del frame
    _preemption.set()
    if callback is not None:
      callback(signum)

  return signal.signal(signal.SIGTERM, handler)


def preemption_requested() -> bool:
  """Whether SIGTERM arrived since install (or the last clear)."""
  return _preemption.is_set()


def clear_preemption_request():
  """Resets the flag (tests; a loop that handled one and goes on)."""
  _preemption.clear()
