"""The base of every chest X-ray builder: configs, features, validate-then-decode.

A builder subclass states its label names (in label-vector order), its task,
and one method, `_list_records`, that reads the official label files into
`Record`s per split. This class does the rest, in two phases:

1. Listing (in the main process, no pixels read): the subclass parses the label
   files (bad columns and values raise `LabelFileError` naming file, line and
   column); then every image path is checked to stay inside manual_dir and to
   exist, no image may be in train and in validation or test, no patient (where
   the dataset has patient ids) in train and in test, and no split may be
   empty. A broken dataset fails here in seconds, not hours into decoding.
2. Decoding: a pool of `num_workers` processes reads, resizes and PNG-encodes
   the images (`images.decode_task`); TFDS serialises them into ArrayRecord in
   this process. A bad image stops the build (`BadImageError`), or with
   `skip_bad_images` is logged, counted and left out. Workers are spawned, not
   forked (a fork of a process running JAX or other threads can deadlock), so
   a script that builds must guard its entry point with
   `if __name__ == '__main__':`, as any spawning program must.

Resolution. One BuilderConfig per stored side R, named 'r<R>': 'r224', 'r256',
'r896' (the Ark+ pre-resize) and 'r64' are predeclared, 'r256' the default, and any other
'r<R>' is made on request (`get_builder_config` is overridden), so
`prepare --image_size=512` and `tfds.builder(name, config='r512')` just work.
Each R is a separate prepared dataset under `data_dir/<name>/r<R>/<version>/`.

Features: `image` (R, R, 1) uint8 stored as PNG, `labels_raw` float32 [n]
as found (1, 0, -1 uncertain, NaN blank; multi-class: one-hot), `id` (path
relative to manual_dir), `sex` ('M', 'F', ''), `age` (years, NaN unknown),
`view` ('PA', 'AP', 'LATERAL', ..., ''). The label names, task and image size
are in `info.metadata`, so a reader needs nothing but the prepared folder.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import math
import multiprocessing
import os
import re

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
import tqdm

from input_pipeline import images
from input_pipeline.datasets import label_files
from input_pipeline.datasets import splits

TASKS = ('multilabel', 'multiclass', 'binary')
SPLITS = ('train', 'validation', 'test')
DEFAULT_IMAGE_SIZE = 256  # 896 for the Ark+ 768-px configs (--image_size=896)
_PREDECLARED_SIZES = (896, 256, 224, 64)
_CHUNKSIZE = 8  # images per task sent to a worker: amortises pickling, keeps workers even


class CxrConfig(tfds.core.BuilderConfig):
  """One stored resolution: images resized to image_size × image_size."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f'r{image_size}',
                     description=f'Grey images resized to {image_size}x{image_size} (PIL bicubic).',
                     **kwargs)
    self.image_size = image_size


@functools.cache
def config_for_size(image_size: int) -> CxrConfig:
  """The config of side R; one instance per R (TFDS compares configs by identity)."""
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}')
  return CxrConfig(image_size=image_size)


@dataclasses.dataclass
class Record:
  """One example as listed from the label files, before its image is read."""
  path: str  # relative to manual_dir; also the example's id and key
  labels_raw: np.ndarray  # float32 [n]
  sex: str = ''  # 'M', 'F', '' (DICOM PatientSex fills it when empty)
  age: float = math.nan  # years (DICOM PatientAge fills it when NaN)
  view: str = ''  # (DICOM ViewPosition fills it when empty)
  source: str = ''  # 'label file, line N', for error messages
  patient: str = ''  # patient id where the dataset has one: no patient in train and test


