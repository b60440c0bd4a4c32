"""Grain input pipeline: prepared TFDS datasets -> host batches for the trainer.

Per dataset: ArrayRecord source (the image decoded from PNG on read) -> label
policy (labels.py) -> seeded shuffle, reshuffled every pass. Then one of two
schedules:

  'cyclic'  The reference's loop (ARK_SPEC.md section 3; section 9, pitfall 7):
            an epoch is one whole pass over each dataset in config order,
            batches never mix datasets, and every pass ends with its own,
            possibly short, batch.
  'mixed'   A weighted interleave (the reference's Concurrent ablation): every
            batch mixes the datasets; weights default to the dataset sizes.

Host batch (DESIGN.md section 1), B = the per-process batch, M = Cmax (the
largest label set of config.datasets):
  image       u8[B, R, R]
  labels      f32[B, M]    targets after the label policy, 0 where padded
  label_mask  f32[B, M]    1 where the loss counts: not a padded class, not an
                           'ignore'd label, not a padding row
  dataset_id  i32[B]       the head of each row (config order)
  valid       bool[B]      False on padding rows (see below)
  index       i32[B]       the example's index in its split, -1 on padding
  pass_index  i32[B]       cyclic: epoch * D + d, the pass the batch belongs to
                           (the EMA momentum index); mixed: 0
  pass_end    bool[B]      cyclic: True on the last batch of a pass, the moment
                           the reference updates the EMA teacher; mixed: False
Evaluation batches add sex i32[B] (0 unknown, 1 male, 2 female) and age f32[B]
(NaN unknown) for subgroup metrics.

Static shapes. The last batch of a pass holds fewer examples than a batch; rather
than drop them (the reference keeps them: drop_last=False) or compile a second
program, it is padded to B with rows that have valid=False and label_mask 0
(an all-zero image). The trainer weights every per-example term by them: the
task loss by label_mask, the consistency loss by valid, and averages over the
real rows only, so a short batch means what the reference's short batch means.
Evaluation pads its last batch the same way; scoring only valid rows counts
every example exactly once.

Multi-host. Process i of n reads only its rows: the per-process batch b is the
global batch / n, and process i holds rows [i*b, (i+1)*b) of every global batch,
the layout `jax.make_array_from_process_local_data` expects. In the cyclic
schedule every process takes the same number of steps per pass (passes are
padded to whole global batches), so pass_end arrives on the same step
everywhere.

Damaged data. `prepare` checks every image before storing it; what is read
back can still be damaged on disk. A shard holding fewer records than
dataset_info.json counts fails when the source opens (sources.py); a corrupt
chunk, a stored image that is not a PNG or not R x R fails when read: each
raises BadRecordError naming the dataset, split and record index (and the shard
or example id), instead of an error deep in batching or training.

Resume. Batches are elements of a Grain MapDataset, a pure function of their
position, so `get_state()` / `set_state()` (or grain.checkpoint with Orbax)
resume exactly, with or without mp_prefetch workers; workers read whole
batches, so the batch order does not depend on the number of workers.
"""

import bisect
import dataclasses
import math
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from input_pipeline import datasets
from input_pipeline import labels as labels_lib
from input_pipeline import sources

SCHEDULES = ('cyclic', 'mixed')
# The split readers live in sources.py; these names are the pipeline's API too.
open_source = sources.open_source
decode_png = sources.decode_png
BadRecordError = sources.BadRecordError
_SEX_CODES = {b'M': 1, b'F': 2, 'M': 1, 'F': 2}


