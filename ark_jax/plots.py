"""Pictures of the evaluations a run wrote to `workdir/eval/`.

Each eval writes `step_N.json` ({"step": N, "results": {dataset: {model:
{"auc_mean", "auc", "n", ...}, "labels": [...]}}}) and `step_N_scores.npz`
(per dataset d: `d/labels`, `d/mask`, `d/teacher`, `d/student`, all [N, C]).
These functions only read those files (plot_subgroup_auc: the results they
hold), so they run on a laptop after the fact.

Shape suffixes: N examples, C labels of a dataset.
"""

import json
import os
import re

import matplotlib

matplotlib.use('Agg')  # files only: no display on training hosts
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

MODELS = (('teacher', '-'), ('student', '--'))  # (model, line style)
_STEP_JSON = re.compile(r'step_(\d+)\.json$')
_STEP_NPZ = re.compile(r'step_(\d+)_scores\.npz$')


def _steps(eval_dir: str, pattern: re.Pattern) -> list[tuple[int, str]]:
  """(step, path) of the files in eval_dir matching pattern, by step."""
  found = []
  for name in os.listdir(eval_dir):
    match = pattern.fullmatch(name)
    if match:
      found.append((int(match.group(1)), os.path.join(eval_dir, name)))
  return sorted(found)


