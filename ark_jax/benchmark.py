r"""Throughput of the Ark model: images/s, MFU against a measured matmul peak, memory.

  python -m ark_jax.benchmark --config=configs/ark6.py:swin_tiny,128,4 --mode=forward \
      --config.batch_size=16 --steps=20 --warmup=3
  python -m ark_jax.benchmark --config=configs/demo.py --mode=step --steps=10 --warmup=2
  python -m ark_jax.benchmark --config=configs/demo.py --mode=heads --steps=10 --warmup=2
  python -m ark_jax.benchmark --config=configs/ark6.py --mode=pipeline --config.batch_size=32 \
      --config.data.num_workers=0 --config.data.read_threads=2 --steps=40 --warmup=4
  python -m ark_jax.benchmark --config=configs/demo.py --mode=step --split=false \
      --num_cpu_devices=4 --config.batch_size=32

Prints human-readable lines, then ONE JSON object on the last line of stdout
(benchmarks/*.sh parse it). Modes are a small registry (MODES): each builds a
jitted function, its arguments and the analytic FLOPs per image; `run` times it.
MFU is the analytic FLOP count (DESIGN.md section 5) over the matmul peak
measured in the same process on the same device, so it is comparable across
machines, CPU included.

Parameters and inputs are random host arrays, not the model's initialisers:
timings do not depend on the values, and compiling the ~70 initialiser
programs (truncated normals of every shape) takes 40+ s on a busy 2-core CPU,
longer than the benchmark itself.

--mode=step times the real train step (train.make_train_step, jitted as the
trainer does, state from train_state.create_train_state) on synthetic batches;
it needs a trainer config (configs/demo.py). See `run_step`; --split=false
compiles the full step only. --mode=heads times that step with the config's D
heads against D x 10 (`run_heads`: vmapped heads should keep it flat).
--mode=pipeline times the host input pipeline on a synthetic prepared dataset
at R = config.data.image_size (ark_jax/pipeline_benchmark.py). --num_cpu_devices
fakes N CPU devices (sharding overhead on one host; they share the cores).
"""

if __name__ == '__main__':
  # Before JAX starts: XLA's CPU buffers stay mapped between steps (ark_jax/host_memory.py).
  from ark_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_tuned_malloc()

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from ark_jax import pipeline_benchmark
from ark_jax import sharding
from ark_jax import train
from ark_jax import train_state
from ark_jax.models import ark
from ark_jax.models import registry
from input_pipeline import datasets

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py).')
_MODE = flags.DEFINE_string('mode', 'forward', 'What to time; one of MODES.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed calls (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls after compilation.')
_SPLIT = flags.DEFINE_bool('split', True, 'step: also compile and time the variants that '
                           'split the step; false compiles the full step only.')
_HEADS_FACTOR = flags.DEFINE_integer('heads_factor', 10, 'heads: D x this many heads vs D.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'pipeline: prepare (or reuse) the synthetic '
                               'dataset here; default a temporary folder.')
_NUM_CPU_DEVICES = flags.DEFINE_integer('num_cpu_devices', None, 'Fake CPU devices '
                                        '(jax_num_cpu_devices), set before JAX starts.')


@dataclasses.dataclass(frozen=True)
class Workload:
  """What a mode times: `fn(*args)` processes `batch_size` images."""
  fn: Callable  # a jax.jit-wrapped function
  args: tuple
  flops_per_image: float  # analytic, 2 x multiply-accumulates


def ark_forward_macs(model: ark.ArkModel) -> int:
  """Multiply-accumulates of one image through backbone, projector and every head.

  The heads count as computed: D stacked heads, each padded to the widest one.
  """
  macs = model.backbone.cfg.forward_macs()
  fc1, fc2 = model.projector.fc1, model.projector.fc2
  macs += fc1.in_features * fc1.out_features
  if fc2 is not None:
    macs += fc2.in_features * fc2.out_features
  return macs + len(model.num_classes) * max(model.num_classes) * fc1.out_features


