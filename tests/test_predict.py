"""--mode=predict: the teacher's zero-shot probabilities, checked against timm + torch heads."""

import csv
import os
import subprocess
import sys

from flax import nnx
import numpy as np
from PIL import Image
import pytest
from safetensors.numpy import load_file
from timm.models import swin_transformer
import torch

import cxr_layouts
from ark_jax import augment
from ark_jax import export
from ark_jax import interop
from ark_jax import predict
from input_pipeline import datasets
from input_pipeline import images
from tests.conftest import REPO_ROOT


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Five images of different sizes and formats, one in a subfolder: {path: grey as stored}."""
  root = tmp_path_factory.mktemp('images')
  os.makedirs(root / 'sub')
  rng = np.random.default_rng(0)
  grey = {}
  for name, shape in (('b.png', (40, 52)), ('sub/a.png', (32, 32)), ('c.jpg', (30, 30))):
    pixels = rng.integers(0, 256, shape, np.uint8)
    Image.fromarray(pixels).save(root / name)
    grey[str(root / name)] = np.array(Image.open(root / name))  # JPEG: as decoded
  rgb = rng.integers(0, 256, (48, 64, 3), np.uint8)
  Image.fromarray(rgb).save(root / 'd_rgb.png')
  grey[str(root / 'd_rgb.png')] = np.array(Image.fromarray(rgb).convert('L'))
  # 8-bit MONOCHROME1: kept as stored, then inverted (low values are white).
  pixels = rng.integers(0, 256, (20, 28), np.uint8)
  cxr_layouts.write_dicom(str(root / 'e.dcm'), pixels, photometric='MONOCHROME1', bits_stored=8)
  grey[str(root / 'e.dcm')] = 255 - pixels
  return str(root), grey


@pytest.fixture(scope='module')
def predicted(trained, image_files, tmp_path_factory):
  """predict.predict over every image: (header, rows) of the CSV."""
  config, workdir, _, _ = trained
  output = str(tmp_path_factory.mktemp('predict_out') / 'p.csv')
  assert predict.predict(config, workdir, os.path.join(image_files[0], '**', '*'), output) == output
  with open(output, newline='') as f:
    table = list(csv.reader(f))
  return table[0], table[1:]


def test_csv_matches_timm_backbone_with_torch_projector_and_heads(trained, image_files,
                                                                   predicted, tmp_path):
  config, workdir, graphdef, state = trained
  header, rows = predicted
  m = config.model
  path = export.export(config, workdir, 'timm', str(tmp_path / 'teacher.safetensors'),
                       export_model='teacher')
  backbone = swin_transformer.SwinTransformer(
      img_size=m.img_size, patch_size=4, window_size=m.window_size, embed_dim=m.embed_dim,
      depths=tuple(m.depths), num_heads=tuple(m.num_heads), num_classes=0).eval()
  backbone.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(path).items()},
                           strict=True)
  ark_sd = {k: torch.from_numpy(np.array(v)) for k, v in
            interop.ark_state_dict(nnx.merge(graphdef, state.ema_params), 'ark').items()}
  # The notebook's preprocessing, independently: grey, resize straight to S, ImageNet.
  paths = [r[0] for r in rows]
  grey_NxSxS = np.stack([images.resize(image_files[1][p], m.img_size) for p in paths])
  x_NxSxSx3 = ((grey_NxSxS[..., None] / 255.0 - np.array(augment.IMAGENET_MEAN))
               / np.array(augment.IMAGENET_STD)).astype(np.float32)
  with torch.no_grad():
    z = torch.nn.functional.linear(backbone(torch.from_numpy(x_NxSxSx3).permute(0, 3, 1, 2)),
                                   ark_sd['projector.weight'], ark_sd['projector.bias'])
    expected = []
    for k, name in enumerate(config.data.datasets):
      logits = torch.nn.functional.linear(z, ark_sd[f'omni_heads.{k}.weight'],
                                          ark_sd[f'omni_heads.{k}.bias'])
      multiclass = datasets.metadata(name, config.data.data_dir).task == 'multiclass'
      expected.append(torch.softmax(logits, -1) if multiclass else torch.sigmoid(logits))
  expected_NxK = torch.cat(expected, dim=1).numpy()
  got_NxK = np.array([[float(v) for v in r[1:]] for r in rows])
  assert got_NxK.shape == expected_NxK.shape == (5, len(header) - 1)
  np.testing.assert_allclose(got_NxK, expected_NxK, atol=1e-4, rtol=0)
  assert got_NxK.std(axis=0).max() > 1e-3  # the images are told apart, not one constant row
  # The teacher, not the student: they differ after 3 steps of an independent init.
  assert not np.allclose(np.asarray(state.params['projector']['fc1']['kernel']),
                         np.asarray(state.ema_params['projector']['fc1']['kernel']), atol=1e-4)


def test_columns_are_every_head_output_and_rows_sorted_paths(trained, image_files, predicted):
  config, _, _, _ = trained
  header, rows = predicted
  expected = ['path']
  for name in config.data.datasets:
    expected += [f'{name}/{label}'
                 for label in datasets.metadata(name, config.data.data_dir).label_names]
  assert header == expected
  assert len(header) - 1 == 10 + 5 + 1 + 3
  assert header[1] == 'demo_multilabel/tshirt_top'
  assert [r[0] for r in rows] == sorted(image_files[1])
  probs = np.array([[float(v) for v in r[1:]] for r in rows])
  assert ((probs > 0) & (probs < 1)).all()
  count = [i - 1 for i, c in enumerate(header) if c.startswith('demo_count/')]
  assert len(count) == 3
  np.testing.assert_allclose(probs[:, count].sum(axis=1), 1.0, atol=1e-6)


def test_no_match_and_bad_images_fail_naming_them_and_write_nothing(trained, tmp_path):
  config, workdir, _, _ = trained
  output = str(tmp_path / 'out.csv')
  pattern = str(tmp_path / 'nothing' / '*.png')
  with pytest.raises(FileNotFoundError, match='matches no file') as e:
    predict.predict(config, workdir, pattern, output)
  assert pattern in str(e.value)
  # Not an image at all: refused from its header, before the checkpoint is read
  # (this workdir has none, which would be the error otherwise).
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8)).save(tmp_path / 'good.png')
  bad = tmp_path / 'bad.png'
  bad.write_bytes(rng.bytes(300))
  with pytest.raises(images.BadImageError, match='bad.png'):
    predict.predict(config, str(tmp_path / 'no_run'), str(tmp_path / '*.png'), output)
  # A valid header over truncated pixel data: found when decoded; still no file.
  bad.write_bytes((tmp_path / 'good.png').read_bytes()[:-200])
  with pytest.raises(images.BadImageError, match='bad.png'):
    predict.predict(config, workdir, str(tmp_path / '*.png'), output)
  assert not os.path.exists(output) and not os.path.exists(output + '.tmp')


def test_command_line_needs_images_and_output(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ark_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path}', '--mode=predict', f'--output={tmp_path / "p.csv"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert '--mode=predict needs --images=GLOB and --output=FILE.csv' in result.stderr
