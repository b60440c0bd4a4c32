"""Evaluation: per-dataset, per-label AUC of the student and the teacher.

ARK_SPEC.md section 5; DESIGN.md section 2 (`DIR/eval/step_N.json`). For each
configured dataset, one ordered pass over `config.eval_split`; each example is
scored by its own dataset's head: sigmoid for multi-label and binary sets,
softmax for multi-class ones. Views, as the reference:

- default (its validation transform): centre crop S of the stored R x R image;
- `config.ten_crop` (its test transform): the four corners, the centre and their
  horizontal flips, the per-crop probabilities averaged (not the logits).

AUC per label with labels lacking a positive (or a negative) left out, the
`label_mask` respected (an 'ignore'd uncertain label does not count); mean AUC
over the dataset's evaluation labels (CheXpert: the 5 competition labels);
argmax accuracy for multi-class sets.

Every AUC reported carries a 95% bootstrap CI (`config.bootstrap_samples`
resamples of the rows, seeded by `config.bootstrap_seed`; percentile method;
ark_jax.metrics). Where a dataset's examples carry sex (both F and M present) or
age (two or more of AGE_BANDS present), each model's entry adds `subgroups`:
the mean AUC of each group with its CI and n, and the gap between groups with
the CI of the gap. All CIs of one dataset come from the same resamples of its
whole eval set, so a subgroup's share of a resample varies as it would between
samples, and a gap's CI is the bootstrap of the difference itself.

Files (process 0): `eval/step_N.json` (the results) and `eval/step_N_scores.npz`
(per dataset: labels, mask, student and teacher probabilities, sex and age), from
which ark_jax.plots draws ROC curves and subgroup analyses are computed.

Shape suffixes: B batch, R stored side, S model input side, D datasets, C classes.
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ark_jax import augment
from ark_jax import metrics
from ark_jax import sharding
from ark_jax.models import ark
from input_pipeline import datasets
from input_pipeline import pipeline

MODELS = ('student', 'teacher')
# Datasets whose mean AUC is over some labels only (ARK_SPEC.md section 5).
EVAL_LABELS = {
    'chexpert': ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion'),
}
EVAL_FIELDS = ('image', 'dataset_id')
BOOTSTRAP_SAMPLES = 1000  # default of config.bootstrap_samples (the reference's zero-shot CIs)
BOOTSTRAP_SEED = 233  # default of config.bootstrap_seed (the same)
# The pipeline's sex codes (input_pipeline/pipeline.py: 0 unknown, 1 M, 2 F).
SEX_CODES = (('F', 2), ('M', 1))
# Age bands in years, [low, high); unknown ages (NaN) belong to none.
AGE_BANDS = (('<40', 0.0, 40.0), ('40-60', 40.0, 60.0), ('60-80', 60.0, 80.0),
             ('>=80', 80.0, np.inf))


def center_view(image_BxRxR: jax.Array, size: int) -> jax.Array:
  """The reference's validation view: centre crop S x S (a resize when R < S)."""
  r = image_BxRxR.shape[-1]
  if r < size:
    return augment.teacher_view(image_BxRxR, size)
  o = (r - size) // 2
  return augment.normalize(image_BxRxR[:, o:o + size, o:o + size].astype(jnp.float32) / 255.0)


def _probabilities(logits_XxC: jax.Array, is_multiclass_X: jax.Array,
                   num_classes_X: jax.Array) -> jax.Array:
  """Sigmoid, or softmax over the first num_classes; X any leading shape (broadcast)."""
  classes_XxC = jnp.arange(logits_XxC.shape[-1]).reshape((1,) * (logits_XxC.ndim - 1) + (-1,))
  real_XxC = classes_XxC < num_classes_X[..., None]
  softmax_XxC = jax.nn.softmax(jnp.where(real_XxC, logits_XxC, -jnp.inf), axis=-1)
  return jnp.where(is_multiclass_X[..., None], softmax_XxC, jax.nn.sigmoid(logits_XxC))


def head_probabilities(logits_BxC: jax.Array, dataset_id_B: jax.Array,
                       is_multiclass_D: np.ndarray, num_classes_D: np.ndarray) -> jax.Array:
  """Each row's own head: sigmoid, or softmax over its real classes for multi-class sets."""
  return _probabilities(logits_BxC, jnp.asarray(is_multiclass_D)[dataset_id_B],
                        jnp.asarray(num_classes_D)[dataset_id_B])