def _forward(config, model: ark.ArkModel) -> Workload:
  """Eval-mode forward of the whole model, one jit over the split NNX state."""
  graphdef, state = nnx.split(model)

  def forward(state, x_BxSxSx3):
    # Return every output: returning only `z` would let XLA drop the heads.
    return nnx.merge(graphdef, state)(x_BxSxSx3, train=False)

  size = config.model.img_size
  x = jnp.asarray(np.random.default_rng(config.seed).standard_normal(
      (config.batch_size, size, size, 3), np.float32))
  return Workload(jax.jit(forward), (state, x), 2.0 * ark_forward_macs(model))


# The other modes are not one jitted call: 'step' and 'heads' thread a donated
# state (run_step, run_heads), 'pipeline' times the host input pipeline
# (pipeline_benchmark.run).
MODES: dict[str, Callable[..., Workload]] = {
    'forward': _forward,
}
KNOWN_MODES = (*MODES, 'step', 'heads', 'pipeline')


def _describe(config, device: jax.Device, param_count: int) -> dict:
  """The result fields that say what was measured, where."""
  return {
      'model': f'{config.model.name}_{config.model.variant}',
      'img_size': config.model.img_size,
      'window_size': config.model.window_size if config.model.name == 'swin' else None,
      'batch_size': config.batch_size,
      'dtype': config.model.dtype,
      'param_count': int(param_count),
      'device': f'{device.platform}:{device.device_kind}',
      'jax_version': jax.__version__,
  }


def _throughput(times: list[float], batch_size: int, flops_per_image: float, peak: float,
                peak_kind: str, device: jax.Device) -> dict:
  """Step times, img/s, FLOP rates and MFU from timed calls, and the peak memory so far."""
  median = statistics.median(times)
  achieved = flops_per_image * batch_size / median
  memory, memory_source = peak_memory_bytes(device)
  return {
      'step_time_s': median,  # the name for the median step
      'step_time_s_min': min(times),
      'step_time_s_median': median,
      'step_time_s_max': max(times),
      'img_per_s': batch_size / median,
      'gflops_per_image': flops_per_image / 1e9,
      'tflops_per_s': achieved / 1e12,
      'peak_tflops_per_s': peak / 1e12,
      'peak_matmul': peak_kind,
      'mfu': achieved / peak,
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
  }


def matmul_peak_flops(device: jax.Device, repeats: int = 5) -> tuple[float, str]:
  """Best-of-`repeats` FLOP/s of one square matmul: the roofline MFU is measured against.

  float32 2048^2 on CPU (no faster CPU matmul dtype here), bfloat16 8192^2 on
  accelerators (their tensor-core peak, which a bfloat16 model can reach).
  """
  n, dtype = (2048, jnp.float32) if device.platform == 'cpu' else (8192, jnp.bfloat16)
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(rng.standard_normal((n, n), np.float32).astype(dtype), device)
          for _ in range(2))
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  for _ in range(2):  # warm-up: thread pools, caches, clocks
    matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best, f'{jnp.dtype(dtype).name} {n}x{n}'


