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

import struct

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
  features = {
      IMAGE: _bytes_feature(image),
      LABEL: _int64_feature(label),
      FILENAME: _bytes_feature(filename.encode('utf-8')),
      SHA256: _bytes_feature(sha256.encode('ascii')),
      ORIGINAL_HEIGHT: _int64_feature(original_height),
      ORIGINAL_WIDTH: _int64_feature(original_width),
  }
  entries = [piece for key in sorted(features) for piece in _field(
      0x0A, *_field(0x0A, key.encode()), *_field(0x12, *features[key]))]
  # Example.features = Features{feature: map}; the one copy of the image.
  return b''.join(_field(0x0A, *entries))


def _masked_crc32c(data: bytes) -> int:
  import google_crc32c  # pylint: disable=g-import-not-at-top
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One TFRecord: u64 length, masked crc32c of it, data, masked crc32c.

  TFRecord files have no header, so framed records (and whole files of them)
  concatenate into a valid file; the build relies on that to join chunks.
  """
  length = struct.pack('<Q', len(data))
  return b''.join((length, struct.pack('<I', _masked_crc32c(length)), data,
                   struct.pack('<I', _masked_crc32c(data))))


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

