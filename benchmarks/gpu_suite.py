r"""Issue 6's GPU measurements in one call, under one deadline: what benchmarks/gpu.sh runs.

  python3 benchmarks/gpu_suite.py --out=$OUT                  # on a lent H200 (gpu.sh)
  .venv/bin/python benchmarks/gpu_suite.py --out=/tmp/g --model=swin_custom --img_size=64 \
      --window_size=4 --sizes='{"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}' \
      --batches=2 --large_config=configs/ark6.py:smoke --large_start=2 --large_min=1 \
      --large_max=2 --steps=2 --warmup=1 --dtype=float32   # the same plan, tiny, on a CPU

Each run is its own process, so an out-of-memory error or a crash costs one
row, not the call. In order of what matters most, while time is left:
  1. at the first of --batches (default 128, 256): the JAX train step with the
     teacher (python -m ark_jax.benchmark --mode=step --split=false, bfloat16
     compute, float32 parameters), then the PyTorch reference step on the same
     device (benchmarks/torch_reference.py: timm, AMP bfloat16);
  2. the Ark+ step (--large_config: Swin-L/768, window 12, remat, bfloat16) at
     the largest batch that runs: doubling from --large_start while runs
     succeed, halving after a failure (`batch_search`);
  3. the pair of 1. at the other batches;
  4. with time left, the JAX step at the first batch again with its split
     (augment / teacher / rest), which compiles three more programs.
Every run's matmul peak is measured in that run's process (bfloat16 8192^2 on
a GPU, float32 2048^2 on a CPU), so MFU is against this device as found.

Writes to --out: gpu.md (the table and the JAX/PyTorch ratios; printed last),
gpu.jsonl (every run's JSON line, or its failure) and gpu.log (each run's
command, wall time and, for failures, the end of its stderr).
"""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Issue 6's goal on one H200: Swin-B/224 with the teacher.
GOAL_IMG_PER_S = 2400
GOAL_TORCH_RATIO = 2.0


@dataclasses.dataclass
class Outcome:
  """One run: its label, its result JSON (None if it failed) and why it failed."""
  label: str
  framework: str
  batch_size: int
  result: dict | None = None
  status: str = 'ok'
  wall_s: float = 0.0


class Deadline:
  """Seconds left of the call's budget; each run gets at most that and its own cap."""

  def __init__(self, budget_s: float):
    self.end = time.monotonic() + budget_s

  def left(self) -> float:
    return self.end - time.monotonic()


def _failure_reason(stderr: str) -> str:
  text = stderr.lower()
  if 'resource_exhausted' in text or 'out of memory' in text:
    return 'out of memory'
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  return 'failed: ' + (lines[-1][:160] if lines else 'no stderr')


def run_json(cmd: list[str], outcome: Outcome, deadline: Deadline, cap_s: float, log,
             env: dict | None = None, min_run_s: float = 20) -> Outcome:
  """Runs `cmd` with a timeout; its last stdout line is the result JSON.

  Skipped when less than `min_run_s` is left: not even a compile would finish.
  """
  timeout = min(cap_s, deadline.left())
  log.write(f'\n$ {shlex.join(cmd)}\n')
  if timeout < min_run_s:
    outcome.status = 'skipped: time budget spent'
    log.write(f'{outcome.status}\n')
    return outcome
  start = time.monotonic()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    outcome.wall_s = time.monotonic() - start
    outcome.status = f'timeout after {timeout:.0f} s'
    # TimeoutExpired holds bytes even with text=True.
    log.write(f"{outcome.status}\n{(e.stderr or b'')[-3000:].decode(errors='replace')}\n")
    return outcome
  outcome.wall_s = time.monotonic() - start
  last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
  try:
    outcome.result = json.loads(last[0]) if proc.returncode == 0 and last else None
  except json.JSONDecodeError:
    outcome.result = None
  if outcome.result is None:
    outcome.status = _failure_reason(proc.stderr)
    log.write(f'rc={proc.returncode} {outcome.status}\n{proc.stderr[-3000:]}\n')
  log.write(f'wall {outcome.wall_s:.1f} s\n')
  log.flush()
  return outcome


def batch_search(try_batch, start: int, smallest: int, largest: int) -> list[Outcome]:
  """Outcomes of `try_batch(b)`: doubling from `start` while it succeeds (up to
  `largest`), or halving after a first failure (down to `smallest`) until one runs.
  Stops at the first run that was skipped or timed out: the budget is spent.
  """
  outcomes = [try_batch(start)]
  growing = outcomes[0].result is not None  # else shrinking to the first that fits
  batch = start
  while True:
    batch = batch * 2 if growing else batch // 2
    last = outcomes[-1]
    if (last.status.startswith(('skipped', 'timeout')) or not smallest <= batch <= largest
        or (last.result is not None) != growing):  # growing: one failed; shrinking: one ran
      return outcomes
    outcomes.append(try_batch(batch))