def random_model(config) -> ark.ArkModel:
  """The Ark model of `config` with N(0, 0.02^2) parameters drawn on the host (see top)."""
  abstract = nnx.eval_shape(lambda: registry.create_model(
      config.model, config.data.num_classes, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_state = nnx.split(abstract)
  rng = np.random.default_rng(config.seed)

  def draw(leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32), leaf.dtype)

  return nnx.merge(graphdef, jax.tree.map(draw, abstract_state))


def peak_memory_bytes(device: jax.Device) -> tuple[int, str]:
  """Device peak bytes in use where the backend tracks them, else this process's max RSS."""
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  # The CPU backend has no memory_stats; ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss * (1 if sys.platform == 'darwin' else 1024), 'host max RSS'


def run(config, mode: str = 'forward', steps: int = 20, warmup: int = 3, *,
        split: bool = True, heads_factor: int = 10, workdir: str | None = None) -> dict:
  """Compiles and times one mode of the Ark model described by `config`.

  Args:
    config: experiment config (configs/ark6.py): model, batch_size, data.num_classes, seed.
    mode: one of KNOWN_MODES.
    steps: timed calls, each ended by block_until_ready.
    warmup: untimed calls between compilation and timing.
    split: 'step' only: also time the variants that split the step (run_step).
    heads_factor: 'heads' only: the wide program has this many times the heads.
    workdir: 'pipeline' only: where the synthetic dataset is prepared or reused.

  Returns:
    A flat dict of results (see the keys below); times in seconds.
  """
  if mode not in KNOWN_MODES:
    raise ValueError(f'Unknown benchmark mode {mode!r}; known modes: {sorted(KNOWN_MODES)}.')
  if steps < 1 or warmup < 0:
    raise ValueError(f'Need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')
  if mode == 'step':
    return run_step(config, steps, warmup, split=split)
  if mode == 'heads':
    return run_heads(config, steps, warmup, heads_factor)
  if mode == 'pipeline':
    return pipeline_benchmark.run(config, steps, warmup, workdir)
  device = jax.devices()[0]
  model = random_model(config)
  param_count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  work = MODES[mode](config, model)

  # The peak is the best matmul seen before and after the timed calls: on a
  # shared machine one short window can miss the quiet moments.
  peak_before, _ = matmul_peak_flops(device)
  start = time.perf_counter()
  compiled = work.fn.lower(*work.args).compile()
  compile_s = time.perf_counter() - start
  program = compiled.memory_analysis()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*work.args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*work.args))
    times.append(time.perf_counter() - start)

  peak_after, peak_kind = matmul_peak_flops(device)
  peak = max(peak_before, peak_after)
  return {
      'mode': mode,
      **_describe(config, device, param_count),  # one device: no sharding yet
      'compile_s': compile_s,
      'steps': steps,
      'warmup': warmup,
      **_throughput(times, config.batch_size, work.flops_per_image, peak, peak_kind, device),
      # XLA's static plan: arguments + outputs + temporaries, what one call needs.
      'program_memory_bytes': _program_bytes(program),
  }


# The parts of the train step whose cost `run_step` splits out, each timed by a
# variant step that leaves it out (train.make_train_step's `skip`).
STEP_PARTS = ('augment', 'teacher', 'ema')


def synthetic_batches(config, num_classes, is_multiclass, count: int, mesh) -> list[dict]:
  """`count` global batches of train.STEP_FIELDS: random uint8 images and labels.

  Rows cycle through the datasets (every head is used), all rows valid,
  pass_index 0; labels are one-hot for multi-class heads, random 0/1 else.
  """
  rng = np.random.default_rng(config.seed)
  b, r, m = config.batch_size, config.data.image_size, max(num_classes)
  classes_D, multiclass_D = np.asarray(num_classes), np.asarray(is_multiclass, bool)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = []
  for i in range(count):
    dataset_id = ((np.arange(b) + i) % len(num_classes)).astype(np.int32)
    classes = classes_D[dataset_id]
    mask = (np.arange(m)[None] < classes[:, None]).astype(np.float32)
    onehot = np.eye(m, dtype=np.float32)[rng.integers(0, classes)]
    labels = np.where(multiclass_D[dataset_id][:, None], onehot,
                      rng.integers(0, 2, (b, m)).astype(np.float32)) * mask
    host = {'image': rng.integers(0, 256, (b, r, r), dtype=np.uint8), 'labels': labels,
            'label_mask': mask, 'dataset_id': dataset_id, 'valid': np.ones(b, bool),
            'pass_index': np.zeros(b, np.int32)}
    batches.append({name: jax.make_array_from_process_local_data(batch_sharding, host[name])
                    for name in train.STEP_FIELDS})
  return batches


