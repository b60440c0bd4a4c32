r"""Pipeline throughput: host batches/s of input_pipeline.pipeline, per R and workers.

  PYTHONPATH=. .venv/bin/python benchmarks/pipeline_throughput.py \
      [--image_sizes=256,896] [--workers=0,2] [--batch_size=32] [--batches=40] \
      [--num_images=256] [--read_threads=2] [--workdir=/tmp/pipeline_throughput]

Prepares a synthetic 14-label dataset at each R (radiograph-like grey images:
smooth large shapes plus sensor-like noise, drawn at 1024 px and resized like
the real builders, so the PNGs compress about as real chest X-rays do), then
times the training iterator (cyclic schedule, label policy, padding, batching)
after a warm-up that covers worker start-up. Also times the per-image stages
in one thread: the read (ArrayRecord + example parsing), the PNG decode, and for
comparison TFDS's own decoding path, which the pipeline skips. Prints a markdown table.
"""

import os
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np

from input_pipeline import images
from input_pipeline import pipeline
from input_pipeline.datasets import base

_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['256', '896'], 'R values.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'num_workers values (mp_prefetch).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Global batch (one process).')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Timed batches per configuration.')
_WARMUP = flags.DEFINE_integer('warmup', 4, 'Untimed batches first (worker start-up).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'Images in the synthetic train split.')
_READ_THREADS = flags.DEFINE_integer('read_threads', 2, 'Grain read threads per process.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/pipeline_throughput', 'Prepared data go here.')
_SOURCE_SIZE = 1024


def synthetic_radiograph(seed: int) -> np.ndarray:
  """A 1024² grey image: smooth body-like shading, a few blobs, noise (std 4)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:_SOURCE_SIZE, 0:_SOURCE_SIZE] / _SOURCE_SIZE
  body = 90 + 50 * np.sin(3 * x + rng.uniform(0, 3)) * np.cos(2 * y + rng.uniform(0, 3))
  for _ in range(4):
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    radius, amplitude = rng.uniform(0.01, 0.05), rng.uniform(-60, 60)
    body += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / radius)
  return np.clip(body + rng.normal(0, 4, body.shape), 0, 255).astype(np.uint8)


class SyntheticCxr(base.CxrBuilder, skip_registration=True):
  """14 seeded multi-label labels on radiograph-like images (benchmarks only).

  Not registered: the pipeline reads it back from its folder, as any dataset
  prepared elsewhere, and Grain's spawned workers (which re-import this
  script) do not meet a second registration.
  """
  LABEL_NAMES = tuple(f'finding_{k}' for k in range(14))
  TASK = 'multilabel'
  NUM_DISTINCT = 32  # distinct pictures; the rest repeat them (encoding is slow)

  def __init__(self, *, num_images: int = 256, **kwargs):
    # An argument, not the flag: Grain pickles this class by value (it lives
    # in __main__) for its workers, and absl's flags do not pickle.
    self._num_images = num_images
    kwargs.setdefault('num_workers', 0)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    self.summary = base.PrepareSummary(self.name, self.image_size, self.LABEL_NAMES)
    return {split: self._generate_examples(split) for split in base.SPLITS}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    num = self._num_images if split == 'train' else 8
    pngs = [images.encode_png(images.resize(synthetic_radiograph(k), self.image_size))
            for k in range(min(num, self.NUM_DISTINCT))]
    rng = np.random.default_rng(0)
    for i in range(num):
      raw = rng.choice(np.array([0, 1, -1, np.nan], np.float32), 14, p=[.8, .1, .05, .05])
      self.summary.add_example(split, raw)
      yield f'{split}{i}', {'image': pngs[i % len(pngs)], 'labels_raw': raw, 'id': str(i),
                            'sex': 'MF'[i % 2], 'age': np.float32(50), 'view': 'PA'}


def _stage_times(name: str, size: int, count: int = 32) -> dict[str, float]:
  """Milliseconds per image of each stage, in one thread (best of 3); PNG kB."""
  decoded = pipeline.open_source(name, 'train', _WORKDIR.value, size)
  raw = pipeline.open_source(name, 'train', _WORKDIR.value, size, decode_images=False)
  decoded[count], raw[count]  # lazy imports (Pillow's plugins) out of the timing

  def per_image(fn):
    times = []
    for _ in range(3):  # best of 3: the machine is shared
      start = time.perf_counter()
      out = [fn(i) for i in range(count)]
      times.append((time.perf_counter() - start) / count * 1e3)
    return min(times), out

  read_ms, examples = per_image(lambda i: raw[i])
  pngs = [ex['image'] for ex in examples]
  decode_ms, _ = per_image(lambda i: pipeline.decode_png(pngs[i]))
  tfds_ms, _ = per_image(lambda i: decoded[i])
  return {'read_ms': read_ms, 'decode_ms': decode_ms, 'tfds_ms': tfds_ms,
          'png_kb': float(np.mean([len(p) for p in pngs])) / 1e3}


def main(argv):
  del argv
  flags.FLAGS.mark_as_parsed()
  cores = os.cpu_count()
  rows = []
  for size in map(int, _IMAGE_SIZES.value):
    builder = SyntheticCxr(data_dir=_WORKDIR.value, config=f'r{size}', file_format='array_record',
                           num_images=_NUM_IMAGES.value)
    builder.download_and_prepare()
    stages = _stage_times('synthetic_cxr', size)
    print(f'R={size}: PNG {stages["png_kb"]:.0f} kB; one thread, ms/img: read + parse '
          f'{stages["read_ms"]:.2f}, PNG decode {stages["decode_ms"]:.2f} (TFDS\'s own decoder '
          f'path, read included: {stages["tfds_ms"]:.2f})')
    for workers in map(int, _WORKERS.value):
      config = ml_collections.ConfigDict(dict(
          datasets=('synthetic_cxr',), data_dir=_WORKDIR.value, image_size=size,
          schedule='cyclic', label_policies={'synthetic_cxr': 'lsr_ones,zeros'},
          num_workers=workers, read_threads=_READ_THREADS.value))
      iterator = pipeline.train_iterator(config, _BATCH_SIZE.value, seed=0, process_index=0,
                                         process_count=1)
      start = time.perf_counter()
      for _ in range(_WARMUP.value):
        next(iterator)
      warmup = time.perf_counter() - start
      start = time.perf_counter()
      for _ in range(_BATCHES.value):
        batch = next(iterator)
      elapsed = time.perf_counter() - start
      iterator.close()
      assert batch['image'].shape == (_BATCH_SIZE.value, size, size)
      batches_per_s = _BATCHES.value / elapsed
      img_per_s = batches_per_s * _BATCH_SIZE.value
      rows.append((size, workers, batches_per_s, img_per_s, img_per_s / cores, warmup,
                   stages['read_ms'], stages['decode_ms'], stages['tfds_ms'], stages['png_kb']))
      print(f'R={size} workers={workers}: {batches_per_s:.2f} batches/s, {img_per_s:.0f} img/s, '
            f'{img_per_s / cores:.0f} img/s/core (warm-up {warmup:.1f} s)')
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