# ------------------------------------------------------------------------------
# Per-example rows (the split sources are in sources.py).
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToExample:
  """Raw TFDS example -> one row of a host batch (a picklable Grain map)."""
  dataset_id: int
  policy: labels_lib.LabelPolicy
  num_classes_max: int
  seed: int  # the dataset's LSR seed
  with_metadata: bool = False
  where: str = ''  # 'dataset/split', for error messages
  image_size: int | None = None  # R: a stored image of another shape is an error

  def __call__(self, index: int, ex: dict[str, Any]) -> dict[str, Any]:
    image = self._image(index, ex)  # first: it also catches an empty record
    labels, mask = labels_lib.apply_policy(ex['labels_raw'], self.policy, self.num_classes_max,
                                           seed=self.seed, index_N=index)
    out = {'image': image, 'labels': labels, 'label_mask': mask,
           'dataset_id': np.int32(self.dataset_id), 'valid': np.bool_(True),
           'index': np.int32(index)}
    if self.with_metadata:
      out['sex'] = np.int32(_SEX_CODES.get(ex.get('sex', b''), 0))
      out['age'] = np.float32(ex.get('age', np.nan))
    return out

  def _image(self, index: int, ex: dict[str, Any]) -> np.ndarray:
    """The decoded image; a bad one raises here, naming its record, not in the batcher."""
    if ex['image'] is None:
      # What TFDS reads from a truncated ArrayRecord shard: every feature None.
      raise self._bad_record(index, ex, 'empty record (a truncated or damaged ArrayRecord '
                             'shard?)')
    try:
      image = decode_png(ex['image'])
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow raises on bad bytes
      raise self._bad_record(index, ex, f'stored image is not a readable PNG ({e})') from e
    size = self.image_size
    if size is not None and image.shape != (size, size):
      raise self._bad_record(index, ex, f'stored image has shape {image.shape}, expected '
                             f'({size}, {size})')
    return image

  def _bad_record(self, index: int, ex: dict[str, Any], reason: str) -> BadRecordError:
    image_id = ex.get('id')
    image_id = image_id.decode(errors='replace') if isinstance(image_id, bytes) else image_id
    named = f' (id {image_id!r})' if image_id else ''
    return BadRecordError(f'{self.where or "dataset"} record {index}{named}: {reason}. The '
                          'prepared files are damaged: prepare the dataset again with '
                          '--overwrite.')


def _padding_row(dataset_id: int, image_size: int, num_classes_max: int,
                 with_metadata: bool) -> dict[str, Any]:
  row = {'image': np.zeros((image_size, image_size), np.uint8),
         'labels': np.zeros((num_classes_max,), np.float32),
         'label_mask': np.zeros((num_classes_max,), np.float32),
         'dataset_id': np.int32(dataset_id), 'valid': np.bool_(False), 'index': np.int32(-1)}
  if with_metadata:
    row.update(sex=np.int32(0), age=np.float32(np.nan))
  return row


# ------------------------------------------------------------------------------
# Grain MapDatasets: pure functions of the position, so state is one integer.
# ------------------------------------------------------------------------------


class EpochShuffle(grain.MapDataset):
  """Element e*N + j is example perm_e[j]: a fresh permutation every pass.

  Grain's own shuffle (a Feistel index shuffle) costs milliseconds per element
  on datasets of under a few hundred examples (Shenzhen-sized and the tests'),
  so each pass draws a numpy permutation from (seed, epoch) instead, cached
  per reading process (8 bytes per example).
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._perms = {}

  def __getstate__(self):
    return {**self.__dict__, '_perms': {}}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'EpochShuffle(seed={self._seed})'

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
      # Keep two: threads may still be reading the end of the previous pass.
      self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(index, len(self._parent))
    return self._parent[int(self._perm(epoch)[j])]


class Subset(grain.MapDataset):
  """Element j is the parent's element indices[j] (few-shot training sets)."""

  def __init__(self, parent: grain.MapDataset, indices):
    super().__init__(parent)
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __str__(self) -> str:
    return f'Subset({len(self._indices)} of {len(self._parent)})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[int(self._indices[index])]


