"""The Grain pipeline on three tiny prepared datasets (8x8 images, odd sizes).

Tiny builders keep every test to a second or two; the demo datasets are
exercised end to end in test_fashion_mosaic.py.
"""

import math

from absl import flags
import ml_collections
import numpy as np
import pytest

from input_pipeline import labels
from input_pipeline import pipeline
from input_pipeline.datasets import base

R = 8
SIZES = {'tiny_multi': 45, 'tiny_binary': 30, 'tiny_class': 7}  # train; eval splits 11


class _Tiny(base.CxrBuilder, skip_registration=True):
  """Generated examples: the image holds the generation index, labels are seeded."""

  def __init__(self, **kwargs):
    kwargs.setdefault('num_workers', 0)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    self.summary = base.PrepareSummary(self.name, self.image_size, tuple(self.LABEL_NAMES))
    return {s: self._generate_examples(s) for s in base.SPLITS}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    n = SIZES[self.name] if split == 'train' else 11
    rng = np.random.default_rng([len(self.name), len(split)])
    for i in range(n):
      raw = self._labels(rng)
      self.summary.add_example(split, raw)
      image = np.full((self.image_size, self.image_size), i % 256, np.uint8)
      image[0, 0] = len(split)
      yield f'{split}{i}', {'image': base.images.encode_png(image), 'labels_raw': raw,
                            'id': f'{split}{i}', 'sex': 'MF'[i % 2] if i % 3 else '',
                            'age': np.float32(i if i % 4 else np.nan), 'view': ''}


class TinyMulti(_Tiny):
  LABEL_NAMES = ('a', 'b', 'c', 'd')
  TASK = 'multilabel'

  def _labels(self, rng):
    return rng.choice(np.array([1, 0, -1, np.nan], np.float32), size=4)


class TinyBinary(_Tiny):
  LABEL_NAMES = ('x',)
  TASK = 'binary'

  def _labels(self, rng):
    return rng.integers(0, 2, size=1).astype(np.float32)


class TinyClass(_Tiny):
  LABEL_NAMES = ('p', 'q', 'r')
  TASK = 'multiclass'

  def _labels(self, rng):
    return np.eye(3, dtype=np.float32)[rng.integers(0, 3)]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_data'))
  for cls in (TinyMulti, TinyBinary, TinyClass):
    cls(data_dir=path, config=f'r{R}', file_format='array_record').download_and_prepare()
  return path


def _config(data_dir, schedule='cyclic', **kwargs):
  c = ml_collections.ConfigDict(dict(
      datasets=tuple(SIZES), data_dir=data_dir, image_size=R, schedule=schedule,
      weights=None, label_policies={'tiny_multi': 'lsr_ones,ignore'}, num_workers=0,
      read_threads=1))
  c.update(kwargs)
  return c


def _take(iterator, n):
  out = [next(iterator) for _ in range(n)]
  return out


def _rows(batches):
  """(dataset_id, index) of every valid row, in order."""
  return [(int(d), int(i)) for b in batches
          for d, i, v in zip(b['dataset_id'], b['index'], b['valid']) if v]