@dataclasses.dataclass
class StepSetup:
  """What a train-step benchmark needs: mesh, state, synthetic batches, analytic FLOPs."""
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: train_state.TrainState
  state_shardings: object
  batches: list[dict]
  num_classes: tuple[int, ...]
  is_multiclass: tuple[bool, ...]
  param_count: int
  flops_per_image: float


def registry_is_multiclass(config) -> tuple[bool, ...]:
  """Per head, whether its dataset is multi-class, from the registered builders (no disk)."""
  return tuple(datasets.metadata(n).task == 'multiclass' for n in config.data.datasets)


def setup_step(config, is_multiclass, devices=None) -> StepSetup:
  """State, batches and FLOPs of the train step on a mesh over `devices` (None: all)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  train.check_config(config, mesh.size)
  num_classes = tuple(config.data.num_classes)
  if len(is_multiclass) != len(num_classes):
    raise ValueError(f'{len(is_multiclass)} is_multiclass flags for {len(num_classes)} heads.')
  graphdef, state, state_shardings = train_state.create_train_state(
      config, num_classes, mesh, config.sharding.rules)
  return StepSetup(
      mesh, graphdef, state, state_shardings,
      synthetic_batches(config, num_classes, is_multiclass, len(num_classes), mesh),
      num_classes, tuple(is_multiclass),
      param_count=sum(p.size for p in jax.tree.leaves(state.params)),
      # Student forward + backward (3x) and teacher forward (1x): DESIGN.md section 5.
      flops_per_image=4 * 2.0 * ark_forward_macs(nnx.merge(graphdef, state.params)))


class Compiled(NamedTuple):
  call: Callable  # (state, batch) -> state
  program: jax.stages.Compiled
  seconds: float  # wall time of lower + compile
  cpu_seconds: float  # this process's CPU time meanwhile: less sensitive to other load


def _compile(jitted, *args) -> tuple[jax.stages.Compiled, float, float]:
  start, cpu_start = time.perf_counter(), time.process_time()
  program = jitted.lower(*args).compile()
  return program, time.perf_counter() - start, time.process_time() - cpu_start


def compile_step(config, setup: StepSetup, *skip: str) -> Compiled:
  """One train step (leaving out the parts in `skip`), compiled for `setup`'s state and batch."""
  jitted = train.jit_train_step(
      train.make_train_step(setup.graphdef, config, setup.num_classes, setup.is_multiclass,
                            skip=frozenset(skip)),
      setup.state_shardings, setup.mesh)
  program, seconds, cpu_seconds = _compile(jitted, setup.state, setup.batches[0])
  return Compiled(lambda state, batch: program(state, batch)[0], program, seconds, cpu_seconds)


def _compile_variants(config, setup: StepSetup, split: bool):
  """name -> Compiled: 'full' is the trainer's step; 'augment', 'teacher' and 'ema' leave that part
  out (only with `split`). With ema='pass' the step holds no EMA update: 'ema'
  is then the separate end-of-pass update (train.make_ema_update), timed on its own.
  """
  variants = {'full': compile_step(config, setup)}
  if not split:
    return variants
  variants['augment'] = compile_step(config, setup, 'augment')
  variants['teacher'] = compile_step(config, setup, 'teacher')
  if config.ema == 'step':
    variants['ema'] = compile_step(config, setup, 'ema')
  else:
    pass_index = jax.device_put(np.int32(0), sharding.replicated(setup.mesh))
    program, seconds, cpu_seconds = _compile(
        train.make_ema_update(config, setup.state_shardings, setup.mesh), setup.state, pass_index)
    variants['ema'] = Compiled(lambda state, _: program(state, pass_index), program, seconds,
                               cpu_seconds)
  return variants