class PassSchedule(grain.MapDataset):
  """The cyclic stream: whole passes over each dataset in turn, padded.

  Position k: epoch e, dataset d, position j in the pass. A pass holds
  ceil(N_d / B) global batches; positions j >= N_d are padding rows. Every
  row carries pass_index = e*D + d and pass_end (its batch ends the pass).
  """

  def __init__(self, parents, sizes, *, global_batch_size: int, padding_rows,
               num_epochs: int | None):
    """Builds the schedule.

    Args:
      parents: per dataset, a MapDataset whose elements [e*N, (e+1)*N) are pass
        e (an EpochShuffle, or the unshuffled examples for one pass).
      sizes: N per dataset, the examples in one pass.
      global_batch_size: B over all processes.
      padding_rows: per dataset, the row that pads its last batch.
      num_epochs: how many epochs the stream holds; None = unbounded.
    """
    super().__init__(parents)
    self._sizes = list(sizes)
    self._batch = global_batch_size
    self._steps = [max(1, math.ceil(n / global_batch_size)) for n in self._sizes]
    self._offsets = np.cumsum([0] + [s * global_batch_size for s in self._steps]).tolist()
    self._padding_rows = padding_rows
    self._length = sys.maxsize if num_epochs is None else num_epochs * self._offsets[-1]

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f'PassSchedule(sizes={self._sizes}, steps={self._steps})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, k = divmod(index, self._offsets[-1])
    d = bisect.bisect_right(self._offsets, k) - 1
    j = k - self._offsets[d]
    if j < self._sizes[d]:
      ex = dict(self._parents[d][epoch * self._sizes[d] + j])
    else:
      ex = dict(self._padding_rows[d])
    ex['pass_index'] = np.int32(epoch * len(self._sizes) + d)
    ex['pass_end'] = np.bool_(j // self._batch == self._steps[d] - 1)
    return ex


class ProcessRows(grain.MapDataset):
  """This process's rows of a global stream: rows [i*b, (i+1)*b) of each batch.

  The layout `jax.make_array_from_process_local_data` assembles, with b = B/n.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch_size: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch_size % process_count:
      raise ValueError(f'Global batch {global_batch_size} is not divisible by the '
                       f'{process_count} processes.')
    self._global_batch = global_batch_size
    self._local_batch = global_batch_size // process_count
    self._offset = process_index * self._local_batch
    steps = len(parent) // global_batch_size  # whole global batches only
    self._length = sys.maxsize if len(parent) == sys.maxsize else steps * self._local_batch

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f'ProcessRows(rows {self._offset}+{self._local_batch} of {self._global_batch})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local_batch)
    return self._parent[step * self._global_batch + self._offset + row]


# ------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------


def num_classes_max(config_data: ml_collections.ConfigDict) -> int:
  """M, the width of labels: the largest label set among the datasets."""
  return max(datasets.metadata(n, config_data.get('data_dir')).num_classes
             for n in config_data.datasets)


def dataset_sizes(config_data: ml_collections.ConfigDict, split: str = 'train') -> list[int]:
  """Examples per dataset in `split`, in config order."""
  return [len(open_source(n, split, config_data.get('data_dir'), config_data.image_size))
          for n in config_data.datasets]


def steps_per_epoch(config_data: ml_collections.ConfigDict, global_batch_size: int) -> int:
  """Steps in one epoch: one pass over every dataset (cyclic: short batches count)."""
  sizes = dataset_sizes(config_data)
  if config_data.get('schedule', 'cyclic') == 'cyclic':
    return sum(max(1, math.ceil(n / global_batch_size)) for n in sizes)
  return math.ceil(sum(sizes) / global_batch_size)


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _examples(config_data, name: str, split: str, seed: int, num_classes: int, *,
              with_metadata: bool = False) -> grain.MapDataset:
  """The host-batch rows of one split, unshuffled: element i is example i."""
  d = list(config_data.datasets).index(name)
  source = open_source(name, split, config_data.get('data_dir'), config_data.image_size,
                       decode_images=False)
  policy = labels_lib.policy_for(name, config_data.get('label_policies') or {})
  where = f'{name}/{split}'
  to_example = ToExample(d, policy, num_classes, labels_lib.dataset_seed(seed, name),
                         with_metadata, where=where, image_size=config_data.image_size)
  return grain.MapDataset.source(sources.NamedSource(source, where)).map_with_index(to_example)


def to_iterator(batches: grain.MapDataset, config_data, start: int = 0) -> grain.DatasetIterator:
  """Reads batches ahead in threads, and in worker processes if configured.

  The elements are whole batches, so workers (each reading every n-th batch)
  give the same batch order as reading here. `start`: the first batch to read
  (batches are a pure function of their position: resuming is slicing).
  """
  threads = config_data.get('read_threads', 2)
  ds = batches[start:].to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=2 * threads))
  workers = config_data.get('num_workers', 0)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2))
  return iter(ds)


def train_batches(config_data: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_epochs: int | None = None, subsets=None) -> grain.MapDataset:
  """The training batches as a Grain MapDataset (see train_iterator)."""
  process_index, process_count = _process(process_index, process_count)
  schedule = config_data.get('schedule', 'cyclic')
  if schedule not in SCHEDULES:
    raise ValueError(f'Unknown schedule {schedule!r}; known: {SCHEDULES}.')
  width = num_classes_max(config_data)
  names = list(config_data.datasets)
  examples = [_examples(config_data, n, 'train', seed, width) for n in names]
  subsets = subsets or {}
  if unknown := set(subsets) - set(names):
    raise ValueError(f'subsets names {sorted(unknown)}, which are not among {names}.')
  # A subset keeps each example's split index (the LSR draws are per example).
  examples = [Subset(ds, subsets[n]) if n in subsets else ds for ds, n in zip(examples, names)]
  sizes = [len(ds) for ds in examples]
  # Far-apart seeds per dataset: no two (dataset, epoch) passes share an order.
  shuffled = [EpochShuffle(ds, labels_lib.dataset_seed(seed, n)) for ds, n in zip(examples, names)]
  if schedule == 'cyclic':
    padding = [_padding_row(d, config_data.image_size, width, False) for d in range(len(names))]
    stream = PassSchedule(shuffled, sizes, global_batch_size=global_batch_size,
                          padding_rows=padding, num_epochs=num_epochs)
  else:
    weights = config_data.get('weights') or sizes
    if len(weights) != len(sizes):
      raise ValueError(f'{len(weights)} mixing weights for {len(sizes)} datasets.')
    stream = grain.MapDataset.mix(shuffled, [float(w) for w in weights]).map(_MixedPassInfo())
    if num_epochs is not None:
      stream = stream[:num_epochs * sum(sizes)]
  rows = ProcessRows(stream, global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count)
  return rows.batch(global_batch_size // process_count, drop_remainder=True)


def train_iterator(config_data: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_epochs: int | None = None, subsets=None) -> grain.DatasetIterator:
  """The training stream of host batches (see the module docstring).

  Args:
    config_data: the config's `data` section: `datasets` (names in head
      order), `data_dir`, `image_size` (R), `schedule` ('cyclic' | 'mixed'),
      optional `weights` (mixed; default the dataset sizes), `label_policies`
      (name -> policy, see labels.policy_for), `num_workers` (mp_prefetch
      processes, 0 = read in this process), `read_threads`.
    global_batch_size: B over all processes; divisible by the process count.
    seed: the run's seed: shuffles and LSR draws derive from it.
    process_index: this process (default jax.process_index()).
    process_count: how many processes read (default jax.process_count()).
    num_epochs: stop after this many epochs; None = never. (Mixed: an epoch
      is as many examples as all datasets hold.)
    subsets: optional {dataset name: indices into its train split}: train on
      those examples only (few-shot fine-tuning); a pass is then one pass over
      the subset.

  Returns:
    A Grain iterator of per-process batches (global batch / process count
    rows) with get_state() / set_state(); close() it when done.
  """
  return to_iterator(train_batches(config_data, global_batch_size, seed, process_index,
                                    process_count, num_epochs, subsets), config_data)


@dataclasses.dataclass(frozen=True)
class _MixedPassInfo:
  """Mixed batches carry the pass fields too, so both schedules look alike."""

  def __call__(self, ex):
    return {**ex, 'pass_index': np.int32(0), 'pass_end': np.bool_(False)}


def eval_iterator(config_data: ml_collections.ConfigDict, dataset_name: str, split: str,
                  batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
  """One ordered pass over a split, the last batch padded (valid=False rows).

  Args:
    config_data: the config's `data` section (as for train_iterator); label
      widths and dataset ids follow config_data.datasets.
    dataset_name: one of config_data.datasets.
    split: 'validation', 'test', ...
    batch_size: the global evaluation batch; divisible by the process count.
    process_index: this process (default jax.process_index()).
    process_count: how many processes read (default jax.process_count()).

  Returns:
    A finite Grain iterator of per-process batches, with `sex` and `age`
    added; pass_end is True on the last batch.
  """
  process_index, process_count = _process(process_index, process_count)
  width = num_classes_max(config_data)
  # A fixed seed: LSR draws (if a policy asks for them) must not vary by run.
  examples = _examples(config_data, dataset_name, split, 0, width, with_metadata=True)
  d = list(config_data.datasets).index(dataset_name)
  padding = _padding_row(d, config_data.image_size, width, True)
  # One unshuffled pass of one dataset: the cyclic layout.
  stream = PassSchedule([examples], [len(examples)], global_batch_size=batch_size,
                        padding_rows=[padding], num_epochs=1)
  rows = ProcessRows(stream, global_batch_size=batch_size, process_index=process_index,
                     process_count=process_count)
  return to_iterator(rows.batch(batch_size // process_count), config_data)
