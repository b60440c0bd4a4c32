"""CheXpert v1.0 (Stanford): 223,414 training radiographs, 14 observations.

Labels from `train.csv` / `valid.csv` by column name, kept raw: 1, 0, -1
(uncertain) and blank (NaN, not mentioned); the load-time policy (DESIGN §4.4)
turns them into targets. Frontal and lateral views are both kept, as in the
reference.

Splits: train = train.csv; validation = valid.csv (234 images); test =
`test_labels.csv` (668 images, radiologist consensus) when it is in manual_dir,
else valid.csv again, which is what the reference's pretraining does
(validation = test = valid). The summary notes which one was used. The
reference's split files hold the same partition, so --split_files_dir changes
nothing here.
"""

import importlib
import os
import re

import numpy as np
from tensorflow_datasets.core import registered

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files

LABEL_NAMES = ('No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
               'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax',
               'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices')
_META_COLUMNS = ('Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA')
_FOLDER = re.compile(r'CheXpert-v1\.0.*')
_PATIENT = re.compile(r'patient\d+')  # the folder of each patient's studies

# TFDS ships a legacy builder named 'chexpert', imported lazily on the first
# look-up of an unknown name (and then it would refuse ours as a duplicate).
# Import it now and take the name over: `tfds.builder('chexpert')` is this one.
try:
  importlib.import_module('tensorflow_datasets.image_classification.chexpert')
except ImportError:
  pass
registered._DATASET_REGISTRY.pop('chexpert', None)  # pylint: disable=protected-access


class Chexpert(base.CxrBuilder):
  """CheXpert v1.0: 14 observations (multi-label) with uncertain and blank labels."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'multilabel'
  HOMEPAGE = 'https://stanfordmlgroup.github.io/competitions/chexpert/'
  CITATION = ('Irvin et al., CheXpert: A large chest radiograph dataset with uncertainty '
              'labels and expert comparison, AAAI 2019.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CheXpert v1.0 (full or -small) from Stanford AIMI and extract it:
    manual_dir/CheXpert-v1.0-small/train.csv, valid.csv
    manual_dir/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...
  (manual_dir may also be the CheXpert-v1.0[-small] folder itself.) Optional:
  the 668-image test set as test_labels.csv (columns Path + the 14
  observations) with its test/ folder, next to train.csv or in manual_dir.
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    self.reference_splits()  # only notes that the lists change nothing
    csv_dir = _csv_dir(manual_dir)
    train = self._read(manual_dir, csv_dir, label_files.find_file(csv_dir, 'train.csv'))
    valid = self._read(manual_dir, csv_dir, label_files.find_file(csv_dir, 'valid.csv'))
    test_csv = (label_files.find_optional(csv_dir, 'test_labels.csv')
                or label_files.find_optional(manual_dir, 'test_labels.csv'))
    if test_csv:
      self._note(f'test split = {test_csv}')
      test = self._read(manual_dir, os.path.dirname(test_csv), test_csv)
    else:
      self._note('no test_labels.csv: test split = valid.csv (as the reference pretraining)')
      test = valid
    return {'train': train, 'validation': valid, 'test': test}

  def _read(self, manual_dir: str, csv_dir: str, path: str) -> list[base.Record]:
    header, _ = label_files.read_csv(path, ['Path'])
    # The test labels file has only Path and the observations.
    with_meta = 'Sex' in header
    required = (_META_COLUMNS if with_meta else ('Path',)) + LABEL_NAMES
    _, rows = label_files.read_csv(path, required)
    prefix = os.path.relpath(csv_dir, manual_dir)
    records = []
    for line, row in rows:
      parts = row['Path'].strip().split('/')
      if _FOLDER.fullmatch(parts[0]):
        parts = parts[1:]  # the CSV names its own folder; images sit beside the CSV
      labels = np.array([label_files.parse_label(row[c], path, line, c) for c in LABEL_NAMES],
                        np.float32)
      if prefix != os.curdir:
        parts = [prefix, *parts]
      patient = next((p for p in parts if _PATIENT.fullmatch(p)), '')
      record = base.Record(path='/'.join(parts), labels_raw=labels, patient=patient,
                           source=f'{os.path.basename(path)} line {line}')
      if with_meta:
        record.sex = label_files.parse_sex(row['Sex'])
        record.age = label_files.parse_age(row['Age'])
        record.view = row['AP/PA'].strip().upper() or (
            'LATERAL' if row['Frontal/Lateral'].strip().lower() == 'lateral' else '')
      records.append(record)
    return records


def _csv_dir(manual_dir: str) -> str:
  """manual_dir itself, or its CheXpert-v1.0[-small] folder: where train.csv is."""
  candidates = [manual_dir] + sorted(
      os.path.join(manual_dir, d) for d in os.listdir(manual_dir) if _FOLDER.fullmatch(d))
  for folder in candidates:
    if os.path.isfile(os.path.join(folder, 'train.csv')):
      return folder
  raise label_files.DatasetError(
      f'{manual_dir}: no train.csv in it or in a CheXpert-v1.0* folder inside it '
      f'(it holds: {sorted(os.listdir(manual_dir))[:20]})')
