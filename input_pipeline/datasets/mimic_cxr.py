"""MIMIC-CXR-JPG 2.x (PhysioNet): 377,110 JPEG radiographs, 14 CheXpert labels.

Labels are per study (`mimic-cxr-2.0.0-chexpert.csv`), joined to each image of
the study through `study_id`; they are read by column name into the label
order below, which is the CSV's own (alphabetical) order and so the order of
the reference's MIMIC head (ARK_SPEC §4 and pitfall 10). Values are raw: 1, 0,
-1 (uncertain), blank → NaN. Images of studies without a label row are left
out (and counted in the summary), as the reference's lists leave them out.

Splits: the official `mimic-cxr-2.0.0-split.csv` (train / validate / test),
which the reference also uses; --split_files_dir changes nothing. Metadata:
view from `mimic-cxr-2.0.0-metadata.csv`; sex and age only if MIMIC-IV's
`patients.csv` is put in manual_dir (age at the study = anchor_age + study
year − anchor_year, both on MIMIC's shifted calendar).
"""

import math
import os

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files

LABEL_NAMES = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema',
               'Enlarged Cardiomediastinum', 'Fracture', 'Lung Lesion', 'Lung Opacity',
               'No Finding', 'Pleural Effusion', 'Pleural Other', 'Pneumonia', 'Pneumothorax',
               'Support Devices')
_SPLITS = {'train': 'train', 'validate': 'validation', 'test': 'test'}


class MimicCxr(base.CxrBuilder):
  """MIMIC-CXR-JPG: 14 CheXpert-labeller labels per study (multi-label), raw."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'multilabel'
  HOMEPAGE = 'https://physionet.org/content/mimic-cxr-jpg/'
  CITATION = ('Johnson et al., MIMIC-CXR-JPG, a large publicly available database of labeled '
              'chest radiographs, arXiv:1901.07042, 2019.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download MIMIC-CXR-JPG 2.x from PhysioNet (credentialed access) into manual_dir
  (the folder .../physionet.org/files/mimic-cxr-jpg/2.x.x/):
    manual_dir/mimic-cxr-2.0.0-chexpert.csv(.gz), mimic-cxr-2.0.0-split.csv(.gz)
    manual_dir/mimic-cxr-2.0.0-metadata.csv(.gz)   (optional: view)
    manual_dir/files/p10/p10000032/s50414267/<dicom_id>.jpg ...
    manual_dir/patients.csv(.gz)  (optional, from MIMIC-IV hosp: sex and age)
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    self.reference_splits()  # only notes that the lists change nothing
    labels = self._study_labels(label_files.find_file(manual_dir, 'mimic-cxr-2.0.0-chexpert.csv'))
    views = _image_metadata(label_files.find_optional(manual_dir, 'mimic-cxr-2.0.0-metadata.csv'))
    patients = _patients(label_files.find_optional(manual_dir, 'patients.csv'))
    split_csv = label_files.find_file(manual_dir, 'mimic-cxr-2.0.0-split.csv')
    _, rows = label_files.read_csv(split_csv, ['dicom_id', 'study_id', 'subject_id', 'split'])
    by_split = {split: [] for split in base.SPLITS}
    unlabelled = 0
    for line, row in rows:
      dicom, study, subject = (row[c].strip() for c in ('dicom_id', 'study_id', 'subject_id'))
      split = _SPLITS.get(row['split'].strip())
      if split is None:
        raise label_files.LabelFileError(
            split_csv, f'split {row["split"]!r} is not one of {sorted(_SPLITS)}', line, 'split')
      if study not in labels:
        unlabelled += 1
        continue
      view, year = views.get(dicom, ('', None))
      sex, anchor_age, anchor_year = patients.get(subject, ('', math.nan, None))
      age = anchor_age + (year - anchor_year) if year and anchor_year else anchor_age
      by_split[split].append(base.Record(
          path=f'files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg',
          labels_raw=labels[study], sex=sex, age=age, view=view, patient=subject,
          source=f'{os.path.basename(split_csv)} line {line}'))
    if unlabelled:
      self._note(f'{unlabelled} images of studies without a row in the chexpert labels file '
                 'were left out')
    return by_split

  def _study_labels(self, path: str) -> dict[str, np.ndarray]:
    _, rows = label_files.read_csv(path, ('subject_id', 'study_id') + LABEL_NAMES)
    labels, lines = {}, {}
    for line, row in rows:
      study = row['study_id'].strip()
      if study in labels:
        raise label_files.LabelFileError(
            path, f'study {study} has a second row (first at line {lines[study]})', line,
            'study_id')
      labels[study] = np.array(
          [label_files.parse_label(row[c], path, line, c) for c in LABEL_NAMES], np.float32)
      lines[study] = line
    return labels


def _image_metadata(path: str | None) -> dict[str, tuple[str, int | None]]:
  """dicom_id → (ViewPosition, study year); empty without the metadata file."""
  if path is None:
    return {}
  header, rows = label_files.read_csv(path, ['dicom_id'])
  out = {}
  for _, row in rows:
    date = row.get('StudyDate', '').strip() if 'StudyDate' in header else ''
    out[row['dicom_id'].strip()] = (row.get('ViewPosition', '').strip().upper(),
                                    int(date[:4]) if date[:4].isdigit() else None)
  return out


def _patients(path: str | None) -> dict[str, tuple[str, float, int | None]]:
  """subject_id → (sex, anchor_age, anchor_year) from MIMIC-IV patients.csv."""
  if path is None:
    return {}
  _, rows = label_files.read_csv(path, ['subject_id', 'gender', 'anchor_age', 'anchor_year'])
  out = {}
  for _, row in rows:
    year = row['anchor_year'].strip()
    out[row['subject_id'].strip()] = (label_files.parse_sex(row['gender']),
                                      label_files.parse_age(row['anchor_age']),
                                      int(year) if year.isdigit() else None)
  return out
