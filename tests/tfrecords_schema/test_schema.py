"""The record format: encode -> shards -> parse/decode round trip, metadata."""

import io
import json
import os
import subprocess
import sys

from google.protobuf.internal import encoder as protobuf_encoder
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.preprocessing import source_image
from tests import helpers
import tfrecords_schema
from tfrecords_schema import metadata
from tfrecords_schema import schema


@pytest.mark.parametrize('image_format', ['jpeg', 'png', 'raw'])
def test_round_trip_through_shards(tmp_path, image_format):
  photo = helpers.photo('chelsea')
  options = source_image.ImageOptions(height=30, width=40,
                                   image_format=image_format, jpeg_quality=95)
  expected, paths = [], []
  for shard in range(2):
    path = str(tmp_path / f'x.tfrecord-{shard}')
    paths.append(path)
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(3):
        crop = photo[i * 10:, shard * 20:]
        processed = source_image.process(helpers.jpeg_bytes(crop),
                                      extension='.jpg', options=options)
        writer.write(schema.encode_example(
            image=processed.encoded, label=shard, filename=f'c/{shard}_{i}.jpg',
            sha256='ab' * 32, original_height=crop.shape[0],
            original_width=crop.shape[1]))
        expected.append((shard, f'c/{shard}_{i}.jpg', crop.shape[:2]))
  batch = next(iter(tf.data.TFRecordDataset(paths).batch(6)))
  parsed = schema.parse_examples(batch)
  assert parsed[schema.LABEL].numpy().tolist() == [e[0] for e in expected]
  assert [f.decode() for f in parsed[schema.FILENAME].numpy()] == [
      e[1] for e in expected]
  assert parsed[schema.ORIGINAL_HEIGHT].numpy().tolist() == [
      e[2][0] for e in expected]
  image = schema.decode_image(parsed[schema.IMAGE][0], image_format=image_format,
                              height=30, width=40, channels=3)
  assert image.shape == (30, 40, 3) and image.dtype == tf.uint8
  reference = np.asarray(source_image.resize(
      source_image.to_8bit(Image.fromarray(photo),
                        channels=3), height=30, width=40, mode='stretch'))
  tolerance = 0 if image_format != 'jpeg' else 8
  assert np.abs(image.numpy().astype(int) - reference.astype(int)).mean() <= (
      tolerance + 3)  # The JPEG draft decode differs slightly from full decode.


_ENCODE_SCRIPT = '''
import sys
from tfrecords_schema import schema
sys.stdout.buffer.write(schema.encode_example(
    image=b'\\x00\\x01', label=1, filename='dogs/a.jpg', sha256='cd' * 32,
    original_height=3, original_width=4).hex().encode())
'''


def test_serialization_is_byte_identical_across_processes():
  outputs = set()
  for seed in ('0', '1', '12345'):
    out = subprocess.run(
        [sys.executable, '-c', _ENCODE_SCRIPT], capture_output=True,
        cwd=helpers.REPO_ROOT, check=True, env={
            **os.environ, 'PYTHONHASHSEED': seed}).stdout
    outputs.add(out)
  assert len(outputs) == 1


def test_read_dataset_spec_errors(tmp_path):
  with pytest.raises(metadata.DatasetError, match='does not exist'):
    tfrecords_schema.read_dataset_spec(str(tmp_path / 'missing'))
  with pytest.raises(metadata.DatasetError, match='not a dataset built by'):
    tfrecords_schema.read_dataset_spec(str(tmp_path))
  (tmp_path / metadata.METADATA_FILE).write_text(json.dumps(
      {'toolkit': metadata.TOOLKIT_MARKER, 'schema_version': 999}))
  with pytest.raises(metadata.DatasetError, match='schema_version=999'):
    tfrecords_schema.read_dataset_spec(str(tmp_path))


def test_spec_json_round_trip():
  spec = metadata.DatasetSpec(
      name='d', class_names=('a', 'b'), height=2, width=3, channels=1,
      image_format='png', resize_mode='pad', mean=(1.0,), std=(2.0,),
      splits={'train': metadata.SplitSpec('train', ('d-train.tfrecord-0',), (5,),
                                          100, (2, 3))})
  again = metadata.DatasetSpec.from_json_dict(
      json.loads(json.dumps(spec.to_json_dict())))
  assert again == spec
  assert again.splits['train'].num_examples == 5
  with pytest.raises(metadata.DatasetError, match="split='test'"):
    again.shard_paths('/x', 'test')


@pytest.mark.parametrize('label,height,filename', [
    (0, 1, 'a.jpg'), (1, 300, 'cats/ü 1.png'), (2**40, 2**31, 'x' * 300),
    (-1, 0, '')])
def test_encoding_parses_to_the_example_tensorflow_builds(
    label, height, filename):
  image = os.urandom(200) + bytes(range(256)) * 3
  ours = schema.encode_example(image=image, label=label, filename=filename,
                               sha256='ef' * 32, original_height=height,
                               original_width=7)

  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  reference = tf.train.Example(features=tf.train.Features(feature={
      schema.IMAGE: feature(image), schema.LABEL: feature(label),
      schema.FILENAME: feature(filename.encode()),
      schema.SHA256: feature(('ef' * 32).encode()),
      schema.ORIGINAL_HEIGHT: feature(height),
      schema.ORIGINAL_WIDTH: feature(7)}))
  assert tf.train.Example.FromString(ours) == reference
  # Byte for byte: protobuf's own encoding of every map entry, in sorted key
  # order (protobuf's map order depends on the runtime, so it is not used).
  features = reference.features.feature
  entries = b''.join(
      tf.train.Features(feature={key: features[key]}).SerializeToString()
      for key in sorted(features))
  assert ours == b'\x0a' + protobuf_encoder._VarintBytes(len(entries)) + (  # pylint: disable=protected-access
      entries)
  # TensorFlow's parser reads ours as it reads protobuf's serialization.
  parsed = schema.parse_examples(tf.constant(
      [ours, reference.SerializeToString()]))
  values = {schema.IMAGE: image, schema.LABEL: label,
            schema.FILENAME: filename.encode(),
            schema.SHA256: ('ef' * 32).encode(),
            schema.ORIGINAL_HEIGHT: height, schema.ORIGINAL_WIDTH: 7}
  for key, value in values.items():
    assert parsed[key].numpy().tolist() == [value, value], key
  # The reader without TensorFlow (the report page's) reads both the same.
  assert schema.decode_example(ours) == values
  assert schema.decode_example(reference.SerializeToString()) == values