def jax_step_cmd(python: str, config: str, batch: int, args, sizes: dict | None = None,
                 split: bool = False) -> list[str]:
  """The JAX step's command; `sizes` (--sizes) override config.model's."""
  overrides = [f'--config.model.{key}={tuple(value) if isinstance(value, list) else value}'
               for key, value in (sizes or {}).items()]
  return [python, '-m', 'ark_jax.benchmark', '--mode=step', f'--config={config}', *overrides,
          f'--config.batch_size={batch}', f'--config.model.dtype={args.dtype}',
          f'--split={str(split).lower()}', f'--steps={args.steps}', f'--warmup={args.warmup}']


def torch_step_cmd(python: str, batch: int, args) -> list[str]:
  """The PyTorch reference step's command, the same Swin (timm's, --sizes as its kwargs)."""
  # A custom Swin is timm's SwinTransformer with the sizes given; every named
  # variant shares the rest (patch 4, MLP ratio 4).
  variant = 'swin_base' if args.model == 'swin_custom' else args.model
  return [python, 'benchmarks/torch_reference.py', '--model', f'{variant}_patch4_window7_224',
          '--img_size', str(args.img_size), '--window_size', str(args.window_size),
          '--batch_size', str(batch), '--backbone_kwargs', json.dumps(args.sizes),
          '--steps', str(args.steps), '--warmup', str(args.warmup)]


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value * scale, spec)


def table_lines(outcomes: list[Outcome]) -> list[str]:
  """The markdown table: one row per run, failures included."""
  lines = ['| run | framework | model | img / window | batch | dtype | img/s '
           '| step ms median (min-max) | GFLOPs/img | TFLOP/s | matmul peak TFLOP/s | MFU '
           '| compile s | peak GiB | wall s | status |',
           '|' + '---|' * 16]
  for o in outcomes:
    r = o.result or {}
    steps_ms = (f"{r['step_time_s_median'] * 1e3:.1f} ({r['step_time_s_min'] * 1e3:.1f}-"
                f"{r['step_time_s_max'] * 1e3:.1f})" if r else '-')
    lines.append(
        f"| {o.label} | {o.framework} | {r.get('model', '-')} "
        f"| {r.get('img_size', '-')} / {r.get('window_size', '-')} | {o.batch_size} "
        f"| {r.get('dtype', '-')} | {_fmt(r.get('img_per_s'), '.1f')} | {steps_ms} "
        f"| {_fmt(r.get('gflops_per_image'), '.1f')} | {_fmt(r.get('tflops_per_s'), '.3g')} "
        f"| {_fmt(r.get('peak_tflops_per_s'), '.3g')} | {_fmt(r.get('mfu'), '.1%')} "
        f"| {_fmt(r.get('compile_s'), '.1f')} "
        f"| {_fmt(r.get('peak_memory_bytes'), '.1f', 2**-30)} | {o.wall_s:.0f} | {o.status} |")
  return lines


def verdict_lines(outcomes: list[Outcome]) -> list[str]:
  """JAX/PyTorch per batch, and the first batch's JAX step against issue 6's goal."""
  by_key = {(o.label, o.framework, o.batch_size): o.result for o in outcomes if o.result}
  lines = []
  for (label, framework, batch), jax_result in by_key.items():
    torch_result = by_key.get((label, 'torch', batch))
    if framework != 'jax' or torch_result is None:
      continue
    ratio = jax_result['img_per_s'] / torch_result['img_per_s']
    lines.append(f"- {label} batch {batch}: JAX {jax_result['img_per_s']:.1f} img/s "
                 f"(MFU {jax_result['mfu']:.1%}), PyTorch {torch_result['img_per_s']:.1f} "
                 f"img/s (MFU {torch_result['mfu']:.1%}): JAX/PyTorch {ratio:.2f}; goal "
                 f"{GOAL_IMG_PER_S} img/s and {GOAL_TORCH_RATIO:.0f}x: "
                 + ('met' if jax_result['img_per_s'] >= GOAL_IMG_PER_S
                    and ratio >= GOAL_TORCH_RATIO else 'not met'))
  large = [o for o in outcomes if o.label == 'ark+ large' and o.result]
  if large:
    best = max(large, key=lambda o: o.batch_size)
    lines.append(f'- largest batch that ran for the large config: {best.batch_size} '
                 f"({best.result['img_per_s']:.1f} img/s, peak "
                 f"{best.result['peak_memory_bytes'] / 2**30:.1f} GiB)")
  return lines


