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
