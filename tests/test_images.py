"""input_pipeline/images.py: formats, DICOM windowing, bombs, safe paths."""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from input_pipeline import images
import cxr_layouts


def test_png_8bit_kept_as_stored_and_resized_like_the_reference(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (20, 24), np.uint8)
  path = str(tmp_path / 'a.png')
  Image.fromarray(pixels).save(path)
  grey, tags = images.read_grey(path)
  np.testing.assert_array_equal(grey, pixels)
  assert tags == images.DicomTags()
  # The reference: Image.open(p).convert('RGB').resize((R, R)); every channel equals ours.
  reference = np.asarray(Image.open(path).convert('RGB').resize((32, 32)))
  ours = images.resize(grey, 32)
  for channel in range(3):
    np.testing.assert_array_equal(ours, reference[..., channel])
  png, _ = images.load_resized_png(path, 32)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), ours)


def test_png_16bit_is_stretched_from_its_range(tmp_path):
  pixels = np.array([[1000, 2000], [3000, 4095]], np.uint16)
  path = str(tmp_path / 'deep.png')
  Image.fromarray(pixels).save(path)
  grey, _ = images.read_grey(path)
  np.testing.assert_array_equal(grey, [[0, 82], [165, 255]])  # (x - 1000) * 255 / 3095


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'P'])
def test_colour_becomes_grey(tmp_path, mode):
  path = str(tmp_path / f'c_{mode}.png')
  cxr_layouts.write_image(path, value=77, mode=mode)
  grey, _ = images.read_grey(path)
  assert grey.shape == (16, 16) and grey.dtype == np.uint8
  np.testing.assert_array_equal(grey, 77)
  rgb = Image.new('RGB', (4, 4), (255, 0, 0))
  rgb.save(tmp_path / 'red.png')
  assert images.read_grey(str(tmp_path / 'red.png'))[0][0, 0] == 76  # ITU-R 601 luma of red


def test_jpeg(tmp_path):
  path = str(tmp_path / 'a.jpg')
  cxr_layouts.write_image(path, value=150, fmt='JPEG')
  grey, _ = images.read_grey(path)
  assert np.abs(grey.astype(int) - 150).max() <= 2


def test_dicom_rescale_window_and_tags(tmp_path):
  path = str(tmp_path / 'w.dcm')
  pixels = np.array([[0, 100], [200, 300]], np.uint16)
  # Rescaled values -1000, -800, -600, -400; window [-900, -500] (LINEAR, c=-700, w=401).
  cxr_layouts.write_dicom(path, pixels, RescaleSlope=2, RescaleIntercept=-1000,
                          WindowCenter=-699.5, WindowWidth=401, PatientSex='F',
                          PatientAge='045Y', ViewPosition='AP')
  grey, tags = images.read_grey(path)
  np.testing.assert_array_equal(grey, [[0, 64], [191, 255]])
  assert tags == images.DicomTags('F', '045Y', 'AP')


def test_dicom_monochrome1_inverted_and_stored_range(tmp_path):
  bright_top = np.zeros((16, 16), np.uint16)
  bright_top[:8] = 4000
  bright_top[8:] = 1000
  mono2, mono1 = str(tmp_path / 'm2.dcm'), str(tmp_path / 'm1.dcm')
  cxr_layouts.write_dicom(mono2, bright_top)
  cxr_layouts.write_dicom(mono1, bright_top, photometric='MONOCHROME1')
  grey2, _ = images.read_grey(mono2)
  grey1, _ = images.read_grey(mono1)
  assert (grey2[:8] == 255).all() and (grey2[8:] == 0).all()  # min..max of the image
  np.testing.assert_array_equal(grey1, 255 - grey2)


def test_dicom_8bit_kept_as_stored(tmp_path):
  path = str(tmp_path / 'eight.dcm')
  pixels = np.array([[10, 20], [30, 40]], np.uint8)
  cxr_layouts.write_dicom(path, pixels, bits_stored=8)
  np.testing.assert_array_equal(images.read_grey(path)[0], pixels)
  cxr_layouts.write_dicom(path, pixels, photometric='MONOCHROME1', bits_stored=8)
  np.testing.assert_array_equal(images.read_grey(path)[0], 255 - pixels)


def test_dicom_voi_lut_and_signed_pixels(tmp_path):
  from pydicom.dataset import Dataset  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'lut.dcm')
  item = Dataset()
  item.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0, 8 bits
  item.add_new(0x00283006, 'US', [0, 10, 20, 40])  # LUTData
  cxr_layouts.write_dicom(path, np.array([[0, 1], [2, 3]], np.uint16), VOILUTSequence=[item])
  np.testing.assert_array_equal(images.read_grey(path)[0], [[0, 64], [128, 255]])
  signed = str(tmp_path / 'signed.dcm')
  cxr_layouts.write_dicom(signed, np.array([[-100, 0], [50, 100]], np.int16))
  np.testing.assert_array_equal(images.read_grey(signed)[0], [[0, 128], [191, 255]])


def _png_header(width: int, height: int) -> bytes:
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)  # 8-bit grey
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
          + chunk(b'IDAT', zlib.compress(b'\0' * 100)) + chunk(b'IEND', b''))


