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
