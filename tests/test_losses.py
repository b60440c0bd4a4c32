"""Losses: a mixed batch checked against an explicit numpy computation; masking and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ark_jax import losses
from ark_jax.models.ark import PADDED_LOGIT

# Datasets: 0 BCE with 3 classes, 1 BCE with 2 classes, 2 CE with 3 classes (Cmax = 3).
IS_MULTICLASS = np.array([False, False, True])
NUM_CLASSES = np.array([3, 2, 3])


def _mixed_batch():
  """Two rows per dataset, some labels masked, a soft CE row, then one padding row."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 3)).astype(np.float32) * 2
  logits[2:4, 2] = PADDED_LOGIT  # dataset 1 has 2 classes
  labels = np.array([[1, 0, 1],
                     [0, 1, 0],
                     [1, 0, 0],
                     [0.7, 1, 0],  # a soft (LSR-ones) label
                     [0, 0, 1],
                     [0.1, 0.8, 0.1],  # soft CE target
                     [0, 0, 0]], np.float32)
  mask = np.array([[1, 0, 1],  # row 0: label 1 'ignore'd
                   [1, 1, 1],
                   [1, 1, 0],
                   [0, 1, 0],  # row 3: label 0 'ignore'd
                   [1, 1, 1],
                   [1, 1, 1],
                   [0, 0, 0]], np.float32)  # padding row
  dataset_id = np.array([0, 0, 1, 1, 2, 2, 0], np.int32)
  valid = np.array([True] * 6 + [False])
  return logits, labels, mask, dataset_id, valid


def _numpy_reference(logits, labels, mask, dataset_id, valid):
  """Written out per dataset: BCE over unmasked elements, CE over rows, mean over datasets."""
  logits = logits.astype(np.float64)
  def bce(x, y):
    return -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))
  per_dataset = []
  for d in range(3):
    rows = [i for i in range(len(valid)) if valid[i] and dataset_id[i] == d]
    n = NUM_CLASSES[d]
    if IS_MULTICLASS[d]:
      terms = []
      for i in rows:
        x = logits[i, :n]
        log_p = x - np.log(np.sum(np.exp(x)))
        terms.append(-np.sum(labels[i, :n] * log_p))
    else:
      terms = [bce(logits[i, c], labels[i, c]) for i in rows for c in range(n) if mask[i, c]]
    per_dataset.append(np.mean(terms))
  return np.mean(per_dataset), np.array(per_dataset)


@jax.jit
def _loss(logits, labels, mask, dataset_id, valid, num_classes=NUM_CLASSES):
  return losses.task_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                          jnp.asarray(dataset_id), jnp.asarray(IS_MULTICLASS),
                          jnp.asarray(num_classes), jnp.asarray(valid))


def test_mixed_batch_matches_numpy():
  batch = _mixed_batch()
  loss, loss_D, count_D = _loss(*batch)
  want, want_D = _numpy_reference(*batch)
  np.testing.assert_allclose(loss_D, want_D, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Counted BCE elements (5 and 3), then CE rows (2).
  np.testing.assert_array_equal(count_D, [5, 3, 2])


def test_padded_logits_and_padding_rows_do_not_matter():
  logits, labels, mask, dataset_id, valid = _mixed_batch()
  want = _loss(logits, labels, mask, dataset_id, valid)[0]
  garbage = logits.copy()
  garbage[2:4, 2] = 7.0  # a padded class's logit that is not PADDED_LOGIT
  garbage[6] = [50.0, -50.0, 3.0]  # padding row
  labels = labels.copy()
  labels[6] = 1.0
  mask = mask.copy()
  mask[2:4, 2] = 1.0  # a mask that forgot the padded class
  np.testing.assert_allclose(_loss(garbage, labels, mask, dataset_id, valid)[0], want, rtol=1e-6)


def test_single_dataset_equals_reference_reduction():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = (rng.random((4, 3)) > 0.5).astype(np.float32)
  ones = np.ones((4, 3), np.float32)
  valid = np.ones(4, bool)
  # BCEWithLogitsLoss(reduction='mean') over B x n_d.
  loss = _loss(logits, labels, ones, np.zeros(4, np.int32), valid)[0]
  np.testing.assert_allclose(loss, optax.sigmoid_binary_cross_entropy(logits, labels).mean(),
                             rtol=1e-6)
  # CrossEntropyLoss over B.
  onehot = np.eye(3, dtype=np.float32)[[0, 2, 1, 2]]
  loss = _loss(logits, onehot, ones, np.full(4, 2, np.int32), valid)[0]
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy(logits, onehot).mean(), rtol=1e-6)
  # A 2-class CE head in Cmax = 3: the padded class is out of the softmax even
  # when its logit is not PADDED_LOGIT (and its label and mask are not 0).
  onehot = np.eye(3, dtype=np.float32)[[0, 1, 1, 0]]
  garbage = logits.copy()
  garbage[:, 2] = 5.0
  loss = _loss(garbage, onehot + np.float32([0, 0, 1]), ones, np.full(4, 2, np.int32), valid,
               num_classes=np.array([3, 2, 2]))[0]
  np.testing.assert_allclose(
      loss, optax.softmax_cross_entropy(logits[:, :2], onehot[:, :2]).mean(), rtol=1e-6)


