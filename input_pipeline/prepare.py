r"""Prepares a dataset: official download → pre-resized ArrayRecord shards.

  python -m input_pipeline.prepare --dataset=chexpert \
      --manual_dir=/data/raw/chexpert --data_dir=/data/tfds --image_size=896 \
      [--split_files_dir=DIR] [--skip_bad_images] [--num_workers=N] [--overwrite]

  python -m input_pipeline.prepare --dataset=csv_images:my_set \
      --manual_dir=/data/raw/my_set --data_dir=/data/tfds --csv=labels.csv \
      --image_col=path --label_cols=a,b,c --task=multilabel [--split_col=split] \
      [--patient_col=patient] [--sex_col=sex] [--age_col=age] [--view_col=view] \
      [--class_names=x,y]

Datasets: chestxray14, chexpert, mimic_cxr, rsna_pneumonia, vindr_cxr,
shenzhen_cxr (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS says what manual_dir
holds), csv_images:NAME for anything described by one CSV, and the generated
demo sets demo_multilabel, demo_subset, demo_binary, demo_count (no
--manual_dir). All label files
are checked before any image is decoded; then `--num_workers` processes
(default: all cores) decode and resize. A summary (examples per split, label
prevalence, skipped files) is printed at the end and kept in the dataset's
metadata. The output is `data_dir/NAME/r<R>/1.0.0/` (ArrayRecord shards,
dataset_info.json, features.json, metadata.json).

Bad data. Before any image is read, and before anything is written, these
stop the build with an error naming the file, line and column: a label file
row with fewer fields than its header or with non-empty fields beyond it, a
label value other than 1, 0, -1 or blank, an image path that is absolute,
holds '..', or leads (through a symbolic link) outside --manual_dir (such a
file is never opened), an image listed twice in a split or in train and in
validation/test, and a patient with images in both train and test (datasets
with patient ids: chestxray14, chexpert, mimic_cxr, csv_images with
--patient_col). A listed image that is missing, and then, while decoding,
one that is empty, truncated, corrupt, or larger than 100,000,000 pixels
(10k x 10k; the decompression-bomb limit, images.MAX_PIXELS, checked from the
header before any pixel is decoded) stops the build naming the file and its
label file line; with --skip_bad_images it is logged, counted per split in the
summary and left out. 16-bit images are stretched from their own range; RGB,
RGBA and palette images become grey.

Reading it back needs neither TensorFlow nor this package's builders:

  import tensorflow_datasets as tfds
  source = tfds.data_source('chexpert', split='train', data_dir='/data/tfds',
                            builder_kwargs={'config': 'r896'}, download=False)
  len(source); example = source[0]          # random access (Grain calls
  source.__getitems__([1, 2, 3])            # __getitems__ for batches)
  # example: image uint8 (R, R, 1); labels_raw float32 [n] (1, 0, -1, NaN);
  # id, sex, view as bytes (b'M'); age float32 (NaN unknown)
  info = tfds.builder_from_directory('/data/tfds/chexpert/r896/1.0.0').info
  info.metadata['label_names'], info.metadata['task']   # no config needed
  # or: tfds.builder('chexpert', config='r896', data_dir=...).as_data_source('train')
  # or: input_pipeline.datasets.metadata('chexpert', data_dir='/data/tfds')

Splits are 'train', 'validation', 'test' for every dataset.
"""

import os

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from input_pipeline import datasets
from input_pipeline import images
from input_pipeline.datasets import base
from input_pipeline.datasets import csv_images

_DATASET = flags.DEFINE_string('dataset', None, 'TFDS name, or csv_images:NAME.')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'The official download (not for the demo sets).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where prepared datasets go.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'R: images are stored R x R (config r<R>); default: the builder\'s '
    f'default config (r{base.DEFAULT_IMAGE_SIZE}; r64 for the demo sets).')
_SPLIT_FILES_DIR = flags.DEFINE_string(
    'split_files_dir', None, "Folder with the reference's split lists, to use its partition.")
_SKIP_BAD_IMAGES = flags.DEFINE_bool(
    'skip_bad_images', False, 'Log, count and leave out missing, empty, corrupt or truncated '
    f'images and images over {images.MAX_PIXELS:,} pixels, instead of stopping.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None,
                                    'Decoding processes (default: os.cpu_count(); 0: inline).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild a dataset already prepared.')
_CSV = flags.DEFINE_string('csv', None, 'csv_images: the CSV (absolute or in manual_dir).')
_IMAGE_COL = flags.DEFINE_string('image_col', 'path', 'csv_images: image path column.')
_LABEL_COLS = flags.DEFINE_list('label_cols', [], 'csv_images: label columns.')
_TASK = flags.DEFINE_enum('task', 'multilabel', list(base.TASKS), 'csv_images: the task.')
_SPLIT_COL = flags.DEFINE_string('split_col', '', 'csv_images: split column (optional).')
_PATIENT_COL = flags.DEFINE_string(
    'patient_col', '', 'csv_images: patient id column (optional): the seeded split keeps a '
    "patient's images together, and a patient in train and test is an error.")
