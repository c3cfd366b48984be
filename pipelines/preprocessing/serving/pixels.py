"""Decoded pixels -> the stored channels, exactly as Pillow converts them.
"""

from __future__ import annotations

import tensorflow as tf


def composite_on_white(color: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
  """uint8 color over a white background, exactly Pillow's alpha_composite.

  (c * a + 255 * (255 - a) + 128) / 255 with Pillow's rounding, in uint16
  (every intermediate fits): 2 bytes a value, never a float copy.
  """
  c = tf.cast(color, tf.uint16)
  a = tf.cast(alpha, tf.uint16)
  y = c * a + tf.constant(255, tf.uint16) * (tf.constant(255, tf.uint16) - a)
  y = y + tf.constant(128, tf.uint16)
  return tf.cast(tf.bitwise.right_shift(
      y + tf.bitwise.right_shift(y, tf.constant(8, tf.uint16)),
      tf.constant(8, tf.uint16)), tf.uint8)


def luma(rgb: tf.Tensor) -> tf.Tensor:
  """uint8 RGB -> L like Pillow's convert('L') (ITU-R 601-2, its rounding)."""
  c = tf.cast(rgb, tf.int32)
  y = c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(y, 16), tf.uint8)[..., None]


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [h, w, 1|2|3|4] -> [h, w, channels]; alpha composited on white."""
  def gray():
    return image[..., :1] if channels == 1 else tf.tile(image[..., :1],
                                                          [1, 1, 3])

  def gray_alpha():
    g = composite_on_white(image[..., :1], image[..., 1:2])
    return g if channels == 1 else tf.tile(g, [1, 1, 3])

  def rgb():
    return luma(image[..., :3]) if channels == 1 else image[..., :3]

  def rgba():
    composited = composite_on_white(image[..., :3], image[..., 3:4])
    return luma(composited) if channels == 1 else composited

  branches = [gray, gray_alpha, rgb, rgba]
  if image.shape[-1] is not None:  # Known when tracing (JPEG: 3).
    out = branches[image.shape[-1] - 1]()
  else:
    out = tf.switch_case(tf.clip_by_value(tf.shape(image)[-1] - 1, 0, 3),
                         branches)
  out.set_shape([None, None, channels])
  return out