def test_cyclic_epoch_is_one_pass_of_each_dataset_in_order(data_dir):
  config = _config(data_dir)
  batch = 8
  iterator = pipeline.train_iterator(config, batch, seed=3, process_index=0, process_count=1,
                                     num_epochs=2)
  batches = list(iterator)
  iterator.close()
  steps = [math.ceil(n / batch) for n in SIZES.values()]
  assert len(batches) == 2 * sum(steps) == 2 * pipeline.steps_per_epoch(config, batch)
  sources = [pipeline.open_source(n, 'train', data_dir, R) for n in SIZES]
  step = 0
  orders = []
  for epoch in range(2):
    for d, (name, n) in enumerate(SIZES.items()):
      passed = batches[step:step + steps[d]]
      step += steps[d]
      for k, b in enumerate(passed):
        assert b['image'].shape == (batch, R, R) and b['image'].dtype == np.uint8
        assert b['labels'].shape == b['label_mask'].shape == (batch, 4)
        np.testing.assert_array_equal(b['dataset_id'], d)  # batches never mix datasets
        np.testing.assert_array_equal(b['pass_index'], epoch * len(SIZES) + d)
        np.testing.assert_array_equal(b['pass_end'], k == steps[d] - 1)
      rows = _rows(passed)
      assert sorted(i for _, i in rows) == list(range(n))  # every example exactly once
      orders.append([i for _, i in rows])
      # Short last batch: padded with masked rows at the end.
      last = passed[-1]
      num_pad = steps[d] * batch - n
      assert not last['valid'][batch - num_pad:].any() and last['valid'][:batch - num_pad].all()
      assert (last['label_mask'][batch - num_pad:] == 0).all()
      np.testing.assert_array_equal(last['index'][batch - num_pad:], -1)
      # Rows carry their source example, with its label policy applied.
      policy = labels.policy_for(name, config.label_policies)
      for b in passed[:2]:
        for r in np.flatnonzero(b['valid']):
          ex = sources[d][int(b['index'][r])]
          np.testing.assert_array_equal(b['image'][r], ex['image'][..., 0])
          want, mask = labels.apply_policy(ex['labels_raw'], policy, 4,
                                           seed=labels.dataset_seed(3, name),
                                           index_N=b['index'][r])
          np.testing.assert_array_equal(b['labels'][r], want)
          np.testing.assert_array_equal(b['label_mask'][r], mask)
  # Each pass is reshuffled; the LSR draw stays with the example.
  assert orders[0] != orders[3] and orders[0] != list(range(SIZES['tiny_multi']))


def test_policy_in_batches_is_fixed_per_example(data_dir):
  config = _config(data_dir)
  first = list(pipeline.train_iterator(config, 45, seed=0, process_index=0, process_count=1,
                                       num_epochs=2))
  by_example = {}
  for b in first:
    for r in np.flatnonzero(b['valid'] & (b['dataset_id'] == 0)):
      by_example.setdefault(int(b['index'][r]), []).append(b['labels'][r])
  soft = []
  for values in by_example.values():
    assert len(values) == 2
    np.testing.assert_array_equal(values[0], values[1])  # the same in both epochs
    soft.extend(v for v in values[0] if 0 < v < 1)
  assert len(soft) > 10 and min(soft) >= 0.55 and max(soft) <= 0.85
  assert len(set(soft)) == len(soft)  # drawn per example and label


