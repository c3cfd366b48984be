"""zlib's CRC-32 in TF ops, for many byte ranges of one input at once.

PNG chunks end with a CRC-32 of their type and data (see png).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf


# ------------------------------------------------------------------- CRC-32
#
# PNG chunks end with a CRC-32 (zlib's) of their type and data. The build
# (Pillow) refuses a chunk before the image data whose CRC is wrong;
# TensorFlow's libpng refuses wrong CRCs in IDAT and IEND, which Pillow
# never checks. So serving checks the first kind itself and hands libpng a
# copy of the image data with a correct CRC. CRC-32 is linear over GF(2):
# the state after a run of zero bytes is a linear map of the state before,
# applied here with four byte-indexed tables per power of two of the run.

_CRC_BLOCK = 64  # Bytes a block: sequential within, a parallel scan across.


@functools.lru_cache(maxsize=None)
def _crc_tables():
  """(byte table int64 [256], zero-run tables int64 [40, 4, 256]): the
  second maps a state through 2^k zero bytes, one byte of it at a time."""
  table = np.zeros(256, np.int64)
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
    table[i] = c
  basis = 1 << np.arange(32, dtype=np.int64)
  op = (basis >> 8) ^ table[basis & 0xFF]  # One zero byte, bit by bit.
  tables = np.zeros((40, 4, 256), np.int64)
  for k in range(40):
    for q in range(4):
      for v in range(1, 256):
        low = v & -v
        tables[k, q, v] = tables[k, q, v ^ low] ^ op[8 * q + low.bit_length()
                                                        - 1]
    # The map for 2^(k+1) zero bytes: this one applied twice.
    op = np.array([_apply_bits(op, int(op[j])) for j in range(32)], np.int64)
  return table, tables


def _apply_bits(op, value: int) -> int:
  out = 0
  for j in range(32):
    if value >> j & 1:
      out ^= int(op[j])
  return out


def _crc_step(state, byte, table):
  return tf.bitwise.bitwise_xor(tf.bitwise.right_shift(state, 8), tf.gather(
      table, tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(state, byte),
                                    0xFF)))


def _crc_zeros_pow2(state, k, tables):
  """States (int64 [...]) through 2^k zero bytes."""
  moved = tf.zeros_like(state)
  for q in range(4):
    moved = tf.bitwise.bitwise_xor(moved, tf.gather(tables[k, q], tf.bitwise.
        bitwise_and(tf.bitwise.right_shift(state, 8 * q), 0xFF)))
  return moved


def _crc_zeros(state, count, tables):
  """States (int64 [...]) through `count` (int64 [...]) zero bytes."""
  def level(k, s):
    bit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(
        count, tf.cast(k, tf.int64)), 1)
    return tf.where(tf.equal(bit, 1), _crc_zeros_pow2(s, k, tables), s)

  return tf.while_loop(lambda k, s: k < 40, lambda k, s: (k + 1, level(k, s)),
                       (tf.constant(0), state))[1]


def crc32(b, starts, ends) -> tf.Tensor:
  """zlib CRC-32 (int64) of b[starts[i]:ends[i]] for each i; b uint8 [n].

  Prefix states P(i) (the register after b[:i] from 0) come from a CRC of
  each _CRC_BLOCK bytes and a log-depth scan across blocks; then
  crc(b[a:e]) = P(e) ^ Z(e - a)(P(a) ^ ~0) ^ ~0, Z(m) being m zero bytes.
  """
  table_np, tables_np = _crc_tables()
  table, tables = tf.constant(table_np), tf.constant(tables_np)
  n = tf.size(b, out_type=tf.int64)
  blocks = n // _CRC_BLOCK + 1
  padded = tf.reshape(tf.pad(b, [[0, blocks * _CRC_BLOCK - n]]),
                      tf.stack([blocks, _CRC_BLOCK]))
  columns = tf.cast(tf.transpose(padded), tf.int64)  # [_CRC_BLOCK, blocks]
  sums = tf.while_loop(
      lambda t, s: t < _CRC_BLOCK,
      lambda t, s: (t + 1, _crc_step(s, columns[t], table)),
      (tf.constant(0), tf.zeros([blocks], tf.int64)))[1]
  # Inclusive scan: after level k, sums[j] covers blocks (j - 2^(k+1), j].
  def scan(k, shift, s):
    moved = _crc_zeros_pow2(s[:-shift], k + _CRC_BLOCK.bit_length() - 1,
                            tables)
    return k + 1, shift * 2, tf.bitwise.bitwise_xor(
        s, tf.concat([tf.zeros([shift], tf.int64), moved], 0))

  sums = tf.while_loop(
      lambda k, shift, s: shift < blocks, scan,
      (tf.constant(0), tf.constant(1, tf.int64), sums),
      shape_invariants=(tf.TensorShape([]), tf.TensorShape([]),
                        tf.TensorShape([None])))[2]
  before = tf.concat([[0], sums[:-1]], 0)  # P at each block's start.

  def prefix(pos):
    block, offset = pos // _CRC_BLOCK, pos % _CRC_BLOCK
    data = tf.cast(tf.gather(padded, block), tf.int64)
    return tf.while_loop(
        lambda t, s: t < _CRC_BLOCK,
        lambda t, s: (t + 1, tf.where(t < offset, _crc_step(
            s, data[:, t], table), s)),
        (tf.constant(0, tf.int64), tf.gather(before, block)))[1]

  ones = tf.constant(0xFFFFFFFF, tf.int64)
  inverted = tf.bitwise.bitwise_xor(prefix(starts), ones)
  return tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(
      prefix(ends), _crc_zeros(inverted, ends - starts, tables)), ones)
