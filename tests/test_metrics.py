"""Metrics: the rank AUC equals sklearn's roc_auc_score; left-out labels; mean AUC; accuracy."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from ark_jax import metrics


def test_auc_equals_sklearn_with_ties():
  rng = np.random.default_rng(0)
  n, c = 200, 6
  # Scores rounded to 1 decimal: many ties, within and across classes.
  probs = np.round(rng.random((n, c)), 1)
  labels = (rng.random((n, c)) < np.linspace(0.05, 0.6, c)).astype(np.float32)
  names = [f'l{i}' for i in range(c)]
  aucs = metrics.per_label_auc(probs, labels, names)
  assert list(aucs) == names
  for i, name in enumerate(names):
    assert abs(aucs[name] - sk_metrics.roc_auc_score(labels[:, i], probs[:, i])) < 1e-12


def test_auc_hand_values():
  # Positives 0.8, 0.4; negatives 0.4, 0.1: pairs win 1 + 1 + 0.5 (tie) + 1 of 4.
  aucs = metrics.per_label_auc([[0.8], [0.4], [0.4], [0.1]], [[1], [1], [0], [0]], ['x'])
  assert aucs == {'x': 0.875}


def test_labels_without_positives_or_negatives_left_out():
  probs = np.array([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7], [0.4, 0.5, 0.6]])
  labels = np.array([[0, 0, 1], [1, 0, 1], [0, 0, 1]])
  aucs = metrics.per_label_auc(probs, labels, ['a', 'no_pos', 'no_neg'])
  assert aucs == {'a': 1.0}


def test_mask_selects_rows_per_label():
  rng = np.random.default_rng(1)
  probs = np.round(rng.random((50, 3)), 1)
  labels = (rng.random((50, 3)) < 0.4).astype(np.float32)
  mask = rng.random((50, 3)) < 0.7
  mask[:, 2] = labels[:, 2] == 0  # only negatives remain: left out
  aucs = metrics.per_label_auc(probs, labels, ['a', 'b', 'c'], mask_NxC=mask)
  assert list(aucs) == ['a', 'b']
  for i, name in enumerate(['a', 'b']):
    keep = mask[:, i]
    want = sk_metrics.roc_auc_score(labels[keep, i], probs[keep, i])
    assert abs(aucs[name] - want) < 1e-12


def test_mean_auc():
  aucs = {'a': 0.6, 'b': 0.8, 'c': 1.0}
  assert metrics.mean_auc(aucs) == pytest.approx(0.8)
  # Evaluation labels missing from aucs (no positives) are skipped.
  assert metrics.mean_auc(aucs, ['a', 'c', 'missing']) == pytest.approx(0.8)
  assert np.isnan(metrics.mean_auc(aucs, ['missing']))


def test_accuracy():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]])
  onehot = np.eye(3)[[0, 2, 0, 1]]
  assert metrics.accuracy(probs, onehot) == 0.5
  assert np.isnan(metrics.accuracy(np.zeros((0, 3)), np.zeros((0, 3))))


# ------------------------------------------------------------------ bootstrap


def _scored(n, c, seed, signal=1.0, decimals=None):
  """Scores that rank positives higher by `signal` (probit units), optionally rounded."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, c)) < np.linspace(0.1, 0.5, c)).astype(np.float32)
  probs = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + signal * labels)))
  return (np.round(probs, decimals) if decimals else probs), labels


def test_resampled_auc_equals_sklearn_on_the_resampled_rows():
  probs, labels = _scored(150, 4, 0, decimals=1)  # many ties
  mask = np.random.default_rng(1).random((150, 4)) < 0.8
  drawn = np.random.default_rng(2).integers(0, 150, (6, 150))
  drawn[5] = np.flatnonzero(labels[:, 0] == 0)[0]  # one row repeated: label 0 lacks a positive
  weights = np.stack([np.bincount(d, minlength=150) for d in drawn])
  got = metrics.resampled_auc(probs, labels, weights, mask)
  for r, rows in enumerate(drawn):
    for k in range(4):
      kept = rows[mask[rows, k]]
      if 0 < labels[kept, k].sum() < kept.size:
        assert abs(got[r, k] - sk_metrics.roc_auc_score(labels[kept, k], probs[kept, k])) < 1e-9
      else:
        assert np.isnan(got[r, k])
  assert np.isnan(got[5]).all()


def test_bootstrap_is_seeded_and_a_subgroup_shares_the_whole_sets_resamples():
  probs, labels = _scored(300, 3, 3)
  a = metrics.bootstrap_auc(probs, labels, num_samples=50, seed=233)
  np.testing.assert_array_equal(a, metrics.bootstrap_auc(probs, labels, num_samples=50, seed=233))
  assert not np.allclose(a, metrics.bootstrap_auc(probs, labels, num_samples=50, seed=234))
  # The subgroup's rows of the same draws of all 300 rows.
  rows = np.arange(300) % 3 == 0
  drawn = np.random.default_rng(233).integers(0, 300, size=(50, 300))
  weights = np.stack([np.bincount(d, minlength=300) for d in drawn])
  np.testing.assert_allclose(metrics.bootstrap_auc(probs, labels, rows_N=rows, num_samples=50,
                                                   seed=233),
                             metrics.resampled_auc(probs, labels, weights * rows), atol=1e-12)
  np.testing.assert_allclose(a, metrics.resampled_auc(probs, labels, weights), atol=1e-12)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_rows():
  widths = []
  for n in (200, 3200):
    probs, labels = _scored(n, 3, n)
    names = ['a', 'b', 'c']
    point = metrics.mean_auc(metrics.per_label_auc(probs, labels, names))
    auc_RxC = metrics.bootstrap_auc(probs, labels, num_samples=400, seed=0)
    lo, hi = metrics.percentile_interval(metrics.mean_auc_resamples(auc_RxC, names))
    assert lo < point < hi
    widths.append(hi - lo)
  # The standard error falls as 1/sqrt(n): 16x the rows, about a quarter the width.
  assert 0.15 < widths[1] / widths[0] < 0.4, widths


def test_mean_auc_resamples_skips_labels_left_out_of_a_resample():
  auc_RxC = np.array([[0.6, 0.8, 1.0], [np.nan, 0.8, 0.6], [np.nan, np.nan, np.nan]])
  np.testing.assert_allclose(metrics.mean_auc_resamples(auc_RxC, ['a', 'b', 'c']),
                             [0.8, 0.7, np.nan])
  np.testing.assert_allclose(metrics.mean_auc_resamples(auc_RxC, ['a', 'b', 'c'], ['a', 'c']),
                             [0.8, 0.6, np.nan])


def test_percentile_interval():
  assert metrics.percentile_interval(np.arange(1001.0)) == pytest.approx([25.0, 975.0])
  assert metrics.percentile_interval([np.nan, 1.0, 3.0], level=0.5) == pytest.approx([1.5, 2.5])
  assert metrics.percentile_interval([np.nan, np.nan]) is None
