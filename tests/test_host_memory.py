"""ark_jax/host_memory.py: the entry points' malloc settings, and that they stop XLA's page faults."""

import json
import os
import subprocess
import sys

import pytest

from ark_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED = ':'.join(host_memory.TUNABLES)


def test_cpu_processes_get_the_tunables_added_to_what_the_user_set():
  env = host_memory.tuned_environment({'PATH': '/bin'}, accelerator_plugins=False)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': TUNED}

  # Other tunables stay; one of ours the user set keeps the user's value.
  user = 'glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4'
  env = host_memory.tuned_environment({'GLIBC_TUNABLES': user}, accelerator_plugins=False)
  assert env['GLIBC_TUNABLES'] == (user + ':glibc.malloc.mmap_max=0'
                                   ':glibc.malloc.trim_threshold=1099511627776')
  # Once they are all there (the re-executed process), nothing changes again.
  assert host_memory.tuned_environment(env, accelerator_plugins=False) is None


def test_accelerators_and_the_opt_out_are_left_alone():
  assert host_memory.tuned_environment({}, accelerator_plugins=True) is None
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'cuda'}, accelerator_plugins=False) is None
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'tpu,cpu'},
                                       accelerator_plugins=False) is None
  # A CPU run on a GPU host, said so explicitly, is tuned.
  env = host_memory.tuned_environment({'JAX_PLATFORMS': 'cpu'}, accelerator_plugins=True)
  assert env['GLIBC_TUNABLES'] == TUNED
  assert host_memory.tuned_environment({'ARK_JAX_MALLOC': 'system'},
                                       accelerator_plugins=False) is None
  with pytest.raises(ValueError, match=r"ARK_JAX_MALLOC='off': expected tuned .* or system"):
    host_memory.tuned_environment({'ARK_JAX_MALLOC': 'off'}, accelerator_plugins=False)


def _benchmark_step(malloc: str) -> dict:
  """`python -m ark_jax.benchmark --mode=step` (which re-executes itself) on the smoke model.

  At batch 32 XLA's temporaries are 74 MB: more than a glibc thread arena
  holds, so by default they are mmapped afresh every step.
  """
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', ARK_JAX_MALLOC=malloc)
  out = subprocess.run(
      [sys.executable, '-m', 'ark_jax.benchmark', '--config=configs/ark6.py:smoke',
       '--config.batch_size=32', '--mode=step', '--split=false', '--steps=3', '--warmup=1'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_benchmarked_step_stops_page_faulting_once_reexecuted():
  assert host_memory.applies_here()  # CI and this project's machines: Linux, glibc
  tuned, default = _benchmark_step('tuned'), _benchmark_step('system')

  assert tuned['glibc_tunables'] == TUNED and default['glibc_tunables'] == ''
  # glibc's defaults fault XLA's temporaries back in every step (74 MB: ~18,000
  # pages); tuned, the freed buffer stays in the heap and the next step reuses it.
  assert default['page_faults_per_step'] > 10_000, default
  assert tuned['page_faults_per_step'] < 100, tuned