def roc_curve(scores_N: np.ndarray, positive_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ROC points at every distinct score, as sklearn.metrics.roc_curve(drop_intermediate=False).

  Args:
    scores_N: higher means more likely positive.
    positive_N: truthy for positives; needs at least one of each class.

  Returns:
    (fpr, tpr), each of length (distinct scores + 1), starting at (0, 0).
  """
  scores_N = np.asarray(scores_N, np.float64).ravel()
  positive_N = np.asarray(positive_N, bool).ravel()
  order = np.argsort(-scores_N, kind='mergesort')
  scores_N, positive_N = scores_N[order], positive_N[order]
  # A threshold between distinct scores only: tied examples enter together.
  last_of_tie = np.r_[np.flatnonzero(np.diff(scores_N)), scores_N.size - 1]
  tps = np.cumsum(positive_N)[last_of_tie]
  fps = (last_of_tie + 1) - tps
  if tps[-1] == 0 or fps[-1] == 0:
    raise ValueError('ROC needs at least one positive and one negative')
  return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
  """Area under a curve by the trapezoid rule (what roc_auc_score computes)."""
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def plot_auc_history(workdir: str) -> str:
  """Mean AUC per dataset over the steps of all evals; teacher solid, student dashed.

  Args:
    workdir: the run's directory, holding eval/step_N.json.

  Returns:
    Path of the written eval/auc_history.png.
  """
  eval_dir = os.path.join(workdir, 'eval')
  history = {}  # (dataset, model) -> [(step, auc_mean)]
  for step, path in _steps(eval_dir, _STEP_JSON):
    with open(path) as f:
      results = json.load(f)['results']
    for dataset, by_model in results.items():
      for model, _ in MODELS:
        if model in by_model and by_model[model].get('auc_mean') is not None:
          history.setdefault((dataset, model), []).append((step, by_model[model]['auc_mean']))
  if not history:
    raise FileNotFoundError(f'no eval/step_N.json with results in {workdir}')

  datasets = sorted({dataset for dataset, _ in history})
  colours = plt.get_cmap('tab10' if len(datasets) <= 10 else 'tab20')
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, dataset in enumerate(datasets):
    for model, style in MODELS:
      points = history.get((dataset, model))
      if points:
        steps, aucs = zip(*points)
        # Markers: a run with a single eval still shows its points.
        ax.plot(steps, aucs, style, marker='o', markersize=4, color=colours(i),
                label=f'{dataset} {model}')
  ax.set_xlabel('step')
  ax.set_ylabel('mean AUC')
  ax.set_title('Mean AUC per dataset (teacher solid, student dashed)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small', loc='best')
  out = os.path.join(eval_dir, 'auc_history.png')
  fig.savefig(out, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return out


def plot_roc_curves(workdir: str, step: int | None = None) -> str:
  """The teacher's ROC curve of every label, one subplot per dataset.

  Labels without a positive or without a negative among the counted
  (mask != 0) examples have no curve and are left out.

  Args:
    workdir: the run's directory, holding eval/step_N.json and
      eval/step_N_scores.npz.
    step: which eval; None takes the last one that saved scores.

  Returns:
    Path of the written eval/roc_step_N.png.
  """
  eval_dir = os.path.join(workdir, 'eval')
  if step is None:
    saved = _steps(eval_dir, _STEP_NPZ)
    if not saved:
      raise FileNotFoundError(f'no eval/step_N_scores.npz in {workdir}')
    step = saved[-1][0]
  with open(os.path.join(eval_dir, f'step_{step}.json')) as f:
    results = json.load(f)['results']
  with np.load(os.path.join(eval_dir, f'step_{step}_scores.npz')) as npz:
    arrays = {key: npz[key] for key in npz.files}
  datasets = sorted({key.rsplit('/', 1)[0] for key in arrays})

  cols = min(len(datasets), 3)
  rows = -(-len(datasets) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
  for ax, dataset in zip(axes.flat, datasets):
    labels_NxC = arrays[f'{dataset}/labels'] > 0.5
    mask_NxC = arrays[f'{dataset}/mask'] != 0
    scores_NxC = arrays[f'{dataset}/teacher']
    names = results.get(dataset, {}).get('labels') or []
    aucs = []
    for c in range(labels_NxC.shape[1]):
      counted = mask_NxC[:, c]
      positive = labels_NxC[counted, c]
      if positive.all() or not positive.any():
        continue
      fpr, tpr = roc_curve(scores_NxC[counted, c], positive)
      aucs.append(auc(fpr, tpr))
      name = names[c] if c < len(names) else f'label {c}'
      ax.plot(fpr, tpr, linewidth=1, label=f'{name} ({aucs[-1]:.3f})')
    ax.plot([0, 1], [0, 1], ':', color='grey', linewidth=0.8)
    mean = f'mean AUC {np.mean(aucs):.3f}' if aucs else 'no label with both classes'
    ax.set_title(f'{dataset}: teacher, {mean}', fontsize='medium')
    ax.set_xlabel('false positive rate')
    ax.set_ylabel('true positive rate')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect('equal')
    if aucs:
      ax.legend(fontsize='x-small', loc='lower right')
  for ax in axes.flat[len(datasets):]:
    ax.axis('off')
  fig.suptitle(f'ROC curves at step {step}')
  out = os.path.join(eval_dir, f'roc_step_{step}.png')
  fig.savefig(out, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return out


def subgroup_points(results) -> dict[str, list[tuple[str, str, str, float, list | None]]]:
  """The points plot_subgroup_auc draws, read straight from an eval's `results`.

  Returns:
    Per dataset with subgroups, one (model, attribute, group, auc_mean,
    auc_mean_ci or None) per model and group.
  """
  points = {}
  for dataset, by_model in results.items():
    for model, _ in MODELS:
      for attr, entry in by_model.get(model, {}).get('subgroups', {}).items():
        for group, values in entry['groups'].items():
          points.setdefault(dataset, []).append(
              (model, attr, group, values['auc_mean'], values.get('auc_mean_ci')))
  return points


def _gap_lines(by_model) -> str:
  """The teacher's gaps, a line each: 'teacher, sex gap M - F: -0.031 [-0.062, +0.001]'."""
  lines = []
  for attr, entry in by_model.get('teacher', {}).get('subgroups', {}).items():
    gap = entry.get('gap')
    if gap:
      ci = gap.get('ci')
      lines.append(f'teacher, {attr} gap {gap["of"]}: {gap["value"]:+.3f}'
                   + (f' [{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else ''))
  return '\n'.join(lines)


def plot_subgroup_auc(results, path: str) -> str | None:
  """Mean AUC per subgroup (sex, age band) with its 95% CI, one subplot per dataset.

  Teacher circles, student squares; the dotted line is the teacher's mean AUC
  over the whole set; the subtitle gives the teacher's gaps with their CIs.

  Args:
    results: an eval's results ({dataset: {model: {..., 'subgroups': ...}}}, as
      evaluate.dataset_results writes them).
    path: the PNG to write, e.g. eval/subgroups_step_N.png.

  Returns:
    path, or None (nothing written) when no dataset has subgroups.
  """
  points = subgroup_points(results)
  if not points:
    return None
  cols = min(len(points), 3)
  rows = -(-len(points) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
  for ax, (dataset, dataset_points) in zip(axes.flat, points.items()):
    groups = list(dict.fromkeys((attr, group) for _, attr, group, _, _ in dataset_points))
    for m, (model, _) in enumerate(MODELS):
      mine = [p for p in dataset_points if p[0] == model]
      if not mine:
        continue
      x = [groups.index((attr, group)) + (m - 0.5) * 0.2 for _, attr, group, _, _ in mine]
      y = [auc_mean for _, _, _, auc_mean, _ in mine]
      # NaN-free error bars: a group without a CI gets none.
      err = np.array([[a - ci[0], ci[1] - a] if ci else [0.0, 0.0]
                      for _, _, _, a, ci in mine]).T
      ax.errorbar(x, y, yerr=err, fmt='o' if model == 'teacher' else 's', capsize=3,
                  markersize=5, label=model)
    overall = results[dataset].get('teacher', {}).get('auc_mean')
    if overall is not None:
      ax.axhline(overall, linestyle=':', color='grey', linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f'{group}\n({attr})' for attr, group in groups],
                  fontsize='small')
    ax.set_ylabel('mean AUC of the subgroup (95% CI)')
    ax.set_title('\n'.join([dataset, _gap_lines(results[dataset])]).strip(), fontsize='small')
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize='x-small', loc='best')
  for ax in axes.flat[len(points):]:
    ax.axis('off')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path
