"""The demo command run in subprocesses, as a user runs it (test_resume, test_multiprocess).

`python -m ark_jax.main --config=configs/demo.py --workdir=DIR --config.KEY=VALUE ...`
with the tiny model of test_train.make_config, on demo data small enough that a
cyclic dataset pass ends every two steps (TRAIN_SIZE examples per dataset, batch 16).
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from input_pipeline import prepare
from input_pipeline.datasets import fashion_mosaic as fm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 32
TRAIN_SIZE = 24  # per dataset: a full batch of 16 and a short one of 8 per pass
TIMEOUT_S = 480  # a hung run fails the test instead of blocking CI (generous: a loaded 2-core box)
# Everything of a metrics line but the throughput: must match bit for bit.
EXACT_FIELDS = ('loss', 'task_loss', 'consistency_loss', 'lr', 'ema_momentum',
                'consistency_weight', 'grad_norm')

# test_train.make_config's tiny model, as `--config.KEY=VALUE` overrides.
TINY = {
    'batch_size': 16,
    'model.img_size': R, 'model.window_size': 4, 'model.embed_dim': 16,
    'model.depths': (1, 1), 'model.num_heads': (1, 2), 'model.projector_dim': 16,
    'data.image_size': R, 'data.read_threads': 1,
    'optimizer.name': 'sgd', 'optimizer.lr': 0.1, 'optimizer.warmup_steps': 2,
    'optimizer.total_steps': 20,
    'log_every_steps': 1, 'eval_every_steps': -1, 'progress_bar': False,
}


def prepare_small_demo(path: str) -> str:
  """Prepares the four demo datasets at R=32 with TRAIN_SIZE train and 16 eval mosaics each."""
  saved = dict(fm.SPECS)
  try:
    for name, spec in saved.items():
      fm.SPECS[name] = dataclasses.replace(spec, subset_sizes=(TRAIN_SIZE, 16, 16))
    for name in fm.BUILDERS:
      prepare.prepare(prepare.create_builder(name, data_dir=path, image_size=R, source='subset'),
                      None)
  finally:
    fm.SPECS.update(saved)
  return path


def shared_cache_dir(tmp_path_factory) -> str:
  """The session's compilation cache for these runs: modules running the same
  demo command (test_resume, test_faults) compile its programs once."""
  path = tmp_path_factory.getbasetemp() / 'demo_runs_jax_cache'
  path.mkdir(exist_ok=True)
  return str(path)


def env(cache_dir: str, num_devices: int) -> dict[str, str]:
  """The subprocess environment: N fake CPU devices and a shared compilation cache."""
  e = dict(os.environ)
  e.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(num_devices),
           JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  # LLVM's optimisations dominate the compile of these few-step runs; every run
  # of a comparison compiles the same way, so results stay comparable.
  e['XLA_FLAGS'] = ' '.join([e.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()
  e['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in [e.get('PYTHONPATH')] if p])
  return e


def command(workdir: str, overrides: dict, config: str = 'configs/demo.py',
            flags: tuple[str, ...] = ()) -> list[str]:
  """argv of one `python -m ark_jax.main` run."""
  args = [sys.executable, '-m', 'ark_jax.main', f'--config={config}', f'--workdir={workdir}',
          *flags]
  for key, value in {**TINY, **overrides}.items():
    args.append(f'--config.{key}={value}')
  return args


class Run:
  """One subprocess of the command; stdout+stderr go to workdir-side log files."""

  def __init__(self, argv: list[str], environ: dict[str, str], log_path: str):
    self.argv, self.log_path = argv, log_path
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    self._log = open(log_path, 'w')
    self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=environ, stdout=self._log,
                                 stderr=subprocess.STDOUT)

  def log(self) -> str:
    if not self._log.closed:
      self._log.flush()
    with open(self.log_path) as f:
      return f.read()

  def describe(self) -> str:
    return (f'$ {" ".join(self.argv)}\n(exit {self.proc.returncode})\n'
            f'--- {self.log_path} (last 6000 chars) ---\n{self.log()[-6000:]}')

  def wait(self, timeout: float = TIMEOUT_S) -> int:
    """Waits for the exit (killing the run on timeout); returns the exit code."""
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'Timed out after {timeout} s:\n{self.describe()}') from None
    finally:
      self._log.close()
    return self.proc.returncode

  def wait_ok(self, timeout: float = TIMEOUT_S):
    rc = self.wait(timeout)
    assert rc == 0, self.describe()

  def kill(self, sig: int):
    with contextlib.suppress(ProcessLookupError):
      os.kill(self.proc.pid, sig)


def run_ok(argv, environ, log_path):
  Run(argv, environ, log_path).wait_ok()


def committed_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps (folders named by a bare number; Orbax's tmp ones are not)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def wait_for_checkpoint(run: Run, workdir: str, min_step: int, timeout: float = TIMEOUT_S) -> int:
  """Polls until a step >= min_step is committed; returns the newest one."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in committed_steps(workdir) if s >= min_step]
    if steps:
      return steps[-1]
    if run.proc.poll() is not None:
      raise AssertionError(f'Exited before checkpoint {min_step}:\n{run.describe()}')
    time.sleep(0.01)
  run.kill(signal.SIGKILL)
  run.wait()
  raise AssertionError(f'No checkpoint {min_step} after {timeout} s:\n{run.describe()}')


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def exact(lines: list[dict]) -> list[dict]:
  """The lines without their throughput (the one field that may differ between runs)."""
  return [{k: v for k, v in m.items() if k != 'img_per_s'} for m in lines]
