r"""Train-step throughput on 1, 2, 4, 8 fake CPU devices at a fixed per-device batch.

  PYTHONPATH=. .venv/bin/python benchmarks/device_scaling.py --config=configs/demo.py \
      [--devices=1,2,4,8] [--per_device_batch=8 | --global_batch=64] [--steps=10] [--warmup=2]

One process with max(--devices) fake CPU devices (jax_num_cpu_devices). For
each N the trainer's step (ark_jax.benchmark.setup_step / compile_step: the
config's train step, batch split over an N-way data mesh of the first N
devices, parameters replicated) runs at global batch per_device_batch x N.
The N programs alternate step by step (1 2 4 8 1 2 4 8 ...) so that machine
noise falls on all of them alike; the table gives medians. Fake devices share
the same cores, so this measures what sharding costs on one host (a
partitioned program, per-device thunks, the gradients' all-reduce), not a
speed-up: with no overhead, total img/s would stay flat as N grows. At a
fixed per-device batch the global batch grows with N, and a small model's
step gets more efficient per image with the batch; --global_batch keeps the
work fixed, so that the ratio to 1 device is the cost of sharding alone.
"""

if __name__ == '__main__':
  # Before JAX starts: XLA's CPU buffers stay mapped between steps (ark_jax/host_memory.py).
  from ark_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_tuned_malloc()

import json
import statistics

from absl import app
from absl import flags
import jax

from ark_jax import benchmark

# --config, --steps and --warmup are ark_jax.benchmark's flags (imported above).
FLAGS = flags.FLAGS
_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Fake device counts.')
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 8, 'Images per device.')
_GLOBAL_BATCH = flags.DEFINE_integer('global_batch', None, 'A fixed global batch for every N '
                                     'instead of per_device_batch x N: the same work split '
                                     'N ways, what sharding itself costs.')


def main(argv):
  del argv
  counts = [int(n) for n in _DEVICES.value]
  jax.config.update('jax_num_cpu_devices', max(counts))  # before JAX starts its backend
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  steps, warmup = FLAGS.steps, FLAGS.warmup
  is_multiclass = benchmark.registry_is_multiclass(config)
  setups, compiled = {}, {}
  batch = {n: _GLOBAL_BATCH.value or _PER_DEVICE_BATCH.value * n for n in counts}
  for n in counts:
    c = config.copy_and_resolve_references()
    c.batch_size = batch[n]
    setups[n] = benchmark.setup_step(c, is_multiclass, jax.devices()[:n])
    with jax.set_mesh(setups[n].mesh):
      compiled[n] = benchmark.compile_step(c, setups[n])
    print(f'{n} devices: compiled in {compiled[n].seconds:.1f} s', flush=True)
  times = benchmark.alternate({n: (compiled[n].call, n) for n in counts},
                              {n: s.state for n, s in setups.items()},
                              {n: s.batches for n, s in setups.items()},
                              steps, warmup)
  rows = []
  for n in counts:
    median = statistics.median(times[n])
    rows.append({'devices': n, 'batch_size': batch[n],
                 'step_time_s': median, 'img_per_s': batch[n] / median,
                 'step_time_s_min': min(times[n]), 'step_time_s_max': max(times[n]),
                 'compile_s': compiled[n].seconds})
  base = rows[0]['img_per_s']
  per = (f'global batch {_GLOBAL_BATCH.value}' if _GLOBAL_BATCH.value else
         f'{_PER_DEVICE_BATCH.value} images per device')
  print(f'\n{per}, {steps} alternating steps after {warmup}\n')
  print('| fake devices | global batch | step median (min-max) s | img/s | img/s vs '
        f'{rows[0]["devices"]} device(s) | compile s |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['devices']} | {r['batch_size']} | {r['step_time_s']:.4f} "
          f"({r['step_time_s_min']:.4f}-{r['step_time_s_max']:.4f}) | {r['img_per_s']:.1f} "
          f"| {r['img_per_s'] / base:.2f} | {r['compile_s']:.1f} |")
  print(json.dumps(rows), flush=True)


if __name__ == '__main__':
  app.run(main)