@pytest.mark.parametrize('weights,num_examples', [((1.0, 2.0, 5.0), 10_000), (None, 2_000)])
def test_mixed_proportions_follow_weights(data_dir, weights, num_examples):
  config = _config(data_dir, 'mixed', weights=weights)
  iterator = pipeline.train_iterator(config, 100, seed=0, process_index=0, process_count=1)
  batches = _take(iterator, num_examples // 100)
  iterator.close()
  ids = np.concatenate([b['dataset_id'] for b in batches])
  assert len(ids) == num_examples
  want = np.array(weights or list(SIZES.values()), float)
  want /= want.sum()
  np.testing.assert_allclose(np.bincount(ids, minlength=3) / len(ids), want, atol=0.02)
  # Every batch mixes the datasets; no padding in this schedule.
  assert all(len(np.unique(b['dataset_id'])) == 3 for b in batches)
  assert all(b['valid'].all() and not b['pass_end'].any() for b in batches)


@pytest.mark.parametrize('schedule,workers', [('cyclic', 0), ('mixed', 0), ('cyclic', 2)])
def test_resume_gives_the_same_batches(data_dir, schedule, workers):
  if workers:
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags

  def make(num_workers):
    config = _config(data_dir, schedule, num_workers=num_workers)
    return pipeline.train_iterator(config, 8, seed=1, process_index=0, process_count=1)

  # Read without workers: the batch order must not depend on their number.
  uninterrupted = make(0)
  want = _take(uninterrupted, 13)
  uninterrupted.close()
  first = make(workers)
  _take(first, 6)  # crosses the end of the first pass in the cyclic schedule
  state = first.get_state()
  first.close()
  resumed = make(workers)
  resumed.set_state(state)
  got = _take(resumed, 7)
  resumed.close()
  for w, g in zip(want[6:], got):
    assert w.keys() == g.keys()
    for key in w:
      np.testing.assert_array_equal(w[key], g[key], err_msg=key)


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
  config = _config(data_dir)
  per_process = []
  for process in range(2):
    it = pipeline.train_iterator(config, 8, seed=0, process_index=process, process_count=2,
                                 num_epochs=1)
    per_process.append(list(it))
    it.close()
  assert len(per_process[0]) == len(per_process[1]) == sum(
      math.ceil(n / 8) for n in SIZES.values())
  for a, b in zip(*per_process):
    assert a['image'].shape[0] == b['image'].shape[0] == 4  # global batch 8 over 2
    # In step: same dataset, same pass, same pass end on every process.
    assert a['dataset_id'][0] == b['dataset_id'][0] and a['pass_end'][0] == b['pass_end'][0]
  rows = [set(_rows(p)) for p in per_process]
  assert not rows[0] & rows[1]
  assert rows[0] | rows[1] == {(d, i) for d, n in enumerate(SIZES.values()) for i in range(n)}
  # Process 0 holds the first half of each global batch of the one-process run.
  single = pipeline.train_iterator(config, 8, seed=0, process_index=0, process_count=1,
                                   num_epochs=1)
  for s, a, b in zip(single, *per_process):
    np.testing.assert_array_equal(s['index'], np.concatenate([a['index'], b['index']]))
  single.close()


def test_mixed_process_shards_split_each_global_batch(data_dir):
  config = _config(data_dir, 'mixed')
  seen = []
  for process in range(2):
    it = pipeline.train_iterator(config, 8, seed=0, process_index=process, process_count=2)
    batches = _take(it, 5)
    it.close()
    seen.append([(int(d), int(i)) for b in batches for d, i in zip(b['dataset_id'], b['index'])])
  # 40 positions of a mix whose smallest dataset repeats every 7: compare the
  # positions, not the examples (which repeat by design).
  single = pipeline.train_iterator(config, 8, seed=0, process_index=0, process_count=1)
  whole = [(int(d), int(i)) for b in _take(single, 5) for d, i in zip(b['dataset_id'], b['index'])]
  single.close()
  interleaved = [r for step in range(5) for p in range(2) for r in seen[p][4 * step:4 * step + 4]]
  assert interleaved == whole


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_example_once(data_dir, process_count):
  config = _config(data_dir)
  rows, valid_total = [], 0
  for process in range(process_count):
    it = pipeline.eval_iterator(config, 'tiny_class', 'test', 4, process_index=process,
                                process_count=process_count)
    batches = list(it)
    it.close()
    assert len(batches) == 3  # ceil(11 / 4), whatever the process count
    for b in batches:
      assert b['image'].shape == (4 // process_count, R, R)
      np.testing.assert_array_equal(b['dataset_id'], 2)
      assert (b['label_mask'][~b['valid']] == 0).all() and (b['index'][~b['valid']] == -1).all()
      np.testing.assert_array_equal(b['label_mask'][b['valid']], [[1, 1, 1, 0]] * b['valid'].sum())
      np.testing.assert_array_equal(b['labels'][b['valid']].sum(axis=1), 1)  # one-hot
      valid_total += b['valid'].sum()
    rows.append([int(i) for b in batches for i in b['index'][b['valid']]])
  assert valid_total == 11
  assert sorted(sum(rows, [])) == list(range(11))
  if process_count == 1:
    assert rows[0] == list(range(11))  # in order
  source = pipeline.open_source('tiny_class', 'test', data_dir, R)
  it = pipeline.eval_iterator(config, 'tiny_class', 'test', 16, process_index=0, process_count=1)
  (b,) = list(it)
  it.close()
  want_sex = [{b'M': 1, b'F': 2}.get(source[i]['sex'], 0) for i in range(11)]
  np.testing.assert_array_equal(b['sex'][:11], want_sex)
  np.testing.assert_array_equal(b['age'][:11], [source[i]['age'] for i in range(11)])


def test_bad_configs_fail_with_a_clear_message(data_dir):
  with pytest.raises(ValueError, match='divisible'):
    pipeline.train_iterator(_config(data_dir), 9, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='schedule'):
    pipeline.train_iterator(_config(data_dir, 'round_robin'), 8, seed=0)
  with pytest.raises(FileNotFoundError, match='input_pipeline.prepare'):
    pipeline.open_source('tiny_multi', 'train', data_dir, 16)
