r"""Throughput of the Ark model: images/s, MFU against a measured matmul peak, memory.

  python -m ark_jax.benchmark --config=configs/ark6.py:swin_tiny,128,4 --mode=forward \
      --config.batch_size=16 --steps=20 --warmup=3
  python -m ark_jax.benchmark --config=configs/demo.py --mode=step --steps=10 --warmup=2

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
it needs a trainer config (configs/demo.py). See `run_step`.
"""

import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

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


# 'step' is not a Workload (it threads a donated state): run_step times it.
# Later issues add 'pipeline', 'heads'.
MODES: dict[str, Callable[..., Workload]] = {
    'forward': _forward,
}
KNOWN_MODES = (*MODES, 'step')


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


def run(config, mode: str = 'forward', steps: int = 20, warmup: int = 3) -> dict:
  """Compiles and times one mode of the Ark model described by `config`.

  Args:
    config: experiment config (configs/ark6.py): model, batch_size, data.num_classes, seed.
    mode: a key of MODES.
    steps: timed calls, each ended by block_until_ready.
    warmup: untimed calls between compilation and timing.

  Returns:
    A flat dict of results (see the keys below); times in seconds.
  """
  if mode not in KNOWN_MODES:
    raise ValueError(f'Unknown benchmark mode {mode!r}; known modes: {sorted(KNOWN_MODES)}.')
  if steps < 1 or warmup < 0:
    raise ValueError(f'Need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')
  if mode == 'step':
    return run_step(config, steps, warmup)
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


def _compile_variants(config, graphdef, num_classes, is_multiclass, state, state_shardings,
                      batch, mesh):
  """name -> (`call(state, batch) -> state`, compiled program, compile seconds).

  'full' is the trainer's step; 'augment', 'teacher' and 'ema' leave that part
  out. With ema='pass' the step holds no EMA update: 'ema' is then the
  separate end-of-pass update (train.make_ema_update), timed on its own.
  """
  def compile_timed(jitted, arg):
    start = time.perf_counter()
    return jitted.lower(state, arg).compile(), time.perf_counter() - start

  def step(*skip):
    compiled, seconds = compile_timed(train.jit_train_step(
        train.make_train_step(graphdef, config, num_classes, is_multiclass, skip=frozenset(skip)),
        state_shardings, mesh), batch)
    return (lambda state, batch: compiled(state, batch)[0]), compiled, seconds

  variants = {'full': step(), 'augment': step('augment'), 'teacher': step('teacher')}
  if config.ema == 'step':
    variants['ema'] = step('ema')
  else:
    pass_index = jax.device_put(np.int32(0), sharding.replicated(mesh))
    compiled, seconds = compile_timed(train.make_ema_update(config, state_shardings, mesh),
                                      pass_index)
    variants['ema'] = (lambda state, _: compiled(state, pass_index)), compiled, seconds
  return variants


