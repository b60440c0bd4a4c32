r"""--mode=predict: zero-shot use of the teacher (DESIGN.md section 2, ARK_SPEC.md section 5).

  python -m ark_jax.main --config=... --workdir=DIR --mode=predict \
      --images='scans/**/*.png' --output=predictions.csv

Every file matching the glob (recursive, sorted; PNG, JPEG, other Pillow
formats, DICOM) goes through the newest checkpoint's EMA teacher, the model
Ark+ releases and uses downstream. Preprocessing as the Ark+ zero-shot notebook:
grey, resized straight to S x S (no crop; Pillow bicubic, as prepare resizes),
ImageNet normalisation, grey -> 3 channels. DICOMs are read as prepare reads
them (modality and VOI LUT or window, MONOCHROME1 inverted).

The CSV has one row per image: `path`, then `<dataset>/<label>` for every output
of every head in head order (config.data.datasets). Every image gets every head:
sigmoid for multi-label and binary heads, softmax over the head's real classes
for multi-class ones. (The reference's notebooks take the sigmoid of all heads,
its CE-trained RSNA head included; the softmax is what that head was trained for.)

Failures come before the checkpoint is read: no file matching the glob, or a
file whose header does not read as an image or declares too many pixels. A file
whose pixel data is corrupt past a valid header is found when its batch is
decoded; the run stops naming it, and no output file is written (the CSV
appears whole, under its final name, only at the end).

Multi-process: every process decodes every image and feeds its devices their
rows of each batch; process 0 writes the file. Simple, and the forward pass is
still split over all devices; decoding is repeated on each host.

Shape suffixes: B batch, S model input side, D datasets (heads), C classes.
"""

from collections.abc import Iterator, Sequence
import concurrent.futures
import csv
import glob
import os

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from ark_jax import augment
from ark_jax import evaluate
from ark_jax import sharding
from ark_jax import train
from input_pipeline import datasets
from input_pipeline import images

# Decoding threads, not processes: Pillow's decoders and resize release the GIL
# (pydicom's parsing does not, but DICOM pixels are mostly numpy work), and
# threads hand the S x S arrays back without pickling. Two batches in flight
# keep the device fed while the host decodes the next.
DECODE_THREADS = min(16, os.cpu_count() or 1)


def list_images(pattern: str) -> list[str]:
  """The files matching `pattern` (recursive `**`), sorted; folders left out.

  Raises:
    FileNotFoundError: nothing matches.
  """
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'--images={pattern!r} matches no file.')
  return paths


def check_header(path: str, max_pixels: int = images.MAX_PIXELS) -> None:
  """Reads only the header: is it an image, and of an acceptable size?

  Cheap (no pixels decoded), so a run refuses a stray or broken file before it
  reads the checkpoint and compiles.

  Raises:
    images.BadImageError: naming the file.
  """
  try:
    if images.is_dicom(path):
      import pydicom  # pylint: disable=g-import-not-at-top
      ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
      if 'Rows' not in ds or 'Columns' not in ds:
        raise images.BadImageError(path, 'DICOM without Rows/Columns: not an image')
      num_pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get('NumberOfFrames', 1) or 1)
    else:
      with Image.open(path) as img:
        num_pixels = img.width * img.height
  except images.BadImageError:
    raise
  except FileNotFoundError as e:
    raise images.BadImageError(path, 'no such file') from e
  except Exception as e:  # pylint: disable=broad-except  # pydicom and Pillow raise many kinds
    raise images.BadImageError(path, f'cannot read as an image: {e}') from e
  if num_pixels > max_pixels:
    raise images.BadImageError(path, f'{num_pixels:,} pixels, over the limit of '
                               f'{max_pixels:,} (images.MAX_PIXELS)')


def load_image(path: str, size: int) -> np.ndarray:
  """The model's input before normalisation: grey uint8 [S, S], resized straight."""
  return images.resize(images.read_grey(path)[0], size)


def _batches(paths: Sequence[str], size: int, batch_size: int,
             pool: concurrent.futures.Executor) -> Iterator[np.ndarray]:
  """uint8 [B, S, S] batches in order, the last padded with zeros; one batch decoded ahead."""
  starts = range(0, len(paths), batch_size)
  submit = lambda i: [pool.submit(load_image, p, size) for p in paths[i:i + batch_size]]
  ahead = submit(starts[0])
  for k in range(len(starts)):
    current, ahead = ahead, (submit(starts[k + 1]) if k + 1 < len(starts) else None)
    batch_BxSxS = np.zeros((batch_size, size, size), np.uint8)
    for row, future in enumerate(current):
      batch_BxSxS[row] = future.result()
    yield batch_BxSxS


