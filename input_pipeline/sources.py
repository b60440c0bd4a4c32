"""Reading one prepared split: its ArrayRecord source, checked, and its PNGs.

TFDS takes a split's example counts from dataset_info.json, not from the files,
and reads a truncated shard as examples whose features are all None; a corrupt
chunk fails deep inside the ArrayRecord reader. `open_source` checks every
shard's record count once when it opens a split, and `NamedSource` turns read
errors into `BadRecordError` naming the dataset, split and record, so damaged
prepared files fail with a message that says what to do.
"""

import io
import os
import struct
import zlib

from array_record.python import array_record_module
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from input_pipeline import images


class BadRecordError(ValueError):
  """Prepared data that cannot be read: a truncated shard, a corrupt or mis-sized image."""


def open_source(name: str, split: str, data_dir: str | None, image_size: int,
                decode_images: bool = True):
  """The random-access source of one prepared split (ArrayRecord).

  Args:
    name: TFDS name ('csv_images:NAME' is read as NAME, like metadata()).
    split: 'train', 'validation', 'test'.
    data_dir: where `prepare` wrote it (None = TFDS's default).
    image_size: R; the prepared config is 'r<R>'.
    decode_images: False leaves 'image' as PNG bytes; the pipeline decodes
      them itself (TFDS's decoding path measured 0-50% slower per image).

  Returns:
    A tfds ArrayRecord data source: len() and random access to dicts with
    'image' u8[R, R, 1] (or PNG bytes), 'labels_raw' f32[C], 'id', 'sex',
    'age', 'view' (strings as bytes).

  Raises:
    FileNotFoundError: the dataset is not prepared at this size.
    BadRecordError: a shard of the split holds fewer records than counted.
  """
  name = name.split(':', 1)[1] if name.startswith('csv_images:') else name
  try:
    builder = tfds.builder(f'{name}/r{image_size}', data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(builder.data_dir)
  except (FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
    raise FileNotFoundError(
        f'{name} is not prepared at {image_size}x{image_size} in {data_dir}: run python -m '
        f'input_pipeline.prepare --dataset={name} --data_dir={data_dir} '
        f'--image_size={image_size} (with --manual_dir for the chest X-ray sets).') from e
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  source = builder.as_data_source(split=split, decoders=decoders)
  _check_shards(builder, name, split)
  return source


def _check_shards(builder, name: str, split: str):
  """Each shard of the split holds the records dataset_info.json counts.

  TFDS reads the counts from dataset_info.json, not from the files, so a
  truncated shard would otherwise read as examples whose features are all None.
  One footer read per shard (milliseconds), once per source.

  Raises:
    BadRecordError: naming the dataset, split and shard file.
  """
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    return  # as_data_source reads no other format
  # The whole named splits: a slice ('train[:10%]+test') counts its own share.
  names = dict.fromkeys(part.split('[')[0].strip() for part in split.split('+'))
  shards = [shard for n in names for shard in zip(builder.info.splits[n].filepaths,
                                                  builder.info.splits[n].shard_lengths)]
  for path, expected in shards:
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path))
      found = reader.num_records()
      reader.close()  # where a damaged file's error surfaces
    except (RuntimeError, OSError, ValueError) as e:
      found, error = None, f'{type(e).__name__} {e}'.strip()
    if found != expected:
      what = f'holds {found} records' if found is not None else f'cannot be read ({error})'
      raise BadRecordError(
          f'{name}/{split}: shard {os.fspath(path)} {what}; dataset_info.json counts {expected}. '
          'The prepared files are damaged: prepare the dataset again with --overwrite.')


class NamedSource:
  """A split's source whose read errors name the dataset, split and record.

  A corrupt chunk of an ArrayRecord shard raises riegeli's RuntimeError from
  deep inside the reader; this re-raises it as BadRecordError, at the cost of
  one Python call per example.
  """

  def __init__(self, source, where: str):
    self._source = source
    self._where = where

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return self._source[index]
    except RuntimeError as e:  # 'Corrupted Riegeli/records file: chunk data hash mismatch ...'
      raise BadRecordError(f'{self._where} record {index} cannot be read ({e}). The prepared '
                           'files are damaged: prepare the dataset again with --overwrite.') from e


def decode_png(png: bytes) -> np.ndarray:
  """u8[R, R] from the stored PNG of a grey image.

  What images.encode_png writes (8-bit grey, unfiltered rows) is read with one
  zlib inflate, a third of Pillow's time; any other PNG (data prepared by an
  older version) goes through Pillow. Damage raises ValueError either way.
  """
  unfiltered = _decode_unfiltered_grey(bytes(png))
  if unfiltered is not None:
    return unfiltered
  with Image.open(io.BytesIO(png)) as image:
    if image.mode != 'L':
      image = image.convert('L')
    return np.asarray(image)



def _decode_unfiltered_grey(png: bytes) -> np.ndarray | None:
  """u8[H, W] of an 8-bit grey, non-interlaced PNG whose rows are all unfiltered.

  None for any other PNG (Pillow reads it). As strict as Pillow: every chunk's
  CRC, the zlib stream's checksum and the pixel count are checked.

  Raises:
    ValueError: a truncated or corrupt PNG.
  """
  if png[:8] != images.PNG_SIGNATURE:
    return None  # Pillow names what it is
  pos, header, idat = 8, None, []
  while True:
    if pos + 8 > len(png):
      raise ValueError('truncated PNG: no IEND chunk')
    length, tag = struct.unpack_from('>I4s', png, pos)
    data, crc = png[pos + 8:pos + 8 + length], png[pos + 8 + length:pos + 12 + length]
    if len(data) != length or len(crc) != 4:
      raise ValueError(f'truncated PNG: chunk {tag!r} ends early')
    if zlib.crc32(tag + data) != int.from_bytes(crc, 'big'):
      raise ValueError(f'corrupt PNG: chunk {tag!r} fails its CRC')
    if tag == b'IHDR':
      header = struct.unpack('>IIBBBBB', data)
      if header[2:] != (8, 0, 0, 0, 0):  # anything but 8-bit grey, no interlace
        return None
    elif tag == b'IDAT':
      idat.append(data)
    elif tag == b'IEND':
      break
    pos += 12 + length
  if header is None:
    raise ValueError('corrupt PNG: no IHDR chunk')
  w, h = header[:2]
  stream = b''.join(idat)
  try:
    if zlib.decompressobj().decompress(stream, 1) != b'\0':
      return None  # the first row is filtered: Pillow's encoder, no need to inflate twice
    raw = zlib.decompress(stream)
  except zlib.error as e:
    raise ValueError(f'corrupt PNG image data ({e})') from e
  if len(raw) != h * (w + 1):
    raise ValueError(f'corrupt PNG: {len(raw)} bytes of image data for {w}x{h}')
  rows_HxW1 = np.frombuffer(raw, np.uint8).reshape(h, w + 1)
  if rows_HxW1[:, 0].any():
    return None  # filtered rows (Pillow's encoder): Pillow undoes them
  return np.ascontiguousarray(rows_HxW1[:, 1:])
