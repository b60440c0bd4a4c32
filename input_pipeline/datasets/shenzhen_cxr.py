"""Shenzhen chest X-ray set (NLM): 662 PNG radiographs, tuberculosis or not.

The label is in the file name: `CHNCXR_0001_0.png` normal, `..._1.png` TB.
Sex and age come from the first line of `ClinicalReadings/CHNCXR_0001_0.txt`
('male 35yrs'); a missing reading leaves them unknown.

Splits: seeded (`splits.SPLIT_SEED`) in the reference's proportions
463/65/134, or with --split_files_dir the reference's
`ShenzenCXR_{train,valid,test}_data.txt` (sic).
"""

import math
import os
import re

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files
from input_pipeline.datasets import splits

LABEL_NAMES = ('TB',)
FRACTIONS = (('train', 463 / 662), ('validation', 65 / 662), ('test', 134 / 662))
_NAME = re.compile(r'CHNCXR_\d+_([01])\.png')
_SEX = re.compile(r'\b(male|female)\b', re.IGNORECASE)
_AGE = re.compile(r'(\d+)\s*(yrs?|years?|y|months?|m|days?|d)?\b', re.IGNORECASE)


class ShenzhenCxr(base.CxrBuilder):
  """Shenzhen CXR: tuberculosis (binary), label from the file name."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'binary'
  HOMEPAGE = 'https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets'
  CITATION = ('Jaeger et al., Two public chest X-ray datasets for computer-aided screening of '
              'pulmonary diseases, Quant. Imaging Med. Surg. 2014.')
  REFERENCE_SPLIT_FILES = {'train': 'ShenzenCXR_train_data.txt',
                           'validation': 'ShenzenCXR_valid_data.txt',
                           'test': 'ShenzenCXR_test_data.txt'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download ChinaSet_AllFiles.zip (NLM) and extract it into manual_dir:
    manual_dir/ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png ...
    manual_dir/ChinaSet_AllFiles/ClinicalReadings/CHNCXR_0001_0.txt ...
  (manual_dir may also be the ChinaSet_AllFiles folder itself.)
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    root = ''
    if not os.path.isdir(os.path.join(manual_dir, 'CXR_png')):
      root = 'ChinaSet_AllFiles/'
    png_dir = os.path.join(manual_dir, root, 'CXR_png')
    if not os.path.isdir(png_dir):
      raise label_files.DatasetError(f'{manual_dir}: no CXR_png folder in it or in '
                                     f'ChinaSet_AllFiles/\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    names = sorted(n for n in os.listdir(png_dir) if n.lower().endswith('.png'))
    records = {}
    for name in names:
      match = _NAME.fullmatch(name)
      if not match:
        raise label_files.LabelFileError(
            os.path.join(png_dir, name), 'file name does not carry a label: expected '
            'CHNCXR_<number>_<0 normal | 1 TB>.png')
      sex, age = _reading(os.path.join(manual_dir, root, 'ClinicalReadings', name[:-4] + '.txt'))
      records[name] = base.Record(path=f'{root}CXR_png/{name}',
                                  labels_raw=np.array([float(match[1])], np.float32),
                                  sex=sex, age=age, source=f'file name {name}')
    reference = self.reference_splits()
    if reference is None:
      reference = dict(zip(names, splits.assign_by_group(names, FRACTIONS)))
    by_split = {split: [] for split in base.SPLITS}
    for name, record in records.items():
      if name in reference:
        by_split[reference[name]].append(record)
    if len(reference) != len(records):
      self._note(f'{len(set(records) - set(reference))} images in no split list, '
                 f'{len(set(reference) - set(records))} listed images not in CXR_png: left out')
    return by_split


def _reading(path: str) -> tuple[str, float]:
  """(sex, age) from the first line of a clinical reading; ('', NaN) if absent."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      first = f.readline()
  except OSError:
    return '', math.nan
  sex = _SEX.search(first)
  age = _AGE.search(first)
  return (label_files.parse_sex(sex[1]) if sex else '',
          label_files.parse_age(age[0].replace(' ', '')) if age else math.nan)