def make_predict_fn(graphdef, config, mesh, num_classes: Sequence[int],
                    is_multiclass: Sequence[bool]):
  """Jitted `(params, image_BxSxS uint8) -> probs_BxDxC`: every head for every image.

  The output is replicated (every process reads all rows).
  """
  rules = config.sharding.rules
  num_classes_D = np.asarray(num_classes, np.int32)
  is_multiclass_D = np.asarray(is_multiclass, bool)

  def predict(params, image_BxSxS):
    with nnx.logical_axis_rules(rules):
      model = nnx.merge(graphdef, params)
      # = augment.teacher_view at R = S: the host already resized.
      x_BxSxSx3 = augment.normalize(image_BxSxS.astype(jnp.float32) / 255.0)
      logits_BxDxC = model(x_BxSxSx3, train=False)['logits']
      return evaluate.all_head_probabilities(logits_BxDxC.astype(jnp.float32), is_multiclass_D,
                                             num_classes_D)

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def column_names(metas: Sequence[datasets.DatasetMetadata]) -> list[str]:
  """`<dataset>/<label>` for every head output, in head order."""
  return [f'{m.name}/{label}' for m in metas for label in m.label_names]


def write_csv(output: str, paths: Sequence[str], columns: Sequence[str],
              probs_NxK: np.ndarray) -> None:
  """Writes the CSV atomically (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', *columns])
    for path, row in zip(paths, probs_NxK):
      writer.writerow([path, *('%.8g' % v for v in row)])  # float32 to ~1e-8
  os.replace(tmp, output)


def predict(config, workdir: str, pattern: str, output: str, step: int | None = None) -> str:
  """--mode=predict: the teacher's probabilities for every image matching `pattern`.

  Args:
    config: the run's ConfigDict (datasets, model, eval_batch_size, progress_bar).
    workdir: the run's directory; its newest (or the given) checkpoint is used.
    pattern: a glob of image files (`**` recurses).
    output: the CSV to write (process 0).
    step: a committed checkpoint step, or None for the newest.

  Returns:
    `output`.

  Raises:
    FileNotFoundError: nothing matches `pattern`, or the workdir has no checkpoint.
    images.BadImageError: a file is not a readable image (named).
  """
  paths = list_images(pattern)
  size = config.model.img_size
  with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
    list(pool.map(check_header, paths))  # every bad header before the checkpoint is read
    graphdef, state, step, mesh = train.restore_checkpoint(config, workdir, step,
                                                           purpose='--mode=predict')
    logging.info('Predicting %d images with the teacher of step %d.', len(paths), step)
    metas = [datasets.metadata(n, config.data.get('data_dir')) for n in config.data.datasets]
    fn = make_predict_fn(graphdef, config, mesh, [m.num_classes for m in metas],
                         [m.task == 'multiclass' for m in metas])
    # One compiled program for all batches: the configured eval batch, or less
    # for few images, a multiple of the device count either way.
    batch_size = min(config.get('eval_batch_size') or config.batch_size, len(paths))
    batch_size = -(-batch_size // mesh.size) * mesh.size
    batch_sh = sharding.batch_sharding(mesh)
    is_main = jax.process_index() == 0
    progress = tqdm.tqdm(total=len(paths), desc='predict', unit='img', mininterval=2,
                         disable=not (is_main and config.get('progress_bar', True)))
    chunks = []
    try:
      with jax.set_mesh(mesh):
        for batch_BxSxS in _batches(paths, size, batch_size, pool):
          # Every process holds the whole batch; each device takes its rows.
          x = jax.make_array_from_callback(batch_BxSxS.shape, batch_sh,
                                           lambda index, b=batch_BxSxS: b[index])
          probs_BxDxC = np.asarray(fn(state.ema_params, x))
          chunks.append(np.concatenate([probs_BxDxC[:, d, :m.num_classes]
                                        for d, m in enumerate(metas)], axis=1))
          progress.update(min(batch_size, len(paths) - progress.n))
    finally:
      progress.close()
  if is_main:
    write_csv(output, paths, column_names(metas), np.concatenate(chunks)[:len(paths)])
  return output
