"""Bad data, through `prepare` and through the pipeline: a clear error or a counted skip.

Each case either stops with an error naming the file (for label files: the
line and column), or, with skip_bad_images, is logged, counted and left out;
never a crash deep in training, never a file read outside manual_dir. Cases
covered elsewhere: test_images.py (16-bit PNG, colour, bombs, resolve) and
test_datasets.py (unknown label values, missing columns, missing and corrupt
images, '..' paths).
"""

import builtins
import io
import os
import re
import struct
import zlib

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest

import cxr_layouts
from cxr_layouts import build, read, write_dicom, write_image, write_text
from input_pipeline import images
from input_pipeline import labels
from input_pipeline import pipeline
from input_pipeline import prepare
from input_pipeline.datasets import base
from input_pipeline.datasets import csv_images
from input_pipeline.datasets import label_files

R = cxr_layouts.SIZE
CSV = dict(csv='labels.csv', image_col='path', label_cols=['a'], task='binary',
           split_col='split')


def _prepared(data_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(data_dir, name, f'r{R}', '1.0.0'))


def _jpeg_bytes() -> bytes:
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='JPEG')
  return buf.getvalue()


def _dicom_bytes(directory: str) -> bytes:
  path = os.path.join(directory, 'whole.dcm')
  write_dicom(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
  with open(path, 'rb') as f:
    return f.read()


def _bomb_png(side: int) -> bytes:
  """A ~100-byte PNG whose header declares side × side grey pixels."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
          + chunk(b'IDAT', zlib.compress(b'\0' * 100)) + chunk(b'IEND', b''))


def _write_bytes(path: str, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


# ------------------------------------------------------------------ image files


def test_empty_and_truncated_files_name_the_file(tmp_path, monkeypatch):
  jpeg, dicom = _jpeg_bytes(), _dicom_bytes(str(tmp_path))
  # As after TFDS's thumbnailer ran in this process: truncated files must still fail.
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
  cases = {
      'zero.png': (b'', r'empty file \(0 bytes\)'),
      'zero.jpg': (b'', r'empty file \(0 bytes\)'),
      'zero.dcm': (b'', r'empty file \(0 bytes\)'),
      'zero_no_suffix': (b'', r'empty file \(0 bytes\)'),
      'head.jpg': (jpeg[:20], 'cannot decode: cannot identify image file'),
      'half.jpg': (jpeg[:len(jpeg) // 2], 'cannot decode: image file is truncated'),
      'end.jpg': (jpeg[:-2], 'cannot decode: image file is truncated'),  # EOI marker cut
      'head.dcm': (dicom[:300], r'DICOM file without pixel data \(300 bytes: truncated'),
      'half.dcm': (dicom[:len(dicom) // 2],
                   'cannot decode DICOM pixel data .*less than expected'),
      'end.dcm': (dicom[:-1], r'cannot decode DICOM pixel data .*\(8191 vs 8192 bytes\)'),
  }
  for name, (data, reason) in cases.items():
    path = str(tmp_path / name)
    _write_bytes(path, data)
    with pytest.raises(images.BadImageError, match=reason) as info:
      images.read_grey(path)
    assert info.value.path == path and str(info.value).startswith(f'{path}: ')
  assert ImageFile.LOAD_TRUNCATED_IMAGES  # the process's setting is left as found
  # The whole files read; so a failure above is the damage, not the encoder.
  _write_bytes(str(tmp_path / 'whole.jpg'), jpeg)
  assert images.read_grey(str(tmp_path / 'whole.jpg'))[0].shape == (64, 64)
  assert images.read_grey(str(tmp_path / 'whole.dcm'))[0].shape == (64, 64)


def _format_tree(manual: str) -> dict[str, str]:
  """Good images of every supported kind plus one of each bad kind; a CSV of them all.

  Returns:
    bad image path → the skip reason expected (a regex).
  """
  write_image(os.path.join(manual, 'ok/grey.png'), value=60)
  deep = np.full((16, 16), 1000, np.uint16)
  deep[8:] = 4000  # 16-bit: stretched from its own range to 0..255
  Image.fromarray(deep).save(os.path.join(manual, 'ok/deep16.png'))
  write_image(os.path.join(manual, 'ok/rgb.png'), value=90, mode='RGB')
  write_image(os.path.join(manual, 'ok/rgba.png'), value=120, mode='RGBA')
  write_image(os.path.join(manual, 'ok/grey.jpg'), value=150, fmt='JPEG')
  write_dicom(os.path.join(manual, 'ok/eight.dcm'), np.full((16, 16), 180, np.uint8),
              bits_stored=8)
  good = ['grey.png', 'deep16.png', 'rgb.png', 'rgba.png', 'grey.jpg', 'eight.dcm']
  jpeg, dicom = _jpeg_bytes(), _dicom_bytes(os.path.dirname(manual))
  bad = {'bad/zero.png': (b'', r'empty file \(0 bytes\)'),
         'bad/zero.jpg': (b'', r'empty file \(0 bytes\)'),
         'bad/zero.dcm': (b'', r'empty file \(0 bytes\)'),
         'bad/truncated.jpg': (jpeg[:len(jpeg) // 2], 'image file is truncated'),
         'bad/truncated.dcm': (dicom[:len(dicom) // 2], 'less than expected'),
         'bad/bomb.png': (_bomb_png(12_000), r'144,000,000 pixels, over the limit of '
                          r'100,000,000 \(images.MAX_PIXELS\)')}
  for rel, (data, _) in bad.items():
    _write_bytes(os.path.join(manual, rel), data)
  # Patient p1 in train and validation (noted, not refused), p3 in test.
  patient = {'train': 'p1', 'validation': 'p1', 'test': 'p3'}
  rows = ['path,split,a,patient']
  for i, name in enumerate(good):
    split = ('train', 'validation', 'test')[i % 3]
    rows.append(f'ok/{name},{split},{i % 2},{patient[split]}')
  for i, rel in enumerate(bad):
    split = ('train', 'test')[i % 2]
    rows.append(f'{rel},{split},0,{patient[split]}')
  write_text(os.path.join(manual, 'labels.csv'), '\n'.join(rows) + '\n')
  return {rel: reason for rel, (_, reason) in bad.items()}


def test_prepare_skips_and_counts_bad_images_and_reads_every_format(tmp_path):
  manual, data = str(tmp_path / 'own'), str(tmp_path / 'data')
  bad = _format_tree(manual)
  options = dict(CSV, patient_col='patient')
  # Without --skip_bad_images: the first bad file stops the build, naming it and
  # its CSV line, and nothing is left in data_dir.
  with pytest.raises(images.BadImageError,
                     match=r'bad/zero\.png: empty file \(0 bytes\) \(listed in labels\.csv line 8\)'
                     r'\. Pass --skip_bad_images'):
    build('csv_images:formats', manual, data, csv_options=options)
  assert not _prepared(data, 'formats')
  summary = build('csv_images:formats', manual, data, csv_options=options, skip_bad_images=True)
  assert summary.examples == {'train': 2, 'validation': 2, 'test': 2}
  skipped = {path: reason for split in summary.skipped.values() for path, reason in split}
  assert sorted(skipped) == sorted(bad)
  for path, reason in bad.items():
    assert re.search(reason, skipped[path]), (path, skipped[path])
  assert {s: len(v) for s, v in summary.skipped.items()} == {'train': 3, 'test': 3}
  assert any('1 patient(s) have images in both train and validation (e.g. p1)' in note
             for note in summary.notes)
  everything = {k: v for s in ('train', 'validation', 'test') for k, v in
                read('formats', s, data).items()}
  assert sorted(everything) == sorted(f'ok/{n}' for n in
                                      ['grey.png', 'deep16.png', 'rgb.png', 'rgba.png',
                                       'grey.jpg', 'eight.dcm'])
  for name, value in (('grey.png', 60), ('rgb.png', 90), ('rgba.png', 120), ('eight.dcm', 180)):
    image = everything[f'ok/{name}']['image']
    assert image.shape == (R, R, 1) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, value)  # colour and alpha become the same grey
  assert abs(int(everything['ok/grey.jpg']['image'].mean()) - 150) <= 2
  deep = everything['ok/deep16.png']['image'][..., 0]
  assert deep[:12].max() == 0 and deep[20:].min() == 255  # 1000 → 0, 4000 → 255


def test_pixel_limit_is_documented_where_users_look():
  limit = f'{images.MAX_PIXELS:,}'
  assert limit == '100,000,000'
  assert f'larger than {limit} pixels' in ' '.join(prepare.__doc__.split())  # prepare --help
  assert limit in flags.FLAGS['skip_bad_images'].help


# ------------------------------------------------------------------ label files


def test_csv_rows_with_missing_or_extra_fields_name_file_line_and_column(tmp_path):
  manual = str(tmp_path / 'own')
  for name in ('1', '2', '3'):
    write_image(os.path.join(manual, f'x/{name}.png'))
  path = os.path.join(manual, 'labels.csv')
  header = 'path,split,a,view'
  # A short row: the first column without a value is named.
  write_text(path, f'{header}\nx/1.png,train,1,PA\nx/2.png,test,0\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"labels\.csv, line 3, column 'view': 3 fields, the header has 4: "
                     r"no value from column 'view' on"):
    build('csv_images:short', manual, str(tmp_path / 'data'), csv_options=CSV)
  # An extra value (an unquoted comma in a path shifts every later column).
  write_text(path, f'{header}\nx/1.png,train,1,PA\nx/2,b.png,test,0,AP\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"labels\.csv, line 3, column '#5': 5 fields, the header has 4: 'AP' "
                     r"is beyond the last column, 'view' \(an unquoted comma\?\)"):
    build('csv_images:extra', manual, str(tmp_path / 'data'), csv_options=CSV)
  assert not _prepared(str(tmp_path / 'data'), 'extra')
  # A trailing comma (an empty extra field) shifts nothing: read as written.
  write_text(path, f'{header}\nx/1.png,train,1,PA,\nx/2.png,test,0,AP,,\n\n')
  _, rows = label_files.read_csv(path, ['path', 'a'])
  assert [(line, row['path'], row['view']) for line, row in rows] == [
      (2, 'x/1.png', 'PA'), (3, 'x/2.png', 'AP')]
  # The same check guards every official label file.
  chexpert = str(tmp_path / 'chexpert')
  cxr_layouts.chexpert_tree(chexpert)
  train_csv = os.path.join(chexpert, 'CheXpert-v1.0-small', 'train.csv')
  with open(train_csv) as f:
    lines = f.read().split('\n')
  lines[3] = lines[3].replace(',Unknown,', ',Unknown,extra,')  # line 4: one field too many
  write_text(train_csv, '\n'.join(lines))
  with pytest.raises(label_files.LabelFileError,
                     match=r"train\.csv, line 4, column '#20': 20 fields, the header has 19: "
                     r"'1\.0' is beyond the last column, 'Support Devices'"):
    build('chexpert', chexpert, str(tmp_path / 'data'))


def test_unknown_class_and_split_values_name_line_and_column(tmp_path):
  manual, data = str(tmp_path / 'own'), str(tmp_path / 'data')
  for name in ('1', '2', '3'):
    write_image(os.path.join(manual, f'x/{name}.png'))
  path = os.path.join(manual, 'labels.csv')
  write_text(path, 'path,split,a\nx/1.png,train,1\nx/2.png,tset,0\nx/3.png,test,0\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"labels\.csv, line 3, column 'split': split 'tset' is not one of"):
    build('csv_images:splits', manual, data, csv_options=CSV)
  write_text(path, 'path,split,a\nx/1.png,train,cat\nx/2.png,validation,dog\nx/3.png,test,cow\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"labels\.csv, line 4, column 'a': class 'cow' is not one of "
                     r"\['cat', 'dog'\]"):
    build('csv_images:classes', manual, data,
          csv_options=dict(CSV, task='multiclass', class_names=['cat', 'dog']))
  write_text(path, 'path,split,a\nx/1.png,train,1\nx/2.png,validation,yes\nx/3.png,test,0\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"labels\.csv, line 3, column 'a': label value 'yes' is not 1, 0, -1"):
    build('csv_images:binary', manual, data, csv_options=CSV)
  assert not any(_prepared(data, n) for n in ('splits', 'classes', 'binary'))


def test_image_in_train_and_test_is_an_error(tmp_path):
  manual, data = str(tmp_path / 'own'), str(tmp_path / 'data')
  for name in ('1', '2', '3'):
    write_image(os.path.join(manual, f'x/{name}.png'))
  write_text(os.path.join(manual, 'labels.csv'),
             'path,split,a\nx/1.png,train,1\nx/2.png,train,0\nx/3.png,validation,0\n'
             'x/2.png,test,1\n')
  with pytest.raises(label_files.DatasetError,
                     match=r'dup: 1 image\(s\) in both train and test: x/2\.png \(labels\.csv line '
                     r'3; labels\.csv line 5\)\. An image may be in one of them only'):
    build('csv_images:dup', manual, data, csv_options=CSV)
  assert not _prepared(data, 'dup')
  # Twice in one split.
  write_text(os.path.join(manual, 'labels.csv'),
             'path,split,a\nx/1.png,train,1\nx/3.png,validation,0\nx/2.png,test,0\n'
             'x/1.png,train,0\n')
  with pytest.raises(label_files.DatasetError,
                     match=r"x/1\.png is listed twice for split 'train': labels\.csv line 2 and "
                     r'labels\.csv line 5'):
    build('csv_images:dup', manual, data, csv_options=CSV)
  # ChestX-ray14: an image in both official lists.
  nih = str(tmp_path / 'nih')
  names = cxr_layouts.nih_tree(nih)
  with open(os.path.join(nih, 'test_list.txt'), 'a') as f:
    f.write(names[2] + '\n')
  with pytest.raises(label_files.LabelFileError,
                     match=rf'test_list\.txt, line 5: {names[2]} is also listed in '
                     r'train_val_list\.txt line 3'):
    build('chestxray14', nih, data)


def test_patient_in_train_and_test_is_an_error_naming_ids_and_splits(tmp_path):
  data = str(tmp_path / 'data')
  # CSV images with a patient column: P7 has an image in train and one in test.
  manual = str(tmp_path / 'own')
  for name in ('1', '2', '3', '4'):
    write_image(os.path.join(manual, f'x/{name}.png'))
  write_text(os.path.join(manual, 'labels.csv'),
             'path,split,a,patient\nx/1.png,train,1,P7\nx/2.png,validation,0,P8\n'
             'x/3.png,test,0,P9\nx/4.png,test,1,P7\n')
  with pytest.raises(label_files.DatasetError,
                     match=r'leak: patient leakage: 1 patient\(s\) have images in both train and '
                     r'test: P7 \(train: x/1\.png, labels\.csv line 2; test: x/4\.png, '
                     r'labels\.csv line 5\)'):
    build('csv_images:leak', manual, data, csv_options=dict(CSV, patient_col='patient'))
  assert not _prepared(data, 'leak')
  # CheXpert: the patient is the path's patientNNNNN folder.
  chexpert = str(tmp_path / 'chexpert')
  train, _ = cxr_layouts.chexpert_tree(chexpert)
  folder = os.path.join(chexpert, 'CheXpert-v1.0-small')
  rel = 'valid/patient00002/study2/view1_frontal.jpg'  # a train patient in valid.csv (= test)
  write_image(os.path.join(folder, rel), fmt='JPEG')
  with open(os.path.join(folder, 'valid.csv'), 'a') as f:
    f.write(f'CheXpert-v1.0-small/{rel},Male,87,Frontal,PA' + ',0.0' * 14 + '\n')
  with pytest.raises(label_files.DatasetError,
                     match=rf'chexpert: patient leakage: 1 patient\(s\) .* test: patient00002 '
                     rf'\(train: {train[1]}, train\.csv line 3; test: .*{rel}, valid\.csv line 4\)'):
    build('chexpert', chexpert, data)
  # MIMIC-CXR: subject 10000032 (train) gets a test image.
  mimic = str(tmp_path / 'mimic')
  cxr_layouts.mimic_tree(mimic)
  with cxr_layouts.gzip.open(os.path.join(mimic, 'mimic-cxr-2.0.0-split.csv.gz'), 'rt') as f:
    text = f.read()
  with cxr_layouts.gzip.open(os.path.join(mimic, 'mimic-cxr-2.0.0-split.csv.gz'), 'wt') as f:
    f.write(text.replace('d3,53189527,10000032,validate', 'd3,53189527,10000032,test'))
  with pytest.raises(label_files.DatasetError,
                     match=r'mimic_cxr: patient leakage: 1 patient\(s\) .* test: 10000032 '
                     r'\(train: files/p10/p10000032/s50414267/d1\.jpg'):
    build('mimic_cxr', mimic, data)
  # ChestX-ray14: a patient's second image moved from the train list to the test list.
  nih = str(tmp_path / 'nih')
  names = cxr_layouts.nih_tree(nih)
  write_text(os.path.join(nih, 'train_val_list.txt'), '\n'.join(names[1:16]) + '\n')
  write_text(os.path.join(nih, 'test_list.txt'), '\n'.join([names[0]] + names[16:]) + '\n')
  with pytest.raises(label_files.DatasetError,
                     match=r'chestxray14: patient leakage: .* test: 0 \(train: '
                     rf'images_001/images/{names[1]}.* test: images_001/images/{names[0]}'):
    build('chestxray14', nih, data)
  assert not _prepared(data, 'chestxray14')


def test_csv_seeded_split_keeps_each_patient_together(tmp_path):
  manual = str(tmp_path / 'own')
  rows = ['path,a,patient'] + [f'x/{i}.png,{i % 2},P{i // 4}' for i in range(80)]
  write_text(os.path.join(manual, 'labels.csv'), '\n'.join(rows) + '\n')
  cls = csv_images.make_builder('grouped', manual_dir=manual, csv='labels.csv', image_col='path',
                                label_cols=['a'], task='binary', patient_col='patient')
  by_split = cls(data_dir=str(tmp_path / 'data'), num_workers=0)._list_records(manual)
  patients = {s: {r.patient for r in recs} for s, recs in by_split.items()}
  assert sum(len(p) for p in patients.values()) == 20  # each of the 20 patients in one split
  assert {s: len(recs) for s, recs in by_split.items()} == {'train': 64, 'validation': 8,
                                                            'test': 8}


# ------------------------------------------------------------------ paths out of manual_dir


@pytest.fixture
def opened(monkeypatch):
  """Every path opened with open() (Pillow's and pydicom's way in) during the test."""
  paths = []
  real_open = builtins.open

  def recording_open(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
      paths.append(os.path.realpath(os.fsdecode(file)))
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', recording_open)
  return paths


def test_symlinks_out_of_manual_dir_are_refused_and_never_read(tmp_path, opened):
  outside = tmp_path / 'outside'
  write_image(str(outside / 'secret.png'), value=213)  # recognisable, and a valid image
  secret = os.path.realpath(outside / 'secret.png')
  data = str(tmp_path / 'data')
  manual = str(tmp_path / 'own')
  write_image(os.path.join(manual, 'x/1.png'), value=10)
  write_image(os.path.join(manual, 'x/2.png'), value=20)
  os.symlink(outside / 'secret.png', os.path.join(manual, 'x/link.png'))  # a file link
  os.symlink(outside, os.path.join(manual, 'linked_dir'))  # a folder link
  opened.clear()  # from here on, nothing may open a file outside manual_dir
  for rel in ('x/link.png', 'linked_dir/secret.png'):
    write_text(os.path.join(manual, 'labels.csv'),
               f'path,split,a\nx/1.png,train,1\nx/2.png,validation,0\n{rel},test,0\n')
    # Refused even with --skip_bad_images: a path out of manual_dir is a label
    # file error, not a bad image to count.
    with pytest.raises(images.BadImageError,
                       match=rf'{rel}: resolves to {secret}, outside manual_dir .*'
                       r'\(listed in labels\.csv line 4\)'):
      build('csv_images:escape', manual, data, csv_options=CSV, skip_bad_images=True)
  # ChestX-ray14 finds its images by listing folders: a linked images_002 folder.
  nih = str(tmp_path / 'nih')
  cxr_layouts.nih_tree(nih)
  os.rename(os.path.join(nih, 'images_002'), str(outside / 'images_002'))
  os.symlink(outside / 'images_002', os.path.join(nih, 'images_002'))
  with pytest.raises(images.BadImageError,
                     match=r'images_002/images/\d+_\d+\.png: resolves to .*outside manual_dir'):
    build('chestxray14', nih, data, skip_bad_images=True)
  assert not any(p.startswith(os.path.realpath(outside)) for p in opened), opened
  assert not _prepared(data, 'escape') and not _prepared(data, 'chestxray14')
  # A link that stays inside manual_dir is fine, and is read.
  os.remove(os.path.join(manual, 'x/link.png'))
  os.symlink(os.path.join(manual, 'x/2.png'), os.path.join(manual, 'x/link.png'))
  write_text(os.path.join(manual, 'labels.csv'),
             'path,split,a\nx/1.png,train,1\nx/2.png,validation,0\nx/link.png,test,0\n')
  build('csv_images:inside', manual, data, csv_options=CSV)
  np.testing.assert_array_equal(read('inside', 'test', data)['x/link.png']['image'], 20)


# ------------------------------------------------------------------ prepared records


class DamagedRecords(base.CxrBuilder, skip_registration=True):
  """Six examples per split, image i all i; two damaged ones (see _damage)."""

  LABEL_NAMES = ('a',)
  TASK = 'binary'

  def _split_generators(self, dl_manager):
    self.summary = base.PrepareSummary(self.name, self.image_size, self.LABEL_NAMES)
    return {s: self._generate_examples(s) for s in base.SPLITS}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    for i in range(6):
      png = images.encode_png(np.full((self.image_size, self.image_size), i, np.uint8))
      if (split, i) == ('train', 3):
        png = png[:len(png) // 2]  # a truncated PNG, as a damaged disk or copy leaves it
      if (split, i) == ('validation', 4):
        png = images.encode_png(np.zeros((4, 4), np.uint8))  # not R x R
      yield f'{split}{i}', {'image': png, 'labels_raw': np.float32([i % 2]), 'id': f'{split}{i}',
                            'sex': '', 'age': np.float32(np.nan), 'view': ''}


def test_damaged_prepared_record_is_named_by_the_pipeline(tmp_path):
  data = str(tmp_path / 'data')
  DamagedRecords(data_dir=data, config='r8', file_format='array_record',
                 num_workers=0).download_and_prepare()
  config = ml_collections.ConfigDict(dict(
      datasets=('damaged_records',), data_dir=data, image_size=8, schedule='cyclic',
      weights=None, label_policies={}, num_workers=0, read_threads=1))

  def index_of(split, image_id):  # TFDS stores examples in its own (hashed) order
    source = pipeline.open_source('damaged_records', split, data, 8, decode_images=False)
    return [source[i]['id'] for i in range(len(source))].index(image_id.encode())

  # The undamaged split reads as ever.
  iterator = pipeline.eval_iterator(config, 'damaged_records', 'test', 6, 0, 1)
  batch = next(iterator)
  iterator.close()
  assert sorted(batch['image'][:, 0, 0]) == list(range(6))
  # Training: the truncated PNG is named by dataset, split, record index and id.
  iterator = pipeline.train_iterator(config, 2, seed=0, process_index=0, process_count=1,
                                     num_epochs=1)
  with pytest.raises(pipeline.BadRecordError,
                     match=rf"damaged_records/train record {index_of('train', 'train3')} "
                     r"\(id 'train3'\): stored image is not a readable PNG .*prepare the "
                     'dataset again with --overwrite'):
    list(iterator)
  iterator.close()
  # A PNG of the wrong size is caught too, before batching would fail to stack it.
  iterator = pipeline.eval_iterator(config, 'damaged_records', 'validation', 2, 0, 1)
  with pytest.raises(pipeline.BadRecordError,
                     match=rf"damaged_records/validation record "
                     rf"{index_of('validation', 'validation4')} \(id 'validation4'\): stored "
                     r'image has shape \(4, 4\), expected \(8, 8\)'):
    list(iterator)
  iterator.close()


def test_damaged_shard_is_named_by_the_pipeline(tmp_path):
  data = str(tmp_path / 'data')
  DamagedRecords(data_dir=data, config='r8', file_format='array_record',
                 num_workers=0).download_and_prepare()
  config = ml_collections.ConfigDict(dict(
      datasets=('damaged_records',), data_dir=data, image_size=8, schedule='cyclic',
      weights=None, label_policies={}, num_workers=0, read_threads=1))
  folder = os.path.join(data, 'damaged_records', 'r8', '1.0.0')
  shard = os.path.join(folder, 'damaged_records-test.array_record-00000-of-00001')
  # Intact: a slice of the split checks the whole split's shards, not its own share.
  assert len(pipeline.open_source('damaged_records', 'test[:2]+validation', data, 8)) == 8
  with open(shard, 'rb') as f:
    whole = f.read()
  # Bytes flipped inside the first chunk: the record read fails, named.
  flipped = bytearray(whole)
  flipped[100:140] = bytes(b ^ 0xFF for b in flipped[100:140])
  _write_bytes(shard, bytes(flipped))
  iterator = pipeline.eval_iterator(config, 'damaged_records', 'test', 2, 0, 1)
  with pytest.raises(pipeline.BadRecordError,
                     match=r'damaged_records/test record 0 cannot be read \(Corrupted Riegeli'
                     r'.*hash mismatch.*prepare the dataset again'):
    next(iterator)
  iterator.close()
  # Truncated (an interrupted copy): TFDS alone would read 6 examples of None.
  _write_bytes(shard, whole[:len(whole) // 2])
  with pytest.raises(pipeline.BadRecordError,
                     match=rf'damaged_records/test: shard {shard} cannot be read .*; '
                     r'dataset_info\.json counts 6\. The prepared files are damaged'):
    pipeline.eval_iterator(config, 'damaged_records', 'test', 2, 0, 1)
  # An empty record, however it arises, is named before its labels are touched.
  to_example = pipeline.ToExample(0, labels.LabelPolicy(), 1, 0, where='damaged_records/test',
                                  image_size=8)
  empty = dict.fromkeys(['image', 'labels_raw', 'id', 'sex', 'age', 'view'])
  with pytest.raises(pipeline.BadRecordError,
                     match=r'damaged_records/test record 2: empty record \(a truncated or '
                     r'damaged ArrayRecord shard\?\)'):
    to_example(2, empty)
