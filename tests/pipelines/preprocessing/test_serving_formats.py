"""The tables the build and serving share (image_formats) read alike."""

import numpy as np
from PIL import Image
import tensorflow as tf

from pipelines.preprocessing import image_formats
from pipelines.preprocessing.serving import exif


def test_each_orientation_is_undone_alike_by_pillow_and_tensorflow():
  array = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
  for value in range(0, 10):
    entry = image_formats.ORIENTATIONS.get(value)
    want = array if entry is None else np.asarray(
        Image.fromarray(array).transpose(entry.pillow))
    got = exif.orient(tf.constant(array), tf.constant(value, tf.int64))
    np.testing.assert_array_equal(got.numpy(), want, err_msg=str(value))


def test_signatures_name_every_format_once_in_order():
  assert image_formats.FORMATS == ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
  assert image_formats.sniff(b'RIFF\0\0\0\0WEBPVP8 ') == 'WEBP'
  assert image_formats.sniff(b'RIFF\0\0\0\0WAVE') is None
  assert image_formats.sniff(b'GIF87a') == 'GIF'
  assert image_formats.sniff(b'') is None


def test_first_true_is_total_on_an_empty_mask():
  # The readers' "first such" index: ArgMax failed on an empty mask ("Reduction
  # axis 0 is empty"), which, when a reader the dispatch did not pick ran on
  # a request's bytes, hid the real error behind one naming no input.
  from pipelines.preprocessing.serving import byte_reads  # pylint: disable=g-import-not-at-top
  first = lambda bits: int(byte_reads.first_true(tf.constant(bits, tf.bool)))
  assert first([]) == 0 and first([False, False]) == 2
  assert first([False, True, True]) == 1


def test_jpeg_markers_are_total_on_a_file_cut_anywhere():
  # The JPEG reader's header walk runs outside the checks' tf.conds: an op
  # of it that failed on a cut file (a slice of no scan, a substr or gather
  # past the end) raced the check that names the input and sometimes won,
  # so `serve` said "slice index 0 of dimension 0 out of bounds" (or raised
  # UnicodeDecodeError: substr's message quotes the raw bytes) instead of
  # `image_bytes[i]: corrupt JPEG header`. Run alone here, it must not fail.
  import io  # pylint: disable=g-import-not-at-top
  from pipelines.preprocessing.serving import byte_reads  # pylint: disable=g-import-not-at-top
  from pipelines.preprocessing.serving import jpeg  # pylint: disable=g-import-not-at-top

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def walk(data):
    markers = jpeg._JpegMarkers(byte_reads.Bytes(data), data)  # pylint: disable=protected-access
    return (markers.problem, markers.scans, markers.one_scan,
            markers.table_edits[2], markers.mcu_grid())

  pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  for options, step in (({}, 1), ({'progressive': True}, 7)):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', **options)
    data = buffer.getvalue()
    for size in range(0, len(data), step):
      walk(tf.constant(data[:size]))
