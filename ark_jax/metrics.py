"""Host-side evaluation metrics (numpy): per-label AUC, mean AUC, accuracy.

ARK_SPEC.md section 5. The AUC is the Mann-Whitney statistic from average
(tie-corrected) ranks, which equals sklearn's `roc_auc_score` (the reference's
metric) to rounding; it is computed for all labels at once with one sort.

Confidence intervals: nonparametric bootstrap of the rows (the reference's
zero-shot CIs: 1000 resamples, seed 233), every label's AUC computed on every
resample, and the percentile interval of the statistic over them.

Shape suffixes: N examples, C labels, R resamples.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import NamedTuple

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


# ------------------------------------------------------------------------------
# Bootstrap confidence intervals.
#
# A resample draws N rows with replacement; it is held as multiplicities (how
# often each row was drawn), R resamples at once. A resample's AUC is then the
# weighted Mann-Whitney statistic over the original rows, ties counting one half:
#   AUC = sum_{i positive} w_i (neg(< s_i) + neg(<= s_i)) / (2 W_pos W_neg),
# neg(< s) the weight of the negatives scored below s. One sort of a label's
# negatives places every positive among them; per resample it is then one
# cumulative sum over the negatives and one weighted sum over the positives:
# O(R N) per label, in integers held exactly, so equal to sklearn on the
# resampled rows to rounding.
# ------------------------------------------------------------------------------

_BOOTSTRAP_CHUNK = 1 << 22  # resample x row weights drawn at once (R x N, bounds memory)


def _compact(weights_RxN) -> np.ndarray:
  """Row multiplicities in the narrowest unsigned type that holds them.

  Bootstrap multiplicities fit a byte; numpy gathers and sums bytes several
  times faster than int64 (the work is memory bound).
  """
  top = weights_RxN.max(initial=0)
  for dtype in (np.uint8, np.uint16, np.uint32):
    if top <= np.iinfo(dtype).max:
      return weights_RxN.astype(dtype)
  return weights_RxN.astype(np.int64)


class _LabelOrder(NamedTuple):
  """One label's counted rows, arranged once for any number of weightings."""
  neg_K: np.ndarray  # the negatives' rows, by ascending score
  pos_P: np.ndarray  # the positives' rows
  below_P: np.ndarray  # per positive: how many negatives score lower
  at_or_below_P: np.ndarray  # ... score lower or equal


def _label_orders(probs_NxC, positive_NxC, keep_NxC) -> list[_LabelOrder]:
  """Every label's _LabelOrder (its rows where keep_NxC)."""
  orders = []
  for c in range(probs_NxC.shape[1]):
    neg_K = np.flatnonzero(~positive_NxC[:, c] & keep_NxC[:, c])
    neg_K = neg_K[np.argsort(probs_NxC[neg_K, c], kind='stable')]
    pos_P = np.flatnonzero(positive_NxC[:, c] & keep_NxC[:, c])
    neg_scores, pos_scores = probs_NxC[neg_K, c], probs_NxC[pos_P, c]
    orders.append(_LabelOrder(neg_K, pos_P, np.searchsorted(neg_scores, pos_scores, 'left'),
                              np.searchsorted(neg_scores, pos_scores, 'right')))
  return orders


