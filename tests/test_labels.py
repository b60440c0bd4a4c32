"""Label policies, value by value."""

import numpy as np
import pytest

from input_pipeline import labels

NAN = np.nan
RAW = np.array([[1, 0, -1, NAN],
                [-1, -1, 0, 1]], np.float32)


@pytest.mark.parametrize('uncertain,blank,want_labels,want_mask', [
    ('zeros', 'zeros', [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
     [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]),
    ('ones', 'zeros', [[1, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]],
     [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]),
    ('ignore', 'zeros', [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
     [[1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]]),
    ('zeros', 'ignore', [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
     [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]),
    ('ignore', 'ignore', [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
     [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]),
])
def test_policies_value_by_value(uncertain, blank, want_labels, want_mask):
  got_labels, got_mask = labels.apply_policy(RAW, labels.LabelPolicy(uncertain, blank), 6)
  np.testing.assert_array_equal(got_labels, np.array(want_labels, np.float32))
  np.testing.assert_array_equal(got_mask, np.array(want_mask, np.float32))
  assert got_labels.dtype == got_mask.dtype == np.float32


def test_lsr_ones_range_fixed_and_per_example():
  policy = labels.LabelPolicy('lsr_ones', 'zeros')
  raw = np.full((1000, 3), -1, np.float32)
  raw[:, 2] = 1
  index = np.arange(1000)
  first, mask = labels.apply_policy(raw, policy, 4, seed=7, index_N=index)
  again, _ = labels.apply_policy(raw, policy, 4, seed=7, index_N=index)
  np.testing.assert_array_equal(first, again)  # a second load draws the same values
  soft = first[:, :2]
  assert soft.min() >= 0.55 and soft.max() <= 0.85
  # Spread over the interval, different across examples and across labels.
  assert soft.min() < 0.56 and soft.max() > 0.84
  assert abs(soft.mean() - 0.70) < 0.01
  assert len(np.unique(soft[:, 0])) > 990
  assert np.mean(soft[:, 0] != soft[:, 1]) > 0.99
  np.testing.assert_array_equal(first[:, 2], 1.0)  # positives untouched
  np.testing.assert_array_equal(first[:, 3], 0.0)  # padding
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0]] * 1000)
  # Row by row (as the pipeline calls it) gives the batch's values.
  one, _ = labels.apply_policy(raw[123], policy, 4, seed=7, index_N=123)
  np.testing.assert_array_equal(one, first[123])
  other_seed, _ = labels.apply_policy(raw, policy, 4, seed=8, index_N=index)
  assert np.mean(other_seed[:, 0] != first[:, 0]) > 0.99


def test_lsr_leaves_certain_labels_and_blanks():
  policy = labels.LabelPolicy('lsr_ones', 'zeros')
  got, mask = labels.apply_policy(np.array([1, 0, NAN, -1], np.float32), policy, 4, index_N=3)
  np.testing.assert_array_equal(got[:3], [1, 0, 0])
  assert 0.55 <= got[3] <= 0.85
  np.testing.assert_array_equal(mask, 1)


def test_defaults_and_overrides():
  assert labels.policy_for('chexpert') == labels.LabelPolicy('lsr_ones', 'zeros')
  assert labels.policy_for('mimic_cxr') == labels.LabelPolicy('ones', 'zeros')
  assert labels.policy_for('chestxray14') == labels.LabelPolicy('zeros', 'zeros')
  assert labels.policy_for('demo_subset', {'demo_subset': 'ignore,ignore'}) == (
      labels.LabelPolicy('ignore', 'ignore'))
  assert labels.policy_for('chexpert', {'chexpert': {'blank': 'ignore'}}) == (
      labels.LabelPolicy('lsr_ones', 'ignore'))
  assert labels.policy_for('mimic_cxr', {'mimic_cxr': 'zeros'}) == (
      labels.LabelPolicy('zeros', 'zeros'))
  with pytest.raises(ValueError, match='uncertain'):
    labels.LabelPolicy('maybe', 'zeros')
  with pytest.raises(ValueError, match='unknown keys'):
    labels.policy_for('x', {'x': {'uncertian': 'ones'}})
  with pytest.raises(ValueError, match='do not fit'):
    labels.apply_policy(np.zeros(5), labels.LabelPolicy(), 4)
