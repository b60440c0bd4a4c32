"""Host throughput of the training input pipeline on a synthetic prepared dataset.

`python -m ark_jax.benchmark --mode=pipeline` and benchmarks/pipeline_throughput.py
(the table over R and workers) time `input_pipeline.pipeline.train_iterator`
through `time_train_iterator`. The data is a synthetic 14-label dataset whose
images are radiograph-like (smooth large shapes plus sensor-like noise, drawn at
1024 px and resized like the real builders), so the stored PNGs compress about
as real chest X-rays do (26 kB at R=256, 469 kB at 896).
"""

import contextlib
import functools
import os
import resource
import statistics
import sys
import tempfile
import time

import ml_collections
import numpy as np
import psutil

from input_pipeline import images
from input_pipeline import pipeline
from input_pipeline.datasets import base

NAME = 'synthetic_cxr'
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


@functools.lru_cache(maxsize=64)
def _png(seed: int, size: int) -> bytes:
  # Cached: the three splits draw the same pictures, and drawing is slow.
  return images.encode_png(images.resize(synthetic_radiograph(seed), size))


class SyntheticCxr(base.CxrBuilder, skip_registration=True):
  """14 seeded multi-label labels on radiograph-like images (benchmarks only).

  Not registered: the pipeline reads it back from its folder, as any dataset
  prepared elsewhere, and Grain's spawned workers (which re-import the
  benchmark's modules) do not meet a second registration.
  """
  LABEL_NAMES = tuple(f'finding_{k}' for k in range(14))
  TASK = 'multilabel'
  NUM_DISTINCT = 32  # distinct pictures; the rest repeat them (encoding is slow)

  def __init__(self, *, num_images: int = 256, **kwargs):
    self._num_images = num_images
    kwargs.setdefault('num_workers', 0)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    self.summary = base.PrepareSummary(self.name, self.image_size, self.LABEL_NAMES)
    return {split: self._generate_examples(split) for split in base.SPLITS}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    num = self._num_images if split == 'train' else 8
    pngs = [_png(k, self.image_size) for k in range(min(num, self.NUM_DISTINCT))]
    rng = np.random.default_rng(0)
    for i in range(num):
      raw = rng.choice(np.array([0, 1, -1, np.nan], np.float32), 14, p=[.8, .1, .05, .05])
      self.summary.add_example(split, raw)
      yield f'{split}{i}', {'image': pngs[i % len(pngs)], 'labels_raw': raw, 'id': str(i),
                            'sex': 'MF'[i % 2], 'age': np.float32(50), 'view': 'PA'}


def prepare(data_dir: str, image_size: int, num_images: int = 256) -> None:
  """Writes the synthetic dataset at R=`image_size` under `data_dir` (kept if already there)."""
  SyntheticCxr(data_dir=data_dir, config=f'r{image_size}', file_format='array_record',
               num_images=num_images).download_and_prepare()


def data_config(data_dir: str, image_size: int, num_workers: int,
                read_threads: int) -> ml_collections.ConfigDict:
  """A trainer's `config.data` reading only the synthetic dataset, cyclic, LSR labels."""
  return ml_collections.ConfigDict(dict(
      datasets=(NAME,), data_dir=data_dir, image_size=image_size, schedule='cyclic',
      label_policies={NAME: 'lsr_ones,zeros'}, num_workers=num_workers,
      read_threads=read_threads))


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, not the machine's count)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def time_train_iterator(config_data: ml_collections.ConfigDict, batch_size: int, batches: int,
                        warmup: int) -> dict:
  """Times `batches` host batches of the training iterator after `warmup` untimed ones.

  The warm-up covers worker start-up. img_per_s is the images of the timed
  batches over their total wall time (the stream's rate; per-batch times are
  bursty when read threads or workers prefetch); step_time_s is that time per
  batch, step_time_s_min/median/max the spread of the single next() calls.
  img_per_cpu_s is images over the CPU seconds this process and its workers
  spent in those batches: what one busy core delivers, on a shared machine too.
  """
  iterator = pipeline.train_iterator(config_data, batch_size, seed=0, process_index=0,
                                     process_count=1)
  try:
    start = time.perf_counter()
    for _ in range(warmup):
      next(iterator)
    warmup_s = time.perf_counter() - start
    times = []
    cpu_start = _cpu_seconds()
    for _ in range(batches):
      start = time.perf_counter()
      batch = next(iterator)
      times.append(time.perf_counter() - start)
    cpu_s = _cpu_seconds() - cpu_start
  finally:
    iterator.close()
  size = config_data.image_size
  if batch['image'].shape != (batch_size, size, size):
    raise AssertionError(f'pipeline batch image {batch["image"].shape}, expected '
                         f'{(batch_size, size, size)}')
  total, cores = sum(times), usable_cores()
  return {
      'img_per_s': batches * batch_size / total,
      'img_per_s_per_core': batches * batch_size / total / cores,
      'batches_per_s': batches / total,
      'step_time_s': total / batches,
      'step_time_s_min': min(times),
      'step_time_s_median': statistics.median(times),
      'step_time_s_max': max(times),
      'warmup_s': warmup_s,
      # Images per CPU-second of this process and its workers: the per-core rate
      # that other load on the machine does not dilute (wall time does).
      'cpu_s': cpu_s,
      'img_per_cpu_s': batches * batch_size / cpu_s if cpu_s > 0 else None,
      'cores': cores,
      'workers': config_data.num_workers,
      'read_threads': config_data.read_threads,
  }


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live children (Grain workers)."""
  process = psutil.Process()
  return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def stage_times(data_dir: str, size: int, count: int = 32) -> dict[str, float]:
  """Milliseconds per image of each stage, in one thread (best of 3); PNG kB."""
  decoded = pipeline.open_source(NAME, 'train', data_dir, size)
  raw = pipeline.open_source(NAME, 'train', data_dir, size, decode_images=False)
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


def run(config, steps: int = 20, warmup: int = 3, workdir: str | None = None,
        num_images: int = 256) -> dict:
  """`python -m ark_jax.benchmark --mode=pipeline`: images/s at R = config.data.image_size.

  The synthetic dataset is prepared in `workdir` (reused if already there;
  None: a temporary folder, removed after) and read with the config's batch
  size, data.num_workers and data.read_threads: `steps` timed batches after
  `warmup` untimed ones (see time_train_iterator). No model, no compile: mfu
  and compile_s are None; peak memory is this process's max RSS (workers not
  included).
  """
  size, data = config.data.image_size, config.data
  with contextlib.ExitStack() as stack:
    if workdir is None:
      workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix='ark_pipeline_'))
    start = time.perf_counter()
    prepare(workdir, size, num_images)
    prepare_s = time.perf_counter() - start
    config_data = data_config(workdir, size, data.get('num_workers', 0),
                              data.get('read_threads', 2))
    result = time_train_iterator(config_data, config.batch_size, steps, warmup)
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin'
                                                              else 1024)
  return {
      'mode': 'pipeline',
      'image_size': size,
      'batch_size': config.batch_size,
      'steps': steps,
      'warmup': warmup,
      'num_images': num_images,
      'prepare_s': prepare_s,
      **result,
      'mfu': None,
      'compile_s': None,
      'peak_memory_bytes': rss,
      'peak_memory_source': 'host max RSS',
  }