def all_head_probabilities(logits_BxDxC: jax.Array, is_multiclass_D: np.ndarray,
                           num_classes_D: np.ndarray) -> jax.Array:
  """Every head for every row (zero-shot): [B, D, C]; padded classes are not meaningful."""
  return _probabilities(logits_BxDxC, jnp.asarray(is_multiclass_D)[None],
                        jnp.asarray(num_classes_D)[None])


def make_predict_fn(graphdef, config, mesh, num_classes: Sequence[int],
                    is_multiclass: Sequence[bool]):
  """Jitted `(params, image_BxRxR, dataset_id_B) -> probs_BxC` of each row's own head.

  Args:
    graphdef: the ArkModel graphdef (student and teacher share it).
    config: the run's ConfigDict (model.img_size, ten_crop, sharding.rules).
    mesh: the run's mesh; the batch is split over all of it.
    num_classes: classes per head, in head order.
    is_multiclass: per head, True for softmax heads.

  Returns:
    The jitted function; its output is replicated (every process reads all rows).
  """
  size, rules = config.model.img_size, config.sharding.rules
  ten_crop = bool(config.get('ten_crop', False))
  num_classes_D = np.asarray(num_classes, np.int32)
  is_multiclass_D = np.asarray(is_multiclass, bool)

  def predict(params, image_BxRxR, dataset_id_B):
    with nnx.logical_axis_rules(rules):
      model = nnx.merge(graphdef, params)

      def probs(x_BxSxSx3):
        logits_BxC = ark.select_head(model(x_BxSxSx3, train=False)['logits'], dataset_id_B)
        return head_probabilities(logits_BxC.astype(jnp.float32), dataset_id_B, is_multiclass_D,
                                  num_classes_D)

      if not ten_crop:
        return probs(center_view(image_BxRxR, size))
      # Ten forwards of B images (the reference runs one of 10 B); probabilities
      # averaged, not logits.
      views_TxBxSxSx3 = augment.ten_crop(image_BxRxR, size)
      return sum(probs(views_TxBxSxSx3[t]) for t in range(views_TxBxSxSx3.shape[0])) / \
          views_TxBxSxSx3.shape[0]

  # Inputs keep the shardings they arrive with (state as created, batch split).
  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def _gather(x: np.ndarray) -> np.ndarray:
  """This process's rows -> every process's rows (in process order)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def score_dataset(predict, params_by_model: Mapping[str, Any], config, name: str, mesh,
                  batch_size: int) -> dict[str, np.ndarray]:
  """Runs every model over one dataset's eval split.

  Returns:
    {'labels', 'mask', 'sex', 'age', and one probs_NxC per model name}, the
    padding rows removed, C the dataset's own class count.
  """
  d = list(config.data.datasets).index(name)
  num_classes = config.data.num_classes[d]
  batch_sh = sharding.batch_sharding(mesh)
  chunks: dict[str, list[np.ndarray]] = {}
  it = pipeline.eval_iterator(config.data, name, config.get('eval_split', 'test'), batch_size)
  try:
    for host_batch in it:
      global_batch = [jax.make_array_from_process_local_data(batch_sh, np.asarray(host_batch[f]))
                      for f in EVAL_FIELDS]
      valid_B = _gather(np.asarray(host_batch['valid'], bool))
      for model_name, params in params_by_model.items():
        probs_BxC = np.asarray(predict(params, *global_batch))
        chunks.setdefault(model_name, []).append(probs_BxC[valid_B, :num_classes])
      mask_BxC = np.asarray(host_batch['label_mask'])[:, :num_classes] * np.asarray(
          host_batch['valid'])[:, None]
      for field, value in (('labels', np.asarray(host_batch['labels'])[:, :num_classes]),
                           ('mask', mask_BxC), ('sex', np.asarray(host_batch['sex'])),
                           ('age', np.asarray(host_batch['age']))):
        chunks.setdefault(field, []).append(_gather(value)[valid_B])
  finally:
    it.close()
  return {k: np.concatenate(v) for k, v in chunks.items()}


def subgroup_rows(scores: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """{'sex': {'F': rows_N, 'M': rows_N}, 'age': {band: rows_N}}: the groups with examples.

  An attribute is left out unless two or more of its groups have examples
  (a dataset without sex or age, e.g. the demo's, has none).
  """
  groups = {}
  if 'sex' in scores:
    sex_N = np.asarray(scores['sex'])
    groups['sex'] = {name: sex_N == code for name, code in SEX_CODES}
  if 'age' in scores:
    age_N = np.asarray(scores['age'], np.float64)
    with np.errstate(invalid='ignore'):  # NaN compares False: in no band
      groups['age'] = {name: (age_N >= low) & (age_N < high) for name, low, high in AGE_BANDS}
  groups = {attr: {g: rows for g, rows in by_group.items() if rows.any()}
            for attr, by_group in groups.items()}
  return {attr: by_group for attr, by_group in groups.items() if len(by_group) >= 2}


def _subgroup_entry(probs_NxC, scores, meta, rows_by_group, attr: str, samples: int,
                    seed: int) -> dict[str, Any]:
  """One attribute's groups (auc_mean, auc_mean_ci, n) and the gap between them.

  The gap: sex, auc_mean of M minus that of F; age, the best band's minus the
  worst band's (picked on the point estimates; the CI is that difference's
  over the resamples). `of` names the difference.
  """
  eval_labels = EVAL_LABELS.get(meta.name)
  groups, resampled = {}, {}
  for name, rows_N in rows_by_group.items():
    auc = metrics.per_label_auc(probs_NxC[rows_N], scores['labels'][rows_N], meta.label_names,
                                scores['mask'][rows_N])
    groups[name] = {'auc_mean': metrics.mean_auc(auc, eval_labels)}
    if samples:
      auc_RxC = metrics.bootstrap_auc(probs_NxC, scores['labels'], scores['mask'], rows_N,
                                      num_samples=samples, seed=seed)
      resampled[name] = metrics.mean_auc_resamples(auc_RxC, meta.label_names, eval_labels)
      groups[name]['auc_mean_ci'] = metrics.percentile_interval(resampled[name])
    groups[name]['n'] = int(rows_N.sum())
  entry = {'groups': groups}
  defined = [g for g in groups if not np.isnan(groups[g]['auc_mean'])]
  if attr == 'sex':
    pair = ('M', 'F') if len(defined) == 2 else None
  else:
    pair = (max(defined, key=lambda g: groups[g]['auc_mean']),
            min(defined, key=lambda g: groups[g]['auc_mean'])) if len(defined) >= 2 else None
  if pair:
    high, low = pair
    entry['gap'] = {'of': f'{high} - {low}',
                    'value': groups[high]['auc_mean'] - groups[low]['auc_mean']}
    if samples:
      entry['gap']['ci'] = metrics.percentile_interval(resampled[high] - resampled[low])
  return entry


def dataset_results(scores: Mapping[str, np.ndarray], meta: datasets.DatasetMetadata,
                    model_names: Sequence[str], bootstrap_samples: int = BOOTSTRAP_SAMPLES,
                    bootstrap_seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
  """The JSON entry of one dataset.

  Args:
    scores: score_dataset's arrays ('sex' and 'age' optional).
    meta: the dataset's metadata.
    model_names: the score arrays to evaluate, e.g. ('student', 'teacher').
    bootstrap_samples: resamples behind the CIs; 0 leaves the CIs out.
    bootstrap_seed: their seed; every model and subgroup sees the same resamples.

  Returns:
    {'labels': [...], model: {'auc_mean', 'auc', 'n', 'accuracy' (multi-class),
    'auc_mean_ci': [lo, hi], 'auc_ci': {label: [lo, hi]}, 'subgroups' (where
    the examples carry sex or age): {attr: {'groups': {group: {'auc_mean',
    'auc_mean_ci', 'n'}}, 'gap': {'of': 'A - B', 'value', 'ci'}}}}}. A CI is
    None where no resample defines it.
  """
  entry: dict[str, Any] = {'labels': list(meta.label_names)}
  eval_labels = EVAL_LABELS.get(meta.name)
  groups = subgroup_rows(scores)
  for model_name in model_names:
    probs_NxC = scores[model_name]
    auc = metrics.per_label_auc(probs_NxC, scores['labels'], meta.label_names, scores['mask'])
    result = {'auc_mean': metrics.mean_auc(auc, eval_labels), 'auc': auc,
              'n': int(probs_NxC.shape[0])}
    if meta.task == 'multiclass':
      result['accuracy'] = metrics.accuracy(probs_NxC, scores['labels'])
    if bootstrap_samples:
      auc_RxC = metrics.bootstrap_auc(probs_NxC, scores['labels'], scores['mask'],
                                      num_samples=bootstrap_samples, seed=bootstrap_seed)
      result['auc_mean_ci'] = metrics.percentile_interval(
          metrics.mean_auc_resamples(auc_RxC, meta.label_names, eval_labels))
      result['auc_ci'] = {name: metrics.percentile_interval(auc_RxC[:, c])
                          for c, name in enumerate(meta.label_names) if name in auc}
    if groups:
      result['subgroups'] = {
          attr: _subgroup_entry(probs_NxC, scores, meta, rows, attr, bootstrap_samples,
                                bootstrap_seed)
          for attr, rows in groups.items()}
    entry[model_name] = result
  return entry


def evaluate(config, graphdef, params_by_model: Mapping[str, Any], mesh, predict=None,
             names: Sequence[str] | None = None
             ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """Scores every configured dataset (or those `names`) with every model.

  Args:
    config: the run's ConfigDict (data section, eval_split, eval_batch_size, ten_crop,
      bootstrap_samples, bootstrap_seed).
    graphdef: the ArkModel graphdef.
    params_by_model: e.g. {'student': state.params, 'teacher': state.ema_params}.
    mesh: the run's mesh.
    predict: a make_predict_fn result to reuse (compiled once per run).
    names: a subset of config.data.datasets to score (a federated client's);
      None scores them all.

  Returns:
    (results, scores): results[dataset] is the JSON entry; scores[dataset] the
    arrays score_dataset returns.
  """
  data_dir = config.data.get('data_dir')
  meta = [datasets.metadata(n, data_dir) for n in config.data.datasets]
  if predict is None:
    predict = make_predict_fn(graphdef, config, mesh, [m.num_classes for m in meta],
                              [m.task == 'multiclass' for m in meta])
  if names is not None:
    meta = [m for m in meta if m.name in names]
  names = [m.name for m in meta]
  batch_size = config.get('eval_batch_size') or config.batch_size
  sharding.check_batch_divisible(batch_size, mesh, key='config.eval_batch_size')
  results, scores = {}, {}
  with jax.set_mesh(mesh):
    for name, m in zip(names, meta):
      scores[name] = score_dataset(predict, params_by_model, config, name, mesh, batch_size)
      results[name] = dataset_results(
          scores[name], m, list(params_by_model),
          config.get('bootstrap_samples', BOOTSTRAP_SAMPLES),
          config.get('bootstrap_seed', BOOTSTRAP_SEED))
  return results, scores


def write(workdir: str, step: int, results: Mapping[str, Any],
          scores: Mapping[str, Mapping[str, np.ndarray]], stem: str | None = None,
          extra: Mapping[str, Any] | None = None) -> str:
  """Writes eval/step_N.json and eval/step_N_scores.npz (call on process 0); the JSON path.

  `stem` replaces 'step_N' in the file names (federated: 'round_R'); `extra`
  adds top-level fields to the JSON.
  """
  directory = os.path.join(workdir, 'eval')
  os.makedirs(directory, exist_ok=True)
  stem = stem or f'step_{step}'
  path = os.path.join(directory, f'{stem}.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'step': int(step), **(extra or {}), 'results': results}, f, indent=1)
  os.replace(tmp, path)  # a reader never sees half a file
  arrays = {f'{d}/{k}': v for d, fields in scores.items() for k, v in fields.items()}
  np.savez_compressed(os.path.join(directory, f'{stem}_scores.npz'), **arrays)
  return path


def summary_table(results: Mapping[str, Any]) -> str:
  """A plain-text table: dataset, n, student and teacher mean AUC, the teacher's 95% CI.

  Multi-class sets add their accuracy.
  """
  with_ci = any(entry['teacher'].get('auc_mean_ci') for entry in results.values())
  lines = [f'{"dataset":<24} {"n":>6} {"student AUC":>12} {"teacher AUC":>12}'
           + (f' {"teacher 95% CI":>18}' if with_ci else '')]
  means = {m: [] for m in MODELS}
  for name, entry in results.items():
    row = f'{name:<24} {entry["teacher"]["n"]:>6}'
    for m in MODELS:
      value = entry[m]['auc_mean']
      means[m].append(value)
      row += f' {value:>12.4f}'
    if with_ci:
      ci = entry['teacher'].get('auc_mean_ci')
      row += f' {"[{:.4f}, {:.4f}]".format(*ci) if ci else "":>18}'
    if 'accuracy' in entry['teacher']:
      row += f'   (accuracy: student {entry["student"]["accuracy"]:.4f}, ' \
             f'teacher {entry["teacher"]["accuracy"]:.4f})'
    lines.append(row)
  lines.append(f'{"mean":<24} {"":>6}' + ''.join(f' {np.mean(means[m]):>12.4f}' for m in MODELS))
  return '\n'.join(lines)
