"""Ark+ losses: the masked per-dataset task loss and the consistency loss.

ARK_SPEC.md section 3; DESIGN.md section 4, decision 3. Pure jnp, jittable, one
program for any mix of datasets in a batch.

Shape suffixes: B batch, C the largest head's class count (Cmax), D datasets,
P projector width.

Conventions (the reference has one dataset per batch; these reduce to it then):
  BCE sets (multi-label, binary): the mean of BCE-with-logits over the labels
    of that dataset's rows that count (label_mask > 0, a real class of its
    head, a valid row): B_d x n_d elements when nothing is masked, as the
    reference's BCEWithLogitsLoss(reduction='mean').
  CE sets (multi-class): softmax cross-entropy over the head's real classes
    against one-hot or soft labels, averaged over the dataset's valid rows
    that have any counted label (a row whose labels are all masked is left
    out), as the reference's CrossEntropyLoss.
  The batch loss is the unweighted mean of those per-dataset losses over the
  datasets PRESENT in the batch: those with a non-zero count (counted label
  elements for BCE sets, counted rows for CE sets). Every dataset then weighs
  the same whatever its share of the batch.
"""

import jax
import jax.numpy as jnp

from ark_jax.models.ark import PADDED_LOGIT


def _bce_with_logits(logits, labels):
  # The log-sum-exp form: finite for any finite logit (PADDED_LOGIT included).
  return (jnp.maximum(logits, 0.0) - logits * labels
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _safe_divide(numerator, denominator):
  # A zero denominator means nothing to average: 0, with a zero (not NaN) gradient.
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def task_loss(logits_BxC, labels_BxC, label_mask_BxC, dataset_id_B, is_multiclass_D,
              num_classes_D, valid_B):
  """Masked task loss: BCE or softmax CE per example by its dataset's type.

  Args:
    logits_BxC: each example's own head (`models.ark.select_head`), float.
    labels_BxC: targets in [0, 1]; one-hot or soft rows for multi-class sets.
    label_mask_BxC: 1 where a label counts, 0 for padded classes, 'ignore'd
      labels and padding rows.
    dataset_id_B: int, the head of each row.
    is_multiclass_D: bool, True for softmax-CE datasets.
    num_classes_D: int, the real class count of each head.
    valid_B: bool, False on padding rows.

  Returns:
    (loss, loss_D, count_D): the scalar mean over the datasets present of
    loss_D, each dataset's mean loss (0 where absent), and the number of terms
    each mean is over (label elements for BCE sets, rows for CE sets), so that
    per-dataset losses can be pooled exactly over steps as sum(loss*count)/sum(count).
  """
  num_datasets = is_multiclass_D.shape[0]
  logits_BxC = logits_BxC.astype(jnp.float32)
  labels_BxC = labels_BxC.astype(jnp.float32)
  classes_B = jnp.asarray(num_classes_D)[dataset_id_B]
  multiclass_B = jnp.asarray(is_multiclass_D)[dataset_id_B]
  # Padded classes and padding rows are masked here too, whatever label_mask says.
  real_BxC = jnp.arange(logits_BxC.shape[1])[None, :] < classes_B[:, None]
  mask_BxC = jnp.where(real_BxC & valid_B[:, None], label_mask_BxC.astype(jnp.float32), 0.0)

  # BCE: a sum over counted elements and their count, per row.
  bce_BxC = _bce_with_logits(logits_BxC, labels_BxC)
  bce_sum_B = jnp.sum(jnp.where(mask_BxC > 0, bce_BxC * mask_BxC, 0.0), axis=1)
  bce_count_B = jnp.sum(mask_BxC, axis=1)

  # CE: the softmax over the head's real classes only, whatever the padded logits hold.
  masked_logits_BxC = jnp.where(real_BxC, logits_BxC, PADDED_LOGIT)
  log_probs_BxC = jax.nn.log_softmax(masked_logits_BxC, axis=1)
  targets_BxC = jnp.where(real_BxC, labels_BxC, 0.0)
  ce_B = -jnp.sum(jnp.where(real_BxC, targets_BxC * log_probs_BxC, 0.0), axis=1)
  ce_weight_B = (jnp.max(mask_BxC, axis=1) > 0).astype(jnp.float32)

  sum_B = jnp.where(multiclass_B, ce_B * ce_weight_B, bce_sum_B)
  count_B = jnp.where(multiclass_B, ce_weight_B, bce_count_B)
  sum_D = jax.ops.segment_sum(sum_B, dataset_id_B, num_segments=num_datasets)
  count_D = jax.ops.segment_sum(count_B, dataset_id_B, num_segments=num_datasets)
  loss_D = _safe_divide(sum_D, count_D)
  present_D = (count_D > 0).astype(jnp.float32)
  loss = _safe_divide(jnp.sum(loss_D * present_D), jnp.sum(present_D))
  return loss, loss_D, count_D


def consistency_loss(z_s_BxP, z_t_BxP, valid_B):
  """MSE between student and teacher projections over valid rows x P.

  Not normalised (ARK_SPEC.md section 9, pitfall 4); no gradient reaches the teacher.

  Args:
    z_s_BxP: student projector output.
    z_t_BxP: teacher projector output.
    valid_B: bool, False on padding rows.

  Returns:
    The scalar mean squared difference (0 when no row is valid).
  """
  z_t_BxP = jax.lax.stop_gradient(z_t_BxP)
  diff_BxP = z_s_BxP.astype(jnp.float32) - z_t_BxP.astype(jnp.float32)
  sq_B = jnp.sum(jnp.square(diff_BxP), axis=1)
  weight_B = valid_B.astype(jnp.float32)
  total = jnp.sum(jnp.where(valid_B, sq_B, 0.0))
  return _safe_divide(total, jnp.sum(weight_B) * z_s_BxP.shape[1])


def ark_loss(task, consistency, c):
  """(1 - c) * task + c * consistency; c is `schedules.consistency_weight`."""
  return (1.0 - c) * task + c * consistency
