"""One image file → grey uint8 → R×R → PNG bytes, for the dataset builders.

Formats: PNG (8- and 16-bit), JPEG and anything else Pillow reads, colour
(RGB, RGBA, palette) converted to grey with Pillow's ITU-R 601 luma, and DICOM
through pydicom. 8-bit grey pixels are kept as stored (as the reference, which
opens every image with Pillow). Deeper images (16-bit PNG, 32-bit TIFF) are
stretched from their own min..max to 0..255: Pillow's own conversion clips at
255, which turns a 12-bit radiograph white.

DICOM, in the standard's order (PS3.3 C.11): the modality transform
(RescaleSlope/Intercept or a Modality LUT), then the first VOI LUT if the file
has one, else the first window (WindowCenter/Width, LINEAR, LINEAR_EXACT or
SIGMOID), else the image's own min..max after rescaling (8-bit data in 0..255
is kept as stored, as for PNGs); the result is scaled to 0..255 and
MONOCHROME1 inverted (low values are white there). Then the
uint8 image is resized, like every other format.

Resizing is Pillow bicubic on the grey image, what the reference does to its
RGB copy (the three channels hold the same grey, so the result is identical).

An image larger than `MAX_PIXELS` (100 million pixels, 10k x 10k) is refused
before its pixels are decoded (a few dozen bytes of PNG header can declare a
4-gigapixel image). Every failure (missing, empty, truncated or corrupt file,
too large) raises `BadImageError` naming the file; this module never returns a
blank or partly decoded image.
"""

import collections.abc
import os
import struct
from typing import NamedTuple
import warnings
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile

# The largest image read, in pixels: 10k × 10k. Chest radiographs are at most
# ~4.3k × 4.3k (19 Mpx); anything far larger is a corrupt or hostile header.
MAX_PIXELS = 100_000_000
# zlib level of the stored PNGs: at 896 px, level 1 encodes ~3x faster than
# Pillow's default 6 for ~15% more bytes (BENCHMARKS.md, prepare throughput);
# reading speed is the same.
PNG_COMPRESS_LEVEL = 1
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_DICOM_SUFFIXES = ('.dcm', '.dicom')
_PIL_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.gif', '.webp')


class BadImageError(ValueError):
  """An image file that cannot be used: unreadable, corrupt, too large, misplaced."""

  def __init__(self, path: str, reason: str):
    super().__init__(path, reason)
    self.path = path
    self.reason = reason

  def __str__(self) -> str:
    return f'{self.path}: {self.reason}'


class DicomTags(NamedTuple):
  """Patient tags of a DICOM file, raw strings as stored ('' when absent)."""
  sex: str = ''  # PatientSex: 'M', 'F', 'O'
  age: str = ''  # PatientAge: '058Y', '006M', or a bare number in some sets
  view: str = ''  # ViewPosition: 'PA', 'AP', 'LL', ...


def resolve(manual_dir: str, relative: str, real_dirs: dict[str, str] | None = None) -> str:
  """Joins `relative` to `manual_dir`, refusing any path that leaves it.

  Args:
    manual_dir: the dataset's root folder.
    relative: a path read from a label file.
    real_dirs: optional cache of resolved folders, shared by the calls of one
      listing: without it each call walks every component of the path
      (~0.3 ms; minutes over MIMIC's 377k images).

  Returns:
    `manual_dir/relative` (not resolved, so ids and messages stay readable).

  Raises:
    BadImageError: `relative` is absolute, holds a '..' component, or
      resolves (through symbolic links) to a place outside `manual_dir`.
  """
  if not relative:
    raise BadImageError(repr(relative), 'empty image path')
  if os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
    raise BadImageError(relative, 'absolute path; image paths must be relative to manual_dir')
  if '..' in relative.replace('\\', '/').split('/'):
    raise BadImageError(relative, "'..' in the path; image paths must stay inside manual_dir")
  real_dirs = {} if real_dirs is None else real_dirs
  def real_dir(folder: str) -> str:
    if folder not in real_dirs:
      real_dirs[folder] = os.path.realpath(folder)
    return real_dirs[folder]
  path = os.path.join(manual_dir, relative)
  root = real_dir(manual_dir)
  real = os.path.join(real_dir(os.path.dirname(path)), os.path.basename(path))
  if os.path.islink(real):
    real = os.path.realpath(real)
  if os.path.commonpath([root, real]) != root:
    raise BadImageError(relative, f'resolves to {real}, outside manual_dir {root} '
                        '(a symbolic link pointing out of it?)')
  return path