def test_absent_and_fully_masked_datasets():
  logits, labels, mask, dataset_id, valid = _mixed_batch()
  # Dataset 1 entirely masked: the mean is over datasets 0 and 2 only.
  mask = mask.copy()
  mask[2:4] = 0
  loss, loss_D, count_D = _loss(logits, labels, mask, dataset_id, valid)
  assert count_D[1] == 0 and loss_D[1] == 0
  np.testing.assert_allclose(loss, (loss_D[0] + loss_D[2]) / 2, rtol=1e-6)
  # Nothing counts at all: 0, not NaN, with finite zero gradients.
  zeros = np.zeros_like(mask)
  loss, grad = jax.jit(jax.value_and_grad(lambda x: _loss(x, labels, zeros, dataset_id, valid)[0]))(
      jnp.asarray(logits))
  assert loss == 0
  np.testing.assert_array_equal(grad, 0)


def test_gradients_finite_and_zero_where_masked():
  logits, labels, mask, dataset_id, valid = _mixed_batch()
  grad = jax.jit(jax.grad(lambda x: _loss(x, labels, mask, dataset_id, valid)[0]))(
      jnp.asarray(logits))
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert grad[0, 1] == 0 and grad[3, 0] == 0  # 'ignore'd labels
  np.testing.assert_array_equal(grad[2:4, 2], 0)  # padded class
  np.testing.assert_array_equal(grad[6], 0)  # padding row
  assert np.all(grad[[1, 4, 5]] != 0)
  # BCE: d loss / d logit = (sigmoid(x) - y) / (3 datasets * 5 counted elements).
  want = (1 / (1 + np.exp(-logits[1, 0].astype(np.float64))) - labels[1, 0]) / 15
  np.testing.assert_allclose(grad[1, 0], want, rtol=1e-5)


def test_consistency_loss():
  rng = np.random.default_rng(2)
  z_s = rng.normal(size=(3, 5)).astype(np.float32)
  z_t = rng.normal(size=(3, 5)).astype(np.float32)
  z_t[2] = 100.0  # padding row
  valid = np.array([True, True, False])
  loss_fn = jax.jit(losses.consistency_loss)
  loss = loss_fn(jnp.asarray(z_s), jnp.asarray(z_t), jnp.asarray(valid))
  np.testing.assert_allclose(loss, np.mean((z_s[:2] - z_t[:2]) ** 2), rtol=1e-6)
  grad_s, grad_t = jax.jit(jax.grad(losses.consistency_loss, argnums=(0, 1)))(
      jnp.asarray(z_s), jnp.asarray(z_t), jnp.asarray(valid))
  np.testing.assert_array_equal(grad_t, 0)  # stop_gradient on the teacher
  np.testing.assert_allclose(grad_s[:2], 2 * (z_s[:2] - z_t[:2]) / 10, rtol=1e-5)
  np.testing.assert_array_equal(grad_s[2], 0)
  assert loss_fn(jnp.asarray(z_s), jnp.asarray(z_t), jnp.zeros(3, bool)) == 0


def test_ark_loss():
  assert losses.ark_loss(2.0, 4.0, 0.0) == 2.0
  assert losses.ark_loss(2.0, 4.0, 0.25) == 0.75 * 2.0 + 0.25 * 4.0
  assert losses.ark_loss(2.0, 4.0, 0.5) == 3.0
