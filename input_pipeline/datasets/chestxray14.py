"""ChestX-ray14 (NIH Clinical Center): 112,120 frontal radiographs, 14 findings.

Labels from `Data_Entry_2017_v2020.csv` (or `Data_Entry_2017.csv`): `Finding
Labels` is '|'-separated, 'No Finding' meaning none of the 14. There is no
uncertain or blank value: every label is 1 or 0.

Splits: test = `test_list.txt`; `train_val_list.txt` is divided by patient
(seeded, `splits.SPLIT_SEED`) into train and validation, validation taking the
reference's share (11,212 of 86,524 images). With --split_files_dir the
reference's `Xray14_{train,val,test}_official.txt` decide instead.
"""

import os

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files
from input_pipeline.datasets import splits

LABEL_NAMES = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
               'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis',
               'Pleural_Thickening', 'Hernia')
# The reference's validation share of train_val_list.txt (11,212 of 86,524).
VALIDATION_FRACTION = 11212 / 86524
_NO_FINDING = 'No Finding'


class Chestxray14(base.CxrBuilder):
  """NIH ChestX-ray14: 14 findings (multi-label), official test list."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'multilabel'
  HOMEPAGE = 'https://nihcc.app.box.com/v/ChestXray-NIHCC'
  CITATION = ('Wang et al., ChestX-ray8: Hospital-scale chest X-ray database and benchmarks, '
              'CVPR 2017.')
  REFERENCE_SPLIT_FILES = {'train': 'Xray14_train_official.txt',
                           'validation': 'Xray14_val_official.txt',
                           'test': 'Xray14_test_official.txt'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (or
  Kaggle's 'nih-chest-xrays/data') and extract it into manual_dir:
    manual_dir/Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv)
    manual_dir/train_val_list.txt, manual_dir/test_list.txt
    manual_dir/images/*.png                (the Box tarballs), or
    manual_dir/images_001/images/*.png ... images_012/images/*.png  (Kaggle)
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    entry = label_files.find_file(manual_dir, 'Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')
    _, rows = label_files.read_csv(entry, ['Image Index', 'Finding Labels', 'Patient ID',
                                           'Patient Age', 'Patient Gender', 'View Position'])
    where = _image_index(manual_dir)
    records = {}
    for line, row in rows:
      name = row['Image Index'].strip()
      records[name] = base.Record(
          path=where.get(name, f'images/{name}'),
          labels_raw=_labels(row['Finding Labels'], entry, line),
          sex=label_files.parse_sex(row['Patient Gender']),
          age=label_files.parse_age(row['Patient Age']),
          view=row['View Position'].strip().upper(),
          source=f'{os.path.basename(entry)} line {line}', patient=row['Patient ID'].strip())
    split_of = self.reference_splits() or self._official_splits(manual_dir, records)
    by_split = {split: [] for split in base.SPLITS}
    for name, split in split_of.items():
      if name not in records:
        raise label_files.DatasetError(
            f'{name} is in the split lists but not in {entry}; are the lists from another '
            'release?')
      by_split[split].append(records[name])
    if len(split_of) < len(records):
      self._note(f'{len(records) - len(split_of)} images of {os.path.basename(entry)} are in '
                 'no split list and were left out')
    return by_split

  def _official_splits(self, manual_dir: str,
                       records: dict[str, base.Record]) -> dict[str, str]:
    split_of, where = {}, {}
    for split, file_name in (('train', 'train_val_list.txt'), ('test', 'test_list.txt')):
      path = label_files.find_file(manual_dir, file_name)
      for line, text in label_files.read_lines(path):
        name = text.split()[0]
        if name not in records:
          raise label_files.LabelFileError(path, f'{name} has no row in Data_Entry', line)
        if name in split_of:
          raise label_files.LabelFileError(path, f'{name} is also listed in {where[name]}', line)
        split_of[name], where[name] = split, f'{os.path.basename(path)} line {line}'
    train_val = [name for name, split in split_of.items() if split == 'train']
    assigned = splits.assign_by_group(
        [records[name].patient for name in train_val],
        [('train', 1 - VALIDATION_FRACTION), ('validation', VALIDATION_FRACTION)])
    split_of.update(zip(train_val, assigned))
    return split_of


def _labels(findings: str, path: str, line: int) -> np.ndarray:
  labels = np.zeros(len(LABEL_NAMES), np.float32)
  for finding in findings.split('|'):
    finding = finding.strip()
    if finding in ('', _NO_FINDING):
      continue
    if finding not in LABEL_NAMES:
      raise label_files.LabelFileError(
          path, f'unknown finding {finding!r}; expected {_NO_FINDING!r} or one of {LABEL_NAMES}',
          line, 'Finding Labels')
    labels[LABEL_NAMES.index(finding)] = 1.0
  return labels


def _image_index(manual_dir: str) -> dict[str, str]:
  """File name → path relative to manual_dir, over both official layouts."""
  folders = ['images'] + sorted(
      os.path.join(d, 'images') for d in os.listdir(manual_dir) if d.startswith('images_'))
  where = {}
  for folder in folders:
    full = os.path.join(manual_dir, folder)
    if not os.path.isdir(full):
      continue
    with os.scandir(full) as entries:
      for entry in entries:
        if entry.name.endswith('.png'):
          where.setdefault(entry.name, f'{folder}/{entry.name}')
  return where
