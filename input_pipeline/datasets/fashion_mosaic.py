"""Demo datasets: real Fashion-MNIST items composed into 2x2 mosaics.

The default that runs offline after install (DESIGN.md section 4, decision 10).
Each 56x56 mosaic is a 2x2 grid of 28x28 tiles, each tile an item or empty,
1-4 items. Four datasets with different label sets, drawn from disjoint image
pools, exercise every path of the chest X-ray setting: overlapping label sets,
uncertain and blank labels, BCE and softmax heads:

  demo_multilabel  10 labels, multi-label: which classes are present.
  demo_subset      5 of those classes, multi-label; a seeded quarter of the
                   positives is stored as -1 (uncertain) and a tenth of the
                   negatives as NaN (blank: not mentioned), as in CheXpert.
  demo_binary      1 label: contains a shirt (the hardest class).
  demo_count       3 classes, one-hot: one item, two items, three or four.

Source images: the full 70k Fashion-MNIST from Debian's dataset-fashion-mnist
when installed, else the subset shipped next to this file
(fashion_mnist_subset.npz, see make_demo_subset.py and FASHION_MNIST_LICENSE).
Builders take `source='auto' | 'full' | 'subset'`; tests force 'subset' so that
every machine builds the same data. Generation is seeded: the same source gives
the same datasets, byte for byte.

Pools: Fashion-MNIST train images feed the train splits, its test images the
validation and test splits; each is permuted once and cut into disjoint parts,
one per dataset (and per split for the evaluation images). Within a pool items
are drawn with replacement.
"""

import dataclasses
import gzip
import os

import numpy as np

from input_pipeline import images
from input_pipeline.datasets import base

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
SUBSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'fashion_mnist_subset.npz')
CLASS_NAMES = ('tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
               'sneaker', 'bag', 'ankle_boot')
SHIRT = CLASS_NAMES.index('shirt')
TILE = 28
MOSAIC = 2 * TILE
EMPTY = -1  # tile class / source index of an empty tile
SEED = 20170825  # Fashion-MNIST's release date: any fixed value would do
SPLITS = ('train', 'validation', 'test')
# demo_subset: the share of positives stored as uncertain, of negatives blank.
UNCERTAIN_SHARE = 0.25
BLANK_SHARE = 0.10


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """One demo dataset: its labels and how many mosaics each split holds."""
  name: str
  slot: int  # which disjoint part of the image pools it draws from
  label_names: tuple[str, ...]
  task: str  # 'multilabel' | 'multiclass' | 'binary'
  # Probabilities of 1, 2, 3, 4 items in a mosaic.
  item_probs: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
  # Mosaics per split (train, validation, test) from the subset / full set.
  subset_sizes: tuple[int, int, int] = (2000, 300, 300)
  full_sizes: tuple[int, int, int] = (6000, 1000, 1000)


SUBSET_CLASSES = (0, 1, 2, 7, 8)  # t-shirt, trouser, pullover, sneaker, bag
COUNT_NAMES = ('one', 'two', 'three_or_four')
SPECS = {s.name: s for s in (
    DemoSpec('demo_multilabel', 0, CLASS_NAMES, 'multilabel'),
    DemoSpec('demo_subset', 1, tuple(CLASS_NAMES[c] for c in SUBSET_CLASSES), 'multilabel'),
    DemoSpec('demo_binary', 2, ('shirt',), 'binary'),
    # Balanced buckets: 1/3 one item, 1/3 two, 1/3 three or four.
    DemoSpec('demo_count', 3, COUNT_NAMES, 'multiclass', item_probs=(1 / 3, 1 / 3, 1 / 6, 1 / 6)),
)}