def alternate(programs: dict, states: dict, batches: dict, steps: int, warmup: int,
              page_faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
  """Calls the programs in turn (A B C A B C ...); the step times of each.

  programs: name -> (`call(state, batch) -> state`, key); the call threads
  (and donates) states[key] and reads batches[key]. Each call ends with one
  block_until_ready on the state, the only host sync. With `page_faults`,
  each timed call's minor page faults (the whole process's) go in there too.
  """
  times = {name: [] for name in programs}
  for i in range(warmup + steps):
    for name, (call, key) in programs.items():
      batch = batches[key][i % len(batches[key])]
      faults = _minor_page_faults()
      start = time.perf_counter()
      states[key] = jax.block_until_ready(call(states[key], batch))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
        if page_faults is not None:
          page_faults.setdefault(name, []).append(_minor_page_faults() - faults)
  return times


def _minor_page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak(device, mesh, before: float) -> tuple[float, str]:
  """The best of two matmul peaks; fake CPU devices share one CPU, accelerators add up."""
  after, kind = matmul_peak_flops(device)
  return max(before, after) * (1 if device.platform == 'cpu' else mesh.size), kind


def run_step(config, steps: int = 20, warmup: int = 3, *, split: bool = True,
             is_multiclass=None) -> dict:
  """Times the full Ark+ train step and its variants; splits the step's time.

  Variants alternate (full, augment, teacher, ema, full, ...) so that machine
  noise falls on all of them alike. The split is (full - variant) / full of
  the medians; with ema='pass' the 'ema' share is the separate end-of-pass
  update over one step (paid once per dataset pass, not every step). 'rest'
  (student forward and backward, heads, loss, optimizer) is what the parts
  inside the step leave of it.

  Args:
    config: a trainer config (configs/demo.py): model, data, optimizer, mesh, ema...
    steps: timed calls of each variant.
    warmup: untimed calls of each variant after compilation.
    split: compile and time the variants too; False times the full step only
      (one compile: quick on large configs).
    is_multiclass: per head, True for softmax-CE heads; None reads the dataset
      registry for config.data.datasets.

  Returns:
    The fields of `run` (img/s, step times, MFU of the full step...), plus
    with `split` 'split' (shares of the full step) and 'variant_step_time_s_median'.
  """
  if is_multiclass is None:
    is_multiclass = registry_is_multiclass(config)
  setup = setup_step(config, is_multiclass)
  device = jax.devices()[0]
  peak_before, _ = matmul_peak_flops(device)
  with jax.set_mesh(setup.mesh):
    variants = _compile_variants(config, setup, split)
    # Every variant threads the one state: each call donates what the last returned.
    page_faults = {}
    times = alternate({name: (v.call, 'state') for name, v in variants.items()},
                      {'state': setup.state}, {'state': setup.batches}, steps, warmup,
                      page_faults)
  peak, peak_kind = _peak(device, setup.mesh, peak_before)
  result = {
      'mode': 'step',
      **_describe(config, device, setup.param_count),
      'num_devices': setup.mesh.size,
      'ema': config.ema,
      'compile_s': variants['full'].seconds,
      'compile_cpu_s': variants['full'].cpu_seconds,
      'steps': steps,
      'warmup': warmup,
      **_throughput(times['full'], config.batch_size, setup.flops_per_image, peak, peak_kind,
                    device),
      'program_memory_bytes': _program_bytes(variants['full'].program.memory_analysis()),
      # Minor page faults of a full step (median): ~0 once XLA's CPU temporaries
      # stay mapped (ark_jax/host_memory.py), their page count otherwise.
      'page_faults_per_step': int(statistics.median(page_faults['full'])),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
  }
  if not split:
    return result
  median = {name: statistics.median(t) for name, t in times.items()}
  full = median['full']
  shares = {part: (full - median[part]) / full for part in ('augment', 'teacher')}
  shares['ema'] = ((full - median['ema']) if config.ema == 'step' else median['ema']) / full
  shares['rest'] = 1.0 - shares['augment'] - shares['teacher'] - (
      shares['ema'] if config.ema == 'step' else 0.0)
  return {**result, 'split': shares, 'variant_step_time_s_median': median}


def widened(config, factor: int):
  """`config` with its D heads repeated `factor` times: D x factor heads, names suffixed."""
  wide = config.copy_and_resolve_references()
  wide.data.datasets = tuple(f'{name}_{k}' for k in range(factor)
                             for name in config.data.datasets)
  wide.data.num_classes = tuple(config.data.num_classes) * factor
  return wide


def run_heads(config, steps: int = 20, warmup: int = 3, factor: int = 10) -> dict:
  """The train step with the config's D heads against D x `factor` heads.

  The heads are vmapped (one stacked [D, P, C] kernel), so the step time
  should hardly grow with D. The two programs alternate step by step (A B A B)
  in one process, each on its own state; rows of the synthetic batches cycle
  through all heads of each. The repeated heads keep their dataset's class
  count and task, read once from the registry.

  Returns:
    The step fields of the D-head step (img/s, step_time_s, MFU...), plus
    'heads' (D), 'heads_wide' (D x factor), 'step_time_s_median_wide',
    'compile_s_wide', 'img_per_s_wide' and 'heads_ratio' = median step time
    with D x factor heads / with D; 'heads_ratio_paired', the median of the
    ratios of back-to-back pairs; 'xla_flops_ratio' and
    'xla_bytes_accessed_ratio', XLA's cost analysis of the two programs.
  """
  is_multiclass = registry_is_multiclass(config)
  wide = widened(config, factor)
  setups = {'base': setup_step(config, is_multiclass),
            'wide': setup_step(wide, is_multiclass * factor)}
  mesh = setups['base'].mesh
  device = jax.devices()[0]
  peak_before, _ = matmul_peak_flops(device)
  with jax.set_mesh(mesh):
    compiled = {'base': compile_step(config, setups['base']),
                'wide': compile_step(wide, setups['wide'])}
    times = alternate({name: (c.call, name) for name, c in compiled.items()},
                       {name: s.state for name, s in setups.items()},
                       {name: s.batches for name, s in setups.items()}, steps, warmup)
  peak, peak_kind = _peak(device, mesh, peak_before)
  base, wide_median = (statistics.median(times[name]) for name in ('base', 'wide'))
  # XLA's own count of each program: flops and bytes accessed, free of machine noise.
  cost = {name: (c.program.cost_analysis() or {}) for name, c in compiled.items()}
  return {
      'mode': 'heads',
      **_describe(config, device, setups['base'].param_count),
      'num_devices': mesh.size,
      'ema': config.ema,
      'compile_s': compiled['base'].seconds,
      'steps': steps,
      'warmup': warmup,
      **_throughput(times['base'], config.batch_size, setups['base'].flops_per_image, peak,
                    peak_kind, device),
      'program_memory_bytes': _program_bytes(compiled['base'].program.memory_analysis()),
      'heads': len(config.data.num_classes),
      'heads_wide': len(wide.data.num_classes),
      'param_count_wide': int(setups['wide'].param_count),
      'compile_s_wide': compiled['wide'].seconds,
      'step_time_s_median_wide': wide_median,
      'step_time_s_min_wide': min(times['wide']),
      'step_time_s_max_wide': max(times['wide']),
      'img_per_s_wide': config.batch_size / wide_median,
      'heads_ratio': wide_median / base,
      # The median of per-round ratios: each pair ran back to back, under the same load.
      'heads_ratio_paired': statistics.median(w / b for b, w in zip(times['base'],
                                                                    times['wide'])),
      'xla_flops_ratio': _ratio(cost, 'flops'),
      'xla_bytes_accessed_ratio': _ratio(cost, 'bytes accessed'),
  }


def _ratio(cost: dict, key: str) -> float | None:
  """cost['wide'][key] / cost['base'][key], None where XLA does not report it."""
  if not cost['base'].get(key) or key not in cost['wide']:
    return None
  return float(cost['wide'][key]) / float(cost['base'][key])


def _program_bytes(analysis) -> int | None:
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def summary_lines(result: dict) -> list[str]:
  """The human-readable report printed above the JSON line."""
  r = result
  if r['mode'] == 'pipeline':
    return [
        f"pipeline: R={r['image_size']} batch {r['batch_size']}, {r['workers']} workers, "
        f"{r['read_threads']} read threads, {r['cores']} usable cores",
        f"{r['img_per_s']:.0f} img/s = {r['img_per_s_per_core']:.0f} img/s per core "
        f"({r['img_per_cpu_s'] or 0:.0f} img per CPU-second) over "
        f"{r['steps']} batches after {r['warmup']} (warm-up {r['warmup_s']:.1f} s); next() "
        f"min/median/max {r['step_time_s_min']:.4f}/{r['step_time_s_median']:.4f}/"
        f"{r['step_time_s_max']:.4f} s",
    ]
  lines = [
      f"{r['mode']}: {r['model']} {r['img_size']}px batch {r['batch_size']} {r['dtype']}, "
      f"{r['param_count'] / 1e6:.2f}M params, on {r.get('num_devices', 1)} x {r['device']}",
      f"compile {r['compile_s']:.2f} s"
      + (f" ({r['compile_cpu_s']:.1f} CPU-s)" if 'compile_cpu_s' in r else '')
      + "; step min/median/max "
      f"{r['step_time_s_min']:.4f}/{r['step_time_s_median']:.4f}/{r['step_time_s_max']:.4f} s "
      f"over {r['steps']} steps",
      f"{r['img_per_s']:.2f} img/s, {r['gflops_per_image']:.3f} GFLOPs/img, "
      f"{r['tflops_per_s']:.4f} TFLOP/s achieved",
      f"matmul peak ({r['peak_matmul']}) {r['peak_tflops_per_s']:.4f} TFLOP/s -> "
      f"MFU {r['mfu']:.1%}",
      f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']}); "
      f"compiled program {(r['program_memory_bytes'] or 0) / 2**30:.2f} GiB",
  ]
  if 'page_faults_per_step' in r:
    lines.append(f"minor page faults per step {r['page_faults_per_step']} "
                 f"(GLIBC_TUNABLES={r['glibc_tunables'] or 'unset'})")
  if 'split' in r:
    lines.append(f"split of the step ({r['ema']} EMA): "
                 + ', '.join(f'{k} {v:.1%}' for k, v in r['split'].items()))
  if r['mode'] == 'heads':
    lines.append(f"{r['heads_wide']} heads: step median {r['step_time_s_median_wide']:.4f} s "
                 f"(compile {r['compile_s_wide']:.2f} s) = {r['heads_ratio']:.3f} x the "
                 f"{r['heads']}-head step (paired {r['heads_ratio_paired']:.3f}; XLA flops "
                 f"x{r['xla_flops_ratio'] or float('nan'):.3f}, bytes "
                 f"x{r['xla_bytes_accessed_ratio'] or float('nan'):.3f})")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/ark6.py:swin_tiny,128,4')
  if _MODE.value not in KNOWN_MODES:  # a usage message, not a traceback
    raise app.UsageError(f'--mode={_MODE.value!r} is unknown; known modes: '
                         f'{sorted(KNOWN_MODES)}.')
  if _NUM_CPU_DEVICES.value:
    # Before the first JAX operation starts the CPU backend.
    jax.config.update('jax_num_cpu_devices', _NUM_CPU_DEVICES.value)
  result = run(_CONFIG.value, _MODE.value, _STEPS.value, _WARMUP.value, split=_SPLIT.value,
               heads_factor=_HEADS_FACTOR.value, workdir=_WORKDIR.value)
  print('\n'.join(summary_lines(result)))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
