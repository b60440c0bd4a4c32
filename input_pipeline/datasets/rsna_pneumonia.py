"""RSNA Pneumonia Detection Challenge (stage 2): 26,684 DICOM radiographs, 3 classes.

The class comes from `stage_2_detailed_class_info.csv` (one row per box, so
an image can repeat; its rows must agree): 0 Normal, 1 No Lung Opacity / Not
Normal, 2 Lung Opacity, stored one-hot. The boxes file is not needed. Sex, age
and view come from the DICOM headers.

Splits: each patientId is one image of one patient; a seeded 80/10/10 split
over them (`splits.SPLIT_SEED`), or with --split_files_dir the reference's
`RSNAPneumonia_{train,val,test}.txt` (their `<patientId>.png` names are
matched to the DICOM files).
"""

import os

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files
from input_pipeline.datasets import splits

LABEL_NAMES = ('Normal', 'No Lung Opacity / Not Normal', 'Lung Opacity')
FRACTIONS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))


class RsnaPneumonia(base.CxrBuilder):
  """RSNA Pneumonia: normal / not normal without opacity / lung opacity (multi-class)."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'multiclass'
  HOMEPAGE = 'https://www.kaggle.com/c/rsna-pneumonia-detection-challenge'
  CITATION = ('Shih et al., Augmenting the NIH chest radiograph dataset with expert annotations '
              'of possible pneumonia, Radiology: AI, 2019.')
  REFERENCE_SPLIT_FILES = {'train': 'RSNAPneumonia_train.txt',
                           'validation': 'RSNAPneumonia_val.txt',
                           'test': 'RSNAPneumonia_test.txt'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the RSNA Pneumonia Detection Challenge data (Kaggle) into manual_dir:
    manual_dir/stage_2_detailed_class_info.csv   (patientId, class)
    manual_dir/stage_2_train_images/<patientId>.dcm
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    path = label_files.find_file(manual_dir, 'stage_2_detailed_class_info.csv')
    _, rows = label_files.read_csv(path, ['patientId', 'class'])
    classes, lines = {}, {}
    for line, row in rows:
      patient, name = row['patientId'].strip(), row['class'].strip()
      if name not in LABEL_NAMES:
        raise label_files.LabelFileError(
            path, f'class {name!r} is not one of {LABEL_NAMES}', line, 'class')
      if classes.setdefault(patient, name) != name:
        raise label_files.LabelFileError(
            path, f'{patient} is {name!r} here but {classes[patient]!r} at line {lines[patient]}',
            line, 'class')
      lines.setdefault(patient, line)
    patients = sorted(classes)
    reference = self.reference_splits()
    if reference is None:
      assigned = dict(zip(patients, splits.assign_by_group(patients, FRACTIONS)))
    else:
      assigned = {os.path.splitext(name)[0]: split for name, split in reference.items()}
    by_split = {split: [] for split in base.SPLITS}
    for patient in patients:
      if patient not in assigned:
        continue
      labels = np.zeros(len(LABEL_NAMES), np.float32)
      labels[LABEL_NAMES.index(classes[patient])] = 1.0
      by_split[assigned[patient]].append(base.Record(
          path=f'stage_2_train_images/{patient}.dcm', labels_raw=labels,
          source=f'{os.path.basename(path)} line {lines[patient]}'))
    if len(assigned) < len(patients) or set(assigned) - set(classes):
      self._note(f'{len(set(patients) - set(assigned))} labelled images in no reference list, '
                 f'{len(set(assigned) - set(classes))} listed images without a label: left out')
    return by_split
