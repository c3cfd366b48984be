"""GIF: first frame, its transparency onto white, on Pillow's canvas (TF ops).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.serving.byte_reads import Bytes
from pipelines.preprocessing.serving.byte_reads import MAX_HEADER_STEPS
from pipelines.preprocessing.serving.byte_reads import byte_string
from pipelines.preprocessing.serving.byte_reads import i64
from pipelines.preprocessing.serving.byte_reads import splice
from pipelines.preprocessing.serving.byte_reads import substr
from pipelines.preprocessing.serving.byte_reads import walk
from pipelines.preprocessing.serving.pixels import to_channels
from pipelines.preprocessing.serving.source import Source
from pipelines.preprocessing.serving.source import decode_or_empty


_WINDOW = 1 << 16  # Bytes of a GIF sub-block chain followed at once.


def _skip_sub_blocks(r: Bytes, pos) -> tf.Tensor:
  """Position after the empty sub-block ending the GIF chain at pos (> n if
  the data ends first).

  A few sub-blocks are followed one by one; long chains (image data) 64 KiB
  at a time by pointer doubling, so the time is linear in the bytes however
  small the sub-blocks are.
  """
  def short_cond(p, k):
    return tf.logical_and(k < 16, tf.logical_and(p < r.n, r.at(p) > 0))

  pos, _ = tf.while_loop(short_cond, lambda p, k: (p + 1 + r.at(p), k + 1),
                         (tf.cast(pos, tf.int64), tf.constant(0)))

  def window(p):
    index = p + tf.range(_WINDOW, dtype=tf.int64)
    sizes = tf.where(index < r.n, tf.cast(tf.gather(
        r.b, tf.clip_by_value(index, 0, r.n - 1)), tf.int32), 0)
    local = tf.range(_WINDOW, dtype=tf.int32)
    # Each sub-block points at the next; an empty one (or past the data) and
    # every position past the window point at themselves.
    jump = tf.concat([tf.where(tf.equal(sizes, 0), local, local + 1 + sizes),
                      tf.range(_WINDOW, _WINDOW + 256, dtype=tf.int32)], 0)
    for _ in range(_WINDOW.bit_length()):  # 2^17 steps >= _WINDOW / 2.
      jump = tf.gather(jump, jump)
    return [p + tf.cast(jump[0], tf.int64)]

  pos = tf.while_loop(lambda p: tf.logical_and(p < r.n, r.at(p) > 0), window,
                      [pos])[0]
  return pos + 1


def decode(src: Source):
  """First frame only, its transparency onto white, on Pillow's canvas.

  TF's GIF decoder decodes every frame, paints transparency black and
  sizes the output by the largest frame, so the bytes are cut after the
  first frame (which also bounds the decoder's memory), its transparent
  colour is made white and opaque, and the frame is placed on Pillow's
  canvas (screen size, grown to fit the frame).
  """
  r = src.r
  screen_w, screen_h = r.uint(6, 2, True), r.uint(8, 2, True)
  flags = r.u8(10)
  has_gct = flags >= 128
  gct_size = tf.where(has_gct, 3 * tf.bitwise.left_shift(
      i64(2), flags % 8), i64(0))

  # Blocks up to the first image, one block start or extension sub-block
  # a step (at most MAX_HEADER_STEPS); a graphic control extension gives
  # the transparent colour (Pillow: the last one before the image).
  def cond(pos, in_chain, image, gce, transparent):
    return tf.logical_and(image < 0, pos < r.n)

  def body(pos, in_chain, image, gce, transparent):
    value = r.at(pos)
    is_ext = tf.logical_and(tf.logical_not(in_chain), tf.equal(value, 0x21))
    is_image = tf.logical_and(tf.logical_not(in_chain),
                              tf.equal(value, 0x2C))
    is_gce = tf.logical_and(is_ext, tf.logical_and(
        tf.equal(r.at(pos + 1), 0xF9), tf.equal(r.at(pos + 2), 4)))
    transparency = tf.logical_and(is_gce, r.at(pos + 3) % 2 == 1)
    nxt = tf.where(in_chain, pos + 1 + value,
                   tf.where(is_ext, pos + 2, r.n))  # Else: the walk ends.
    return (nxt, tf.logical_or(is_ext, tf.logical_and(in_chain, value > 0)),
            tf.where(is_image, pos, image),
            tf.where(tf.logical_and(is_gce, gce < 0), pos + 3, gce),
            tf.where(transparency, r.at(pos + 6), transparent))

  _, _, image_pos, gce, transparent = walk(
      cond, body, (13 + gct_size, tf.constant(False), i64(-1), i64(-1),
                   i64(-1)))
  left, top = r.uint(image_pos + 1, 2, True), r.uint(image_pos + 3, 2, True)
  frame_w = r.uint(image_pos + 5, 2, True)
  frame_h = r.uint(image_pos + 7, 2, True)
  frame_flags = r.u8(image_pos + 9)
  has_lct = frame_flags >= 128
  lct_size = tf.where(has_lct, 3 * tf.bitwise.left_shift(
      i64(2), frame_flags % 8), i64(0))
  palette = tf.where(has_lct, image_pos + 10,
                     tf.where(has_gct, i64(13), i64(-1)))
  palette_size = tf.where(has_lct, lct_size, gct_size)
  end = _skip_sub_blocks(r, image_pos + 10 + lct_size + 1)
  canvas_w = tf.maximum(screen_w, left + frame_w)
  canvas_h = tf.maximum(screen_h, top + frame_h)
  checks = [src.fail_unless(
      tf.logical_and(image_pos >= 0, end <= r.n),
      'GIF has no complete image within its first ', MAX_HEADER_STEPS,
      ' blocks (corrupt or truncated file)')]
  checks += src.size_checks('GIF', canvas_w, canvas_h)
  checks += src.size_checks('GIF frame', frame_w, frame_h)

  with tf.control_dependencies(checks):
    data = tf.strings.join([substr(src.data, 0, end), b';'])
  data = splice(data, image_pos + 1, b'\0\0\0\0', 4)  # Frame at 0, 0.
  keyed = tf.logical_and(transparent >= 0, gce >= 0)
  data = tf.where(keyed, splice(data, gce, byte_string(
      r.u8(gce) // 2 * 2), 1), data)
  whiten = tf.logical_and(tf.logical_and(transparent >= 0, palette >= 0),
                          3 * transparent + 3 <= palette_size)
  data = tf.where(whiten, splice(data, palette + 3 * transparent,
                                 b'\xff\xff\xff', 3), data)
  frame = src.refuse_empty(decode_or_empty(
      lambda d: tf.io.decode_gif(d)[0], data), 'corrupt GIF data (the '
                             'decoder cannot read it)')

  # Pillow's canvas outside the frame: the transparent colour (white once
  # composited), else palette entry 0.
  fill = tf.where(transparent >= 0, tf.constant([255, 255, 255], tf.int64),
                  r.bytes(palette, 3))

  def place():
    shape = tf.cast(tf.stack([canvas_h, canvas_w]), tf.int32)
    offset = tf.cast(tf.stack([top, left]), tf.int32)
    placed = tf.image.pad_to_bounding_box(frame, offset[0], offset[1],
                                          shape[0], shape[1])
    inside = tf.image.pad_to_bounding_box(
        tf.ones_like(frame[..., :1]), offset[0], offset[1], shape[0],
        shape[1])
    return tf.where(inside > 0, placed, tf.cast(fill, tf.uint8))

  whole = tf.logical_and(tf.logical_and(tf.equal(left, 0), tf.equal(top, 0)),
                         tf.logical_and(tf.equal(frame_w, canvas_w),
                                        tf.equal(frame_h, canvas_h)))
  image = tf.cond(whole, lambda: frame, place)
  return to_channels(image, src.channels), i64(1)