# ------------------------------------------------------------------------------
# Source images.
# ------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (.gz or not): big-endian dims header, then uint8 data."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes (magic {data[:4]!r}).')
  ndim = data[3]
  dims = np.frombuffer(data, dtype='>u4', count=ndim, offset=4).astype(int)
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(directory: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The full set: {'train': (images u8[60000,28,28], labels), 'test': (10000...)}."""
  directory = directory or FASHION_MNIST_DIR
  out = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images = read_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
    out[split] = (images, labels.astype(np.int64))
  return out


def full_set_available(directory: str | None = None) -> bool:
  directory = directory or FASHION_MNIST_DIR
  return all(os.path.exists(os.path.join(directory, f'{p}-{k}-idx{d}-ubyte.gz'))
             for p in ('train', 't10k') for k, d in (('images', 3), ('labels', 1)))


def resolve_source(source: str = 'auto') -> str:
  """'auto' -> 'full' when Debian's package is installed, else 'subset'."""
  if source == 'auto':
    return 'full' if full_set_available() else 'subset'
  if source not in ('full', 'subset'):
    raise ValueError(f"Demo source must be 'auto', 'full' or 'subset', not {source!r}.")
  if source == 'full' and not full_set_available():
    raise FileNotFoundError(
        f'The full Fashion-MNIST is not in {FASHION_MNIST_DIR} (install the Debian package '
        "dataset-fashion-mnist), or use source='subset'.")
  return source


def load_source(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Fashion-MNIST images and labels per original split, full or subset."""
  if resolve_source(source) == 'full':
    return read_fashion_mnist()
  with np.load(SUBSET_PATH) as f:
    return {s: (f[f'{s}_images'], f[f'{s}_labels'].astype(np.int64)) for s in ('train', 'test')}


# ------------------------------------------------------------------------------
# Mosaics and their labels.
# ------------------------------------------------------------------------------


def pool_indices(source_arrays, slot: int, split: str) -> np.ndarray:
  """Indices (into the original split's arrays) of the pool of (slot, split).

  Train splits share the train images, cut into 4 parts; validation and test
  share the test images, cut into 8 parts. Parts never overlap.
  """
  origin = 'train' if split == 'train' else 'test'
  n = len(source_arrays[origin][1])
  perm = np.random.default_rng([SEED, origin == 'test']).permutation(n)
  if split == 'train':
    return np.array_split(perm, len(SPECS))[slot]
  return np.array_split(perm, 2 * len(SPECS))[2 * slot + (split == 'test')]


def compose(images: np.ndarray, pool: np.ndarray, num: int, item_probs, rng: np.random.Generator):
  """Draws `num` mosaics from the images indexed by `pool`.

  Args:
    images: u8[N, 28, 28], all images of the pool's origin split.
    pool: indices into `images` the mosaics may use.
    num: how many mosaics.
    item_probs: probabilities of 1..4 items.
    rng: the generator (the result is a function of its state).

  Returns:
    (mosaics u8[num, 56, 56], tile_source i64[num, 4]): the index into `images`
    shown in each tile (row-major: top-left, top-right, bottom-left,
    bottom-right), or EMPTY.
  """
  num_items = rng.choice(np.arange(1, 5), size=num, p=np.asarray(item_probs))
  # Which tiles hold items: the first k of a random order of the four tiles.
  order = np.argsort(rng.random((num, 4)), axis=1)
  occupied = np.zeros((num, 4), dtype=bool)
  np.put_along_axis(occupied, order, np.arange(4)[None, :] < num_items[:, None], axis=1)
  tile_source = np.where(occupied, pool[rng.integers(0, len(pool), size=(num, 4))], EMPTY)
  tiles = np.where(occupied[:, :, None, None], images[np.maximum(tile_source, 0)], 0)
  mosaics = tiles.reshape(num, 2, 2, TILE, TILE).transpose(0, 1, 3, 2, 4)
  return mosaics.reshape(num, MOSAIC, MOSAIC).astype(np.uint8), tile_source


def labels_raw(name: str, tile_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The stored label vectors f32[num, C] of mosaics with these tile classes.

  Args:
    name: the demo dataset.
    tile_class: i64[num, 4], the class shown in each tile or EMPTY.
    rng: draws demo_subset's uncertain and blank entries.

  Returns:
    float32 [num, C] with 1, 0, -1 (uncertain) and NaN (blank) as stored.
  """
  present = (tile_class[:, :, None] == np.arange(len(CLASS_NAMES))).any(axis=1)
  if name == 'demo_multilabel':
    return present.astype(np.float32)
  if name == 'demo_subset':
    labels = present[:, SUBSET_CLASSES].astype(np.float32)
    draw = rng.random(labels.shape)
    uncertain = (labels == 1) & (draw < UNCERTAIN_SHARE)
    blank = (labels == 0) & (draw < BLANK_SHARE)
    return np.where(uncertain, -1.0, np.where(blank, np.nan, labels)).astype(np.float32)
  if name == 'demo_binary':
    return present[:, [SHIRT]].astype(np.float32)
  if name == 'demo_count':
    bucket = np.minimum((tile_class != EMPTY).sum(axis=1), 3) - 1
    return np.eye(len(COUNT_NAMES), dtype=np.float32)[bucket]
  raise ValueError(f'Unknown demo dataset {name!r}; known: {sorted(SPECS)}.')


def generate_split(name: str, split: str, source: str = 'auto', source_arrays=None) -> dict:
  """All mosaics of one split of one demo dataset, before resizing.

  Args:
    name: a key of SPECS.
    split: 'train' | 'validation' | 'test'.
    source: 'auto' | 'full' | 'subset'.
    source_arrays: the loaded source (from `load_source`), to skip reloading.

  Returns:
    dict with 'mosaic' u8[n,56,56], 'tile_source' i64[n,4] (index into the
    origin split's images, or EMPTY), 'tile_class' i64[n,4], 'labels_raw'
    f32[n,C], 'origin' ('train' or 'test': which Fashion-MNIST split the
    items come from) and 'source' ('full' or 'subset').
  """
  spec = SPECS[name]
  source = resolve_source(source)
  arrays = source_arrays or load_source(source)
  images, classes = arrays['train' if split == 'train' else 'test']
  sizes = spec.subset_sizes if source == 'subset' else spec.full_sizes
  num = sizes[SPLITS.index(split)]
  rng = np.random.default_rng([SEED, spec.slot, SPLITS.index(split)])
  pool = pool_indices(arrays, spec.slot, split)
  mosaic, tile_source = compose(images, pool, num, spec.item_probs, rng)
  tile_class = np.where(tile_source == EMPTY, EMPTY, classes[np.maximum(tile_source, 0)])
  return {'mosaic': mosaic, 'tile_source': tile_source, 'tile_class': tile_class,
          'labels_raw': labels_raw(name, tile_class, rng),
          'origin': 'train' if split == 'train' else 'test', 'source': source}


# ------------------------------------------------------------------------------
# TFDS builders: the chest X-ray builders' features and metadata, no manual_dir.
# ------------------------------------------------------------------------------


class _FashionMosaic(base.CxrBuilder, skip_registration=True):
  """Common body of the four demo builders: generated, not read from files."""

  DEFAULT_BUILDER_CONFIG_NAME = 'r64'
  HOMEPAGE = 'https://github.com/zalandoresearch/fashion-mnist'
  CITATION = ('Xiao, Rasul and Vollgraf, Fashion-MNIST: a novel image dataset for '
              'benchmarking machine learning algorithms, arXiv:1708.07747, 2017.')

  def __init__(self, *, source: str = 'auto', **kwargs):
    """Demo options; the rest goes to base.CxrBuilder.

    Args:
      source: 'auto' (the full Fashion-MNIST when Debian's package is
        installed, else the shipped subset), 'full' or 'subset'.
      **kwargs: data_dir, config ('r<R>'), ...
    """
    self._source = source
    if kwargs.get('num_workers') is None:
      kwargs['num_workers'] = 0  # generating needs no decoding pool
    super().__init__(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    super()._download_and_prepare(dl_manager, download_config)
    self.info.metadata['source'] = resolve_source(self._source)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download, no manual_dir
    self.summary = base.PrepareSummary(self.name, self.image_size, tuple(self.LABEL_NAMES))
    source = resolve_source(self._source)
    self.summary.notes.append(f'Fashion-MNIST source: {source}')
    arrays = load_source(source)
    return {split: self._generate_examples(split=split, source=source, arrays=arrays)
            for split in SPLITS}

  def _generate_examples(self, split: str, source: str = 'auto', arrays=None):  # pylint: disable=arguments-differ
    data = generate_split(self.name, split, source, arrays)
    for i, (mosaic, labels) in enumerate(zip(data['mosaic'], data['labels_raw'])):
      self.summary.add_example(split, labels)
      key = f'{self.name}/{split}/{i:05d}'
      png = images.encode_png(images.resize(mosaic, self.image_size))
      yield key, {'image': png, 'labels_raw': labels, 'id': key, 'sex': '',
                  'age': np.float32(np.nan), 'view': ''}


class DemoMultilabel(_FashionMosaic):
  """Fashion-MNIST mosaics: which of the 10 classes are present (multi-label)."""
  LABEL_NAMES = SPECS['demo_multilabel'].label_names
  TASK = SPECS['demo_multilabel'].task


class DemoSubset(_FashionMosaic):
  """Fashion-MNIST mosaics: 5 classes, with uncertain (-1) and blank (NaN) labels."""
  LABEL_NAMES = SPECS['demo_subset'].label_names
  TASK = SPECS['demo_subset'].task


class DemoBinary(_FashionMosaic):
  """Fashion-MNIST mosaics: contains a shirt (binary)."""
  LABEL_NAMES = SPECS['demo_binary'].label_names
  TASK = SPECS['demo_binary'].task


class DemoCount(_FashionMosaic):
  """Fashion-MNIST mosaics: one, two, or three-or-four items (multi-class)."""
  LABEL_NAMES = SPECS['demo_count'].label_names
  TASK = SPECS['demo_count'].task


# The demo builders by TFDS name (for `prepare`, next to datasets.BUILDERS).
BUILDERS = {cls.name: cls for cls in (DemoMultilabel, DemoSubset, DemoBinary, DemoCount)}
