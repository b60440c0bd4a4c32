"""Tiny fixture trees in the official layouts of ARK_SPEC §10, for the builder tests.

Each image is a 16×16 constant grey (or a pattern where a test needs one), so
the value read back after resizing to R×R tells which file it came from.
Headers are the official ones, column for column.
"""

import gzip
import os
import warnings

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from input_pipeline import prepare

SIZE = 32  # R of every test build
NIH_HEADER = ('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,'
              'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]')
CHEXPERT_LABELS = ('No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
                   'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis',
                   'Pneumothorax', 'Pleural Effusion', 'Pleural Other', 'Fracture',
                   'Support Devices')
MIMIC_LABELS = tuple(sorted(CHEXPERT_LABELS))
VINDR_LABELS = ('Aortic enlargement', 'Atelectasis', 'Calcification', 'Cardiomegaly',
                'Clavicle fracture', 'Consolidation', 'Edema', 'Emphysema', 'Enlarged PA', 'ILD',
                'Infiltration', 'Lung Opacity', 'Lung cavity', 'Lung cyst', 'Mediastinal shift',
                'Nodule/Mass', 'Pleural effusion', 'Pleural thickening', 'Pneumothorax',
                'Pulmonary fibrosis', 'Rib fracture', 'Other lesion', 'COPD', 'Lung tumor',
                'Pneumonia', 'Tuberculosis', 'Other diseases', 'No finding')


def write_image(path: str, value: int = 128, mode: str = 'L', fmt: str | None = None):
  """A 16×16 constant image (grey `value`), in any Pillow mode/format."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  grey = Image.new('L', (16, 16), value)
  img = grey if mode == 'L' else grey.convert(mode)
  img.save(path, format=fmt)


def write_dicom(path: str, pixels: np.ndarray, photometric: str = 'MONOCHROME2',
                bits_stored: int = 12, **tags):
  """A minimal valid DICOM file; extra keyword tags (PatientSex=...) are set as given."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1'  # CR image storage
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.Modality = 'CR'
  ds.set_pixel_data(pixels, photometric, bits_stored)
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  with warnings.catch_warnings():  # RSNA stores ages as '51', which pydicom calls invalid
    warnings.simplefilter('ignore', UserWarning)
    for key, value in tags.items():
      setattr(ds, key, value)
  ds.save_as(path, enforce_file_format=True)


