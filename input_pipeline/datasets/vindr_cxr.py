"""VinDr-CXR 1.0.0 (PhysioNet): 18,000 DICOM radiographs, the reference's 6 labels.

The labels are the reference's: pleural effusion (a local label, 'PE' in the
reference's config) and five of the six global labels (COPD is not used).
Train: `annotations/image_labels_train.csv` has one row per radiologist (3 per
image); a label is positive if any reader marked it. Test:
`annotations/image_labels_test.csv`, one consensus row per image. Validation =
test, as in the reference. Images: `train/<image_id>.dicom`,
`test/<image_id>.dicom`; sex and age from the DICOM headers, MONOCHROME1
inverted by the image reader. The reference's lists hold the official
partition, so --split_files_dir changes nothing.
"""

import os

import numpy as np

from input_pipeline.datasets import base
from input_pipeline.datasets import label_files

LABEL_NAMES = ('Pleural effusion', 'Lung tumor', 'Pneumonia', 'Tuberculosis', 'Other diseases',
               'No finding')


class VindrCxr(base.CxrBuilder):
  """VinDr-CXR: pleural effusion + 5 global labels (multi-label), readers OR-ed."""

  LABEL_NAMES = LABEL_NAMES
  TASK = 'multilabel'
  HOMEPAGE = 'https://physionet.org/content/vindr-cxr/1.0.0/'
  CITATION = ('Nguyen et al., VinDr-CXR: An open dataset of chest X-rays with radiologist\'s '
              'annotations, Scientific Data 2022.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download VinDr-CXR 1.0.0 from PhysioNet into manual_dir (the folder
  .../physionet.org/files/vindr-cxr/1.0.0/):
    manual_dir/annotations/image_labels_train.csv, image_labels_test.csv
    manual_dir/train/<image_id>.dicom, manual_dir/test/<image_id>.dicom
  """

  def _list_records(self, manual_dir: str) -> dict[str, list[base.Record]]:
    self.reference_splits()  # only notes that the lists change nothing
    annotations = os.path.join(manual_dir, 'annotations')
    if not os.path.isdir(annotations):
      annotations = manual_dir
    train = _read(label_files.find_file(annotations, 'image_labels_train.csv'), 'train')
    test = _read(label_files.find_file(annotations, 'image_labels_test.csv'), 'test')
    return {'train': train, 'validation': test, 'test': test}


def _read(path: str, folder: str) -> list[base.Record]:
  """One record per image_id, labels OR-ed over its rows (readers)."""
  _, rows = label_files.read_csv(path, ('image_id',) + LABEL_NAMES)
  labels, lines = {}, {}
  for line, row in rows:
    image = row['image_id'].strip()
    values = np.array([label_files.parse_label(row[c], path, line, c) for c in LABEL_NAMES],
                      np.float32)
    # fmax: a blank (NaN) from one reader does not hide another's 1 or 0.
    labels[image] = np.fmax(labels[image], values) if image in labels else values
    lines.setdefault(image, line)
  return [base.Record(path=f'{folder}/{image}.dicom', labels_raw=labels[image],
                      source=f'{os.path.basename(path)} line {lines[image]}')
          for image in labels]
