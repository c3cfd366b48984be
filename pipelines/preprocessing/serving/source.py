"""One input being read: its bytes, its index's error prefix, its limits.

Every format's reader gets a Source and returns (uint8 [h, w, channels],
EXIF orientation int64); every refusal goes through fail_unless, so it
is an InvalidArgumentError that starts `image_bytes[i]: `.
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.model_input import ModelInput
from pipelines.preprocessing.serving.byte_reads import Bytes


def decode_or_empty(decode, data) -> tf.Tensor:
  """decode(data), or an empty tensor of its dtype where the decoder fails.

  A TensorFlow decoder's own error names no input of the request, and a
  graph cannot catch it. So the decode runs as a one-element tf.data
  pipeline that drops failed elements (ignore_errors): a refusal becomes an
  empty result, which the caller turns into an error that names the input.
  """
  decoded = tf.data.Dataset.from_tensors(data).map(
      tf.autograph.experimental.do_not_convert(decode)).ignore_errors()
  spec = decoded.element_spec
  empty = tf.zeros([0] + [d or 0 for d in spec.shape.as_list()[1:]],
                   spec.dtype)
  return decoded.concatenate(tf.data.Dataset.from_tensors(empty)).take(
      1).get_single_element()


def in_order(*assertions):
  """Runs assertion thunks one after the other: the first failure is the
  error (several failing at once would race)."""
  done = []
  for assertion in assertions:
    with tf.control_dependencies(done[-1:]):
      done.append(assertion())
  return done[-1]


class Source:
  """One input of a request: its bytes, and what its reader must check.

  data: string []; prefix: string [], `image_bytes[i]: `; r: its bytes;
  channels: the stored channels; max_pixels: the build's decompression-bomb
  limit; min_side: the longer stored side (JPEG's DCT scale keeps both
  sides at least that).
  """

  def __init__(self, data, prefix, model_input: ModelInput):
    self.data = data
    self.prefix = prefix
    self.r = Bytes(data)
    self.channels = model_input.channels
    self.max_pixels = int(model_input.max_pixels)
    self.min_side = max(model_input.stored_size)

  def fail_unless(self, ok, *parts):
    """An assertion that ok holds, else an error of the prefix and parts
    (strings, or tensors written out)."""
    message = tf.strings.join([self.prefix] + [
        p if isinstance(p, str) else tf.strings.as_string(p) for p in parts])
    return tf.debugging.Assert(ok, [message])

  def size_checks(self, fmt: str, width, height) -> list:
    """Assertions that a header's size is positive and within max_pixels."""
    width, height = tf.cast(width, tf.int64), tf.cast(height, tf.int64)
    return [
        self.fail_unless(
            tf.logical_and(width > 0, height > 0),
            f'{fmt} header gives an invalid size ', width, 'x', height,
            ' (corrupt or truncated file)'),
        self.fail_unless(
            width * height <= self.max_pixels,
            f'{fmt} image of ', width, 'x', height, ' = ', width * height,
            f' pixels exceeds the serving limit of {self.max_pixels} pixels '
            '(max_pixels, the build\'s decompression-bomb limit); send a '
            'smaller image'),
    ]

  def refuse_empty(self, image, *parts):
    """image, after an error (the parts) if the decoder refused the data."""
    with tf.control_dependencies([self.fail_unless(tf.size(image) > 0,
                                                   *parts)]):
      return tf.identity(image)