_SEX_COL = flags.DEFINE_string('sex_col', '', 'csv_images: sex column (optional).')
_AGE_COL = flags.DEFINE_string('age_col', '', 'csv_images: age column (optional).')
_VIEW_COL = flags.DEFINE_string('view_col', '', 'csv_images: view column (optional).')
_CLASS_NAMES = flags.DEFINE_list('class_names', [], 'csv_images, multiclass: class order.')
_DEMO_SOURCE = flags.DEFINE_enum(
    'demo_source', 'auto', ['auto', 'full', 'subset'],
    'Demo sets: Fashion-MNIST images from Debian\'s dataset-fashion-mnist (full), the subset '
    'shipped in the repo (subset: the same data on every machine), or full when installed.')


def create_builder(dataset: str, *, data_dir: str, manual_dir: str | None = None,
                   image_size: int | None = None, csv_options: dict | None = None,
                   **build_options) -> base.CxrBuilder:
  """The builder of `dataset` at resolution image_size, writing ArrayRecord.

  Args:
    dataset: a registered name (official or demo), or 'csv_images:NAME'.
    data_dir: where the prepared dataset goes.
    manual_dir: the official download (csv_images reads its CSV from here);
      None for the generated demo sets.
    image_size: R; None for the builder's default config.
    csv_options: csv_images only: `csv_images.make_builder` keyword arguments.
    **build_options: num_workers, skip_bad_images, split_files_dir, progress.

  Returns:
    The builder; call `prepare(builder, manual_dir)`.
  """
  if dataset.startswith('csv_images:'):
    cls = csv_images.make_builder(dataset.split(':', 1)[1], manual_dir=manual_dir,
                                  **(csv_options or {}))
  elif dataset in datasets.BUILDERS or dataset in datasets.DEMO_BUILDERS:
    cls = datasets.BUILDERS.get(dataset) or datasets.DEMO_BUILDERS[dataset]
  else:
    raise ValueError(f'unknown dataset {dataset!r}; known: {sorted(datasets.BUILDERS)}, '
                     f'{sorted(datasets.DEMO_BUILDERS)} or csv_images:NAME')
  config = f'r{image_size}' if image_size else cls.DEFAULT_BUILDER_CONFIG_NAME
  return cls(data_dir=data_dir, config=config, file_format='array_record',
             **build_options)


def prepare(builder: base.CxrBuilder, manual_dir: str | None,
            overwrite: bool = False) -> base.PrepareSummary | None:
  """Builds the dataset; returns its summary (None if it was already there)."""
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode))
  return builder.summary


def main(argv):
  del argv  # Unused.
  tfds.disable_progress_bar()  # ours counts images per split instead
  if not _MANUAL_DIR.value and _DATASET.value not in datasets.DEMO_BUILDERS:
    raise app.UsageError(f'--manual_dir is required for {_DATASET.value}')
  csv_options = None
  if _DATASET.value.startswith('csv_images:'):
    if not _CSV.value or not _LABEL_COLS.value:
      raise app.UsageError('csv_images needs --csv and --label_cols')
    csv_options = dict(csv=_CSV.value, image_col=_IMAGE_COL.value, label_cols=_LABEL_COLS.value,
                       task=_TASK.value, split_col=_SPLIT_COL.value,
                       patient_col=_PATIENT_COL.value, sex_col=_SEX_COL.value,
                       age_col=_AGE_COL.value, view_col=_VIEW_COL.value,
                       class_names=_CLASS_NAMES.value or None)
  demo_options = ({'source': _DEMO_SOURCE.value} if _DATASET.value in datasets.DEMO_BUILDERS
                  else {})
  builder = create_builder(
      _DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
      image_size=_IMAGE_SIZE.value, csv_options=csv_options, num_workers=_NUM_WORKERS.value,
      skip_bad_images=_SKIP_BAD_IMAGES.value, split_files_dir=_SPLIT_FILES_DIR.value,
      progress=True, **demo_options)
  summary = prepare(builder, _MANUAL_DIR.value, overwrite=_OVERWRITE.value)
  if summary is None:
    print(f'{builder.name} is already prepared in {builder.data_dir}; --overwrite rebuilds it.')
    return
  print(summary.format())
  print(f'Written to {os.fspath(builder.data_dir)}')


if __name__ == '__main__':
  # Required only when run: scripts importing this module keep their own flags.
  flags.mark_flags_as_required(['dataset', 'data_dir'])
  app.run(main)
