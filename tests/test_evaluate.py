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


def _scores_with_signal(signal_N, seed, n_labels=14):
  """NIH-like scores whose positives rank higher by signal_N[i] (probit units) in row i."""
  rng = np.random.default_rng(seed)
  n = signal_N.shape[0]
  labels_NxC = (rng.random((n, n_labels)) < 0.3).astype(np.float32)
  probs_NxC = 1 / (1 + np.exp(-(rng.normal(size=(n, n_labels)) + signal_N[:, None] * labels_NxC)))
  return {'labels': labels_NxC, 'mask': np.ones_like(labels_NxC), 'teacher': probs_NxC,
          'student': probs_NxC / 2}  # exactly the same ranking: the same AUCs


def test_dataset_results_sex_subgroups_gap_and_cis():
  meta = datasets.metadata('chestxray14')
  sex_N = np.repeat(np.int32([2, 1, 0]), [600, 500, 100])  # F, M, unknown
  # Good on F (AUC = Phi(2 / sqrt 2) = 0.921), chance on M.
  scores = _scores_with_signal(np.where(sex_N == 2, 2.0, 0.0), seed=0)
  scores.update(sex=sex_N, age=np.full(1200, np.nan, np.float32))
  entry = evaluate.dataset_results(scores, meta, ['student', 'teacher'], bootstrap_samples=300,
                                   bootstrap_seed=233)
  teacher = entry['teacher']
  assert set(teacher['subgroups']) == {'sex'}  # no age known: no age groups
  sex = teacher['subgroups']['sex']
  f, m = sex['groups']['F'], sex['groups']['M']
  assert (f['n'], m['n']) == (600, 500)
  assert f['auc_mean'] == pytest.approx(0.921, abs=0.02)
  assert m['auc_mean'] == pytest.approx(0.5, abs=0.03)
  for group in (f, m):
    assert group['auc_mean_ci'][0] < group['auc_mean'] < group['auc_mean_ci'][1]
  assert sex['gap']['of'] == 'M - F'
  assert sex['gap']['value'] == pytest.approx(m['auc_mean'] - f['auc_mean'])
  lo, hi = sex['gap']['ci']
  assert lo < sex['gap']['value'] < hi < 0  # excludes 0
  # The whole set's CIs: every label's, and the mean's, around the estimates.
  assert set(teacher['auc_ci']) == set(teacher['auc'])
  for label, (lo, hi) in teacher['auc_ci'].items():
    assert lo < teacher['auc'][label] < hi
  assert teacher['auc_mean_ci'][0] < teacher['auc_mean'] < teacher['auc_mean_ci'][1]
  # Same ranking, same seed: the student's numbers are the teacher's.
  assert entry['student'] == teacher
  # Seeded: a second evaluation writes the same JSON.
  assert evaluate.dataset_results(scores, meta, ['student', 'teacher'], bootstrap_samples=300,
                                  bootstrap_seed=233) == entry


def test_dataset_results_age_bands_and_gap():
  meta = datasets.metadata('chestxray14')
  age_N = np.repeat(np.float32([25, 45, 70, np.nan]), [400, 400, 400, 50])  # none 80 or over
  signal_N = np.select([age_N < 40, age_N < 60, age_N < 80], [0.0, 1.0, 3.0], 0.0)
  scores = _scores_with_signal(signal_N, seed=1)
  scores.update(sex=np.zeros(1250, np.int32), age=age_N)  # sex unknown: no sex groups
  age = evaluate.dataset_results(scores, meta, ['teacher'], bootstrap_samples=200)[
      'teacher']['subgroups']
  assert list(age) == ['age']
  groups = age['age']['groups']
  assert list(groups) == ['<40', '40-60', '60-80'] and all(g['n'] == 400 for g in groups.values())
  # Phi(d / sqrt 2) for d = 0, 1, 3.
  for band, want in (('<40', 0.5), ('40-60', 0.760), ('60-80', 0.983)):
    assert groups[band]['auc_mean'] == pytest.approx(want, abs=0.03)
  gap = age['age']['gap']
  assert gap['of'] == '60-80 - <40'
  assert gap['value'] == pytest.approx(groups['60-80']['auc_mean'] - groups['<40']['auc_mean'])
  assert 0 < gap['ci'][0] < gap['value'] < gap['ci'][1]


def test_dataset_results_without_sex_or_age_or_bootstrap():
  meta = datasets.metadata('chestxray14')
  scores = _scores_with_signal(np.ones(300), seed=2)
  plain = evaluate.dataset_results(scores, meta, ['teacher'])  # no sex, no age arrays
  assert 'subgroups' not in plain['teacher'] and 'auc_mean_ci' in plain['teacher']
  one_sex = dict(scores, sex=np.full(300, 2, np.int32), age=np.full(300, 50.0, np.float32))
  assert 'subgroups' not in evaluate.dataset_results(scores, meta, ['teacher'])['teacher']
  assert 'subgroups' not in evaluate.dataset_results(one_sex, meta, ['teacher'])['teacher']
  # 0 resamples: the estimates alone, as before CIs.
  both = dict(scores, sex=np.arange(300, dtype=np.int32) % 3, age=np.full(300, np.nan))
  bare = evaluate.dataset_results(both, meta, ['teacher'], bootstrap_samples=0)['teacher']
  assert set(bare) == {'auc_mean', 'auc', 'n', 'subgroups'}
  assert bare['auc'] == plain['teacher']['auc']
  assert set(bare['subgroups']['sex']['groups']['F']) == {'auc_mean', 'n'}
  assert set(bare['subgroups']['sex']['gap']) == {'of', 'value'}


def test_sex_codes_are_the_pipelines():
  assert dict(evaluate.SEX_CODES) == {k: v for k, v in pipeline._SEX_CODES.items()
                                      if isinstance(k, str)}


def test_summary_table_shows_the_teachers_interval():
  results = {'a': {m: {'auc_mean': 0.8, 'auc_mean_ci': [0.75, 0.85], 'n': 10} for m in
                   ('student', 'teacher')},
             'b': {m: {'auc_mean': 0.6, 'n': 5} for m in ('student', 'teacher')}}
  lines = evaluate.summary_table(results).splitlines()
  assert lines[0].endswith('teacher 95% CI') and lines[1].endswith('[0.7500, 0.8500]')
  assert lines[2].rstrip().endswith('0.6000') and lines[3].startswith('mean')


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
  # The demo's examples carry no sex or age: CIs, no subgroups (nor their plot).
  for entry in during['results'].values():
    assert 'auc_mean_ci' in entry['teacher'] and 'subgroups' not in entry['teacher']
  assert not os.path.exists(os.path.join(workdir, 'eval', 'subgroups_step_3.png'))
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