def _weighted_auc(orders: Sequence[_LabelOrder], weights_RxN) -> np.ndarray:
  """auc_RxC of each label under R row weightings (NaN where a class is missing).

  Integer arithmetic throughout: exact, so a weighting's AUC equals the plain
  AUC of the rows repeated as often as their weights.
  """
  num_r = weights_RxN.shape[0]
  total = weights_RxN.sum(axis=1, dtype=np.int64).max(initial=0)
  cum_dtype = np.int32 if total < 2**31 else np.int64
  auc_RxC = np.empty((num_r, len(orders)))
  for c, (neg_K, pos_P, below_P, at_or_below_P) in enumerate(orders):
    # cum_Rx(K+1)[:, k]: the weight of the k lowest-scored negatives.
    cum_RxK1 = np.zeros((num_r, neg_K.size + 1), cum_dtype)
    np.cumsum(np.take(weights_RxN, neg_K, axis=1), axis=1, dtype=cum_dtype, out=cum_RxK1[:, 1:])
    pos_RxP = np.take(weights_RxN, pos_P, axis=1)
    twice_u_R = 2 * np.einsum('rp,rp->r', pos_RxP, np.take(cum_RxK1, below_P, axis=1),
                              dtype=np.int64)
    tied = np.flatnonzero(at_or_below_P > below_P)  # positives scored as some negatives
    if tied.size:
      twice_u_R += np.einsum('rp,rp->r', pos_RxP[:, tied],
                             np.take(cum_RxK1, at_or_below_P[tied], axis=1)
                             - np.take(cum_RxK1, below_P[tied], axis=1), dtype=np.int64)
    num_pos_R = pos_RxP.sum(axis=1, dtype=np.int64).astype(np.float64)
    num_neg_R = cum_RxK1[:, -1].astype(np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
      auc_RxC[:, c] = np.where((num_pos_R > 0) & (num_neg_R > 0),
                               twice_u_R / (2.0 * num_pos_R * num_neg_R), np.nan)
  return auc_RxC


def _keep(probs_NxC, mask_NxC):
  """The rows that count for each label: all, or where the mask is nonzero."""
  return np.ones(probs_NxC.shape, bool) if mask_NxC is None else np.asarray(mask_NxC) != 0


def resampled_auc(probs_NxC, labels_NxC, weights_RxN, mask_NxC=None) -> np.ndarray:
  """Per-label AUC of R resamples given as row multiplicities.

  Args:
    probs_NxC: scores, as per_label_auc.
    labels_NxC: ground truth; positive when > 0.5.
    weights_RxN: non-negative integers, row i counted weights_RxN[r, i] times
      in resample r (np.bincount of the drawn indices; 0/1 selects a subset).
    mask_NxC: optional, nonzero where an example counts for that label.

  Returns:
    auc_RxC: sklearn's roc_auc_score of each label on each resample's rows;
    NaN where that resample has no positive or no negative of the label.
  """
  probs_NxC = np.asarray(probs_NxC, np.float64)
  weights_RxN = np.asarray(weights_RxN)
  if weights_RxN.size and (weights_RxN.min() < 0 or np.any(weights_RxN % 1 != 0)):
    raise ValueError('weights must be non-negative integers (row multiplicities)')
  orders = _label_orders(probs_NxC, np.asarray(labels_NxC) > 0.5, _keep(probs_NxC, mask_NxC))
  return _weighted_auc(orders, _compact(weights_RxN))


def bootstrap_auc(probs_NxC, labels_NxC, mask_NxC=None, rows_N=None, *, num_samples: int,
                  seed: int) -> np.ndarray:
  """Per-label AUC of `num_samples` bootstrap resamples of the N rows.

  Each resample draws N of the N rows uniformly with replacement (numpy's
  Generator seeded with `seed`). The draw depends on N, num_samples and seed
  only: calls that share them see the same resamples, so their results are
  paired (two models, or two subgroups of one set: their difference per
  resample is the bootstrap of the difference).

  Args:
    probs_NxC, labels_NxC, mask_NxC: as per_label_auc.
    rows_N: optional bool, a subgroup: the whole set is resampled, then only the
      drawn rows in the subgroup count (so the subgroup's size varies between
      resamples, as it would between samples of the population).
    num_samples: R.
    seed: the Generator's seed.

  Returns:
    auc_RxC, NaN where a resample (within the subgroup) lacks a positive or a
    negative of the label: the label is left out of that resample.
  """
  probs_NxC = np.asarray(probs_NxC, np.float64)
  keep_NxC = _keep(probs_NxC, mask_NxC)
  if rows_N is not None:
    keep_NxC = keep_NxC & np.asarray(rows_N, bool)[:, None]
  orders = _label_orders(probs_NxC, np.asarray(labels_NxC) > 0.5, keep_NxC)
  return np.concatenate([np.empty((0, probs_NxC.shape[1]))] + [
      _weighted_auc(orders, weights_RxN)
      for weights_RxN in _bootstrap_weights(probs_NxC.shape[0], num_samples, seed)])


@functools.lru_cache(maxsize=1)
def _bootstrap_weights(n: int, num_samples: int, seed: int) -> tuple[np.ndarray, ...]:
  """The resamples' multiplicities, in [R', N] chunks (R' * N bounded).

  Cached for the last (N, R, seed) (R x N bytes): the models and subgroups of
  one eval set, which share the resamples, draw them once.
  """
  rng = np.random.default_rng(seed)
  chunk = max(1, _BOOTSTRAP_CHUNK // max(n, 1))
  chunks = []
  for start in range(0, num_samples, chunk):
    r = min(chunk, num_samples - start)
    drawn_RxN = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]
    weights_RxN = _compact(np.bincount(drawn_RxN.ravel(), minlength=r * n).reshape(r, n))
    weights_RxN.setflags(write=False)
    chunks.append(weights_RxN)
  return tuple(chunks)


def mean_auc_resamples(auc_RxC, label_names: Sequence[str],
                       eval_labels: Sequence[str] | None = None) -> np.ndarray:
  """mean_auc of every resample: over the `eval_labels` (default all) defined in it."""
  columns = [i for i, n in enumerate(label_names) if eval_labels is None or n in eval_labels]
  auc_RxE = np.asarray(auc_RxC)[:, columns]
  defined_R = np.sum(~np.isnan(auc_RxE), axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(defined_R > 0, np.nansum(auc_RxE, axis=1) / defined_R, np.nan)


def percentile_interval(samples_R, level: float = 0.95) -> list[float] | None:
  """The bootstrap percentile interval [lo, hi] of a statistic's resampled values.

  lo and hi are their (1-level)/2 and (1+level)/2 quantiles (numpy's linear
  interpolation): the 2.5th and 97.5th percentiles for a 95% interval.

  Resamples where the statistic is undefined (NaN: a label without a positive
  or a negative in that resample) are left out; None when none is defined.
  """
  samples_R = np.asarray(samples_R, np.float64)
  samples_R = samples_R[~np.isnan(samples_R)]
  if samples_R.size == 0:
    return None
  lo, hi = np.percentile(samples_R, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]