@dataclasses.dataclass
class PrepareSummary:
  """What a build wrote: examples and label counts per split, skipped files."""
  dataset: str
  image_size: int
  label_names: tuple[str, ...]
  examples: dict[str, int] = dataclasses.field(default_factory=dict)
  positives: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  uncertain: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  blank: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  skipped: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def add_example(self, split: str, labels: np.ndarray):
    n = len(self.label_names)
    for counts in (self.positives, self.uncertain, self.blank):
      counts.setdefault(split, np.zeros(n, np.int64))
    self.examples[split] = self.examples.get(split, 0) + 1
    self.positives[split] += labels == 1
    self.uncertain[split] += labels == -1
    self.blank[split] += np.isnan(labels)

  def add_skipped(self, split: str, path: str, reason: str):
    self.skipped.setdefault(split, []).append((path, reason))
    logging.warning('Skipped %s (%s split): %s', path, split, reason)

  def to_json(self) -> dict:
    """The counts, as stored in the prepared dataset's metadata."""
    return {
        'examples': dict(self.examples),
        'skipped': {split: len(v) for split, v in self.skipped.items()},
        'positives': {split: v.tolist() for split, v in self.positives.items()},
        'uncertain': {split: v.tolist() for split, v in self.uncertain.items()},
        'blank': {split: v.tolist() for split, v in self.blank.items()},
        'notes': list(self.notes),
    }

  def format(self) -> str:
    """A human-readable report: sizes, prevalence per label, skipped files."""
    split_names = [s for s in SPLITS if s in self.examples] + sorted(
        s for s in self.examples if s not in SPLITS)
    lines = [f'{self.dataset} at {self.image_size}x{self.image_size}:']
    for split in split_names:
      lines.append(f'  {split:<12}{self.examples[split]:>9} examples'
                   f'{len(self.skipped.get(split, [])):>7} skipped')
    lines.append('  label prevalence, % positive (uncertain, blank where any):')
    lines.append('  ' + ' ' * 30 + ''.join(f'{s:>22}' for s in split_names))
    for k, label in enumerate(self.label_names):
      cells = []
      for split in split_names:
        n = max(self.examples[split], 1)
        cell = f'{100 * self.positives[split][k] / n:.1f}'
        if self.uncertain[split][k] or self.blank[split][k]:
          cell += (f' ({100 * self.uncertain[split][k] / n:.0f},'
                   f' {100 * self.blank[split][k] / n:.0f})')
        cells.append(f'{cell:>22}')
      lines.append(f'  {label[:30]:<30}' + ''.join(cells))
    for split, skipped in self.skipped.items():
      for path, reason in skipped[:20]:
        lines.append(f'  skipped ({split}) {path}: {reason}')
      if len(skipped) > 20:
        lines.append(f'  ... and {len(skipped) - 20} more skipped in {split}')
    lines.extend(f'  note: {note}' for note in self.notes)
    return '\n'.join(lines)


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the chest X-ray builders; subclasses implement `_list_records`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [config_for_size(size) for size in _PREDECLARED_SIZES]
  DEFAULT_BUILDER_CONFIG_NAME = f'r{DEFAULT_IMAGE_SIZE}'
  LABEL_NAMES: tuple[str, ...] = ()  # label-vector order
  TASK: str = 'multilabel'  # 'multilabel' | 'multiclass' | 'binary'
  HOMEPAGE = ''
  CITATION = ''
  # The reference's split lists (ARK_SPEC §4) read with --split_files_dir:
  # split → file name. Empty: the official partition already is the reference's.
  REFERENCE_SPLIT_FILES: dict[str, str] = {}

  def __init__(self, *, num_workers: int | None = None, skip_bad_images: bool = False,
               split_files_dir: str | None = None, progress: bool = False, **kwargs):
    """Build options; everything else goes to tfds.core.GeneratorBasedBuilder.

    Args:
      num_workers: decoding processes; None = os.cpu_count(); 0 decodes in
        this process (debugging, tiny sets).
      skip_bad_images: log, count and leave out unreadable or missing images
        instead of stopping the build.
      split_files_dir: folder with the reference's split lists, to reproduce
        its partition where it differs from the official one.
      progress: show a tqdm bar per split.
      **kwargs: data_dir, config ('r<R>'), file_format, ...
    """
    if not self.LABEL_NAMES or self.TASK not in TASKS:
      raise ValueError(f'{type(self).__name__}: LABEL_NAMES must be set and TASK one of {TASKS}')
    if self.TASK == 'binary' and len(self.LABEL_NAMES) != 1:
      raise ValueError(f'{type(self).__name__}: a binary task has one label')
    self._num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    self._skip_bad_images = skip_bad_images
    self._split_files_dir = split_files_dir
    self._progress = progress
    self._pool = None
    self.summary: PrepareSummary | None = None
    super().__init__(**kwargs)

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig | None:
    """A predeclared config, or 'r<R>' for any other R, made on request."""
    config = super().get_builder_config(name, version)
    match = re.fullmatch(r'r([1-9][0-9]*)', name)
    if config is None and match:
      config = config_for_size(int(match[1]))
    return config

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the importlib_resources backport (not installed)
    # for builders that live in a package; it only wants the module's file.
    return epath.Path(inspect.getfile(cls))

  @property
  def image_size(self) -> int:
    return self.builder_config.image_size

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or '').strip(),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8,
                                         encoding_format='png'),
            'labels_raw': tfds.features.Tensor(shape=(len(self.LABEL_NAMES),), dtype=np.float32),
            'id': tfds.features.Text(),
            'sex': tfds.features.Text(),
            'age': tfds.features.Tensor(shape=(), dtype=np.float32),
            'view': tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
        metadata=tfds.core.MetadataDict(label_names=list(self.LABEL_NAMES), task=self.TASK,
                                        image_size=size),
    )

  def _list_records(self, manual_dir: str) -> dict[str, list[Record]]:
    """Reads the label files: split name → records. Reads no pixels.

    Every builder of files implements it (generated datasets, like the demo's,
    override `_split_generators` instead). Raise `label_files.LabelFileError`
    for anything wrong in a label file; leave image existence and path checks
    to the base class.
    """
    raise TypeError(f'{type(self).__name__} lists no files: it must implement _list_records '
                    'or override _split_generators.')

  def reference_splits(self) -> dict[str, str] | None:
    """Image base name → split from --split_files_dir; None when not given."""
    if not self._split_files_dir:
      return None
    if not self.REFERENCE_SPLIT_FILES:
      self._note(f'--split_files_dir ignored: the official {self.name} partition is the '
                 "reference's")
      return None
    self._note(f'splits from the reference lists in {self._split_files_dir}')
    return splits.read_reference_lists(self._split_files_dir, self.REFERENCE_SPLIT_FILES)

  def _note(self, message: str):
    logging.info('%s: %s', self.name, message)
    if self.summary is not None:
      self.summary.notes.append(message)

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    # One pool for all splits; its workers start with the first image.
    with contextlib.ExitStack() as stack:
      if self._num_workers > 0:
        self._pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
            self._num_workers, mp_context=multiprocessing.get_context('spawn')))
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._pool = None
    # Written to metadata.json with the rest of the info, after this returns.
    self.info.metadata['prepare_summary'] = self.summary.to_json()

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    self.summary = PrepareSummary(self.name, self.image_size, tuple(self.LABEL_NAMES))
    records = self._check_records(manual_dir, self._list_records(manual_dir))
    return {split: self._generate_examples(split=split, manual_dir=manual_dir, records=recs)
            for split, recs in records.items()}

  def _check_records(self, manual_dir: str,
                     records: dict[str, list[Record]]) -> dict[str, list[Record]]:
    """Paths inside manual_dir, files present, ids unique, no leakage, no split empty."""
    checked, missing, real_dirs = {}, [], {}
    for split, recs in records.items():
      seen, kept = {}, []
      for record in recs:
        try:
          path = images.resolve(manual_dir, record.path, real_dirs)
        except images.BadImageError as e:
          raise images.BadImageError(e.path, f'{e.reason} (listed in {record.source})') from None
        if record.path in seen:
          raise label_files.DatasetError(
              f'{record.path} is listed twice for split {split!r}: {seen[record.path]} and '
              f'{record.source}')
        seen[record.path] = record.source
        if not os.path.isfile(path):
          missing.append((split, record))
          continue
        kept.append(record)
      checked[split] = kept
    if missing:
      self._missing(manual_dir, missing)
    self._check_leakage(checked)
    for split in SPLITS:
      if not checked.get(split):
        raise label_files.DatasetError(
            f'{self.name}: the {split!r} split has no images (splits found: '
            f'{ {s: len(r) for s, r in checked.items()} }); check the label files and '
            f'layout under {manual_dir}:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return checked

  def _check_leakage(self, checked: dict[str, list[Record]]):
    """No image in train and an evaluation split; no patient in train and test.

    Validation and test may share images (CheXpert's and VinDr's reference
    evaluation uses one set as both). A patient in train and validation is
    noted, not refused: it inflates validation scores only, and the
    reference's own validation lists may hold such patients.

    Raises:
      DatasetError: naming the shared image or patient ids and the splits.
    """
    train = {r.path: r for r in checked.get('train', [])}
    train_patients = {}
    for record in train.values():
      if record.patient:
        train_patients.setdefault(record.patient, record)
    for split in ('validation', 'test'):
      shared = [(train[r.path], r) for r in checked.get(split, []) if r.path in train]
      if shared:
        raise label_files.DatasetError(
            f'{self.name}: {len(shared)} image(s) in both train and {split}: '
            + _shown(f'{a.path} ({a.source}; {b.source})' for a, b in shared)
            + '. An image may be in one of them only.')
      leaked, seen = [], set()
      for record in checked.get(split, []):
        if record.patient in train_patients and record.patient not in seen:
          seen.add(record.patient)
          leaked.append((train_patients[record.patient], record))
      if not leaked:
        continue
      if split == 'validation':
        self._note(f'{len(leaked)} patient(s) have images in both train and validation '
                   f'(e.g. {leaked[0][0].patient})')
        continue
      raise label_files.DatasetError(
          f'{self.name}: patient leakage: {len(leaked)} patient(s) have images in both train '
          'and test: ' + _shown(f'{a.patient} (train: {a.path}, {a.source}; test: {b.path}, '
                                f'{b.source})' for a, b in leaked)
          + '. A test score is only meaningful on unseen patients: fix the split lists.')

  def _missing(self, manual_dir: str, missing: list[tuple[str, Record]]):
    if self._skip_bad_images:
      for split, record in missing:
        self.summary.add_skipped(split, record.path, f'missing (listed in {record.source})')
      return
    shown = '; '.join(f'{r.path} (listed in {r.source})' for _, r in missing[:5])
    more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
    raise images.BadImageError(
        missing[0][1].path,
        f'{len(missing)} listed image(s) not found under {manual_dir}: {shown}{more}. '
        'Pass --skip_bad_images to prepare without them.')

  def _generate_examples(self, split: str, manual_dir: str, records: list[Record]):
    tasks = ((i, os.path.join(manual_dir, r.path), self.image_size)
             for i, r in enumerate(records))
    if self._pool is None:
      results = map(images.decode_task, tasks)
    else:
      results = _decode_in_pool(self._pool, tasks, window=4 * self._num_workers)
    bar = tqdm.tqdm(results, total=len(records), desc=f'{self.name} {split}', unit=' img',
                    disable=not self._progress, smoothing=0.05)
    for index, png, tags, reason in bar:
      record = records[index]
      if png is None:
        if not self._skip_bad_images:
          raise images.BadImageError(
              record.path, f'{reason} (listed in {record.source}). '
              'Pass --skip_bad_images to prepare without such files.')
        self.summary.add_skipped(split, record.path, reason)
        continue
      self.summary.add_example(split, record.labels_raw)
      yield record.path, self._example(record, png, tags)

  def _example(self, record: Record, png: bytes, tags: images.DicomTags) -> dict:
    # The label files win; DICOM tags fill what they leave blank.
    age = record.age
    if math.isnan(age):
      age = label_files.parse_age(tags.age)
    return {
        'image': png,
        'labels_raw': np.asarray(record.labels_raw, np.float32),
        'id': record.path,
        'sex': record.sex or label_files.parse_sex(tags.sex),
        'age': np.float32(age),
        'view': record.view or tags.view.strip().upper(),
    }


def _shown(items, limit: int = 5) -> str:
  """The first `limit` items joined with '; ', and how many more."""
  items = list(items)
  more = f'; and {len(items) - limit} more' if len(items) > limit else ''
  return '; '.join(items[:limit]) + more


def _decode_in_pool(pool: concurrent.futures.Executor, tasks, window: int):
  """`images.decode_task` over `tasks` in `pool`, yielding results as they finish.

  At most `window` chunks are in flight, so decoded images never pile up in
  memory when writing is the slower side.
  """
  pending = set()

  def drain_one():
    nonlocal pending
    done, pending = concurrent.futures.wait(pending, return_when='FIRST_COMPLETED')
    for future in done:
      try:
        yield from future.result()
      except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(
            'A decoding worker process died. Workers are spawned, so a script that prepares '
            "a dataset must guard its entry point with `if __name__ == '__main__':` (or pass "
            'num_workers=0).') from e

  chunk = []
  for task in tasks:
    chunk.append(task)
    if len(chunk) == _CHUNKSIZE:
      pending.add(pool.submit(images.decode_chunk, chunk))
      chunk = []
      if len(pending) >= window:
        yield from drain_one()
  if chunk:
    pending.add(pool.submit(images.decode_chunk, chunk))
  while pending:
    yield from drain_one()