def is_dicom(path: str) -> bool:
  """True for a .dcm/.dicom name, or a file with the DICOM preamble magic."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in _DICOM_SUFFIXES:
    return True
  if suffix in _PIL_SUFFIXES:
    return False
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:] == b'DICM'
  except OSError as e:
    raise BadImageError(path, f'cannot open: {e.strerror or e}') from e


def read_grey(path: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, DicomTags]:
  """Reads an image file as grey uint8 at its stored size.

  Args:
    path: the file (PNG, JPEG, other Pillow formats, or DICOM).
    max_pixels: refuse images with more pixels than this (before decoding).

  Returns:
    (uint8 array [H, W], the DICOM patient tags; empty for other formats).

  Raises:
    BadImageError: the file is missing, unreadable, corrupt or too large.
  """
  try:
    size = os.path.getsize(path)
  except FileNotFoundError as e:
    raise BadImageError(path, 'no such file') from e
  except OSError as e:
    raise BadImageError(path, f'cannot open: {e.strerror or e}') from e
  if size == 0:
    raise BadImageError(path, 'empty file (0 bytes)')
  if is_dicom(path):
    return _read_dicom(path, max_pixels)
  return _read_pil(path, max_pixels), DicomTags()


def resize(grey: np.ndarray, size: int) -> np.ndarray:
  """Pillow-bicubic resize of a grey uint8 image to size × size."""
  if grey.shape == (size, size):
    return grey
  return np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC))


def encode_png(grey: np.ndarray) -> bytes:
  """PNG bytes of a grey uint8 image (what tfds.features.Image stores).

  8-bit greyscale, one IDAT chunk, every row unfiltered (PNG filter type 0).
  Written here rather than by Pillow, which picks a filter per row: its files
  are ~20% smaller, but undoing the filters was the training pipeline's largest
  cost per image (0.77 ms of a 256² image's 1.4 ms); unfiltered rows decode with
  one zlib inflate (sources.decode_png, 0.3 ms). Any PNG reader reads them.
  """
  grey = np.asarray(grey)
  if grey.dtype != np.uint8 or grey.ndim != 2:
    raise ValueError(f'encode_png takes a grey uint8 [H, W] image, got {grey.dtype}{grey.shape}')
  h, w = grey.shape
  rows_Hx1pW = np.concatenate([np.zeros((h, 1), np.uint8), grey], axis=1)  # filter byte 0
  header = struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
  return b''.join([PNG_SIGNATURE, _png_chunk(b'IHDR', header),
                   _png_chunk(b'IDAT', zlib.compress(rows_Hx1pW.tobytes(), PNG_COMPRESS_LEVEL)),
                   _png_chunk(b'IEND', b'')])


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))


def load_resized_png(path: str, size: int,
                     max_pixels: int = MAX_PIXELS) -> tuple[bytes, DicomTags]:
  """Reads an image, resizes it to size × size and encodes it as PNG.

  Args:
    path: the image file.
    size: R, the stored side in pixels.
    max_pixels: the decompression-bomb limit.

  Returns:
    (PNG bytes of the grey R×R image, the DICOM patient tags).
  """
  grey, tags = read_grey(path, max_pixels)
  return encode_png(resize(grey, size)), tags


def decode_task(task: tuple[int, str, int]) -> tuple[int, bytes | None, DicomTags | None, str]:
  """Pool worker: `load_resized_png` that returns its failure instead of raising.

  A raised error would lose the rest of its chunk; returning it lets the
  builder decide (stop, or count and skip). Lives here, next to what it calls,
  so that unpickling it in a worker imports only this module.

  Args:
    task: (index, path, size).

  Returns:
    (index, PNG bytes or None, DicomTags or None, failure reason or '').
  """
  index, path, size = task
  try:
    png, tags = load_resized_png(path, size)
  except BadImageError as e:
    return index, None, None, e.reason
  return index, png, tags, ''


def decode_chunk(tasks: list[tuple[int, str, int]]) -> list[tuple]:
  """`decode_task` over a list of tasks (one message to and from a worker)."""
  return [decode_task(task) for task in tasks]


def _check_pixels(path: str, num_pixels: int, max_pixels: int, what: str):
  if num_pixels > max_pixels:
    raise BadImageError(path, f'{what} has {num_pixels:,} pixels, over the limit of '
                        f'{max_pixels:,} (images.MAX_PIXELS); refused as a decompression bomb')


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Linear map of lo..hi to 0..255, clipped and rounded."""
  if not hi > lo:  # a threshold window (w = 1), or a constant image: all 0
    return np.where(values > lo, 255, 0).astype(np.uint8)
  scaled = (values.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read_pil(path: str, max_pixels: int) -> np.ndarray:
  try:
    with warnings.catch_warnings():
      # Pillow warns above its own (smaller) limit; ours is checked just below.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path) as img:
        _check_pixels(path, img.width * img.height, max_pixels, f'{img.format} {img.size}')
        _load_whole(img)
        return _pil_to_grey(img)
  except BadImageError:
    raise
  except FileNotFoundError as e:
    raise BadImageError(path, 'no such file') from e
  except Image.DecompressionBombError as e:
    raise BadImageError(path, f'refused as a decompression bomb: {e}') from e
  except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
    raise BadImageError(path, f'cannot decode: {e}') from e


def _load_whole(img: Image.Image):
  """img.load(), refusing a truncated file even where Pillow's global allows it.

  TFDS's thumbnailer sets ImageFile.LOAD_TRUNCATED_IMAGES for the whole
  process; a truncated radiograph would then decode with its missing rows grey.
  """
  allowed = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    img.load()
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def _pil_to_grey(img: Image.Image) -> np.ndarray:
  if img.mode == 'L':
    return np.array(img)
  if img.mode.startswith('I') or img.mode == 'F':  # 16/32-bit integer, float
    values = np.asarray(img).astype(np.float32)
    return _to_uint8(values, float(np.nanmin(values)), float(np.nanmax(values)))
  return np.array(img.convert('L'))


def _read_dicom(path: str, max_pixels: int) -> tuple[np.ndarray, DicomTags]:
  # Imported here: worker processes that never see a DICOM skip its import.
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.pixels import apply_modality_lut  # pylint: disable=g-import-not-at-top

  try:
    ds = pydicom.dcmread(path, force=True)
  except FileNotFoundError as e:
    raise BadImageError(path, 'no such file') from e
  except Exception as e:  # pylint: disable=broad-except  # pydicom raises many types
    raise BadImageError(path, f'not a readable DICOM file: {e}') from e
  if 'PixelData' not in ds:
    raise BadImageError(path, f'DICOM file without pixel data ({os.path.getsize(path):,} bytes: '
                        'truncated, or not an image)')
  rows, cols = int(ds.get('Rows', 0) or 0), int(ds.get('Columns', 0) or 0)
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  _check_pixels(path, rows * cols * frames, max_pixels, f'DICOM {rows}x{cols}x{frames}')
  if frames > 1:
    raise BadImageError(path, f'multi-frame DICOM ({frames} frames); expected one radiograph')
  try:
    pixels = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except  # missing codecs, truncated data
    syntax = getattr(getattr(ds, 'file_meta', None), 'TransferSyntaxUID', None)
    syntax_name = getattr(syntax, 'name', syntax) or 'unknown transfer syntax'
    raise BadImageError(path, f'cannot decode DICOM pixel data ({syntax_name}): {e}') from e
  tags = DicomTags(sex=_raw_text(ds, 'PatientSex'), age=_raw_text(ds, 'PatientAge'),
                   view=_raw_text(ds, 'ViewPosition'))
  if pixels.ndim == 3:  # RGB (pydicom already converted YBR): luma, as for colour PNGs
    values = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    top = 255.0 if int(ds.get('BitsStored', 8)) <= 8 else float(values.max())
    return _to_uint8(values, 0.0, top), tags
  try:
    values = np.asarray(apply_modality_lut(pixels, ds), np.float32)
    grey = _apply_voi(ds, values, bits_stored=int(ds.get('BitsStored', 16) or 16))
  except (ValueError, TypeError, IndexError, AttributeError) as e:
    raise BadImageError(path, f'invalid DICOM rescale/VOI attributes: {e}') from e
  if str(ds.get('PhotometricInterpretation', '')).upper() == 'MONOCHROME1':
    grey = 255 - grey
  return grey, tags


def _raw_text(ds, keyword: str) -> str:
  """A text tag as stored, without pydicom's validation (RSNA's PatientAge '51'
  is invalid AS and would log a warning for every file)."""
  element = ds.get_item(keyword)
  if element is None:
    return ''
  value = element.value
  if isinstance(value, bytes):
    value = value.decode('latin-1')
  return str(value or '').strip()


def _first(value) -> float:
  """A DICOM multi-value (several windows) → its first entry, as a float."""
  if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
    value = value[0]
  return float(value)


def _apply_voi(ds, values: np.ndarray, bits_stored: int) -> np.ndarray:
  """VOI LUT, else window, else the image's own range → uint8 (PS3.3 C.11.2)."""
  if 'VOILUTSequence' in ds and len(ds.VOILUTSequence):
    from pydicom.pixels import apply_voi  # pylint: disable=g-import-not-at-top
    lut = ds.VOILUTSequence[0]
    # Scale by the LUT's own values: LUTDescriptor's bit depth is often wrong.
    lut_data = np.asarray(lut.LUTData, np.float32)
    # The LUT is indexed by integer input values.
    mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), np.float32)
    return _to_uint8(mapped, float(lut_data.min()), float(lut_data.max()))
  if 'WindowCenter' in ds and 'WindowWidth' in ds:
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get('VOILUTFunction', 'LINEAR') or 'LINEAR').upper()
    if function == 'SIGMOID':
      if width <= 0:
        raise ValueError(f'WindowWidth {width} must be > 0')
      sigmoid = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
      return np.rint(sigmoid * 255.0).astype(np.uint8)
    if function == 'LINEAR_EXACT':
      if width <= 0:
        raise ValueError(f'WindowWidth {width} must be > 0')
      return _to_uint8(values, center - width / 2, center + width / 2)
    if width < 1:
      raise ValueError(f'WindowWidth {width} must be >= 1 for LINEAR windowing')
    # LINEAR: the standard's half-pixel offsets, so c ± w/2 map exactly to the ends.
    return _to_uint8(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
  lo, hi = float(values.min()), float(values.max())
  if bits_stored <= 8 and lo >= 0 and hi <= 255:
    return values.astype(np.uint8)  # 8-bit data kept as stored, as for 8-bit PNGs
  return _to_uint8(values, lo, hi)
