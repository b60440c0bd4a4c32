"""The demo datasets: mosaics, labels, disjoint pools, prepared TFDS data, config.

Everything is built from the subset shipped in the repository (source='subset'),
so the test sees the same data on every machine.
"""

import gzip
import os

import numpy as np
import pytest

from configs import demo
from input_pipeline import images
from input_pipeline import pipeline
from input_pipeline import prepare
from input_pipeline.datasets import fashion_mosaic as fm
import input_pipeline.datasets

R = 64


@pytest.fixture(scope='module')
def source():
  return fm.load_source('subset')


@pytest.fixture(scope='module')
def generated(source):
  return {(name, split): fm.generate_split(name, split, 'subset', source)
          for name in fm.SPECS for split in fm.SPLITS}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The four demo datasets at R=64, prepared once through prepare.prepare()."""
  path = str(tmp_path_factory.mktemp('demo_data'))
  for cls in fm.BUILDERS.values():
    builder = cls(data_dir=path, config=f'r{R}', file_format='array_record', source='subset')
    prepare.prepare(builder, manual_dir=None)
  return path


def test_shipped_subset_is_small_and_balanced(source):
  assert os.path.getsize(fm.SUBSET_PATH) < 5e6
  assert os.path.exists(os.path.join(os.path.dirname(fm.SUBSET_PATH), 'FASHION_MNIST_LICENSE'))
  for split, per_class in (('train', 600), ('test', 200)):
    images_, labels_ = source[split]
    assert images_.shape == (10 * per_class, 28, 28) and images_.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels_), per_class)
    assert images_.mean() > 50  # real pictures, not blanks


def test_read_idx(tmp_path):
  data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  header = bytes([0, 0, 8, 3]) + np.array(data.shape, '>u4').tobytes()
  path = str(tmp_path / 'x-idx3-ubyte.gz')
  with gzip.open(path, 'wb') as f:
    f.write(header + data.tobytes())
  np.testing.assert_array_equal(fm.read_idx(path), data)
  with open(str(tmp_path / 'bad'), 'wb') as f:
    f.write(b'\x00\x00\x0d\x01' + b'\x00' * 8)
  with pytest.raises(ValueError, match='not an IDX file'):
    fm.read_idx(str(tmp_path / 'bad'))
  with pytest.raises(ValueError, match="'auto', 'full' or 'subset'"):
    fm.resolve_source('mnist')


def test_generation_is_seeded(source, generated):
  again = fm.generate_split('demo_subset', 'train', 'subset', source)
  first = generated['demo_subset', 'train']
  np.testing.assert_array_equal(again['mosaic'], first['mosaic'])
  np.testing.assert_array_equal(again['labels_raw'], first['labels_raw'])  # NaN == NaN here


def test_pools_are_disjoint(generated):
  used = {key: set(g['tile_source'][g['tile_source'] != fm.EMPTY].tolist())
          for key, g in generated.items()}
  for (name, split), items in used.items():
    assert len(items) > 100
    for (other, other_split), other_items in used.items():
      same_origin = (split == 'train') == (other_split == 'train')
      if (name, split) != (other, other_split) and same_origin:
        assert not items & other_items, (name, split, other, other_split)


def test_mosaics_show_their_items_and_labels_say_so(source, generated):
  for (name, split), g in generated.items():
    pictures, classes = source[g['origin']]
    tiles = g['mosaic'].reshape(-1, 2, 28, 2, 28).transpose(0, 1, 3, 2, 4).reshape(-1, 4, 28, 28)
    empty = g['tile_source'] == fm.EMPTY
    assert (tiles[empty] == 0).all()
    np.testing.assert_array_equal(tiles[~empty], pictures[g['tile_source'][~empty]])
    np.testing.assert_array_equal(g['tile_class'][~empty], classes[g['tile_source'][~empty]])
    num_items = (~empty).sum(axis=1)
    assert set(num_items.tolist()) == {1, 2, 3, 4}
    raw = g['labels_raw']
    present = np.stack([(g['tile_class'] == c).any(axis=1) for c in range(10)], axis=1)
    if name == 'demo_multilabel':
      np.testing.assert_array_equal(raw, present)
    elif name == 'demo_subset':
      truth = present[:, list(fm.SUBSET_CLASSES)]
      assert fm.SPECS[name].label_names == ('tshirt_top', 'trouser', 'pullover', 'sneaker', 'bag')
      certain = (raw == 0) | (raw == 1)
      np.testing.assert_array_equal(raw[certain], truth[certain])
      assert truth[raw == -1].all() and not truth[np.isnan(raw)].any()
      assert 0.18 < (raw == -1).sum() / truth.sum() < 0.32  # uncertain: a quarter of positives
      assert 0.06 < np.isnan(raw).sum() / (~truth).sum() < 0.14  # blank: a tenth of negatives
    elif name == 'demo_binary':
      np.testing.assert_array_equal(raw[:, 0], present[:, fm.SHIRT])
      assert 0.1 < raw.mean() < 0.35
    else:
      np.testing.assert_array_equal(raw.argmax(axis=1), np.minimum(num_items, 3) - 1)
      np.testing.assert_array_equal(raw.sum(axis=1), 1)


def test_prepared_datasets_hold_the_mosaics(data_dir, generated):
  for name in fm.SPECS:
    meta = input_pipeline.datasets.metadata(name, data_dir)
    assert meta.label_names == fm.SPECS[name].label_names
    assert meta.task == fm.SPECS[name].task
    for split in fm.SPLITS:
      g = generated[name, split]
      src = pipeline.open_source(name, split, data_dir, R)
      assert len(src) == len(g['mosaic'])
      for i in range(0, len(src), 97):
        ex = src[i]
        k = int(ex['id'].decode().rsplit('/', 1)[1])  # the generation index
        np.testing.assert_array_equal(ex['image'][..., 0], images.resize(g['mosaic'][k], R))
        np.testing.assert_array_equal(ex['labels_raw'], g['labels_raw'][k])
        assert ex['sex'] == b'' and np.isnan(ex['age'])


def test_demo_config_feeds_the_pipeline(data_dir):
  config = demo.get_config()
  config.data.data_dir = data_dir
  assert config.data.image_size == config.model.img_size == R
  assert tuple(input_pipeline.datasets.metadata(n).num_classes
               for n in config.data.datasets) == config.data.num_classes
  iterator = pipeline.train_iterator(config.data, config.batch_size, config.seed,
                                     process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  assert batch['image'].shape == (32, R, R) and batch['labels'].shape == (32, 10)
  np.testing.assert_array_equal(batch['dataset_id'], 0)
  # demo_subset uses 'ignore' for uncertain labels: they leave the loss.
  it = pipeline.eval_iterator(config.data, 'demo_subset', 'test', 64, process_index=0,
                              process_count=1)
  batches = list(it)
  it.close()
  src = pipeline.open_source('demo_subset', 'test', data_dir, R)
  raw = np.stack([src[i]['labels_raw'] for i in range(len(src))])
  mask = np.concatenate([b['label_mask'][b['valid']] for b in batches])
  np.testing.assert_array_equal(mask[:, :5], (raw != -1).astype(np.float32))
  np.testing.assert_array_equal(mask[:, 5:], 0)
  assert pipeline.steps_per_epoch(config.data, 32) == 4 * 63  # 2000 train mosaics each


def test_without_the_debian_package_auto_means_the_subset(monkeypatch, tmp_path):
  monkeypatch.setattr(fm, 'FASHION_MNIST_DIR', str(tmp_path))
  assert fm.resolve_source('auto') == 'subset'
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    fm.resolve_source('full')
