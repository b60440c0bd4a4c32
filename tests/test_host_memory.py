"""ark_jax/host_memory.py: when the entry points re-execute, and where large blocks then land."""

import json
import os
import subprocess
import sys

import pytest

from ark_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED = ':'.join(host_memory.TUNABLES)


def test_cpu_processes_get_the_tunables_added_to_what_the_user_set():
  env = host_memory.tuned_environment({'PATH': '/bin'}, accelerator_plugins=lambda: False)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': TUNED}

  # Other tunables stay; one of ours the user set keeps the user's value.
  user = 'glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4'
  env = host_memory.tuned_environment({'GLIBC_TUNABLES': user}, accelerator_plugins=lambda: False)
  assert env['GLIBC_TUNABLES'] == (user + ':glibc.malloc.mmap_max=0'
                                   ':glibc.malloc.trim_threshold=1099511627776')
  # Once they are all there (the re-executed process), nothing changes again,
  # and sys.path is not scanned for plugins a second time.
  def not_asked():
    raise AssertionError('accelerator plugins looked up again')
  assert host_memory.tuned_environment(env, accelerator_plugins=not_asked) is None


def test_accelerators_and_the_opt_out_are_left_alone():
  assert host_memory.tuned_environment({}, accelerator_plugins=lambda: True) is None
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'cuda'},
                                       accelerator_plugins=lambda: False) is None
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'tpu,cpu'},
                                       accelerator_plugins=lambda: False) is None
  # A CPU run on a GPU host, said so explicitly, is tuned.
  env = host_memory.tuned_environment({'JAX_PLATFORMS': 'cpu'}, accelerator_plugins=lambda: True)
  assert env['GLIBC_TUNABLES'] == TUNED
  assert host_memory.tuned_environment({'ARK_JAX_MALLOC': 'system'},
                                       accelerator_plugins=lambda: False) is None
  with pytest.raises(ValueError, match=r"ARK_JAX_MALLOC='off': expected tuned .* or system"):
    host_memory.tuned_environment({'ARK_JAX_MALLOC': 'off'}, accelerator_plugins=lambda: False)


# Re-executes itself as the entry points do, then allocates 200 MB on a new
# thread (as XLA's workers allocate a step's temporaries) and reports whether
# the block lies in the main heap ([heap], grown by brk: kept after free()) or
# in a mapping of its own (munmapped on free(), faulted in again next time).
_SCRIPT = r'''
import ctypes, json, os, sys, threading
from ark_jax import host_memory
host_memory.reexec_with_tuned_malloc()

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
where = {}

def allocate():
  address = libc.malloc(200 * 2**20)
  with open('/proc/self/maps') as maps:
    for line in maps:
      start, end = (int(a, 16) for a in line.split()[0].split('-'))
      if start <= address < end:
        where['region'] = '[heap]' if line.strip().endswith('[heap]') else 'own mapping'
  libc.free(address)

thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(json.dumps({'argv': sys.argv[1:], 'tunables': os.environ.get('GLIBC_TUNABLES'), **where}))
'''


def _run_script(tmp_path, malloc: str) -> dict:
  script = tmp_path / 'allocate.py'
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', ARK_JAX_MALLOC=malloc)
  out = subprocess.run([sys.executable, str(script), '--an', 'argument'], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_reexecuted_process_allocates_large_blocks_from_the_main_heap(tmp_path):
  assert host_memory.applies_here()  # CI and this project's machines: Linux, glibc
  tuned, default = _run_script(tmp_path, 'tuned'), _run_script(tmp_path, 'system')

  assert tuned['argv'] == default['argv'] == ['--an', 'argument']  # the same command line
  assert tuned['tunables'] == TUNED and default['tunables'] is None
  assert default['region'] == 'own mapping'
  assert tuned['region'] == '[heap]'
