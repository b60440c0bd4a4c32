"""Tests of ark_jax/plots.py: ROC points against sklearn, pictures from a fake eval dir."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ark_jax import plots

sklearn_metrics = pytest.importorskip('sklearn.metrics')

DATASETS = {'chexpert': ['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Effusion'],
            'rsna': ['No Lung Opacity', 'Lung Opacity', 'Normal']}


@pytest.mark.parametrize('ties', [False, True])
def test_roc_curve_matches_sklearn(ties):
  rng = np.random.default_rng(int(ties))
  positive_N = rng.random(500) < 0.3
  scores_N = rng.random(500) + 0.5 * positive_N
  if ties:  # few distinct scores: tied examples must enter the curve together
    scores_N = np.round(scores_N * 5) / 5
  fpr, tpr = plots.roc_curve(scores_N, positive_N)
  want_fpr, want_tpr, _ = sklearn_metrics.roc_curve(positive_N, scores_N,
                                                    drop_intermediate=False)
  np.testing.assert_allclose(fpr, want_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, want_tpr, atol=1e-12)
  assert abs(plots.auc(fpr, tpr) - sklearn_metrics.roc_auc_score(positive_N, scores_N)) < 1e-9


def test_roc_curve_needs_both_classes():
  with pytest.raises(ValueError):
    plots.roc_curve(np.arange(4.0), np.ones(4, bool))


def _write_eval(eval_dir, step, rng, with_scores=True):
  """One eval as the evaluator writes it; the teacher improves with the step."""
  results, arrays = {}, {}
  for dataset, names in DATASETS.items():
    n, c = 200, len(names)
    labels_NxC = (rng.random((n, c)) < 0.3).astype(np.float32)
    mask_NxC = (rng.random((n, c)) < 0.9).astype(np.float32)
    labels_NxC[:, -1] = 0  # a label with no positive: no curve, no crash
    signal = step / 1000
    teacher_NxC = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 3 * signal * labels_NxC)))
    student_NxC = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 2 * signal * labels_NxC)))
    results[dataset] = {'labels': names}
    for model, scores_NxC in (('teacher', teacher_NxC), ('student', student_NxC)):
      aucs = {name: float(sklearn_metrics.roc_auc_score(labels_NxC[:, i], scores_NxC[:, i]))
              for i, name in enumerate(names[:-1])}
      results[dataset][model] = {'auc_mean': float(np.mean(list(aucs.values()))),
                                 'auc': aucs, 'n': n}
    arrays.update({f'{dataset}/labels': labels_NxC, f'{dataset}/mask': mask_NxC,
                   f'{dataset}/teacher': teacher_NxC, f'{dataset}/student': student_NxC})
  with open(os.path.join(eval_dir, f'step_{step}.json'), 'w') as f:
    json.dump({'step': step, 'results': results}, f)
  if with_scores:
    np.savez(os.path.join(eval_dir, f'step_{step}_scores.npz'), **arrays)


def _assert_png(path, min_side=200):
  assert os.path.isfile(path)
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert min(image.size) >= min_side and max(image.size) <= 5000
    image.load()  # decodes: a truncated file raises


def test_plots_of_one_eval(tmp_path):
  eval_dir = tmp_path / 'eval'
  eval_dir.mkdir()
  _write_eval(str(eval_dir), 500, np.random.default_rng(0))
  assert plots.plot_auc_history(str(tmp_path)) == str(eval_dir / 'auc_history.png')
  _assert_png(eval_dir / 'auc_history.png')
  assert plots.plot_roc_curves(str(tmp_path)) == str(eval_dir / 'roc_step_500.png')
  _assert_png(eval_dir / 'roc_step_500.png')


def test_plots_of_several_evals(tmp_path):
  eval_dir = tmp_path / 'eval'
  eval_dir.mkdir()
  rng = np.random.default_rng(1)
  for step in (100, 1000, 200):  # written out of order; step 1000 without scores
    _write_eval(str(eval_dir), step, rng, with_scores=step != 1000)
  _assert_png(plots.plot_auc_history(str(tmp_path)))
  # The last eval that saved scores, unless a step is asked for.
  assert plots.plot_roc_curves(str(tmp_path)) == str(eval_dir / 'roc_step_200.png')
  _assert_png(plots.plot_roc_curves(str(tmp_path), step=100))
  assert sorted(os.listdir(eval_dir)) == sorted(
      ['auc_history.png', 'roc_step_100.png', 'roc_step_200.png', 'step_100.json',
       'step_100_scores.npz', 'step_1000.json', 'step_200.json', 'step_200_scores.npz'])


def test_plots_without_evals(tmp_path):
  (tmp_path / 'eval').mkdir()
  with pytest.raises(FileNotFoundError):
    plots.plot_auc_history(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    plots.plot_roc_curves(str(tmp_path))


def _subgroup_results():
  """An eval's results with sex and age subgroups on one dataset, as JSON reads them back."""
  def group(auc, n, ci=True):
    return {'auc_mean': auc, 'auc_mean_ci': [auc - 0.02, auc + 0.03] if ci else None, 'n': n}
  results = {'rsna': {'labels': DATASETS['rsna'],
                      'teacher': {'auc_mean': 0.7, 'auc': {}, 'n': 100},
                      'student': {'auc_mean': 0.6, 'auc': {}, 'n': 100}},
             'chexpert': {'labels': DATASETS['chexpert']}}
  for model, shift in (('teacher', 0.0), ('student', -0.1)):
    results['chexpert'][model] = {
        'auc_mean': 0.8 + shift, 'auc': {}, 'n': 300,
        'subgroups': {
            'sex': {'groups': {'F': group(0.9 + shift, 150), 'M': group(0.7 + shift, 140)},
                    'gap': {'of': 'M - F', 'value': -0.2, 'ci': [-0.25, -0.15]}},
            'age': {'groups': {'<40': group(0.85 + shift, 100),
                               '60-80': group(0.75 + shift, 90, ci=False)},
                    'gap': {'of': '<40 - 60-80', 'value': 0.1}}}}
  return json.loads(json.dumps(results))


def test_subgroup_plot_draws_the_jsons_values(tmp_path):
  results = _subgroup_results()
  points = plots.subgroup_points(results)
  assert list(points) == ['chexpert']  # rsna has no subgroups
  sex_f = results['chexpert']['teacher']['subgroups']['sex']['groups']['F']
  assert ('teacher', 'sex', 'F', sex_f['auc_mean'], sex_f['auc_mean_ci']) in points['chexpert']
  assert ('student', 'age', '60-80', 0.65, None) in points['chexpert']
  assert len(points['chexpert']) == 8  # 2 models x 4 groups
  path = str(tmp_path / 'subgroups_step_7.png')
  assert plots.plot_subgroup_auc(results, path) == path
  _assert_png(path)
  assert os.path.getsize(path) > 1000


def test_no_subgroup_plot_without_subgroups(tmp_path):
  results = _subgroup_results()
  del results['chexpert']
  path = str(tmp_path / 'subgroups_step_7.png')
  assert plots.plot_subgroup_auc(results, path) is None and not os.path.exists(path)