def run_step(config, steps: int = 20, warmup: int = 3) -> dict:
  """Times the full Ark+ train step and its variants; splits the step's time.

  Variants alternate (full, augment, teacher, ema, full, ...) so that machine
  noise falls on all of them alike; each call ends with one block_until_ready
  on the state, the only host sync. The split is (full - variant) / full of
  the medians; with ema='pass' the 'ema' share is the separate end-of-pass
  update over one step (paid once per dataset pass, not every step). 'rest'
  (student forward and backward, heads, loss, optimizer) is what the parts
  inside the step leave of it.

  Args:
    config: a trainer config (configs/demo.py): model, data, optimizer, mesh, ema...
    steps: timed calls of each variant.
    warmup: untimed calls of each variant after compilation.

  Returns:
    The fields of `run` (img/s, step times, MFU of the full step...), plus
    'split' (shares of the full step) and 'variant_step_time_s_median'.
  """
  mesh = sharding.make_mesh(config.mesh)
  train.check_config(config, mesh.size)
  num_classes = tuple(config.data.num_classes)
  # The registered builders know their task; nothing is read from disk.
  is_multiclass = [datasets.metadata(n).task == 'multiclass' for n in config.data.datasets]
  graphdef, state, state_shardings = train_state.create_train_state(
      config, num_classes, mesh, config.sharding.rules)
  param_count = sum(p.size for p in jax.tree.leaves(state.params))
  # Student forward + backward (3x) and teacher forward (1x): DESIGN.md section 5.
  flops_per_image = 4 * 2.0 * ark_forward_macs(nnx.merge(graphdef, state.params))
  batches = synthetic_batches(config, num_classes, is_multiclass, len(num_classes), mesh)
  device = jax.devices()[0]

  peak_before, _ = matmul_peak_flops(device)
  with jax.set_mesh(mesh):
    variants = _compile_variants(config, graphdef, num_classes, is_multiclass, state,
                                 state_shardings, batches[0], mesh)
    times = {name: [] for name in variants}
    for i in range(warmup + steps):
      batch = batches[i % len(batches)]
      for name, (call, _, _) in variants.items():
        start = time.perf_counter()
        state = jax.block_until_ready(call(state, batch))
        if i >= warmup:
          times[name].append(time.perf_counter() - start)
  peak_after, peak_kind = matmul_peak_flops(device)
  # Fake CPU devices share one CPU; accelerators add their peaks.
  peak = max(peak_before, peak_after) * (1 if device.platform == 'cpu' else mesh.size)

  median = {name: statistics.median(t) for name, t in times.items()}
  full = median['full']
  split = {part: (full - median[part]) / full for part in ('augment', 'teacher')}
  split['ema'] = ((full - median['ema']) if config.ema == 'step' else median['ema']) / full
  split['rest'] = 1.0 - split['augment'] - split['teacher'] - (
      split['ema'] if config.ema == 'step' else 0.0)
  return {
      'mode': 'step',
      **_describe(config, device, param_count),
      'num_devices': mesh.size,
      'ema': config.ema,
      'compile_s': variants['full'][2],
      'steps': steps,
      'warmup': warmup,
      **_throughput(times['full'], config.batch_size, flops_per_image, peak, peak_kind, device),
      'program_memory_bytes': _program_bytes(variants['full'][1].memory_analysis()),
      'split': split,
      'variant_step_time_s_median': median,
  }


def _program_bytes(analysis) -> int | None:
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def summary_lines(result: dict) -> list[str]:
  """The human-readable report printed above the JSON line."""
  r = result
  return [
      f"{r['mode']}: {r['model']} {r['img_size']}px batch {r['batch_size']} {r['dtype']}, "
      f"{r['param_count'] / 1e6:.2f}M params, on {r['device']}",
      f"compile {r['compile_s']:.2f} s; step min/median/max "
      f"{r['step_time_s_min']:.4f}/{r['step_time_s_median']:.4f}/{r['step_time_s_max']:.4f} s "
      f"over {r['steps']} steps",
      f"{r['img_per_s']:.2f} img/s, {r['gflops_per_image']:.3f} GFLOPs/img, "
      f"{r['tflops_per_s']:.4f} TFLOP/s achieved",
      f"matmul peak ({r['peak_matmul']}) {r['peak_tflops_per_s']:.4f} TFLOP/s -> "
      f"MFU {r['mfu']:.1%}",
      f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']}); "
      f"compiled program {(r['program_memory_bytes'] or 0) / 2**30:.2f} GiB",
  ] + ([f"split of the step ({r['ema']} EMA): "
        + ', '.join(f'{k} {v:.1%}' for k, v in r['split'].items())] if 'split' in r else [])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/ark6.py:swin_tiny,128,4')
  if _MODE.value not in KNOWN_MODES:  # a usage message, not a traceback
    raise app.UsageError(f'--mode={_MODE.value!r} is unknown; known modes: '
                         f'{sorted(KNOWN_MODES)}.')
  result = run(_CONFIG.value, _MODE.value, _STEPS.value, _WARMUP.value)
  print('\n'.join(summary_lines(result)))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
