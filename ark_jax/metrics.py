"""Host-side evaluation metrics (numpy): per-label AUC, mean AUC, accuracy.

ARK_SPEC.md section 5. The AUC is the Mann-Whitney statistic from average
(tie-corrected) ranks, which equals sklearn's `roc_auc_score` (the reference's
metric) to rounding; it is computed for all labels at once with one sort.

Shape suffixes: N examples, C labels.
"""

from collections.abc import Mapping, Sequence

import numpy as np


def _average_ranks(scores_NxC):
  """1-based ranks within each column, ties given the mean of their ranks."""
  n = scores_NxC.shape[0]
  order_NxC = np.argsort(scores_NxC, axis=0, kind='stable')
  sorted_NxC = np.take_along_axis(scores_NxC, order_NxC, axis=0)
  index_Nx1 = np.arange(n)[:, None]
  differs_N1xC = sorted_NxC[1:] != sorted_NxC[:-1]
  starts_NxC = np.concatenate([np.ones_like(sorted_NxC[:1], bool), differs_N1xC], axis=0)
  ends_NxC = np.concatenate([differs_N1xC, np.ones_like(sorted_NxC[:1], bool)], axis=0)
  # A tie group spans sorted positions [first, last]: carry the group's first
  # index forwards and its last index backwards.
  first_NxC = np.maximum.accumulate(np.where(starts_NxC, index_Nx1, 0), axis=0)
  last_NxC = np.minimum.accumulate(np.where(ends_NxC, index_Nx1, n)[::-1], axis=0)[::-1]
  ranks_NxC = np.empty_like(scores_NxC, dtype=np.float64)
  np.put_along_axis(ranks_NxC, order_NxC, (first_NxC + last_NxC) / 2.0 + 1.0, axis=0)
  return ranks_NxC


def _auc_columns(scores_NxC, positive_NxC):
  """AUC of every column (NaN where a column lacks positives or negatives)."""
  ranks_NxC = _average_ranks(scores_NxC)
  num_pos_C = positive_NxC.sum(axis=0).astype(np.float64)
  num_neg_C = positive_NxC.shape[0] - num_pos_C
  u_C = np.sum(np.where(positive_NxC, ranks_NxC, 0.0), axis=0) - num_pos_C * (num_pos_C + 1) / 2
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where((num_pos_C > 0) & (num_neg_C > 0), u_C / (num_pos_C * num_neg_C), np.nan)


def per_label_auc(probs_NxC, labels_NxC, label_names: Sequence[str], mask_NxC=None):
  """ROC AUC of each label, as sklearn's `roc_auc_score` per column.

  Args:
    probs_NxC: scores (probabilities, or anything monotone in them).
    labels_NxC: ground truth; a label is positive when > 0.5.
    label_names: the C names, in column order.
    mask_NxC: optional, nonzero where an example counts for that label (e.g.
      not an 'ignore'd label, not a padding row).

  Returns:
    {label name: AUC} over the labels with at least one positive and one
    negative among the counted examples; the others are left out, as the
    reference skips labels without positives.
  """
  probs_NxC = np.asarray(probs_NxC, np.float64)
  positive_NxC = np.asarray(labels_NxC) > 0.5
  if probs_NxC.ndim != 2 or probs_NxC.shape != positive_NxC.shape:
    raise ValueError(
        f'probs {probs_NxC.shape} and labels {positive_NxC.shape} must both be [N, C].')
  if len(label_names) != probs_NxC.shape[1]:
    raise ValueError(f'{len(label_names)} label names for {probs_NxC.shape[1]} columns.')
  if mask_NxC is None:
    auc_C = _auc_columns(probs_NxC, positive_NxC)
  else:
    # Each column has its own example set: rank the counted rows of each alone.
    keep_NxC = np.asarray(mask_NxC) != 0
    auc_C = np.array([
        _auc_columns(probs_NxC[keep_NxC[:, c], c:c + 1], positive_NxC[keep_NxC[:, c], c:c + 1])[0]
        for c in range(probs_NxC.shape[1])])
  return {name: float(auc) for name, auc in zip(label_names, auc_C) if not np.isnan(auc)}


def mean_auc(aucs: Mapping[str, float], eval_labels: Sequence[str] | None = None) -> float:
  """Mean of the AUCs of `eval_labels` (default: all), skipping those left out.

  E.g. CheXpert averages its 5 competition labels only. NaN when none is left.
  """
  names = list(aucs) if eval_labels is None else [n for n in eval_labels if n in aucs]
  return float(np.mean([aucs[n] for n in names])) if names else float('nan')


def accuracy(probs_NxC, onehot_NxC) -> float:
  """Argmax accuracy of a multi-class set (NaN for no examples)."""
  probs_NxC = np.asarray(probs_NxC)
  if probs_NxC.shape[0] == 0:
    return float('nan')
  return float(np.mean(np.argmax(probs_NxC, axis=1) == np.argmax(np.asarray(onehot_NxC), axis=1)))
