"""The on-disk record format: feature keys, encode one example, parse a batch.

This module is the single source of truth shared by the Beam writer
(`pipelines.folder_to_records.beam_build`) and the tf.data reader (`pipelines.records_to_batches.input_pipeline`).
A round-trip test (`tests/tfrecords_schema/test_schema.py`) guards it, and a second test loads
the records through `tfds.builder_from_directory` so the TFDS view of the same
bytes (`tfds_features`) cannot drift from this one.

One example (a serialized `tf.train.Example`):

  image                  bytes   JPEG/PNG bytes, or raw uint8 HWC bytes
  label                  int64   index into the sorted class names
  image/filename         bytes   path relative to --input_dir, '/' separated
  image/sha256           bytes   hex sha256 of the *source file's* bytes
  image/original_height  int64   source height after EXIF orientation
  image/original_width   int64   source width after EXIF orientation
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Iterator, Optional

SCHEMA_VERSION = 1

IMAGE = 'image'
LABEL = 'label'
FILENAME = 'image/filename'
SHA256 = 'image/sha256'
ORIGINAL_HEIGHT = 'image/original_height'
ORIGINAL_WIDTH = 'image/original_width'

IMAGE_FORMATS = ('jpeg', 'png', 'raw')
RECORD_SUFFIX = 'tfrecord'


def _varint(value: int) -> bytes:
  """Protobuf base-128 varint (int64 two's complement for negatives)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(tag: int, *payload: bytes) -> list[bytes]:
  """One length-delimited protobuf field: tag byte, varint length, payload
  (given in pieces, kept as pieces: the image is copied once, by the join
  in encode_example)."""
  return [bytes([tag]) + _varint(sum(len(p) for p in payload)), *payload]


def _bytes_feature(value: bytes) -> list[bytes]:
  return _field(0x0A, *_field(0x0A, value))  # Feature.bytes_list.value[0]


def _int64_feature(value: int) -> list[bytes]:
  # Feature.int64_list, packed.
  return _field(0x1A, *_field(0x0A, _varint(value)))


def _entry(key: str, feature: list[bytes]) -> list[bytes]:
  """One entry of the Example's feature map, as pieces."""
  return _field(0x0A, *_field(0x0A, key.encode()), *_field(0x12, *feature))


def encode_example(*, image: bytes, label: int, filename: str, sha256: str,
                   original_height: int, original_width: int) -> bytes:
  """Serializes one `tf.train.Example`, byte-identical in every process.

  Written straight to protobuf's wire format, so Beam workers need no
  TensorFlow import (seconds of start-up per worker), with the feature map's
  entries in sorted key order. Protobuf's own map order follows the
  process' hash seed, so two workers could write different bytes for one
  example. `tests/tfrecords_schema/test_schema.py` checks TensorFlow parses these bytes into
  the same Example it would build itself.
  """
  # 'image' sorts before every other key: its entry first, then the tail.
  entries = _entry(IMAGE, _bytes_feature(image)) + [_tail(
      label=label, filename=filename, sha256=sha256,
      original_height=original_height, original_width=original_width)]
  # Example.features = Features{feature: map}; the one copy of the image.
  return b''.join(_field(0x0A, *entries))


def _prefixed(tag: bytes, payload: bytes) -> bytes:
  """tag, payload's length (varint), payload: one length-delimited field."""
  size = len(payload)
  return tag + (_SMALL[size] if size < 0x80 else _varint(size)) + payload


_SMALL = [bytes((i,)) for i in range(0x80)]  # One-byte varints.
_KEY_FIELDS = {key: _prefixed(b'\n', key.encode()) for key in (
    FILENAME, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, SHA256, LABEL)}
# _tail writes the entries after the image's in this order: the keys'.
assert [IMAGE, *_KEY_FIELDS] == sorted([IMAGE, *_KEY_FIELDS])


def _bytes_entry(key: str, value: bytes) -> bytes:
  """_entry(key, _bytes_feature(value)), made directly."""
  feature = _prefixed(b'\n', _prefixed(b'\n', value))
  return _prefixed(b'\n', _KEY_FIELDS[key] + _prefixed(b'\x12', feature))


@functools.lru_cache(maxsize=4096)  # Labels and image sizes repeat.
def _int64_entry(key: str, value: int) -> bytes:
  """_entry(key, _int64_feature(value)), made directly."""
  feature = _prefixed(b'\x1a', _prefixed(b'\n', _varint(value)))
  return _prefixed(b'\n', _KEY_FIELDS[key] + _prefixed(b'\x12', feature))


def _tail(*, label: int, filename: str, sha256: str, original_height: int,
          original_width: int) -> bytes:
  """The feature map's entries after the image's (keys sorted), serialized:
  what ends every Example encode_example writes (made directly: a taken
  record's check makes one per record). TypeError for a number that is
  not an int (48.0 or True would hit 48's or 1's cached entry)."""
  if not type(label) is type(original_height) is type(original_width) is int:
    raise TypeError('label and original sizes must be ints')
  return b''.join((
      _bytes_entry(FILENAME, filename.encode('utf-8')),
      _int64_entry(ORIGINAL_HEIGHT, original_height),
      _int64_entry(ORIGINAL_WIDTH, original_width),
      _bytes_entry(SHA256, sha256.encode('ascii')),
      _int64_entry(LABEL, label)))


def holds(data: bytes, *, label: int, filename: str, sha256: str,
          original_height: int, original_width: int) -> bool:
  """Whether a serialized Example (encode_example's) has these values: it
  ends with exactly the entries encode_example writes after the image's
  (path, sizes, sha256, label, each with its key and length). A cheap and
  strict check: no value can be found inside another (a file name may
  hold any bytes but '/' and NUL, e.g. another label's entry)."""
  return data.endswith(_tail(
      label=label, filename=filename, sha256=sha256,
      original_height=original_height, original_width=original_width))


def _masked_crc32c(data: bytes) -> int:
  from google_crc32c import value  # pylint: disable=g-import-not-at-top
  crc = value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One TFRecord: u64 length, masked crc32c of it, data, masked crc32c.

  TFRecord files have no header, so framed records (and whole files of them)
  concatenate into a valid file; the build relies on that to join chunks.
  """
  length = struct.pack('<Q', len(data))
  return b''.join((length, struct.pack('<I', _masked_crc32c(length)), data,
                   struct.pack('<I', _masked_crc32c(data))))


def unframe_record(framed: bytes) -> bytes:
  """frame_record's data back; ValueError when the frame's length or
  either checksum is wrong (a damaged record)."""
  if len(framed) < 16:
    raise ValueError('a TFRecord frame is at least 16 bytes')
  length, data = framed[:8], framed[12:-4]
  if (struct.unpack('<Q', length)[0] != len(data) or
      struct.unpack('<I', framed[8:12])[0] != _masked_crc32c(length) or
      struct.unpack('<I', framed[-4:])[0] != _masked_crc32c(data)):
    raise ValueError('a TFRecord frame\'s length or checksum is wrong')
  return data


def read_records(f, *, max_record_bytes: int
                 ) -> Iterator[Optional[bytes]]:
  """The records of an open binary TFRecord file, without TensorFlow.

  The inverse of frame_record, for readers that only look (the build's
  report page): checksums are not checked. A record over max_record_bytes
  yields None and is skipped with a seek (never read); a file cut short,
  or a length no file can hold, ends the records.
  """
  while True:
    header = f.read(12)
    if len(header) < 12:
      return
    (length,) = struct.unpack('<Q', header[:8])
    if length > max_record_bytes:
      try:
        f.seek(length + 4, 1)
      except (OverflowError, OSError, ValueError):  # A damaged length.
        return
      yield None
      continue
    data = f.read(length + 4)
    if len(data) < length + 4:
      return
    yield data[:length]


def read_examples(shard_paths, *, max_record_bytes: int
                  ) -> Iterator[tuple[dict, int]]:
  """(decode_example of each record, the record's bytes) of the shards in
  order, without TensorFlow, for readers that only look (report.html,
  samples.png): ({}, its bytes) for a damaged record, ({}, 0) for one over
  max_record_bytes (skipped unread: read_records)."""
  from tfrecords_schema import files  # pylint: disable=g-import-not-at-top
  for shard in shard_paths:
    with files.open_binary(shard) as f:
      for record in read_records(f, max_record_bytes=max_record_bytes):
        try:
          example = decode_example(record) if record else {}
        except ValueError:
          example = {}  # Damaged: the reader goes on without it.
        yield example, len(record or b'')


def _varint_at(data: memoryview, pos: int) -> tuple[int, int]:
  """(value, position after it) of the protobuf varint at pos."""
  value = shift = 0
  while True:
    if pos >= len(data) or shift > 63:
      raise ValueError('a protobuf varint runs past its message')
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if byte < 0x80:
      return value, pos


def _wire_fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of each field of a protobuf message:
  an int for varints, a memoryview for length-delimited fields; fixed-width
  fields are skipped. ValueError for a damaged message."""
  pos = 0
  while pos < len(data):
    key, pos = _varint_at(data, pos)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _varint_at(data, pos)
      yield number, wire_type, value
    elif wire_type == 2:
      length, pos = _varint_at(data, pos)
      if pos + length > len(data):
        raise ValueError('a protobuf field runs past its message')
      yield number, wire_type, data[pos:pos + length]
      pos += length
    elif wire_type in (1, 5):
      pos += 8 if wire_type == 1 else 4
    else:
      raise ValueError(f'protobuf wire type {wire_type} is not in an Example')


def _signed(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _first_value(feature: memoryview) -> Optional[bytes | int]:
  """The first value of a Feature's bytes_list (1) or int64_list (3, packed
  or not); None for a float_list or an empty list."""
  for kind, _, values in _wire_fields(feature):
    for number, wire_type, value in _wire_fields(values):
      if number != 1:
        continue
      if kind == 1:
        return bytes(value)
      if kind == 3:
        return _signed(value if wire_type == 0 else _varint_at(value, 0)[0])
  return None


def decode_example(data: bytes) -> dict[str, bytes | int]:
  """A serialized tf.train.Example as {key: first value} without
  TensorFlow: bytes for bytes features, int for int64 ones (the inverse of
  encode_example; Examples written by TensorFlow read the same). ValueError
  for a damaged record."""
  out = {}
  for number, _, features in _wire_fields(memoryview(data)):
    if number != 1:
      continue
    for entry_number, _, entry in _wire_fields(features):
      if entry_number != 1:
        continue
      fields = {n: v for n, _, v in _wire_fields(entry)}
      key, feature = fields.get(1), fields.get(2)
      if key is not None and feature is not None:
        out[bytes(key).decode('utf-8')] = _first_value(feature)
  return out


def feature_spec() -> dict:
  """The `tf.io.parse_example` spec for one record (all keys required)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      IMAGE: tf.io.FixedLenFeature([], tf.string),
      LABEL: tf.io.FixedLenFeature([], tf.int64),
      FILENAME: tf.io.FixedLenFeature([], tf.string),
      SHA256: tf.io.FixedLenFeature([], tf.string),
      ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
      ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64),
  }


def parse_examples(serialized):
  """Parses serialized examples.

  Args:
    serialized: string tensor, scalar `[]` or a batch `[B]`.

  Returns:
    Dict keyed by this module's constants; each value has the shape of
    `serialized` (`[]` or `[B]`), `image` still encoded (tf.string).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.parse_example(serialized, feature_spec())


def decode_image(encoded, *, image_format: str, height: int, width: int,
                 channels: int):
  """Decodes one stored image.

  Args:
    encoded: scalar tf.string, the `image` feature.
    image_format: 'jpeg', 'png' or 'raw' (from the dataset metadata).
    height, width, channels: stored image shape (from the dataset metadata).

  Returns:
    uint8 tensor `[height, width, channels]`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if image_format == 'raw':
    image = tf.io.decode_raw(encoded, tf.uint8)
    return tf.reshape(image, [height, width, channels])
  if image_format == 'jpeg':
    # dct_method INTEGER_ACCURATE matches Pillow's default IDCT closely and
    # is deterministic across CPUs.
    image = tf.io.decode_jpeg(encoded, channels=channels,
                              dct_method='INTEGER_ACCURATE')
  elif image_format == 'png':
    image = tf.io.decode_png(encoded, channels=channels)
  else:
    raise ValueError(f'image_format={image_format!r} is not one of '
                     f'{IMAGE_FORMATS}.')
  return tf.ensure_shape(image, [height, width, channels])


# decode_stored: the Pillow format each stored format is, and the modes a
# decoder gives it (8 bits a channel; 16-bit and float modes are refused).
_STORED_FORMATS = {'jpeg': ('JPEG',), 'png': ('PNG',)}  # JPEG opens MPO too.
_EIGHT_BIT_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'CMYK', 'YCbCr')


def decode_stored(encoded: bytes, *, image_format: str, height: int,
                  width: int, channels: int):
  """decode_image without TensorFlow, for readers that only look (report.html,
  samples.png): the stored image as a Pillow 'RGB' (channels=3) or 'L' image.

  As strict as decode_image where it matters: raw bytes of exactly
  height * width * channels, a JPEG or PNG of that format only (Pillow opens
  nothing else) and of 8 bits a channel. Raises ValueError otherwise, and
  for bytes that do not decode to (height, width): a damaged record, which
  those readers leave out.
  """
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = 'L' if channels == 1 else 'RGB'
  if image_format == 'raw':  # uint8 HxWxC, as the build stores it.
    if len(encoded) != height * width * channels:
      raise ValueError(f'a raw stored image of {len(encoded)} bytes, not '
                       f'{height} x {width} x {channels}')
    return Image.frombytes(mode, (width, height), encoded)
  if image_format not in _STORED_FORMATS:
    raise ValueError(f'image_format={image_format!r} is not one of '
                     f'{IMAGE_FORMATS}.')
  try:
    with Image.open(io.BytesIO(encoded),
                    formats=_STORED_FORMATS[image_format]) as opened:
      if opened.size != (width, height):
        raise ValueError(f'a stored image of {opened.width}x{opened.height}, '
                         f'not {width}x{height}')
      if opened.mode not in _EIGHT_BIT_MODES:
        raise ValueError(f'a stored image of mode {opened.mode}, not 8 bits '
                         'a channel')
      opened.load()
      return opened.convert(mode)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Pillow's own kinds.
    raise ValueError(f'a stored image that does not decode '
                     f'({type(e).__name__}: {e})') from None


def tfds_features(*, class_names, height: int, width: int, channels: int,
                  image_format: str):
  """The TFDS view of a record, written to `features.json` by the builder.

  Loading the output with `tfds.builder_from_directory` relies on these
  connectors parsing exactly the bytes `encode_example` writes.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shape = (height, width, channels)
  if image_format == 'raw':
    image = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                 encoding=tfds.features.Encoding.BYTES)
  else:
    image = tfds.features.Image(shape=shape, encoding_format=image_format)
  return tfds.features.FeaturesDict({
      IMAGE: image,
      LABEL: tfds.features.ClassLabel(names=list(class_names)),
      FILENAME: tfds.features.Text(),
      SHA256: tfds.features.Text(),
      ORIGINAL_HEIGHT: tfds.features.Scalar(dtype=np.int64),
      ORIGINAL_WIDTH: tfds.features.Scalar(dtype=np.int64),
  })


def shard_filename(dataset_name: str, split: str, index: int,
                   num_shards: int) -> str:
  """TFDS' default shard name: `{name}-{split}.tfrecord-00000-of-00004`."""
  return (f'{dataset_name}-{split}.{RECORD_SUFFIX}-'
          f'{index:05d}-of-{num_shards:05d}')

