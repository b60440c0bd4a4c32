"""glibc malloc settings that keep XLA's per-step CPU buffers mapped between steps.

XLA on CPU allocates every execution's temporary buffer (830 MB for the
Swin-T/128 batch-16 train step) with posix_memalign on one of its worker
threads. glibc serves a request that large from that thread's arena with a
fresh mmap and munmaps it when the step frees it, so every step page-faults
the whole buffer back in: 205,000 minor faults and 0.5-0.7 s of kernel time
per step on 2 cores; the step is 1.27x faster without them (BENCHMARKS.md,
closing the gap). PyTorch's step, counted the same way, faults ~0 times.

With one arena (the main heap, which grows by brk), no mmap for large chunks
and no trimming of the heap's top, the freed buffer stays mapped and the next
step reuses it: the Swin-T/128 step had 0 page faults in every timed run. Not
guaranteed: when smaller allocations split a freed block, the next step's
buffer no longer fits and the heap grows (faulted in) again; the smoke model
at batch 32 (74 MB of temporaries), beside another busy process, still faulted
14,000 pages in its median step.

glibc reads these settings only when a process starts (GLIBC_TUNABLES), so
the command-line entry points call `reexec_with_tuned_malloc()` first: it
re-executes the same command, same pid, once, with the tunables added. It does nothing where it
would not help: outside Linux/glibc, when an accelerator plugin is installed
and JAX_PLATFORMS does not say cpu (a GPU or TPU step's temporaries live in
device memory), when the tunables are already set, or with
ARK_JAX_MALLOC=system. The costs: memory a long run keeps instead of
returning to the system (the peak host RSS, which it reaches anyway), and
malloc contention between XLA's threads in one arena, which made a 20-30 ms
step of a tiny model (31 MB of temporaries, which glibc keeps anyway) slower.
"""

from collections.abc import Callable
import os
import pkgutil
import sys

TUNABLES = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
            'glibc.malloc.trim_threshold=1099511627776')  # 1 TiB: never trim
OPT_OUT_ENV = 'ARK_JAX_MALLOC'  # 'system' leaves glibc's defaults alone
_ACCELERATOR_PLUGINS = ('jax_cuda', 'jax_rocm', 'libtpu')


def tuned_environment(environ, *, accelerator_plugins: Callable[[], bool]
                      ) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing should change.

  Tunables the user already set win: ours are added only for keys not in
  GLIBC_TUNABLES. `accelerator_plugins` is asked last, only when JAX_PLATFORMS
  does not decide (it scans sys.path: 60 ms, not repeated in the re-executed
  process).
  """
  mode = environ.get(OPT_OUT_ENV, 'tuned')
  if mode not in ('tuned', 'system'):
    raise ValueError(f'{OPT_OUT_ENV}={mode!r}: expected tuned (the default) or system.')
  if mode == 'system':
    return None
  current = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  set_keys = {t.partition('=')[0] for t in current}
  missing = [t for t in TUNABLES if t.partition('=')[0] not in set_keys]
  if not missing:
    return None
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms[:1] != ['cpu'] and (platforms or accelerator_plugins()):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(current + missing)}


def accelerator_plugins_installed() -> bool:
  """Whether a JAX GPU/TPU plugin is importable (found without importing it)."""
  return any(m.name.startswith(_ACCELERATOR_PLUGINS) for m in pkgutil.iter_modules())


def applies_here() -> bool:
  """Linux with glibc, whose tunables these are."""
  if sys.platform != 'linux':
    return False
  try:
    return os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
  except (ValueError, OSError):  # musl and others do not name themselves
    return False


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process's command line with TUNABLES, where they help (module doc).

  Call it first thing in a command-line entry point, before JAX starts.
  """
  if not applies_here():
    return
  env = tuned_environment(os.environ, accelerator_plugins=accelerator_plugins_installed)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the interpreter's own command line: `python -m ark_jax.main ...`.
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
