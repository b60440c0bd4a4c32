"""Evaluation: head probabilities, views, AUC entries as sklearn's, --mode=eval reproduces the run's."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from ark_jax import augment
from ark_jax import evaluate
from ark_jax import sharding
from ark_jax import train
from ark_jax.models import ark
from ark_jax.models import registry
from input_pipeline import datasets
from input_pipeline import pipeline
from tests.conftest import tiny_demo_config


def test_head_probabilities_sigmoid_or_softmax_over_real_classes():
  logits_BxC = jnp.asarray([[0.0, 1.0, 2.0], [0.0, np.log(3.0), -1e9]])
  # Head 0: multi-label with 3 classes; head 1: multi-class with 2 (one padded).
  probs = np.asarray(evaluate.head_probabilities(
      logits_BxC, jnp.asarray([0, 1]), np.array([False, True]), np.array([3, 2])))
  np.testing.assert_allclose(probs[0], 1 / (1 + np.exp(-np.array([0.0, 1.0, 2.0]))), rtol=1e-6)
  np.testing.assert_allclose(probs[1], [0.25, 0.75, 0.0], atol=1e-6)


def test_center_view_crops_the_middle_and_equals_the_teacher_view_at_equal_sizes():
  image_BxRxR = jax.random.randint(jax.random.PRNGKey(0), (2, 12, 12), 0, 256).astype(jnp.uint8)
  np.testing.assert_allclose(evaluate.center_view(image_BxRxR, 12),
                             augment.teacher_view(image_BxRxR, 12), atol=1e-5)
  expected = augment.normalize(image_BxRxR[:, 2:10, 2:10].astype(jnp.float32) / 255.0)
  np.testing.assert_array_equal(evaluate.center_view(image_BxRxR, 8), expected)


def test_dataset_results_equal_sklearn_and_use_chexperts_five_labels():
  meta = datasets.metadata('chexpert')
  rng = np.random.default_rng(0)
  n, c = 200, meta.num_classes
  labels_NxC = (rng.random((n, c)) < 0.3).astype(np.float32)
  labels_NxC[:, meta.label_names.index('Fracture')] = 0  # no positive: left out
  probs_NxC = np.clip(labels_NxC * 0.3 + rng.random((n, c)) * 0.7, 0, 1)
  mask_NxC = (rng.random((n, c)) < 0.9).astype(np.float32)
  scores = {'labels': labels_NxC, 'mask': mask_NxC, 'teacher': probs_NxC,
            'student': 1 - probs_NxC}
  entry = evaluate.dataset_results(scores, meta, ['student', 'teacher'])
  teacher = entry['teacher']
  assert 'Fracture' not in teacher['auc'] and len(teacher['auc']) == c - 1
  for k, name in enumerate(meta.label_names):
    if name == 'Fracture':
      continue
    keep = mask_NxC[:, k] > 0
    expected = sk_metrics.roc_auc_score(labels_NxC[keep, k], probs_NxC[keep, k])
    assert teacher['auc'][name] == pytest.approx(expected, abs=1e-12)
    assert entry['student']['auc'][name] == pytest.approx(1 - expected, abs=1e-12)
  five = evaluate.EVAL_LABELS['chexpert']
  assert teacher['auc_mean'] == pytest.approx(np.mean([teacher['auc'][l] for l in five]))
  assert teacher['auc_mean'] != pytest.approx(np.mean(list(teacher['auc'].values())))
  assert teacher['n'] == n and 'accuracy' not in teacher and entry['labels'] == list(meta.label_names)


def test_eval_mode_reproduces_the_runs_final_eval_and_matches_sklearn(demo_data_dir, tmp_path):
  workdir = str(tmp_path)
  config = tiny_demo_config(demo_data_dir, max_steps=3, eval_every_steps=0)
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval', 'step_3.json')) as f:
    during = json.load(f)
  assert during['step'] == 3 and list(during['results']) == list(config.data.datasets)
  scores = np.load(os.path.join(workdir, 'eval', 'step_3_scores.npz'))
  for name, entry in during['results'].items():
    labels, mask = scores[f'{name}/labels'], scores[f'{name}/mask']
    assert entry["teacher"]["n"] == labels.shape[0] == pipeline.dataset_sizes(config.data, "test")[0]
    for model in ('student', 'teacher'):
      probs = scores[f'{name}/{model}']
      for k, label in enumerate(entry['labels']):
        keep = mask[:, k] > 0
        if label in entry[model]['auc']:
          expected = sk_metrics.roc_auc_score(labels[keep, k] > 0.5, probs[keep, k])
          assert entry[model]['auc'][label] == pytest.approx(expected, abs=1e-9)
    if name == 'demo_count':  # multi-class: softmax rows sum to 1, accuracy reported
      np.testing.assert_allclose(scores[f'{name}/teacher'].sum(axis=1), 1.0, atol=1e-5)
      assert 0.0 <= entry['teacher']['accuracy'] <= 1.0
  for png in ('auc_history.png', 'roc_step_3.png'):
    assert os.path.getsize(os.path.join(workdir, 'eval', png)) > 1000
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events), events

  os.remove(os.path.join(workdir, 'eval', 'step_3.json'))
  again = train.evaluate_checkpoint(config, workdir)
  assert again == during['results']
  with open(os.path.join(workdir, 'eval', 'step_3.json')) as f:
    assert json.load(f) == during


def test_ten_crop_prediction_averages_the_probabilities_of_the_ten_views(demo_data_dir):
  config = tiny_demo_config(demo_data_dir, ten_crop=True, **{'model.img_size': 16,
                                                              'model.window_size': 2})
  mesh = sharding.make_mesh(config.mesh)
  model = registry.create_model(config.model, config.data.num_classes, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  is_multiclass = [False, False, False, True]
  predict = evaluate.make_predict_fn(graphdef, config, mesh, config.data.num_classes,
                                     is_multiclass)
  image_BxRxR = np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8)
  dataset_id_B = np.arange(8, dtype=np.int32) % 4
  with jax.set_mesh(mesh):
    got = np.asarray(predict(params, image_BxRxR, dataset_id_B))
  views = augment.ten_crop(jnp.asarray(image_BxRxR), 16)
  expected = np.mean([np.asarray(evaluate.head_probabilities(
      ark.select_head(model(v, train=False)['logits'], dataset_id_B), dataset_id_B,
      np.array(is_multiclass), np.array(config.data.num_classes))) for v in views], axis=0)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Not the single centre view: the corners and flips count.
  centre = np.asarray(evaluate.head_probabilities(
      ark.select_head(model(views[4], train=False)['logits'], dataset_id_B), dataset_id_B,
      np.array(is_multiclass), np.array(config.data.num_classes)))
  assert np.abs(got - centre).max() > 1e-4
