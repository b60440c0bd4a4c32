r"""Prepare throughput: images/s of `input_pipeline.prepare` on a synthetic NIH tree.

  PYTHONPATH=. .venv/bin/python benchmarks/prepare_throughput.py \
      [--num_images=2000] [--image_sizes=256,896] [--workers=1,2] \
      [--workdir=/tmp/prepare_throughput]

Writes an NIH-layout tree (Data_Entry_2017_v2020.csv, train_val_list.txt,
test_list.txt, images_0NN/images/*.png) of `num_images` 1024x1024 8-bit PNGs,
hard links to `--distinct` synthetic radiograph-like images (smooth anatomy-
like shapes plus noise, ~600 kB each, about NIH's compression ratio), so the
tree costs little disk and sits in the page cache: the numbers are decode +
resize + encode + write, not disk reads. Then it times the whole build (listing,
decoding in worker processes, TFDS serialisation and ArrayRecord writing) for
each R and worker count, and the per-image stages in one process.
"""

import io
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from input_pipeline import images
from input_pipeline import prepare

_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'Images in the synthetic tree.')
_DISTINCT = flags.DEFINE_integer('distinct', 50, 'Distinct images (the rest are hard links).')
_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['256', '896'], 'R values to prepare.')
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'num_workers values to time.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/prepare_throughput', 'Scratch folder.')
_SOURCE_SIZE = 1024
_HEADER = ('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,'
           'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]')


def synthetic_radiograph(seed: int) -> np.ndarray:
  """A 1024² grey image with smooth large shapes and sensor-like noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:_SOURCE_SIZE, 0:_SOURCE_SIZE] / _SOURCE_SIZE
  body = 90 + 50 * np.sin(3 * x + rng.uniform(0, 3)) * np.cos(2 * y + rng.uniform(0, 3))
  for _ in range(4):  # lungs, heart, ...
    cx, cy = rng.uniform(.2, .8, size=2)
    width, contrast = rng.uniform(.01, .05), rng.uniform(-60, 60)
    body += contrast * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / width)
  return np.clip(body + rng.normal(0, 4, body.shape), 0, 255).astype(np.uint8)


def write_tree(root: str, num_images: int, distinct: int):
  sources = []
  for k in range(distinct):
    path = os.path.join(root, 'sources', f'{k}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(synthetic_radiograph(k)).save(path)
    sources.append(path)
  rows, names = [], []
  for i in range(num_images):
    name = f'{i // 3:08d}_{i % 3:03d}.png'
    folder = os.path.join(root, f'images_{1 + i // 10000:03d}', 'images')
    os.makedirs(folder, exist_ok=True)
    os.link(sources[i % distinct], os.path.join(folder, name))
    rows.append(f'{name},No Finding,{i % 3},{i // 3},50,M,PA,1024,1024,0.143,0.143')
    names.append(name)
  with open(os.path.join(root, 'Data_Entry_2017_v2020.csv'), 'w') as f:
    f.write('\n'.join([_HEADER] + rows) + '\n')
  cut = num_images * 9 // 10
  with open(os.path.join(root, 'train_val_list.txt'), 'w') as f:
    f.write('\n'.join(names[:cut]) + '\n')
  with open(os.path.join(root, 'test_list.txt'), 'w') as f:
    f.write('\n'.join(names[cut:]) + '\n')
  return sources


def stage_times(path: str, size: int, repeats: int = 10) -> dict[str, float]:
  """Milliseconds per image of each stage, in this process."""
  def per_image(fn):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn()
    return 1000 * (time.perf_counter() - start) / repeats, out
  decode_ms, (grey, _) = per_image(lambda: images.read_grey(path))
  resize_ms, small = per_image(lambda: images.resize(grey, size))
  times = {'decode 1024 PNG': decode_ms, f'resize to {size}': resize_ms}
  for level in (1, 6):
    def encode(level=level):
      buf = io.BytesIO()
      Image.fromarray(small).save(buf, format='PNG', compress_level=level)
      return buf.getvalue()
    ms, png = per_image(encode)
    times[f'encode PNG level {level} ({len(png) // 1000} kB)'] = ms
  return times


def main(argv):
  del argv  # Unused.
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.WARNING)
  root = os.path.join(_WORKDIR.value, 'nih')
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  start = time.perf_counter()
  sources = write_tree(root, _NUM_IMAGES.value, _DISTINCT.value)
  print(f'tree of {_NUM_IMAGES.value} images written in {time.perf_counter() - start:.0f} s '
        f'({os.path.getsize(sources[0]) // 1000} kB per PNG); {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  results = []
  for size in map(int, _IMAGE_SIZES.value):
    print(f'R={size} per-image stages (ms):',
          ', '.join(f'{k} {v:.1f}' for k, v in stage_times(sources[0], size).items()))
    for workers in map(int, _WORKERS.value):
      data_dir = os.path.join(_WORKDIR.value, f'data_{size}_{workers}')
      builder = prepare.create_builder('chestxray14', data_dir=data_dir, manual_dir=root,
                                       image_size=size, num_workers=workers)
      start = time.perf_counter()
      summary = prepare.prepare(builder, root)
      seconds = time.perf_counter() - start
      written = sum(summary.examples.values())
      results.append((size, workers, written, seconds))
      print(f'R={size} workers={workers}: {written} images in {seconds:.1f} s = '
            f'{written / seconds:.1f} images/s (load average {os.getloadavg()[0]:.1f})',
            flush=True)
      shutil.rmtree(data_dir)
  print('\n| R | workers | images | seconds | images/s |\n|---|---|---|---|---|')
  for size, workers, written, seconds in results:
    print(f'| {size} | {workers} | {written} | {seconds:.1f} | {written / seconds:.1f} |')


if __name__ == '__main__':
  app.run(main)