def write_text(path: str, text: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def build(dataset: str, manual_dir: str, data_dir: str, **options):
  """Prepares `dataset` at SIZE in-process (no decode workers unless asked)."""
  options.setdefault('num_workers', 0)
  csv_options = options.pop('csv_options', None)
  builder = prepare.create_builder(dataset, data_dir=data_dir, manual_dir=manual_dir,
                                   image_size=SIZE, csv_options=csv_options, **options)
  return prepare.prepare(builder, manual_dir)


def read(name: str, split: str, data_dir: str) -> dict[str, dict]:
  """A prepared split through tfds.data_source, keyed by id (str)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(name, split=split, data_dir=data_dir,
                            builder_kwargs={'config': f'r{SIZE}'}, download=False)
  examples = source.__getitems__(list(range(len(source))))
  return {e['id'].decode(): e for e in examples}


def nih_tree(root: str, n: int = 20) -> list[str]:
  """NIH (Kaggle layout): n images, 2 per patient, the last 4 in test_list.txt."""
  names, rows = [], []
  for i in range(n):
    name = f'{i // 2:08d}_{i % 2:03d}.png'
    names.append(name)
    write_image(os.path.join(root, f'images_00{1 + i // 10}', 'images', name), value=10 * i)
    findings = {0: 'Atelectasis|Effusion|Hernia', 3: 'Pneumonia'}.get(i, 'No Finding')
    sex = 'M' if i % 4 < 2 else 'F'
    rows.append(f'{name},{findings},{i % 2},{i // 2},{40 + i},{sex},{"AP" if i == 5 else "PA"},'
                '2500,2048,0.168,0.168')
  write_text(os.path.join(root, 'Data_Entry_2017_v2020.csv'), '\n'.join([NIH_HEADER] + rows) + '\n')
  write_text(os.path.join(root, 'train_val_list.txt'), '\n'.join(names[:n - 4]) + '\n')
  write_text(os.path.join(root, 'test_list.txt'), '\n'.join(names[n - 4:]) + '\n')
  return names


def chexpert_csv(path: str, rows: list[tuple[str, str, str, str, str, dict]]):
  """rows: (Path, Sex, Age, Frontal/Lateral, AP/PA, {label: value}); unlisted labels blank."""
  header = ['Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA', *CHEXPERT_LABELS]
  lines = [','.join(header)]
  for *meta, labels in rows:
    lines.append(','.join([*meta, *(labels.get(c, '') for c in CHEXPERT_LABELS)]))
  write_text(path, '\n'.join(lines) + '\n')


def chexpert_tree(root: str):
  """CheXpert-v1.0-small: 4 train images, 2 valid, JPEG."""
  folder = os.path.join(root, 'CheXpert-v1.0-small')
  train, valid = [], []
  for i in range(4):
    rel = f'train/patient0000{i + 1}/study1/view1_{"lateral" if i == 3 else "frontal"}.jpg'
    write_image(os.path.join(folder, rel), value=40 + 40 * i, fmt='JPEG')
    train.append(f'CheXpert-v1.0-small/{rel}')
  for i in range(2):
    rel = f'valid/patient6454{i}/study1/view1_frontal.jpg'
    write_image(os.path.join(folder, rel), value=200 + 20 * i, fmt='JPEG')
    valid.append(f'CheXpert-v1.0-small/{rel}')
  chexpert_csv(os.path.join(folder, 'train.csv'), [
      (train[0], 'Female', '68', 'Frontal', 'AP',
       {'No Finding': '1.0', 'Edema': '0.0', 'Pleural Effusion': '-1.0'}),
      (train[1], 'Male', '87', 'Frontal', 'PA', {'Cardiomegaly': '-1.0', 'Edema': '1.0'}),
      (train[2], 'Unknown', '', 'Frontal', 'AP', {'Support Devices': '1.0'}),
      (train[3], 'Male', '41', 'Lateral', '', {'Fracture': '0.0'}),
  ])
  chexpert_csv(os.path.join(folder, 'valid.csv'), [
      (valid[0], 'Male', '73', 'Frontal', 'AP',
       {c: '0.0' for c in CHEXPERT_LABELS} | {'Edema': '1.0'}),
      (valid[1], 'Female', '70', 'Frontal', 'PA', {c: '0.0' for c in CHEXPERT_LABELS}),
  ])
  return train, valid


MIMIC_METADATA_HEADER = ('dicom_id,subject_id,study_id,PerformedProcedureStepDescription,'
                         'ViewPosition,Rows,Columns,StudyDate,StudyTime,'
                         'ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,'
                         'PatientOrientationCodeSequence_CodeMeaning')


def mimic_tree(root: str) -> dict[str, dict]:
  """MIMIC-CXR-JPG: 5 images of 4 studies (one unlabelled); label columns shuffled.

  Returns:
    id → {'split', 'labels' (dict label → raw value), 'view', 'sex', 'age'}.
  """
  # (dicom, study, subject, split, view, study date, value)
  images = [('d1', '50414267', '10000032', 'train', 'PA', '21800506', 30),
            ('d2', '50414267', '10000032', 'train', 'LATERAL', '21800506', 60),
            ('d3', '53189527', '10000032', 'validate', 'AP', '21800626', 90),
            ('d4', '57375967', '10000764', 'test', '', '21321121', 120),
            ('d5', '50771383', '10000898', 'train', 'PA', '21541117', 150)]
  study_labels = {'50414267': {'Pleural Effusion': '-1.0', 'Support Devices': '1.0',
                               'Atelectasis': '0.0'},
                  '53189527': {'No Finding': '1.0'},
                  '57375967': {'Cardiomegaly': '1.0', 'Edema': '-1.0', 'Pneumonia': '0.0'}}
  columns = list(reversed(MIMIC_LABELS))  # not the label-vector order: read by name
  rows = ['subject_id,study_id,' + ','.join(columns)]
  for study, labels in study_labels.items():
    subject = next(im[2] for im in images if im[1] == study)
    rows.append(f'{subject},{study},' + ','.join(labels.get(c, '') for c in columns))
  # PhysioNet ships these two gzipped.
  os.makedirs(root, exist_ok=True)
  with gzip.open(os.path.join(root, 'mimic-cxr-2.0.0-chexpert.csv.gz'), 'wt') as f:
    f.write('\n'.join(rows) + '\n')
  split = ['dicom_id,study_id,subject_id,split']
  meta = [MIMIC_METADATA_HEADER]
  expected = {}
  for dicom, study, subject, name, view, date, value in images:
    split.append(f'{dicom},{study},{subject},{name}')
    meta.append(f'{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,{date},'
                '213014.531,CHEST (PA AND LAT),postero-anterior,Erect')
    rel = f'files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg'
    write_image(os.path.join(root, rel), value=value, fmt='JPEG')
    if study in study_labels:
      expected[rel] = {'split': {'validate': 'validation'}.get(name, name),
                       'labels': study_labels[study], 'view': view, 'value': value}
  with gzip.open(os.path.join(root, 'mimic-cxr-2.0.0-split.csv.gz'), 'wt') as f:
    f.write('\n'.join(split) + '\n')
  write_text(os.path.join(root, 'mimic-cxr-2.0.0-metadata.csv'), '\n'.join(meta) + '\n')
  write_text(os.path.join(root, 'patients.csv'),
             'subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n'
             '10000032,F,52,2180,2014 - 2016,2180-09-09\n10000764,M,86,2132,2014 - 2016,\n')
  return expected


def rsna_tree(root: str, n: int = 10) -> list[str]:
  """RSNA stage 2: n 8-bit MONOCHROME2 DICOMs, classes cycling 0, 1, 2; boxes repeat rows."""
  classes = ('Normal', 'No Lung Opacity / Not Normal', 'Lung Opacity')
  patients = [f'{i:04x}aa-{i:02d}bb' for i in range(n)]
  info, boxes = ['patientId,class'], ['patientId,x,y,width,height,Target']
  for i, patient in enumerate(patients):
    name = classes[i % 3]
    repeats = 2 if name == 'Lung Opacity' else 1  # one row per box
    info += [f'{patient},{name}'] * repeats
    boxes += ([f'{patient},10,20,30,40,1'] * repeats if repeats == 2 else [f'{patient},,,,,0'])
    pixels = np.full((16, 16), 20 * i, np.uint8)
    write_dicom(os.path.join(root, 'stage_2_train_images', f'{patient}.dcm'), pixels, bits_stored=8,
                PatientSex='M' if i % 2 else 'F', PatientAge=str(20 + i), ViewPosition='PA')
  write_text(os.path.join(root, 'stage_2_detailed_class_info.csv'), '\n'.join(info) + '\n')
  write_text(os.path.join(root, 'stage_2_train_labels.csv'), '\n'.join(boxes) + '\n')
  return patients


def vindr_tree(root: str) -> dict[str, np.ndarray]:
  """VinDr: 2 train images × 3 readers, 2 test images; one MONOCHROME1 (top half bright)."""
  bright_top = np.zeros((16, 16), np.uint16)
  bright_top[:8] = 4000
  write_dicom(os.path.join(root, 'train', 'tr0.dicom'), bright_top, photometric='MONOCHROME1',
              PatientSex='F', PatientAge='045Y')
  write_dicom(os.path.join(root, 'train', 'tr1.dicom'), bright_top, PatientSex='M')
  for name in ('te0', 'te1'):
    write_dicom(os.path.join(root, 'test', f'{name}.dicom'), bright_top)
  def row(image, positives, reader=None):
    values = ['1' if label in positives else '0' for label in VINDR_LABELS]
    return ','.join([image] + ([reader] if reader else []) + values)
  train = ['image_id,rad_id,' + ','.join(VINDR_LABELS),
           row('tr0', {'Pleural effusion'}, 'R8'), row('tr0', {'Pneumonia', 'COPD'}, 'R9'),
           row('tr0', set(), 'R10'), row('tr1', {'No finding'}, 'R8'),
           row('tr1', {'No finding'}, 'R9'), row('tr1', {'Tuberculosis'}, 'R10')]
  test = ['image_id,' + ','.join(VINDR_LABELS), row('te0', {'Lung tumor', 'Other diseases'}),
          row('te1', {'No finding'})]
  write_text(os.path.join(root, 'annotations', 'image_labels_train.csv'), '\n'.join(train) + '\n')
  write_text(os.path.join(root, 'annotations', 'image_labels_test.csv'), '\n'.join(test) + '\n')
  return {'train/tr0.dicom': np.array([1, 0, 1, 0, 0, 0], np.float32),
          'train/tr1.dicom': np.array([0, 0, 0, 1, 0, 1], np.float32),
          'test/te0.dicom': np.array([0, 1, 0, 0, 1, 0], np.float32),
          'test/te1.dicom': np.array([0, 0, 0, 0, 0, 1], np.float32)}


def shenzhen_tree(root: str, n: int = 10) -> list[str]:
  """Shenzhen (ChinaSet_AllFiles): n PNGs, odd numbers TB, readings for all but the last."""
  base = os.path.join(root, 'ChinaSet_AllFiles')
  names = []
  for i in range(n):
    name = f'CHNCXR_{i + 1:04d}_{i % 2}.png'
    names.append(name)
    write_image(os.path.join(base, 'CXR_png', name), value=20 * i)
    if i < n - 1:
      sex = 'male' if i % 3 else 'Female'
      write_text(os.path.join(base, 'ClinicalReadings', name[:-4] + '.txt'),
                 f'{sex} {30 + i}yrs\nnormal\n' if i % 2 == 0 else f'{sex} {30 + i}yrs\nPTB\n')
  write_text(os.path.join(base, 'CXR_png', 'Thumbs.db'), 'not an image')
  return names
