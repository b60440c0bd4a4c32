"""The dataset builders: official layouts in, ArrayRecord out, read back value by value."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import cxr_layouts
from cxr_layouts import build, read
from input_pipeline import datasets
from input_pipeline import images
from input_pipeline.datasets import label_files


def _nan_equal(actual, expected):
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected, np.float32))


def _splits(name, data_dir):
  return {split: read(name, split, data_dir) for split in ('train', 'validation', 'test')}


def test_chestxray14(tmp_path):
  manual, data = str(tmp_path / 'nih'), str(tmp_path / 'data')
  names = cxr_layouts.nih_tree(manual)
  summary = build('chestxray14', manual, data)
  split = _splits('chestxray14', data)
  assert {s: len(e) for s, e in split.items()} == {'train': 14, 'validation': 2, 'test': 4}
  assert summary.examples == {'train': 14, 'validation': 2, 'test': 4}
  assert sorted(split['test']) == [f'images_002/images/{n}' for n in names[16:]]
  patients = {s: {os.path.basename(i)[:8] for i in e} for s, e in split.items()}
  assert not patients['train'] & patients['validation']  # carved by patient
  everything = {**split['train'], **split['validation'], **split['test']}
  for i, name in enumerate(names):
    example = everything[f'images_00{1 + i // 10}/images/{name}']
    assert example['image'].shape == (32, 32, 1) and example['image'].dtype == np.uint8
    np.testing.assert_array_equal(example['image'], 10 * i)  # the source's grey
    assert example['sex'] == (b'M' if i % 4 < 2 else b'F') and example['age'] == 40 + i
    assert example['view'] == (b'AP' if i == 5 else b'PA')
  expected = np.zeros(14, np.float32)
  expected[[0, 2, 13]] = 1  # Atelectasis|Effusion|Hernia
  _nan_equal(everything['images_001/images/00000000_000.png']['labels_raw'], expected)
  _nan_equal(everything['images_001/images/00000001_001.png']['labels_raw'], np.eye(14)[6])
  _nan_equal(everything['images_001/images/00000000_001.png']['labels_raw'], np.zeros(14))
  meta = datasets.metadata('chestxray14', data_dir=data)
  assert meta.label_names[2] == 'Effusion' and (meta.task, meta.num_classes) == ('multilabel', 14)
  # 'r32' is no predeclared config: the builder class makes it on request.
  builder = datasets.BUILDERS['chestxray14'](data_dir=data, config='r32')
  assert builder.info.metadata['label_names'][13] == 'Hernia'
  assert len(builder.as_data_source('validation')) == 2


def test_chestxray14_reference_split_files(tmp_path):
  manual, data, lists = (str(tmp_path / d) for d in ('nih', 'data', 'lists'))
  names = cxr_layouts.nih_tree(manual)
  for file_name, chosen in (('Xray14_train_official.txt', names[:10]),
                            ('Xray14_val_official.txt', names[10:13]),
                            ('Xray14_test_official.txt', names[13:15])):
    cxr_layouts.write_text(os.path.join(lists, file_name),
                           ''.join(f'{n} ' + ' '.join(['0'] * 14) + '\n' for n in chosen))
  summary = build('chestxray14', manual, data, split_files_dir=lists)
  assert summary.examples == {'train': 10, 'validation': 3, 'test': 2}
  assert {os.path.basename(i) for i in read('chestxray14', 'test', data)} == set(names[13:15])
  assert any('5 images' in note for note in summary.notes)  # the unlisted ones


def test_chexpert_raw_labels_and_test_split(tmp_path):
  manual, data = str(tmp_path / 'chexpert'), str(tmp_path / 'data')
  train_ids, valid_ids = cxr_layouts.chexpert_tree(manual)
  summary = build('chexpert', manual, data)
  split = _splits('chexpert', data)
  assert sorted(split['train']) == sorted(train_ids)
  assert sorted(split['validation']) == sorted(split['test']) == sorted(valid_ids)
  assert any('test split = valid.csv' in note for note in summary.notes)
  labels = {k: v['labels_raw'] for k, v in split['train'].items()}
  nan = math.nan
  first = np.full(14, nan, np.float32)
  first[[0, 5, 10]] = [1, 0, -1]  # No Finding 1, Edema 0, Pleural Effusion -1, rest blank
  _nan_equal(labels[train_ids[0]], first)
  second = np.full(14, nan, np.float32)
  second[[2, 5]] = [-1, 1]
  _nan_equal(labels[train_ids[1]], second)
  ex = [split['train'][i] for i in train_ids]
  assert [e['sex'] for e in ex] == [b'F', b'M', b'', b'M']
  assert [e['view'] for e in ex] == [b'AP', b'PA', b'AP', b'LATERAL']
  assert ex[0]['age'] == 68 and math.isnan(ex[2]['age'])
  assert abs(int(ex[1]['image'].mean()) - 80) <= 2  # JPEG of grey 80
  # The 668-image test set, when present, becomes the test split.
  rel = 'test/patient64741/study1/view1_frontal.jpg'
  cxr_layouts.write_image(os.path.join(manual, 'CheXpert-v1.0-small', rel), 30, fmt='JPEG')
  cxr_layouts.write_text(os.path.join(manual, 'CheXpert-v1.0-small', 'test_labels.csv'),
                         'Path,' + ','.join(cxr_layouts.CHEXPERT_LABELS) + '\n' + rel + ','
                         + ','.join(['0'] * 12 + ['1', '0']) + '\n')
  build('chexpert', manual, str(tmp_path / 'data2'))
  test = read('chexpert', 'test', str(tmp_path / 'data2'))
  assert list(test) == [f'CheXpert-v1.0-small/{rel}']
  _nan_equal(test[f'CheXpert-v1.0-small/{rel}']['labels_raw'], np.eye(14)[12])


def test_mimic_cxr_labels_by_name_per_study(tmp_path):
  manual, data = str(tmp_path / 'mimic'), str(tmp_path / 'data')
  expected = cxr_layouts.mimic_tree(manual)
  summary = build('mimic_cxr', manual, data)
  split = _splits('mimic_cxr', data)
  assert {s: sorted(e) for s, e in split.items()} == {
      s: sorted(k for k, v in expected.items() if v['split'] == s) for s in split}
  assert any('1 images of studies without a row' in note for note in summary.notes)
  names = datasets.metadata('mimic_cxr').label_names
  assert names == cxr_layouts.MIMIC_LABELS  # alphabetical, the reference head's order
  for image_id, want in expected.items():
    example = split[want['split']][image_id]
    raw = [float(want['labels'][n]) if n in want['labels'] else math.nan for n in names]
    _nan_equal(example['labels_raw'], raw)
    assert example['view'] == want['view'].encode()
    assert abs(int(example['image'].mean()) - want['value']) <= 2
  d1 = split['train']['files/p10/p10000032/s50414267/d1.jpg']
  assert d1['sex'] == b'F' and d1['age'] == 52  # anchor_age 52 in anchor_year 2180 = study year
  d4 = split['test']['files/p10/p10000764/s57375967/d4.jpg']
  assert d4['sex'] == b'M' and d4['age'] == 86


def test_rsna_pneumonia_one_hot_and_dicom_tags(tmp_path):
  manual, data = str(tmp_path / 'rsna'), str(tmp_path / 'data')
  patients = cxr_layouts.rsna_tree(manual)
  summary = build('rsna_pneumonia', manual, data)
  assert summary.examples == {'train': 8, 'validation': 1, 'test': 1}
  everything = {k: v for s in _splits('rsna_pneumonia', data).values() for k, v in s.items()}
  for i, patient in enumerate(patients):
    example = everything[f'stage_2_train_images/{patient}.dcm']
    _nan_equal(example['labels_raw'], np.eye(3)[i % 3])
    np.testing.assert_array_equal(example['image'], 20 * i)  # 8-bit DICOM kept as stored
    assert example['sex'] == (b'M' if i % 2 else b'F') and example['age'] == 20 + i
    assert example['view'] == b'PA'
  assert datasets.metadata('rsna_pneumonia').task == 'multiclass'


def test_vindr_cxr_readers_or_and_monochrome1(tmp_path):
  manual, data = str(tmp_path / 'vindr'), str(tmp_path / 'data')
  expected = cxr_layouts.vindr_tree(manual)
  build('vindr_cxr', manual, data)
  split = _splits('vindr_cxr', data)
  assert sorted(split['train']) == ['train/tr0.dicom', 'train/tr1.dicom']
  assert sorted(split['validation']) == sorted(split['test']) == ['test/te0.dicom',
                                                                  'test/te1.dicom']
  for image_id, labels in expected.items():
    _nan_equal(split['test' if image_id.startswith('test') else 'train'][image_id]['labels_raw'],
               labels)
  inverted, plain = split['train']['train/tr0.dicom'], split['train']['train/tr1.dicom']
  # Same stored pixels (top half bright): MONOCHROME1 shows that region dark.
  assert inverted['image'][:12].max() == 0 and inverted['image'][20:].min() == 255
  assert plain['image'][:12].min() == 255 and plain['image'][20:].max() == 0
  assert (inverted['sex'], inverted['age']) == (b'F', 45)
  assert plain['sex'] == b'M' and math.isnan(plain['age'])


def test_shenzhen_cxr_with_worker_processes(tmp_path):
  manual, data = str(tmp_path / 'shenzhen'), str(tmp_path / 'data')
  names = cxr_layouts.shenzhen_tree(manual)
  summary = build('shenzhen_cxr', manual, data, num_workers=2)
  assert summary.examples == {'train': 7, 'validation': 1, 'test': 2}  # 463/65/134 of 10
  everything = {k: v for s in _splits('shenzhen_cxr', data).values() for k, v in s.items()}
  assert len(everything) == 10
  for i, name in enumerate(names):
    example = everything[f'ChinaSet_AllFiles/CXR_png/{name}']
    _nan_equal(example['labels_raw'], [i % 2])
    np.testing.assert_array_equal(example['image'], 20 * i)
    if i < 9:
      assert example['sex'] == (b'F' if i % 3 == 0 else b'M') and example['age'] == 30 + i
    else:
      assert example['sex'] == b'' and math.isnan(example['age'])
  assert datasets.metadata('shenzhen_cxr') == datasets.DatasetMetadata(
      'shenzhen_cxr', ('TB',), 'binary', 1)


def test_shenzhen_cxr_reference_split_files(tmp_path):
  manual, data, lists = (str(tmp_path / d) for d in ('shenzhen', 'data', 'lists'))
  names = cxr_layouts.shenzhen_tree(manual)
  for file_name, chosen in (('ShenzenCXR_train_data.txt', names[:4]),
                            ('ShenzenCXR_valid_data.txt', names[4:6]),
                            ('ShenzenCXR_test_data.txt', names[6:])):
    cxr_layouts.write_text(os.path.join(lists, file_name),
                           ''.join(f'{n},{n[-5]}\n' for n in chosen))  # the reference's format
  summary = build('shenzhen_cxr', manual, data, split_files_dir=lists)
  assert summary.examples == {'train': 4, 'validation': 2, 'test': 4}
  assert sorted(read('shenzhen_cxr', 'validation', data)) == [
      f'ChinaSet_AllFiles/CXR_png/{n}' for n in names[4:6]]


def _csv_tree(root, rows, header='path,split,a,b,sex'):
  for row in rows:
    path = row.split(',')[0]
    if not path.startswith(('..', '/')):
      cxr_layouts.write_image(os.path.join(root, path), value=50)
  cxr_layouts.write_text(os.path.join(root, 'labels.csv'), '\n'.join([header] + rows) + '\n')


def test_csv_images_multilabel_and_multiclass(tmp_path):
  manual, data = str(tmp_path / 'own'), str(tmp_path / 'data')
  _csv_tree(manual, ['x/1.png,train,1,,F', 'x/2.png,train,-1,0,M', 'x/3.png,val,0,1,',
                     'x/4.png,test,1,1,M'])
  options = dict(csv='labels.csv', image_col='path', label_cols=['b', 'a'], task='multilabel',
                 split_col='split', sex_col='sex')
  summary = build('csv_images:own_set', manual, data, csv_options=options)
  assert summary.examples == {'train': 2, 'validation': 1, 'test': 1}
  train = read('own_set', 'train', data)  # not registered: read from the files alone
  _nan_equal(train['x/1.png']['labels_raw'], [math.nan, 1])
  _nan_equal(train['x/2.png']['labels_raw'], [0, -1])
  assert train['x/1.png']['sex'] == b'F'
  assert datasets.metadata('csv_images:own_set', data_dir=data) == datasets.DatasetMetadata(
      'own_set', ('b', 'a'), 'multilabel', 2)
  # Multi-class: class names in a column, one-hot, classes sorted when not given.
  _csv_tree(manual, [f'y/{i}.png,{s},{c},0,' for i, (s, c) in enumerate(
      [('train', 'cat'), ('train', 'dog'), ('validation', 'ant'), ('test', 'dog')])])
  build('csv_images:classes', manual, data, csv_options=dict(
      csv=os.path.join(manual, 'labels.csv'), image_col='path', label_cols=['a'],
      task='multiclass', split_col='split'))
  train = read('classes', 'train', data)
  _nan_equal(train['y/0.png']['labels_raw'], [0, 1, 0])  # ant, cat, dog
  assert datasets.metadata('classes', data_dir=data).label_names == ('ant', 'cat', 'dog')


def test_prepare_command_line(tmp_path):
  manual, data = str(tmp_path / 'own'), str(tmp_path / 'data')
  _csv_tree(manual, ['x/1.png,train,1,0,F', 'x/2.png,validate,0,1,M', 'x/3.png,test,1,1,M'])
  command = [sys.executable, '-m', 'input_pipeline.prepare', '--dataset=csv_images:cli_set',
             f'--manual_dir={manual}', f'--data_dir={data}', '--image_size=24', '--csv=labels.csv',
             '--image_col=path', '--label_cols=a,b', '--split_col=split', '--sex_col=sex',
             '--num_workers=0']
  env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'cli_set at 24x24:' in result.stdout and 'validation          1 examples' in result.stdout
  source = tfds.data_source('cli_set', split='test', data_dir=data,
                            builder_kwargs={'config': 'r24'}, download=False)
  assert source[0]['image'].shape == (24, 24, 1) and source[0]['sex'] == b'M'


# Bad input: each error names the file and where in it.


def test_missing_label_column_names_the_columns_present(tmp_path):
  manual = str(tmp_path / 'chexpert')
  cxr_layouts.chexpert_tree(manual)
  path = os.path.join(manual, 'CheXpert-v1.0-small', 'train.csv')
  with open(path) as f:
    lines = [l.replace(',Edema,', ',Oedema,') for l in f]
  cxr_layouts.write_text(path, ''.join(lines))
  with pytest.raises(label_files.LabelFileError,
                     match=r"train\.csv, line 1: missing column\(s\) \['Edema'\]; the header "
                     r"has \['Path', 'Sex'.*'Oedema'"):
    build('chexpert', manual, str(tmp_path / 'data'))


def test_unknown_label_values(tmp_path):
  manual = str(tmp_path / 'chexpert')
  cxr_layouts.chexpert_tree(manual)
  path = os.path.join(manual, 'CheXpert-v1.0-small', 'train.csv')
  with open(path) as f:
    lines = f.read().split('\n')
  fields = lines[2].split(',')
  fields[5 + 5] = '2.0'  # Edema of the second image
  lines[2] = ','.join(fields)
  cxr_layouts.write_text(path, '\n'.join(lines))
  with pytest.raises(label_files.LabelFileError,
                     match=r"train\.csv, line 3, column 'Edema': label value '2\.0' is not 1, 0, "
                     "-1 or blank"):
    build('chexpert', manual, str(tmp_path / 'data'))
  nih = str(tmp_path / 'nih')
  cxr_layouts.nih_tree(nih)
  entry = os.path.join(nih, 'Data_Entry_2017_v2020.csv')
  with open(entry) as f:
    text = f.read().replace('Pneumonia', 'Pneumonitis')
  cxr_layouts.write_text(entry, text)
  with pytest.raises(label_files.LabelFileError,
                     match="Data_Entry_2017_v2020.csv, line 5, column 'Finding Labels': unknown "
                     "finding 'Pneumonitis'"):
    build('chestxray14', nih, str(tmp_path / 'data'))


def test_listed_image_missing(tmp_path):
  manual, data = str(tmp_path / 'nih'), str(tmp_path / 'data')
  names = cxr_layouts.nih_tree(manual)
  os.remove(os.path.join(manual, 'images_001', 'images', names[3]))
  with pytest.raises(images.BadImageError,
                     match=rf'1 listed image\(s\) not found .*{names[3]} \(listed in '
                     r'Data_Entry_2017_v2020\.csv line 5\)'):
    build('chestxray14', manual, data)
  assert not os.path.exists(os.path.join(data, 'chestxray14', 'r32', '1.0.0'))
  summary = build('chestxray14', manual, data, skip_bad_images=True)
  assert sum(summary.examples.values()) == 19
  # Not found in any images folder: reported where the Box layout would have it.
  assert [p for s in summary.skipped.values() for p, _ in s] == [f'images/{names[3]}']


def test_corrupt_image_stops_or_is_skipped_and_counted(tmp_path):
  manual, data = str(tmp_path / 'nih'), str(tmp_path / 'data')
  names = cxr_layouts.nih_tree(manual)
  bad = f'images_002/images/{names[17]}'
  with open(os.path.join(manual, bad), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n garbage')
  with pytest.raises(images.BadImageError,
                     match=rf'{bad}: cannot decode.*listed in Data_Entry_2017_v2020.csv line 19'):
    build('chestxray14', manual, data)
  summary = build('chestxray14', manual, data, skip_bad_images=True)
  assert summary.examples['test'] == 3 and len(summary.skipped['test']) == 1
  assert 'skipped (test) ' + bad in summary.format()
  assert bad not in read('chestxray14', 'test', data)
  with open(os.path.join(data, 'chestxray14', 'r32', '1.0.0', 'metadata.json')) as f:
    assert json.load(f)['prepare_summary']['skipped'] == {'test': 1}


def test_paths_escaping_manual_dir(tmp_path):
  manual = str(tmp_path / 'own')
  cxr_layouts.write_image(str(tmp_path / 'outside.png'))
  options = dict(csv='labels.csv', image_col='path', label_cols=['a'], task='binary',
                 split_col='split')
  _csv_tree(manual, ['x/1.png,train,1,0,', '../outside.png,test,0,0,'])
  with pytest.raises(images.BadImageError,
                     match=r"\.\./outside\.png: '\.\.' in the path.*labels\.csv line 3"):
    build('csv_images:escape', manual, str(tmp_path / 'data'), csv_options=options)
  os.symlink(tmp_path / 'outside.png', os.path.join(manual, 'x', 'link.png'))
  _csv_tree(manual, ['x/1.png,train,1,0,', 'x/link.png,test,0,0,'])
  with pytest.raises(images.BadImageError, match=r'x/link\.png: resolves to .*outside manual_dir'):
    build('csv_images:escape', manual, str(tmp_path / 'data'), csv_options=options)


def test_empty_split(tmp_path):
  manual = str(tmp_path / 'shenzhen')
  cxr_layouts.shenzhen_tree(manual, n=3)
  with pytest.raises(label_files.DatasetError, match="shenzhen_cxr: the 'validation' split has "
                     r"no images \(splits found: {'train': 2, 'validation': 0, 'test': 1}\)"):
    build('shenzhen_cxr', manual, str(tmp_path / 'data'))


def test_metadata_of_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    datasets.metadata('nope', data_dir=str(tmp_path))
