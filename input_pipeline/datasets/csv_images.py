"""A builder for any labelled image set described by one CSV file.

`prepare --dataset=csv_images:NAME --csv=FILE --image_col=path
--label_cols=a,b,c --task=multilabel|multiclass|binary [--split_col=split]
[--patient_col=...] [--sex_col=...] [--age_col=...] [--view_col=...]
[--class_names=x,y,z]`.

Image paths in `image_col` are relative to manual_dir; FILE is absolute or
relative to manual_dir. Label names are the label columns' names, with values
1, 0, -1 or blank (kept raw). Multi-class: one label column holding the class
name or its index, stored one-hot; the classes are `class_names` when given,
else the sorted distinct names (or 0..max when every value is an integer).
Splits: `split_col` values train / validation (or val, valid, validate) /
test; without it, a seeded 80/10/10 split over images, or over patients when
`patient_col` is given. With `patient_col`, a patient with images in both
train and test is an error (see base.CxrBuilder).

`make_builder` creates a builder class named NAME that is not registered with
TFDS: the prepared folder `data_dir/NAME/r<R>/1.0.0` carries its features and
metadata, and `tfds.data_source(NAME, data_dir=..., builder_kwargs={'config':
'r<R>'})` reads it from the files alone, in any process.
"""

import os
import re
import types

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files
from input_pipeline.datasets import splits

FRACTIONS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))
_SPLIT_VALUES = {'train': 'train', 'validation': 'validation', 'val': 'validation',
                 'valid': 'validation', 'validate': 'validation', 'test': 'test'}


class CsvImages(base.CxrBuilder, skip_registration=True):
  """Images and labels listed in one CSV file."""

  CSV_PATH = ''
  IMAGE_COL = ''
  LABEL_COLS: tuple[str, ...] = ()  # multiclass: the one column holding the class
  SPLIT_COL = ''
  PATIENT_COL = ''
  SEX_COL = ''
  AGE_COL = ''
  VIEW_COL = ''
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the images under manual_dir and pass --csv with one row per image: the
  image path relative to manual_dir (--image_col), the label columns
  (--label_cols), and optionally a split column (--split_col).
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    path = self.CSV_PATH
    optional = [c for c in (self.SPLIT_COL, self.PATIENT_COL, self.SEX_COL, self.AGE_COL,
                            self.VIEW_COL) if c]
    _, rows = label_files.read_csv(path, [self.IMAGE_COL, *self.LABEL_COLS, *optional])
    records, split_of = [], []
    for line, row in rows:
      records.append(base.Record(
          path=row[self.IMAGE_COL].strip(), labels_raw=self._labels(row, path, line),
          sex=label_files.parse_sex(row[self.SEX_COL]) if self.SEX_COL else '',
          age=label_files.parse_age(row[self.AGE_COL]) if self.AGE_COL else np.nan,
          view=row[self.VIEW_COL].strip().upper() if self.VIEW_COL else '',
          patient=row[self.PATIENT_COL].strip() if self.PATIENT_COL else '',
          source=f'{os.path.basename(path)} line {line}'))
      if self.SPLIT_COL:
        value = row[self.SPLIT_COL].strip().lower()
        if value not in _SPLIT_VALUES:
          raise label_files.LabelFileError(
              path, f'split {row[self.SPLIT_COL]!r} is not one of {sorted(_SPLIT_VALUES)}', line,
              self.SPLIT_COL)
        split_of.append(_SPLIT_VALUES[value])
    if not self.SPLIT_COL:
      split_of = splits.assign_by_group([r.patient or r.path for r in records], FRACTIONS)
    by_split = {split: [] for split in base.SPLITS}
    for record, split in zip(records, split_of):
      by_split[split].append(record)
    return by_split

  def _labels(self, row: dict[str, str], path: str, line: int) -> np.ndarray:
    if self.TASK != 'multiclass':
      return np.array([label_files.parse_label(row[c], path, line, c) for c in self.LABEL_COLS],
                      np.float32)
    column = self.LABEL_COLS[0]
    index = _class_index(row[column].strip(), self.LABEL_NAMES)
    if index is None:
      raise label_files.LabelFileError(
          path, f'class {row[column]!r} is not one of {list(self.LABEL_NAMES)} nor an index '
          'into them', line, column)
    labels = np.zeros(len(self.LABEL_NAMES), np.float32)
    labels[index] = 1.0
    return labels


def _class_index(value: str, class_names: tuple[str, ...]) -> int | None:
  if value in class_names:
    return class_names.index(value)
  if re.fullmatch(r'\d+', value) and int(value) < len(class_names):
    return int(value)
  return None


def _class_names(path: str, column: str) -> tuple[str, ...]:
  """The classes of a multi-class column: 0..max if all integers, else sorted names."""
  _, rows = label_files.read_csv(path, [column])
  values = {row[column].strip() for _, row in rows} - {''}
  if values and all(re.fullmatch(r'\d+', v) for v in values):
    return tuple(str(i) for i in range(max(int(v) for v in values) + 1))
  return tuple(sorted(values))


def make_builder(name: str, *, manual_dir: str, csv: str, image_col: str,
                 label_cols: list[str], task: str, split_col: str = '', patient_col: str = '',
                 sex_col: str = '', age_col: str = '', view_col: str = '',
                 class_names: list[str] | None = None) -> type[CsvImages]:
  """A builder class for one CSV-described dataset.

  Args:
    name: the dataset's TFDS name (snake_case).
    manual_dir: the images' root; `csv` may be relative to it.
    csv: the CSV file.
    image_col: the column of image paths (relative to manual_dir).
    label_cols: the label columns (multi-class: exactly one).
    task: 'multilabel', 'multiclass' or 'binary'.
    split_col, patient_col, sex_col, age_col, view_col: optional columns.
    class_names: multi-class only: the classes, in order.

  Returns:
    A CsvImages subclass, not registered with TFDS.
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'dataset name {name!r} must be snake_case (a-z, 0-9, _)')
  if task not in base.TASKS:
    raise ValueError(f'task {task!r} is not one of {base.TASKS}')
  if not label_cols:
    raise ValueError('label_cols is empty')
  if task != 'multilabel' and len(label_cols) != 1:
    raise ValueError(f'a {task} dataset has one label column, got {label_cols}')
  csv_path = csv if os.path.isabs(csv) else os.path.join(manual_dir, csv)
  if not os.path.isfile(csv_path):
    raise label_files.DatasetError(f'{csv_path}: no such CSV file')
  if task == 'multiclass':
    label_names = tuple(class_names) if class_names else _class_names(csv_path, label_cols[0])
  else:
    label_names = tuple(label_cols)
  attributes = {
      'name': name, '__doc__': f'{name}: images listed in {os.path.basename(csv_path)}.',
      '__module__': __name__, 'LABEL_NAMES': label_names, 'TASK': task,
      'CSV_PATH': csv_path, 'IMAGE_COL': image_col, 'LABEL_COLS': tuple(label_cols),
      'SPLIT_COL': split_col, 'PATIENT_COL': patient_col, 'SEX_COL': sex_col,
      'AGE_COL': age_col, 'VIEW_COL': view_col}
  return types.new_class(name, (CsvImages,), {'skip_registration': True},
                         lambda namespace: namespace.update(attributes))
