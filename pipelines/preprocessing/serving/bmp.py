"""BMP: signed size, supported layouts, rows cut short or long, decode (TF ops).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.serving.byte_reads import i64
from pipelines.preprocessing.serving.byte_reads import substr
from pipelines.preprocessing.serving.pixels import to_channels
from pipelines.preprocessing.serving.source import Source
from pipelines.preprocessing.serving.source import decode_or_empty
from pipelines.preprocessing.serving.source import in_order


def _signed32(value) -> tf.Tensor:
  """An unsigned 32-bit field read as the signed int it holds."""
  return tf.where(value >= 2**31, value - 2**32, value)


def decode(src: Source):
  """BMP: signed size from the info header, rows checked, decode."""
  r = src.r
  offset, header = r.uint(10, 4, True), r.uint(14, 4, True)
  # Signed: a negative height is a top-down BMP (Pillow reads it), a
  # negative width is corrupt.
  width, height = _signed32(r.uint(18, 4, True)), _signed32(
      r.uint(22, 4, True))
  rows = tf.abs(height)
  bpp, compression = r.uint(28, 2, True), r.uint(30, 4, True)
  colors = r.uint(46, 4, True)
  # 8-bit: only a 256-grey palette reads right in TF (it ignores palettes).
  palette = r.bytes(14 + header + 4 * tf.range(256, dtype=tf.int64), 3)
  grey_palette = tf.logical_and(
      tf.logical_or(tf.equal(colors, 0), tf.equal(colors, 256)),
      tf.reduce_all(tf.equal(palette,
                             tf.range(256, dtype=tf.int64)[:, None])))
  supported = tf.logical_and(tf.logical_and(header >= 40, tf.equal(
      compression, 0)), tf.logical_or(
          tf.logical_or(tf.equal(bpp, 24), tf.equal(bpp, 32)),
          tf.logical_and(tf.equal(bpp, 8), grey_palette)))
  # Rows are padded to 4 bytes; Pillow needs all but the last row's
  # padding, TensorFlow exactly the rows (so the data is cut or padded).
  stride = (width * bpp + 31) // 32 * 4
  needed = offset + stride * (rows - 1) + (width * bpp + 7) // 8
  exact = offset + stride * rows
  checked = in_order(
      lambda: src.fail_unless(
          supported, 'BMP with ', bpp, ' bits per pixel, compression ',
          compression, ' and a ', header, '-byte header is not supported '
          'by the serving endpoint (only uncompressed 24/32-bit, or 8-bit '
          'grey); convert it to PNG or JPEG'),
      lambda: src.fail_unless(
          tf.logical_and(width > 0, rows > 0), 'BMP header gives an '
          'invalid size ', width, 'x', height, ' (corrupt or truncated '
          'file)'),
      lambda: tf.group(src.size_checks('BMP', width, rows)),
      lambda: src.fail_unless(
          r.n >= needed, 'BMP pixel data is cut short (truncated file): ',
          r.n, ' bytes, the header needs ', needed))
  with tf.control_dependencies([checked]):
    data = tf.strings.join([substr(src.data, 0, exact), tf.strings.
                            reduce_join(tf.fill([tf.maximum(
                                exact - r.n, 0)], b'\0'))])
  image = src.refuse_empty(decode_or_empty(
      lambda d: tf.io.decode_bmp(d, channels=0), data),
                             'corrupt BMP data (the decoder cannot read it)')
  # 32-bit BMPs are read as RGB by Pillow (the 4th byte is padding).
  image = tf.cond(tf.equal(tf.shape(image)[-1], 4),
                  lambda: image[..., :3], lambda: image)
  return to_channels(image, src.channels), i64(1)
