"""Bounds-checked reads of one input's bytes and string edits, in TF ops.

Shared by the per-format readers (jpeg, png, gif, bmp, webp): every
position is clipped or checked, so no input makes an op fail with a
message that quotes raw bytes.
"""

from __future__ import annotations

import tensorflow as tf


# How many JPEG segments / PNG, WebP chunks / GIF blocks are walked looking
# for metadata and structure before giving up (then: no EXIF orientation,
# and nothing past that point checked).
MAX_HEADER_STEPS = 16384


class Bytes:
  """Bounds-checked little/big-endian reads from one input's bytes."""

  def __init__(self, data: tf.Tensor):
    self.b = tf.io.decode_raw(data, tf.uint8)
    self.n = tf.size(self.b, out_type=tf.int64)

  def bytes(self, pos, count: int) -> tf.Tensor:
    """int64 [..., count]: the bytes at pos (scalar or vector), 0 outside."""
    pos = tf.cast(pos, tf.int64)
    idx = tf.expand_dims(pos, -1) + tf.range(count, dtype=tf.int64)
    inside = tf.logical_and(idx >= 0, idx < self.n)
    values = tf.gather(self.b, tf.clip_by_value(idx, 0, tf.maximum(
        self.n - 1, 0)))
    return tf.where(inside, tf.cast(values, tf.int64), tf.zeros_like(idx))

  def u8(self, pos) -> tf.Tensor:
    return self.bytes(pos, 1)[..., 0]

  def at(self, pos) -> tf.Tensor:
    """The byte at scalar pos (clipped into the data): cheap, for loops."""
    return tf.cast(tf.gather(self.b, tf.clip_by_value(
        pos, 0, tf.maximum(self.n - 1, 0))), tf.int64)

  def uint(self, pos, count: int, little) -> tf.Tensor:
    """Unsigned integer of `count` bytes; `little` may be a bool tensor."""
    le = tf.constant([256**i for i in range(count)], tf.int64)
    be = tf.constant([256**(count - 1 - i) for i in range(count)], tf.int64)
    weights = tf.where(tf.cast(little, tf.bool), le, be)
    return tf.reduce_sum(self.bytes(pos, count) * weights, axis=-1)

  def has(self, pos, count) -> tf.Tensor:
    pos = tf.cast(pos, tf.int64)
    return tf.logical_and(pos >= 0, pos + count <= self.n)

  def equals(self, pos, expected: bytes) -> tf.Tensor:
    return tf.logical_and(
        self.has(pos, len(expected)),
        tf.reduce_all(tf.equal(self.bytes(pos, len(expected)),
                               tf.constant(list(expected), tf.int64))))


def substr(data, pos, length) -> tf.Tensor:
  """tf.strings.substr with pos clipped to [0, the data's length]: total.

  A start past the end gives b'' instead of an error that quotes the raw
  bytes (and, on a truncated file, races the check that names the input).
  """
  size = tf.cast(tf.strings.length(data), tf.int64)
  return tf.strings.substr(data, tf.clip_by_value(tf.cast(pos, tf.int64), 0,
                                                  size),
                           tf.cast(length, tf.int64))


def splice(data, pos, replacement, length: int) -> tf.Tensor:
  """data with `length` bytes at pos replaced by as many others.

  Positions are clipped to the data, so a short input never fails here
  (substr errors quote the raw bytes).
  """
  size = tf.cast(tf.strings.length(data), tf.int64)
  pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, size)
  return tf.strings.join([substr(data, 0, pos), replacement,
                          substr(data, tf.minimum(pos + length, size), -1)])


def byte_string(value) -> tf.Tensor:
  """A one-byte string of value (0..255)."""
  return tf.gather(tf.constant([bytes([i]) for i in range(256)]),
                   tf.cast(value, tf.int64) % 256)


def fourcc(text: bytes) -> int:
  return int.from_bytes(text, 'big')


def walk(cond, body, state, shape_invariants=None):
  """tf.while_loop with a step counter capped at MAX_HEADER_STEPS."""
  def loop_cond(steps, *s):
    return tf.logical_and(steps < MAX_HEADER_STEPS, cond(*s))

  def loop_body(steps, *s):
    return (steps + 1, *body(*s))

  if shape_invariants is not None:
    shape_invariants = (tf.TensorShape([]), *shape_invariants)
  return tf.while_loop(loop_cond, loop_body, (tf.constant(0), *state),
                       shape_invariants=shape_invariants)[1:]


def i64(value) -> tf.Tensor:
  return tf.constant(value, tf.int64)


def first_true(mask) -> tf.Tensor:
  """Index of the first True of a bool [n] (n when none; int64 []).

  Total: an empty mask gives 0 instead of ArgMax's "Reduction axis 0 is
  empty". A reader must not fail on bytes it was not meant for: after a
  SavedModel is restored, TensorFlow's graph optimizer was seen (under
  load) to run ops of a format reader the dispatch did not pick, and such
  a failure would hide the request's real error behind one naming no
  input.
  """
  return tf.argmax(tf.cast(tf.concat([mask, [True]], 0), tf.int32),
                   output_type=tf.int64)
