r"""The paper's ablations on the demo data: runs them and writes ABLATIONS.md.

  python scripts/ablations.py [--seeds=0,1,2] [--only=a,b,c,d] \
      [--data_dir=workdir/data] [--workdir=workdir/ablations] [--output=ABLATIONS.md]

Comparisons (configs/ablations/*.py):
  (a) pretraining on one dataset vs Ark over three, each teacher (and a random
      initialisation) then fine-tuned on the held-out demo_binary
      (configs/finetune_demo.py); metric: demo_binary test AUC.
  (b) per-dataset heads vs one consolidated head over the union of labels;
  (c) with vs without the teacher's consistency term (c = 0);
  (d) cyclic vs mixed schedule;
  for (b)-(d) the metric is the teacher's test AUC averaged over the four demo
  datasets (each dataset's mean AUC, as `make demo` prints).

Every run is `python -m ark_jax.main` in a subprocess, timed by its wall clock.
Runs whose configs are equal (the per-dataset, with-teacher and cyclic rows are
one baseline) run once per seed. A finished run leaves `result.json` in its
directory and is not run again, so an interrupted script continues where it
stopped; delete the workdir to measure afresh.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs.ablations import base  # pylint: disable=g-import-not-at-top,wrong-import-position

# (key, title, [(row label, config spec)]); a spec is 'configs/...py:ARG'.
PRETRAINING = (
    ('b', 'Per-dataset heads vs one consolidated head', [
        ('per-dataset heads (Ark)', 'configs/ablations/heads.py:per_dataset'),
        ('one consolidated head', 'configs/ablations/heads.py:consolidated')]),
    ('c', "With vs without the teacher's consistency loss", [
        ('with teacher (c from 0 to 0.5)', 'configs/ablations/consistency.py:with_teacher'),
        ('c = 0', 'configs/ablations/consistency.py:c0')]),
    ('d', 'Cyclic vs mixed schedule', [
        ('cyclic passes, EMA per pass (Ark)', 'configs/ablations/schedule.py:cyclic'),
        ('mixed batches, EMA per step', 'configs/ablations/schedule.py:mixed')]),
)
# (row label, pretraining spec, which of its models starts the fine-tuning).
SINGLE_VS_ARK = [
    ('random initialisation', None, None),
    ('demo_multilabel alone, its teacher', 'configs/ablations/single_vs_ark.py:single', 'teacher'),
    ('Ark over three datasets, its teacher', 'configs/ablations/single_vs_ark.py:ark', 'teacher'),
    ('demo_multilabel alone, its student', 'configs/ablations/single_vs_ark.py:single', 'student'),
    ('Ark over three datasets, its student', 'configs/ablations/single_vs_ark.py:ark', 'student'),
]
FINETUNE_CONFIG = 'configs/finetune_demo.py'
# Few-shot (500 of demo_binary's 2000 training mosaics, one subset drawn with
# the reference's seed 99 for every run, so that seeds differ only in the
# head's initialisation, the data order and the augmentation), where pretraining
# matters most, and a bound on epochs for the CPU.
FINETUNE_OVERRIDES = ('--config.finetune.few_shot=500', '--config.finetune.few_shot_seed=99',
                      '--config.max_epochs=15', '--config.patience=4')


def _config(spec: str):
  """The ConfigDict a 'configs/NAME.py:ARG' spec names."""
  path, _, arg = spec.partition(':')
  module = path[:-3].replace('/', '.')
  return __import__(module, fromlist=['get_config']).get_config(arg or None)


def _run_dir(root: str, spec: str | None, seed: int, known: dict) -> str:
  """One directory per distinct config: equal configs share their runs."""
  if spec is None:
    return os.path.join(root, f'random_s{seed}')
  key = json.dumps(_config(spec).to_dict(), sort_keys=True, default=str)
  name = known.setdefault(key, os.path.basename(spec).replace('.py:', '-'))
  return os.path.join(root, f'{name}_s{seed}')


def _python(args: list[str], log_path: str) -> float:
  """Runs `python ARGS` from the repo root; its wall time. Raises on failure."""
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    proc = subprocess.run([sys.executable] + args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(args)} failed (exit {proc.returncode}); see {log_path}')
  return time.perf_counter() - start


def _done(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, 'result.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _finish(run_dir: str, result: dict) -> dict:
  with open(os.path.join(run_dir, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def _newest_eval(workdir: str) -> dict:
  paths = glob.glob(os.path.join(workdir, 'eval', 'step_*.json'))
  if not paths:
    raise FileNotFoundError(f'{workdir} has no eval/step_N.json')
  path = max(paths, key=lambda p: int(os.path.basename(p)[5:-5]))
  with open(path) as f:
    return json.load(f)['results']


def pretrain(spec: str, seed: int, run_dir: str, data_dir: str) -> dict:
  """Trains one config; {'teacher', 'student' (mean over datasets of mean AUC), 'wall_s'}."""
  if (result := _done(run_dir)) is not None:
    return result
  os.makedirs(run_dir, exist_ok=True)
  wall_s = _python(['-m', 'ark_jax.main', f'--config={spec}', f'--workdir={run_dir}',
                    f'--config.data.data_dir={data_dir}', f'--config.seed={seed}',
                    '--config.log_every_steps=100'], os.path.join(run_dir, 'log.txt'))
  results = _newest_eval(run_dir)
  means = {m: float(np.mean([r[m]['auc_mean'] for r in results.values()]))
           for m in ('teacher', 'student')}
  return _finish(run_dir, {**means, 'per_dataset': {d: r['teacher']['auc_mean']
                                                    for d, r in results.items()},
                           'wall_s': wall_s})


def finetune(pretrained_dir: str | None, model: str | None, seed: int, run_dir: str,
             data_dir: str) -> dict:
  """Fine-tunes on the held-out set from a pretrained teacher or student (or at random)."""
  if (result := _done(run_dir)) is not None:
    return result
  os.makedirs(run_dir, exist_ok=True)
  args = ['-m', 'ark_jax.main', f'--config={FINETUNE_CONFIG}', f'--workdir={run_dir}',
          f'--config.data.data_dir={data_dir}', f'--config.seed={seed}', '--config.trials=1',
          *FINETUNE_OVERRIDES]
  if pretrained_dir is not None:
    args += [f'--config.init.from_checkpoint={pretrained_dir}', f'--config.init.key={model}']
  wall_s = _python(args, os.path.join(run_dir, 'log.txt'))
  with open(os.path.join(run_dir, 'finetune_results.json')) as f:
    summary = json.load(f)
  return _finish(run_dir, {'auc': float(summary['trials'][0]['test']['auc_mean']),
                           'wall_s': wall_s})


def prepare_data(data_dir: str) -> None:
  for name in demo.DEMO_DATASETS:
    if not glob.glob(os.path.join(data_dir, name, '*', '*', 'dataset_info.json')):
      _python(['-m', 'input_pipeline.prepare', f'--dataset={name}', f'--data_dir={data_dir}',
               '--demo_source=subset'], os.path.join(data_dir, f'prepare_{name}.log'))


def _stats(values) -> str:
  return f'{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}'


def _table(rows, metric: str, student: bool = False) -> list[str]:
  """rows: (label, metric per seed, wall seconds per seed[, student AUC per seed])."""
  extra = ' student: mean ± std |' if student else ''
  lines = [f'| variant | {metric}: mean ± std | per seed |{extra} wall time per run (s) |',
           '|---|---|---|' + ('---|' if student else '') + '---|']
  for label, values, walls, *rest in rows:
    cells = f' {_stats(rest[0])} |' if student else ''
    lines.append(f'| {label} | {_stats(values)} | {", ".join(f"{v:.4f}" for v in values)} |'
                 f'{cells} {np.mean(walls):.0f} |')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds (at least 3)')
  parser.add_argument('--only', default='a,b,c,d', help='comparisons to run')
  parser.add_argument('--data_dir', default=os.path.join(REPO, 'workdir', 'data'))
  parser.add_argument('--workdir', default=os.path.join(REPO, 'workdir', 'ablations'))
  parser.add_argument('--output', default=os.path.join(REPO, 'ABLATIONS.md'))
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  only = set(args.only.split(','))
  if unknown := only - {'a', 'b', 'c', 'd'}:
    parser.error(f'--only names unknown comparisons {sorted(unknown)}')
  data_dir, root = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  prepare_data(data_dir)
  known: dict[str, str] = {}
  start = time.perf_counter()
  sections = []

  if 'a' in only:
    rows = []
    for label, spec, model in SINGLE_VS_ARK:
      aucs, walls = [], []
      for seed in seeds:
        pre_dir, pre_wall = None, 0.0
        if spec is not None:
          pre_dir = _run_dir(root, spec, seed, known)
          pre_wall = pretrain(spec, seed, pre_dir, data_dir)['wall_s']
        name = os.path.basename(pre_dir) if pre_dir else f'random_s{seed}'
        name += '-student' if model == 'student' else ''
        result = finetune(pre_dir, model, seed, os.path.join(root, f'finetune_{name}'), data_dir)
        print(f'(a) {label} seed {seed}: demo_binary AUC {result["auc"]:.4f}', flush=True)
        aucs.append(result['auc'])
        walls.append(pre_wall + result['wall_s'])
      rows.append((label, aucs, walls))
    mean = {label: np.mean(values) for label, values, _ in rows}
    labels = [label for label, _, _ in SINGLE_VS_ARK]
    sections.append(
        ['## (a) One dataset alone vs Ark, judged by fine-tuning on a held-out dataset', '',
         'Pretraining (configs/ablations/single_vs_ark.py) leaves demo_binary out; each '
         'teacher, and a random initialisation, is then fine-tuned on it '
         f'({FINETUNE_CONFIG} {" ".join(FINETUNE_OVERRIDES)}, one trial per seed); metric: '
         'demo_binary test AUC of the epoch with the lowest validation loss. Wall time '
         'includes pretraining. The released model of Ark is the teacher; at this scale '
         f'({2 * base.ABLATION_EPOCHS} epochs: {2 * base.ABLATION_EPOCHS} passes for one '
         f'dataset, {6 * base.ABLATION_EPOCHS} for three) the once-per-pass EMA leaves 77% / '
         '51% of the teacher\'s random initialisation in it, so the students are '
         'fine-tuned too.', ''] + _table(rows, 'demo_binary test AUC') +
        ['', 'Differences of the means: ' + '; '.join(
            f'{labels[i]} minus {labels[j]}: {mean[labels[i]] - mean[labels[j]]:+.4f}'
            for i, j in ((2, 0), (2, 1), (4, 0), (4, 3))) + '.', ''])

  for key, title, variants in PRETRAINING:
    if key not in only:
      continue
    rows = []
    for label, spec in variants:
      results = []
      for seed in seeds:
        result = pretrain(spec, seed, _run_dir(root, spec, seed, known), data_dir)
        print(f'({key}) {label} seed {seed}: teacher mean AUC {result["teacher"]:.4f}',
              flush=True)
        results.append(result)
      rows.append((f'{label} (`{spec.split("/")[-1]}`)', [r['teacher'] for r in results],
                   [r['wall_s'] for r in results], [r['student'] for r in results]))
    diff = np.mean(rows[1][1]) - np.mean(rows[0][1])
    sections.append([f'## ({key}) {title}', '']
                    + _table(rows, 'teacher test AUC, mean of 4 sets', student=True)
                    + ['', f'Teacher, second row minus first: {diff:+.4f} AUC; student: '
                       f'{np.mean(rows[1][3]) - np.mean(rows[0][3]):+.4f}.', ''])

  total_min = (time.perf_counter() - start) / 60
  compute_min = sum(json.load(open(p))['wall_s'] for p in glob.glob(
      os.path.join(root, '*', 'result.json'))) / 60
  lines = [
      '# Ablations on the demo data', '',
      'The Ark+ papers\' claims, measured on the four Fashion-MNIST mosaic datasets of '
      '`make demo` with its small Swin, '
      f'{base.ABLATION_EPOCHS} epochs per pretraining run (configs/ablations/base.py; '
      f'{2 * base.ABLATION_EPOCHS} for (a)), '
      f'seeds {seeds}. Numbers are as measured, whichever way they point; std is over seeds '
      '(ddof 1). These are toy-scale results: they show the code paths work and how the '
      'variants compare here, not what happens on 700k chest X-rays.', '',
      'Read the teacher column with the schedule in mind: with one EMA update per dataset '
      'pass (the reference), two epochs give the teacher 8 updates (2 for a single dataset) '
      'with momentum rising from 0.9, so 63% of its independent random initialisation '
      'remains in it (86% after 2 updates; the 4-epoch `make demo`: 41%); the student '
      'column shows what was learned. With one update per '
      'step (mixed) the teacher follows the student closely. Wall times are of single runs '
      'on a shared machine whose load varied with other jobs: compare them loosely.', '',
      f'Command: `python scripts/ablations.py --seeds={args.seeds} --only={args.only}` '
      f'({platform.machine()}, {os.cpu_count()} CPU cores; the runs took {compute_min:.0f} min '
      f'in all; this invocation {total_min:.0f} min, as it reuses finished runs).', '']
  for section in sections:
    lines += section
  with open(args.output, 'w') as f:
    f.write('\n'.join(lines))
  print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
