"""WebP: size from VP8/VP8L/VP8X, EXIF, first frame, decode (TF ops).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.serving.byte_reads import Bytes
from pipelines.preprocessing.serving.byte_reads import byte_string
from pipelines.preprocessing.serving.byte_reads import fourcc
from pipelines.preprocessing.serving.byte_reads import i64
from pipelines.preprocessing.serving.byte_reads import splice
from pipelines.preprocessing.serving.byte_reads import walk
from pipelines.preprocessing.serving.exif import tiff_orientation
from pipelines.preprocessing.serving.pixels import to_channels
from pipelines.preprocessing.serving.source import Source
from pipelines.preprocessing.serving.source import decode_or_empty


def _webp_exif(r: Bytes):
  """(start, end) of the TIFF block of the first EXIF chunk, or -1."""
  exif_type = fourcc(b'EXIF')

  def cond(pos, start, end):
    return tf.logical_and(start < 0, pos + 8 <= r.n)

  def body(pos, start, end):
    kind = r.uint(pos, 4, False)
    size = r.uint(pos + 4, 4, True)
    found = tf.equal(kind, exif_type)
    # Pillow strips an 'Exif\0\0' prefix some writers put in the chunk.
    skip = tf.where(r.equals(pos + 8, b'Exif\x00\x00'), i64(6), i64(0))
    return (pos + 8 + size + size % 2,
            tf.where(found, pos + 8 + skip, start),
            tf.where(found, tf.minimum(pos + 8 + size, r.n), end))

  _, start, end = walk(cond, body, (i64(12), i64(-1), i64(-1)))
  return start, end


def _decode_still(data) -> tf.Tensor:
  """uint8 [h, w, C]: the (first) frame of an image TF's decode_image reads."""
  image = tf.io.decode_image(data, channels=0, expand_animations=False)
  image.set_shape([None, None, None])
  return image


def decode(src: Source):
  """WebP: VP8/VP8L/VP8X size, EXIF, the first frame of an animation."""
  r = src.r
  vp8x, vp8, vp8l = (r.equals(12, b'VP8X'), r.equals(12, b'VP8 '),
                     r.equals(12, b'VP8L'))
  bits = r.uint(21, 4, True)
  width = tf.where(vp8x, r.uint(24, 3, True) + 1, tf.where(
      vp8, r.uint(26, 2, True) % 16384, (bits % 16384) + 1))
  height = tf.where(vp8x, r.uint(27, 3, True) + 1, tf.where(
      vp8, r.uint(28, 2, True) % 16384, (bits // 16384) % 16384 + 1))
  known = tf.logical_or(tf.logical_or(vp8x, tf.logical_and(
      vp8, r.equals(23, b'\x9d\x01\x2a'))), tf.logical_and(
          vp8l, tf.equal(r.u8(20), 0x2F)))
  checks = [src.fail_unless(
      known, 'WebP has no VP8/VP8L/VP8X header (corrupt file)')]
  checks += src.size_checks('WebP', width, height)
  flags = r.u8(20)
  start, end = tf.cond(vp8x, lambda: _webp_exif(r),
                       lambda: (i64(-1), i64(-1)))
  orientation = tiff_orientation(r, start, end)
  animated = tf.logical_and(vp8x, tf.equal(flags // 2 % 2, 1))
  opaque = tf.logical_and(vp8x, tf.equal(flags // 16 % 2, 0))
  with tf.control_dependencies(checks):
    # TF decodes an animation's first frame as RGBA but sizes its output
    # buffer by the alpha flag: without the flag it writes past the buffer
    # (heap corruption, TF 2.21). So an animation always gets the flag.
    data = tf.where(tf.logical_and(animated, opaque), splice(
        src.data, 20, byte_string(flags + 16), 1), src.data)
  image = src.refuse_empty(decode_or_empty(_decode_still, data),
                             'corrupt WebP data (the decoder cannot read '
                             'it)')
  # An animation without the alpha flag is RGB to Pillow (RGBX).
  image = tf.cond(tf.logical_and(opaque, tf.equal(tf.shape(image)[-1], 4)),
                  lambda: image[..., :3], lambda: image)
  return to_channels(image, src.channels), orientation