def test_framed_records_equal_tfrecordwriter_output(tmp_path):
  records = [b'', b'x', os.urandom(70000)]
  with tf.io.TFRecordWriter(str(tmp_path / 'tf.tfrecord')) as writer:
    for r in records:
      writer.write(r)
  ours = b''.join(schema.frame_record(r) for r in records)
  assert ours == (tmp_path / 'tf.tfrecord').read_bytes()
  # Concatenated files are one valid file (how chunks become shards).
  (tmp_path / 'joined').write_bytes(ours + ours)
  read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / 'joined'))]
  assert read == records + records
  # The reader without TensorFlow: the same records; one over its limit is
  # skipped (None), a file cut short ends the records.
  with open(tmp_path / 'joined', 'rb') as f:
    assert list(schema.read_records(f, max_record_bytes=1 << 20)) == (
        records + records)
  with open(tmp_path / 'joined', 'rb') as f:
    assert list(schema.read_records(f, max_record_bytes=10)) == [
        b'', b'x', None] * 2
  with io.BytesIO(ours[:-1]) as f:
    assert list(schema.read_records(f, max_record_bytes=1 << 20)) == [
        b'', b'x']


@pytest.mark.parametrize('label', [0, 1, 127, 128, 2**40])
@pytest.mark.parametrize('filename', ['', 'a/b.jpg', 'ä/' + 'x' * 200,
                                      'c/\n\x0e\n\x05label\x12\x05.png'])
def test_holds_is_exact_on_what_encode_example_writes(label, filename):
  """holds accepts the values a record was written with and nothing else,
  whatever bytes the name holds; the Example is the one TensorFlow reads."""
  values = dict(label=label, filename=filename, sha256='ab' * 32,
                original_height=128, original_width=5)
  data = schema.encode_example(image=b'\n\x05label' * 9, **values)
  example = tf.train.Example.FromString(data).features.feature
  assert example[schema.FILENAME].bytes_list.value == [filename.encode()]
  assert example[schema.LABEL].int64_list.value == [label]
  assert schema.holds(data, **values)
  for key, other in (('label', label + 1), ('filename', filename + 'x'),
                     ('filename', 'z' + filename), ('sha256', 'ab' * 31),
                     ('original_height', 127), ('original_width', 6)):
    assert not schema.holds(data, **{**values, key: other}), key


def _encoded(image: Image.Image, image_format: str) -> bytes:
  return source_image.encode(image, image_format=image_format)


@pytest.mark.parametrize('image_format', ['jpeg', 'png', 'raw'])
@pytest.mark.parametrize('channels', [1, 3])
def test_decode_stored_is_decode_image_without_tensorflow(image_format,
                                                          channels):
  """The Pillow decode report.html and samples.png use gives TensorFlow's
  pixels on what the build stores, and refuses what TensorFlow refuses:
  raw bytes of another length, another format under the stored one's name,
  16-bit pixels, another size."""
  photo = Image.fromarray(helpers.photo('chelsea')).resize((40, 30))
  image = photo.convert('L' if channels == 1 else 'RGB')
  encoded = _encoded(image, image_format)
  shape = dict(image_format=image_format, height=30, width=40,
               channels=channels)
  got = np.asarray(schema.decode_stored(encoded, **shape)).reshape(
      30, 40, channels)
  want = schema.decode_image(tf.constant(encoded), **shape).numpy()
  assert np.abs(got.astype(int) - want).max() <= 1
  other = {'jpeg': _encoded(image, 'png'), 'png': _encoded(image, 'jpeg'),
           'raw': encoded + b'\0'}[image_format]
  for bad, shape_bad in ((other, shape), (encoded, {**shape, 'width': 41}),
                         (encoded[:len(encoded) // 2], shape)):
    with pytest.raises(ValueError):
      schema.decode_stored(bad, **shape_bad)
  if image_format == 'png':
    wide = Image.fromarray(np.asarray(image.convert('L'), np.uint16) * 257)
    buffer = io.BytesIO()
    wide.save(buffer, format='PNG')
    with pytest.raises(ValueError, match='8 bits'):
      schema.decode_stored(buffer.getvalue(), **shape)


@pytest.mark.parametrize('length', [2**62, 2**63 + 5, 2**64 - 1])
def test_read_records_ends_at_a_length_no_file_holds(tmp_path, length):
  """A damaged length field ends the records (report.html and samples.png
  go on with what came before) instead of raising from the seek."""
  import struct  # pylint: disable=g-import-not-at-top
  record = schema.frame_record(b'hello')
  path = tmp_path / 'damaged.tfrecord'
  path.write_bytes(record + struct.pack('<Q', length) + b'\0' * 40 + record)
  with open(path, 'rb') as f:
    got = [r for r in schema.read_records(f, max_record_bytes=100) if r]
  assert got == [b'hello']
