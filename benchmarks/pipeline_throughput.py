r"""Pipeline throughput: host batches/s of input_pipeline.pipeline, per R and workers.

  PYTHONPATH=. .venv/bin/python benchmarks/pipeline_throughput.py \
      [--image_sizes=256,896] [--workers=0,2] [--batch_size=32] [--batches=40] \
      [--num_images=256] [--read_threads=2] [--workdir=/tmp/pipeline_throughput]

The table over R and workers of `python -m ark_jax.benchmark --mode=pipeline`
(both run ark_jax/pipeline_benchmark.py). Prepares a synthetic 14-label dataset
at each R (radiograph-like grey images whose PNGs compress about as real chest
X-rays do), then times the training iterator (cyclic schedule, label policy, padding, batching)
after a warm-up that covers worker start-up. Also times the per-image stages
in one thread: the read (ArrayRecord + example parsing), the PNG decode, and for
comparison TFDS's own decoding path, which the pipeline skips. Prints a markdown table;
per core is over the cores this process may use (os.sched_getaffinity).
"""

from absl import app
from absl import flags

from ark_jax import pipeline_benchmark

_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['256', '896'], 'R values.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'num_workers values (mp_prefetch).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Global batch (one process).')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Timed batches per configuration.')
_WARMUP = flags.DEFINE_integer('warmup', 4, 'Untimed batches first (worker start-up).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'Images in the synthetic train split.')
_READ_THREADS = flags.DEFINE_integer('read_threads', 2, 'Grain read threads per process.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/pipeline_throughput', 'Prepared data go here.')


def main(argv):
  del argv
  flags.FLAGS.mark_as_parsed()
  cores = pipeline_benchmark.usable_cores()
  rows = []
  for size in map(int, _IMAGE_SIZES.value):
    pipeline_benchmark.prepare(_WORKDIR.value, size, _NUM_IMAGES.value)
    stages = pipeline_benchmark.stage_times(_WORKDIR.value, size)
    print(f'R={size}: PNG {stages["png_kb"]:.0f} kB; one thread, ms/img: read + parse '
          f'{stages["read_ms"]:.2f}, PNG decode {stages["decode_ms"]:.2f} (TFDS\'s own decoder '
          f'path, read included: {stages["tfds_ms"]:.2f})')
    for workers in map(int, _WORKERS.value):
      config = pipeline_benchmark.data_config(_WORKDIR.value, size, workers, _READ_THREADS.value)
      r = pipeline_benchmark.time_train_iterator(config, _BATCH_SIZE.value, _BATCHES.value,
                                                 _WARMUP.value)
      rows.append((size, workers, r['batches_per_s'], r['img_per_s'], r['img_per_s_per_core'],
                   r['warmup_s'], stages['read_ms'], stages['decode_ms'], stages['tfds_ms'],
                   stages['png_kb']))
      print(f'R={size} workers={workers}: {r["batches_per_s"]:.2f} batches/s, '
            f'{r["img_per_s"]:.0f} img/s, {r["img_per_s_per_core"]:.0f} img/s/core '
            f'(warm-up {r["warmup_s"]:.1f} s)')
  print(f'\n{cores} cores, batch {_BATCH_SIZE.value}, read_threads {_READ_THREADS.value}, '
        f'{_BATCHES.value} timed batches after {_WARMUP.value}\n')
  print('| R | workers | batches/s | img/s | img/s/core | warm-up s | read+parse ms/img '
        '| PNG decode ms/img | TFDS decoder path ms/img | PNG kB |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1f} | {r[6]:.2f} '
          f'| {r[7]:.2f} | {r[8]:.2f} | {r[9]:.0f} |')


if __name__ == '__main__':
  app.run(main)
