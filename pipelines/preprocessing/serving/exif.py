"""EXIF orientation in TF ops: read tag 0x0112 from a TIFF block, undo it.

Where the TIFF block is depends on the format (jpeg, png, webp find it);
the tag and what undoes each orientation are image_formats', shared with
the build (source_image).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing import image_formats
from pipelines.preprocessing.serving.byte_reads import Bytes
from pipelines.preprocessing.serving.byte_reads import i64


def tiff_orientation(r: Bytes, start, end) -> tf.Tensor:
  """Tag 0x0112 of IFD0 of the TIFF structure in [start, end), else 0.

  Like Pillow: the header must be II*\\0 or MM\\0*, the entries that fit in
  the block are read, a tag with count 1 of type BYTE/SHORT/LONG is used.
  """
  little = r.equals(start, b'II*\x00')
  valid = tf.logical_and(
      start >= 0, tf.logical_or(little, r.equals(start, b'MM\x00*')))
  valid = tf.logical_and(valid, start + 8 <= end)
  ifd = start + r.uint(start + 4, 4, little)
  valid = tf.logical_and(valid, ifd + 2 <= end)
  count = tf.where(valid, r.uint(ifd, 2, little), i64(0))
  count = tf.maximum(tf.minimum(count, (end - ifd - 2) // 12), 0)
  entries = ifd + 2 + 12 * tf.range(count, dtype=tf.int64)
  tags = r.uint(entries, 2, little)
  types = r.uint(entries + 2, 2, little)
  counts = r.uint(entries + 4, 4, little)
  value = tf.where(tf.equal(types, 1), r.u8(entries + 8),
                   tf.where(tf.equal(types, 3), r.uint(entries + 8, 2, little),
                            r.uint(entries + 8, 4, little)))
  match = tf.logical_and(
      tf.equal(tags, image_formats.EXIF_ORIENTATION_TAG), tf.equal(counts, 1))
  known_type = tf.reduce_any(tf.equal(types[:, None], tf.constant(
      [1, 3, 4], tf.int64)), axis=1)  # BYTE, SHORT, LONG.
  match = tf.logical_and(match, known_type)
  # Pillow keeps the last of duplicated tags.
  values = tf.boolean_mask(value, match)
  return tf.cond(tf.size(values) > 0, lambda: values[-1], lambda: i64(0))


def _undo(image: tf.Tensor, orientation: image_formats.Orientation):
  if orientation.swap_axes:
    image = tf.transpose(image, [1, 0, 2])
  if orientation.reverse:
    image = tf.reverse(image, list(orientation.reverse))
  return image


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """Applies EXIF orientation 2..8 like PIL.ImageOps.exif_transpose (the
  table of image_formats.ORIENTATIONS; any other value: as is)."""
  branches = [lambda: image] + [
      lambda o=o: _undo(image, image_formats.ORIENTATIONS[o])
      for o in range(2, 9)]
  index = tf.where(tf.logical_and(orientation >= 2, orientation <= 8),
                   orientation - 1, i64(0))
  return tf.switch_case(tf.cast(index, tf.int32), branches)