def test_decompression_bomb_refused_before_decoding(tmp_path):
  # A 200-byte PNG declaring 12000 x 12000 grey pixels (144 MB): over our limit, under
  # Pillow's own error threshold; and one of 10^10 pixels, over both.
  for side in (12_000, 100_000):
    path = tmp_path / f'bomb{side}.png'
    path.write_bytes(_png_header(side, side))
    with pytest.raises(images.BadImageError, match=f'bomb{side}.png.*decompression bomb'):
      images.read_grey(str(path))
  small = str(tmp_path / 'small.png')
  cxr_layouts.write_image(small)
  with pytest.raises(images.BadImageError, match='256 pixels, over the limit of 100'):
    images.read_grey(small, max_pixels=100)
  dicom = str(tmp_path / 'big.dcm')
  cxr_layouts.write_dicom(dicom, np.zeros((16, 16), np.uint16))
  with pytest.raises(images.BadImageError, match='DICOM 16x16x1 has 256 pixels'):
    images.read_grey(dicom, max_pixels=100)


def test_unreadable_files_name_the_file(tmp_path):
  corrupt = tmp_path / 'corrupt.png'
  good = io.BytesIO()
  Image.new('L', (64, 64), 9).save(good, format='PNG')
  corrupt.write_bytes(good.getvalue()[:60])  # truncated inside the pixel data
  for path, reason in [(corrupt, 'cannot decode'), (tmp_path / 'gone.png', 'no such file'),
                       (tmp_path / 'bad.dcm', 'not a readable DICOM|without pixel data')]:
    if path.name == 'bad.dcm':
      path.write_bytes(b'\0' * 10)
    with pytest.raises(images.BadImageError, match=reason) as info:
      images.read_grey(str(path))
    assert info.value.path == str(path) and str(path) in str(info.value)
  index, png, tags, reason = images.decode_task((7, str(corrupt), 32))
  assert (index, png, tags) == (7, None, None) and 'cannot decode' in reason


def test_resolve_keeps_paths_inside_manual_dir(tmp_path):
  root = tmp_path / 'manual'
  (root / 'sub').mkdir(parents=True)
  (tmp_path / 'outside.png').write_bytes(b'x')
  (root / 'sub' / 'in.png').write_bytes(b'x')
  os.symlink(tmp_path / 'outside.png', root / 'sub' / 'link_out.png')
  os.symlink(root / 'sub' / 'in.png', root / 'link_in.png')
  assert images.resolve(str(root), 'sub/in.png') == str(root / 'sub' / 'in.png')
  assert images.resolve(str(root), 'link_in.png') == str(root / 'link_in.png')
  for relative, reason in [('../outside.png', r"'\.\.'"), ('sub/../../outside.png', r"'\.\.'"),
                           (str(tmp_path / 'outside.png'), 'absolute'),
                           ('sub/link_out.png', 'outside manual_dir'), ('', 'empty')]:
    with pytest.raises(images.BadImageError, match=reason):
      images.resolve(str(root), relative)


def test_real_radiograph_from_pydicom_data():
  """A real PA chest CR (MONOCHROME1, 15-bit) shipped by PyPI's pydicom-data (MIT)."""
  import data_store  # pydicom-data's package name, pinned in requirements-test.txt
  path = os.path.join(os.path.dirname(data_store.__file__), 'data', 'RG1_UNCR.dcm')
  grey, _ = images.read_grey(path)
  assert grey.shape == (1955, 1841) and grey.dtype == np.uint8
  # The file's own window (centre 15000, width 30000) spans its whole 15-bit
  # range, so the film is not stretched to 0..255, but it keeps its contrast.
  assert grey.max() - grey.min() > 150
  # MONOCHROME1 inverted: a lung is darker than the spine between the lungs.
  assert grey[900:1100, 300:700].mean() + 30 < grey[900:1100, 800:1000].mean()


def test_stored_png_is_unfiltered_read_fast_and_strict():
  """encode_png writes unfiltered rows that any reader (Pillow) decodes to the same pixels;
  decode_png reads them without Pillow, still reads Pillow's filtered PNGs, and
  refuses a truncated or corrupt one."""
  from input_pipeline import sources
  rng = np.random.default_rng(0)
  for shape in [(1, 1), (3, 5), (256, 256)]:
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    png = images.encode_png(grey)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grey)
    np.testing.assert_array_equal(sources.decode_png(png), grey)
    assert sources._decode_unfiltered_grey(png) is not None  # the fast path, not Pillow
    filtered = io.BytesIO()
    Image.fromarray(grey).save(filtered, format='PNG', compress_level=6)
    np.testing.assert_array_equal(sources.decode_png(filtered.getvalue()), grey)
  smooth = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
  filtered = io.BytesIO()
  Image.fromarray(smooth).save(filtered, format='PNG')  # Pillow filters a gradient's rows
  assert sources._decode_unfiltered_grey(filtered.getvalue()) is None
  png = images.encode_png(smooth)
  flipped = bytearray(png)
  flipped[50] ^= 1  # inside the IDAT chunk
  for bad, message in [(png[:-5], 'no IEND'), (png[:60], 'ends early'),
                       (bytes(flipped), 'fails its CRC')]:
    with pytest.raises(ValueError, match=message):
      sources.decode_png(bad)
  # A valid CRC over a damaged zlib stream: zlib's own checksum catches it.
  length = struct.unpack('>I', png[33:37])[0]
  stream = bytearray(png[41:41 + length])
  stream[-1] ^= 1
  chunk = b'IDAT' + bytes(stream)
  forged = png[:33] + png[33:37] + chunk + struct.pack('>I', zlib.crc32(chunk)) + png[45 + length:]
  with pytest.raises(ValueError, match='corrupt PNG image data'):
    sources.decode_png(forged)