def main(argv: list[str] | None = None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  deadline = Deadline(args.budget_s)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  # The largest-batch search wants the device's memory, not XLA's default 75%.
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  # Runs of one model share their initialiser programs through the cache.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='gpu_suite_jax_cache_'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  base = f'configs/ark6.py:{args.model},{args.img_size},{args.window_size}'
  outcomes = []
  with open(os.path.join(args.out, 'gpu.log'), 'w') as log, \
       open(os.path.join(args.out, 'gpu.jsonl'), 'w') as jsonl:

    def record(outcome: Outcome) -> Outcome:
      outcomes.append(outcome)
      jsonl.write(json.dumps({'label': outcome.label, 'framework': outcome.framework,
                              'batch_size': outcome.batch_size, 'status': outcome.status,
                              'wall_s': outcome.wall_s, 'result': outcome.result}) + '\n')
      jsonl.flush()
      print(table_lines([outcome])[-1], flush=True)
      return outcome

    def step_pair(batch: int):
      record(run_json(jax_step_cmd(args.python, base, batch, args, args.sizes),
                      Outcome('step', 'jax', batch), deadline, args.run_cap_s, log, env))
      record(run_json(torch_step_cmd(args.python, batch, args),
                      Outcome('step', 'torch', batch), deadline, args.run_cap_s, log, env))

    step_pair(args.batches[0])
    batch_search(lambda b: record(run_json(
        jax_step_cmd(args.python, args.large_config, b, args), Outcome('ark+ large', 'jax', b),
        deadline, args.run_cap_s, log, env)), args.large_start, args.large_min, args.large_max)
    for batch in args.batches[1:]:
      step_pair(batch)
    if args.split and deadline.left() > args.split_min_s:
      record(run_json(jax_step_cmd(args.python, base, args.batches[0], args, args.sizes,
                                   split=True),
                      Outcome('step split', 'jax', args.batches[0]), deadline,
                      args.run_cap_s, log, env))

  split = next((o.result['split'] for o in outcomes
                if o.label == 'step split' and o.result), None)
  report = [f'# ark_jax GPU benchmark ({time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})',
            '', f'Command: python3 benchmarks/gpu_suite.py {shlex.join(argv)}',
            f'Step: {args.steps} timed after {args.warmup} warm-up; JAX computes in '
            f'{args.dtype} with float32 parameters, PyTorch under bfloat16 autocast on CUDA.',
            '', *table_lines(outcomes), '', *verdict_lines(outcomes)]
  if split:
    report.append('- split of the JAX step: ' + ', '.join(f'{k} {v:.1%}'
                                                          for k, v in split.items()))
  with open(os.path.join(args.out, 'gpu.md'), 'w') as f:
    f.write('\n'.join(report) + '\n')
  print('\n'.join(report))
  return 0 if any(o.result for o in outcomes) else 1


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder for gpu.md, gpu.jsonl, gpu.log')
  parser.add_argument('--python', default=sys.executable, help='interpreter for the runs')
  parser.add_argument('--budget_s', type=float, default=450,
                      help='wall-clock budget of the whole suite; later runs are skipped')
  parser.add_argument('--run_cap_s', type=float, default=240, help='most seconds per run')
  parser.add_argument('--model', default='swin_base', help='configs/ark6.py model name')
  parser.add_argument('--img_size', type=int, default=224)
  parser.add_argument('--window_size', type=int, default=7)
  parser.add_argument('--sizes', type=json.loads, default={},
                      help='JSON, with --model=swin_custom: {"embed_dim": 32, "depths": '
                      '[1, 1, 1, 1], "num_heads": [1, 2, 4, 8]} on both sides')
  parser.add_argument('--batches', type=lambda s: [int(b) for b in s.split(',')],
                      default=[128, 256], help='comma-separated batch sizes, JAX and PyTorch')
  parser.add_argument('--dtype', default='bfloat16', help="JAX's config.model.dtype")
  parser.add_argument('--large_config', default='configs/arkplus6_swin_large_768.py')
  # Swin-L/768 with remat in bfloat16: ~1 GB per image at the peak (estimate), so 64 should fit.
  parser.add_argument('--large_start', type=int, default=64, help='first batch tried')
  parser.add_argument('--large_min', type=int, default=8)
  parser.add_argument('--large_max', type=int, default=256)
  parser.add_argument('--split', action=argparse.BooleanOptionalAction, default=True,
                      help='with time left, the first batch\'s JAX step split into parts')
  parser.add_argument('--split_min_s', type=float, default=150,
                      help='seconds that must be left to start the split run')
  parser.add_argument('--steps', type=int, default=20, help='timed steps per run')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps per run')
  args = parser.parse_args(argv)
  if bool(args.sizes) != (args.model == 'swin_custom'):
    parser.error(f'--sizes goes with --model=swin_custom (and only there), got '
                 f'--model={args.model} --sizes={json.dumps(args.sizes)}')
  if not args.large_min <= args.large_start <= args.large_max:
    parser.error(f'need --large_min <= --large_start <= --large_max, got {args.large_min}, '
                 f'{args.large_start}, {args.large_max}')
  return args


if __name__ == '__main__':
  sys.exit(main())
