"""Source image bytes -> the model's pixels, in TensorFlow ops only.

The serving export (trainer.export, endpoint `serve`) takes raw image files
(JPEG, PNG, GIF, BMP, WebP: the formats the build accepts) and must not call
Pillow, so this module reproduces source_image's conversion in TF ops, then
applies ModelInput's read-time resize: what the build and the input pipeline
do to a file before the model sees it:

  header check    the size is read from the header (JPEG SOF, PNG IHDR, GIF
                  screen and first frame, BMP info header, WebP VP8/VP8L/VP8X)
                  and an image over `max_pixels` (the build's
                  decompression-bomb limit, kept in the config) is refused
                  with an InvalidArgumentError that names its size and the
                  limit, before anything is decoded
  strictness      what the build refuses as corrupt is refused too, though
                  TF's decoders accept it: JPEGs libjpeg only warns about
                  (cut short and given a new end marker, damaged scan data,
                  odd headers; see "JPEG strictness"), PNG chunks before the
                  image data with a bad CRC or cut short after it, BMP pixel
                  data cut short; and what the build accepts is decoded
                  though TF's decoders would refuse it (a PNG without IEND or
                  with a bad IDAT/IEND CRC, a BMP with bytes after its rows
                  or without the last row's padding)
  decode          JPEG at the largest DCT scale (1/2, 1/4, 1/8) that keeps
                  both sides >= the stored size, like the build's draft
                  decode; 16-bit PNG to 8 bits like Pillow; the first frame
                  of an animated GIF or WebP only
  EXIF            orientation tag 0x0112 of JPEG (APP1), PNG (eXIf) and WebP
                  (EXIF chunk) applied like PIL.ImageOps.exif_transpose
  to 8 bits       alpha (RGBA, LA, palette or tRNS transparency, GIF
                  transparency) composited onto white exactly like
                  Pillow's alpha_composite; RGB -> L with ITU-R 601-2 luma
  stored size     resized to the dataset's stored size with the TensorFlow
                  half of its resize mode (resize_modes), and for a JPEG
                  dataset re-encoded at its quality as the build stores it
  read size       the same tf.image.resize the input pipeline applies when
                  the trainer's --image_size differs from the stored size
  normalize       the model's normalization

An image that is already at the stored size (what the build wrote, and what
`trainer.predict` sends after running the build's own Pillow path) skips the
stored-size step, so stored images are decoded exactly as in training.
Images of a request are decoded one at a time, so a request never holds
more than one full-size image (and, for a JPEG's checks, a copy of it while
its blocks are fingerprinted). Every refusal is an InvalidArgumentError
that starts `image_bytes[i]: `, i being the input's index in the request,
also where a TensorFlow decoder refuses the data (see _decode_or_empty).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from pipelines.preprocessing import resize_modes
from pipelines.preprocessing.model_input import ModelInput
# How many JPEG segments / PNG, WebP chunks / GIF blocks are walked looking
# for metadata and structure before giving up (then: no EXIF orientation,
# and nothing past that point checked).
MAX_HEADER_STEPS = 16384

_JPEG, _PNG, _GIF, _BMP, _WEBP = range(5)
_SIGNATURES = (  # Same signatures as the build (source_image._SIGNATURES).
    (_JPEG, 0, b'\xff\xd8\xff'), (_PNG, 0, b'\x89PNG\r\n\x1a\n'),
    (_GIF, 0, b'GIF87a'), (_GIF, 0, b'GIF89a'), (_BMP, 0, b'BM'))
_HEAD = 32  # Bytes of header every format's sniffing and size need.
_ORIENTATION_TAG = 0x0112


# ---------------------------------------------------------------- byte reads


class _Bytes:
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


def _substr(data, pos, length) -> tf.Tensor:
  return tf.strings.substr(data, tf.cast(pos, tf.int64),
                           tf.cast(length, tf.int64))


def _splice(data, pos, replacement, length: int) -> tf.Tensor:
  """data with `length` bytes at pos replaced by as many others.

  Positions are clipped to the data, so a short input never fails here
  (substr errors quote the raw bytes).
  """
  size = tf.cast(tf.strings.length(data), tf.int64)
  pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, size)
  return tf.strings.join([_substr(data, 0, pos), replacement,
                          _substr(data, tf.minimum(pos + length, size), -1)])


def _byte_string(value) -> tf.Tensor:
  """A one-byte string of value (0..255)."""
  return tf.gather(tf.constant([bytes([i]) for i in range(256)]),
                   tf.cast(value, tf.int64) % 256)


def _fourcc(text: bytes) -> int:
  return int.from_bytes(text, 'big')


def _walk(cond, body, state, shape_invariants=None):
  """tf.while_loop with a step counter capped at MAX_HEADER_STEPS."""
  def loop_cond(steps, *s):
    return tf.logical_and(steps < MAX_HEADER_STEPS, cond(*s))

  def loop_body(steps, *s):
    return (steps + 1, *body(*s))

  if shape_invariants is not None:
    shape_invariants = (tf.TensorShape([]), *shape_invariants)
  return tf.while_loop(loop_cond, loop_body, (tf.constant(0), *state),
                       shape_invariants=shape_invariants)[1:]


def _i64(value) -> tf.Tensor:
  return tf.constant(value, tf.int64)


# -------------------------------------------------------------- EXIF parsing


def _tiff_orientation(r: _Bytes, start, end) -> tf.Tensor:
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
  count = tf.where(valid, r.uint(ifd, 2, little), _i64(0))
  count = tf.maximum(tf.minimum(count, (end - ifd - 2) // 12), 0)
  entries = ifd + 2 + 12 * tf.range(count, dtype=tf.int64)
  tags = r.uint(entries, 2, little)
  types = r.uint(entries + 2, 2, little)
  counts = r.uint(entries + 4, 4, little)
  value = tf.where(tf.equal(types, 1), r.u8(entries + 8),
                   tf.where(tf.equal(types, 3), r.uint(entries + 8, 2, little),
                            r.uint(entries + 8, 4, little)))
  match = tf.logical_and(tf.equal(tags, _ORIENTATION_TAG), tf.equal(counts, 1))
  known_type = tf.reduce_any(tf.equal(types[:, None], tf.constant(
      [1, 3, 4], tf.int64)), axis=1)  # BYTE, SHORT, LONG.
  match = tf.logical_and(match, known_type)
  # Pillow keeps the last of duplicated tags.
  values = tf.boolean_mask(value, match)
  return tf.cond(tf.size(values) > 0, lambda: values[-1], lambda: _i64(0))


def _jpeg_exif(r: _Bytes):
  """(start, end) of the TIFF block of the first APP1 Exif segment, or -1."""
  def cond(pos, start, end, done):
    return tf.logical_and(tf.logical_not(done), pos + 4 <= r.n)

  def body(pos, start, end, done):
    marker = r.bytes(pos, 2)
    m0, m1 = marker[0], marker[1]
    length = r.uint(pos + 2, 2, False)
    fill = tf.equal(m1, 0xFF)
    standalone = tf.logical_or(tf.logical_and(m1 >= 0xD0, m1 <= 0xD8),
                               tf.equal(m1, 0x01))
    junk = tf.not_equal(m0, 0xFF)  # Pillow skips it byte by byte.
    stop = tf.logical_and(tf.logical_not(junk), tf.logical_or(
        tf.equal(m1, 0xDA), tf.equal(m1, 0xD9)))  # Image data, or the end.
    exif = tf.logical_and(tf.logical_and(tf.equal(m1, 0xE1), length >= 8),
                          r.equals(pos + 4, b'Exif\x00\x00'))
    exif = tf.logical_and(exif, tf.logical_not(tf.logical_or(junk, fill)))
    step = tf.where(tf.logical_or(junk, fill), _i64(1),
                    tf.where(standalone, _i64(2), 2 + length))
    return (pos + step, tf.where(exif, pos + 10, start),
            tf.where(exif, tf.minimum(pos + 2 + length, r.n), end),
            tf.logical_or(stop, exif))

  _, start, end, _ = _walk(cond, body, (_i64(2), _i64(-1), _i64(-1),
                                        tf.constant(False)))
  return start, end


def _png_chunks(r: _Bytes):
  """(eXIf start, end, tRNS start, length) from the chunk list; -1 if none."""
  iend, exif_type, trns_type = (_fourcc(b'IEND'), _fourcc(b'eXIf'),
                                _fourcc(b'tRNS'))

  def cond(pos, *_):
    return pos + 8 <= r.n

  def body(pos, exif, exif_end, trns, trns_len):
    length = r.uint(pos, 4, False)
    kind = r.uint(pos + 4, 4, False)
    new_exif = tf.logical_and(tf.equal(kind, exif_type), exif < 0)
    new_trns = tf.logical_and(tf.equal(kind, trns_type), trns < 0)
    nxt = tf.where(tf.equal(kind, iend), r.n, pos + 12 + length)
    return (nxt, tf.where(new_exif, pos + 8, exif),
            tf.where(new_exif, tf.minimum(pos + 8 + length, r.n), exif_end),
            tf.where(new_trns, pos + 8, trns),
            tf.where(new_trns, length, trns_len))

  minus = _i64(-1)
  _, exif, exif_end, trns, trns_len = _walk(
      cond, body, (_i64(8), minus, minus, minus, minus))
  return exif, exif_end, trns, trns_len


def _webp_exif(r: _Bytes):
  """(start, end) of the TIFF block of the first EXIF chunk, or -1."""
  exif_type = _fourcc(b'EXIF')

  def cond(pos, start, end):
    return tf.logical_and(start < 0, pos + 8 <= r.n)

  def body(pos, start, end):
    kind = r.uint(pos, 4, False)
    size = r.uint(pos + 4, 4, True)
    found = tf.equal(kind, exif_type)
    # Pillow strips an 'Exif\0\0' prefix some writers put in the chunk.
    skip = tf.where(r.equals(pos + 8, b'Exif\x00\x00'), _i64(6), _i64(0))
    return (pos + 8 + size + size % 2,
            tf.where(found, pos + 8 + skip, start),
            tf.where(found, tf.minimum(pos + 8 + size, r.n), end))

  _, start, end = _walk(cond, body, (_i64(12), _i64(-1), _i64(-1)))
  return start, end


_WINDOW = 1 << 16  # Bytes of a GIF sub-block chain followed at once.


def _skip_sub_blocks(r: _Bytes, pos) -> tf.Tensor:
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


# ---------------------------------------------------------- pixel conversion


def _composite_on_white(color: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
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


def _luma(rgb: tf.Tensor) -> tf.Tensor:
  """uint8 RGB -> L like Pillow's convert('L') (ITU-R 601-2, its rounding)."""
  c = tf.cast(rgb, tf.int32)
  y = c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(y, 16), tf.uint8)[..., None]


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [h, w, 1|2|3|4] -> [h, w, channels]; alpha composited on white."""
  def gray():
    return image[..., :1] if channels == 1 else tf.tile(image[..., :1],
                                                          [1, 1, 3])

  def gray_alpha():
    g = _composite_on_white(image[..., :1], image[..., 1:2])
    return g if channels == 1 else tf.tile(g, [1, 1, 3])

  def rgb():
    return _luma(image[..., :3]) if channels == 1 else image[..., :3]

  def rgba():
    composited = _composite_on_white(image[..., :3], image[..., 3:4])
    return _luma(composited) if channels == 1 else composited

  branches = [gray, gray_alpha, rgb, rgba]
  if image.shape[-1] is not None:  # Known when tracing (JPEG: 3).
    out = branches[image.shape[-1] - 1]()
  else:
    out = tf.switch_case(tf.clip_by_value(tf.shape(image)[-1] - 1, 0, 3),
                         branches)
  out.set_shape([None, None, channels])
  return out


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """Applies EXIF orientation 2..8 like PIL.ImageOps.exif_transpose."""
  transposed = lambda: tf.transpose(image, [1, 0, 2])
  branches = [
      lambda: image,                                      # 0, 1: as is
      lambda: tf.reverse(image, [1]),                     # 2: FLIP_LEFT_RIGHT
      lambda: tf.reverse(image, [0, 1]),                  # 3: ROTATE_180
      lambda: tf.reverse(image, [0]),                     # 4: FLIP_TOP_BOTTOM
      transposed,                                         # 5: TRANSPOSE
      lambda: tf.reverse(transposed(), [1]),              # 6: ROTATE_270
      lambda: tf.reverse(transposed(), [0, 1]),           # 7: TRANSVERSE
      lambda: tf.reverse(transposed(), [0]),              # 8: ROTATE_90
  ]
  index = tf.where(tf.logical_and(orientation >= 2, orientation <= 8),
                   orientation - 1, _i64(0))
  return tf.switch_case(tf.cast(index, tf.int32), branches)


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


def _crc32(b, starts, ends) -> tf.Tensor:
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


# ------------------------------------------------------------ PNG structure

_PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'
# (before, after) the chunk's type in the message, by problem.
_PNG_PROBLEMS = (
    ('', ''),
    ('PNG has a broken chunk header before its image data (corrupt file)',
     ''),
    ('PNG chunk ', ' before the image data is cut short (truncated file)'),
    ('PNG chunk ', ' has a bad checksum (corrupt file)'),
    ('PNG chunk ', ' after the image data is cut short (truncated file)'),
)


def _is_word_byte(value) -> tf.Tensor:
  """Bytes Pillow accepts in a chunk type (the regex \\w: [A-Za-z0-9_])."""
  return tf.logical_or(tf.logical_or(
      tf.logical_and(value >= 48, value <= 57),
      tf.logical_and(value >= 65, value <= 90)), tf.logical_or(
          tf.logical_and(value >= 97, value <= 122), tf.equal(value, 95)))


class _PngLayout:
  """A PNG's chunks as Pillow reads them, and the copy libpng decodes.

  Pillow reads the chunks before the first IDAT checking each one's CRC,
  then the IDATs that follow one another, then the chunks after them until
  IEND (refusing one cut short, not checking CRCs); it needs no IEND.
  libpng checks the CRC of IDAT and IEND and needs IEND. So libpng gets the
  chunks before the image data (checked here), one IDAT holding the image
  data with its CRC computed, and IEND.

  problem: int64, 0 or the index in _PNG_PROBLEMS; message: what is wrong;
  for_decoder: the PNG that TensorFlow decodes.
  """

  def __init__(self, r: _Bytes, data):
    self.r, self.data = r, data
    first = self._before_image_data()
    members = self._image_chunks(first)
    after = self._after_image_data(members)
    problem = tf.where(self.problem > 0, self.problem, tf.where(
        after >= 0, _i64(4), _i64(0)))
    name = _substr(data, tf.where(self.problem > 0, self.at, after) + 4, 4)
    parts = tf.gather(tf.constant(_PNG_PROBLEMS), problem)
    self.message = tf.strings.join([
        parts[0], tf.where(tf.equal(problem, 1), b'', name), parts[1]])
    self.problem = problem
    self.for_decoder = tf.cond(first >= 0,
                               lambda: self._rebuilt(first, members),
                               lambda: data)

  def _header(self, pos):
    r = self.r
    named = tf.reduce_all(_is_word_byte(r.bytes(pos + 4, 4)))
    return r.uint(pos, 4, False), r.uint(pos + 4, 4, False), named

  def _before_image_data(self):
    """Position of the first IDAT (-1 if none); sets problem and at."""
    r = self.r
    idat, iend = _fourcc(b'IDAT'), _fourcc(b'IEND')

    def cond(pos, first, problem, at, chunks):
      return tf.logical_and(tf.logical_and(first < 0, tf.equal(problem, 0)),
                            pos + 8 <= r.n)

    def body(pos, first, problem, at, chunks):
      length, kind, named = self._header(pos)
      found = tf.logical_and(named, tf.equal(kind, idat))
      end = tf.logical_and(named, tf.equal(kind, iend))
      cut = tf.logical_and(named, pos + 12 + length > r.n)
      problem = tf.where(tf.logical_not(named), _i64(1), tf.where(
          tf.logical_and(cut, tf.logical_not(tf.logical_or(found, end))),
          _i64(2), _i64(0)))
      keep = tf.logical_not(tf.logical_or(tf.logical_or(found, end),
                                          problem > 0))
      chunks = tf.cond(keep, lambda: tf.concat(
          [chunks, tf.stack([pos, length])[None]], 0), lambda: chunks)
      return (tf.where(end, r.n, pos + 12 + length),
              tf.where(found, pos, first), problem, pos, chunks)

    state = (_i64(8), _i64(-1), _i64(0), _i64(0), tf.zeros([0, 2], tf.int64))
    invariants = (tf.TensorShape([]),) * 4 + (tf.TensorShape([None, 2]),)
    _, first, problem, at, chunks = _walk(cond, body, state, invariants)
    # Pillow checks the CRC of each chunk it read before the image data.
    starts, lengths = chunks[:, 0], chunks[:, 1]
    limit = tf.where(first >= 0, first, r.n)
    crcs = _crc32(r.b[:limit], starts + 4, starts + 8 + lengths)
    bad = tf.not_equal(crcs, r.uint(starts + 8 + lengths, 4, False))
    index = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)
    any_bad = tf.reduce_any(bad)
    self.problem = tf.where(problem > 0, problem, tf.where(
        any_bad, _i64(3), _i64(0)))
    self.at = tf.where(problem > 0, at, tf.where(any_bad, tf.gather(
        tf.concat([starts, [0]], 0), index), _i64(0)))
    return first

  def _image_chunks(self, first):
    """Positions of the IDAT chunks that follow one another from `first`
    (sorted): each IDAT's length points at the next. Found for all at once
    by doubling the jumps (log steps), however many chunks there are."""
    r = self.r
    b = r.b
    marks = tf.logical_and(
        tf.logical_and(tf.equal(b[4:-3], 73), tf.equal(b[5:-2], 68)),
        tf.logical_and(tf.equal(b[6:-1], 65), tf.equal(b[7:], 84)))
    starts = tf.where(marks)[:, 0]  # Chunk starts: 4 bytes before 'IDAT'.
    count = tf.size(starts, out_type=tf.int64)
    nxt = starts + 12 + r.uint(starts, 4, False)
    index = tf.searchsorted(starts, nxt, out_type=tf.int64)
    linked = tf.equal(tf.gather(tf.concat([starts, [-1]], 0), index), nxt)
    jump = tf.where(linked, index, tf.range(count))
    reach = tf.equal(starts, first)

    def step(k, jump, reach):
      reached = tf.math.unsorted_segment_max(
          tf.cast(reach, tf.int32), jump, count) > 0
      return k + 1, tf.gather(jump, jump), tf.logical_or(reach, reached)

    reach = tf.while_loop(lambda k, jump, reach: tf.bitwise.left_shift(
        _i64(1), k) <= count, step, (_i64(0), jump, reach))[2]
    return tf.boolean_mask(starts, reach)

  def _after_image_data(self, members):
    """Position of the chunk after the image data that Pillow finds cut
    short (its load_end), else -1."""
    r = self.r
    last = tf.concat([[_i64(-1)], members], 0)[-1]
    start = tf.where(last >= 0, last + 12 + r.uint(last, 4, False), r.n)
    stops = tf.constant([_fourcc(b'IEND'), _fourcc(b'fcTL')], tf.int64)

    def cond(pos, cut):
      length, kind, named = self._header(pos)
      return tf.logical_and(tf.logical_and(cut < 0, pos + 8 <= r.n),
                            tf.logical_and(named, tf.logical_not(
                                tf.reduce_any(tf.equal(kind, stops)))))

    def body(pos, cut):
      length = r.uint(pos, 4, False)
      return pos + 12 + length, tf.where(pos + 8 + length > r.n, pos, cut)

    return _walk(cond, body, (start, _i64(-1)))[1]

  def _rebuilt(self, first, members):
    """The chunks before `first`, one IDAT with the image data, IEND."""
    lengths = self.r.uint(members, 4, False)
    chunk = tf.strings.join([b'IDAT', tf.strings.reduce_join(
        tf.strings.substr(self.data, members + 8, lengths))])
    size = tf.cast(tf.strings.length(chunk), tf.int64)
    crc = _crc32(tf.io.decode_raw(chunk, tf.uint8), tf.zeros([1], tf.int64),
                 size[None])[0]
    return tf.strings.join([_substr(self.data, 0, first), _be32(size - 4),
                            chunk, _be32(crc), _PNG_IEND])


def _be32(value) -> tf.Tensor:
  """The 4-byte big-endian string of value (0 .. 2^32 - 1)."""
  shifts = tf.constant([24, 16, 8, 0], tf.int64)
  return tf.strings.reduce_join(_byte_string(tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(value, shifts), 0xFF)))


# ---------------------------------------------------------- checked decoding


def _decode_or_empty(decode, data) -> tf.Tensor:
  """decode(data), or an empty tensor of its dtype where the decoder fails.

  A TensorFlow decoder's own error names no input of the request, and a
  graph cannot catch it. So the decode runs as a one-element tf.data
  pipeline that drops failed elements (ignore_errors): a refusal becomes an
  empty result, which the caller turns into an error that names the input.
  """
  decoded = tf.data.Dataset.from_tensors(data).map(decode).ignore_errors()
  spec = decoded.element_spec
  empty = tf.zeros([0] + [d or 0 for d in spec.shape.as_list()[1:]],
                   spec.dtype)
  return decoded.concatenate(tf.data.Dataset.from_tensors(empty)).take(
      1).get_single_element()


def _decode_still(data) -> tf.Tensor:
  """uint8 [h, w, C]: the (first) frame of an image TF's decode_image reads."""
  image = tf.io.decode_image(data, channels=0, expand_animations=False)
  image.set_shape([None, None, None])
  return image


def _signed32(value) -> tf.Tensor:
  """An unsigned 32-bit field read as the signed int it holds."""
  return tf.where(value >= 2**31, value - 2**32, value)


_PNG_UNDECODABLE = ('corrupt PNG data (the decoder cannot read its image '
                    'data: truncated or damaged)')


def _digest(image: tf.Tensor) -> tf.Tensor:
  """int64 [rank + 1]: the shape and a 64-bit FarmHash of the pixels."""
  hashed = tf.bitcast(tf.fingerprint(tf.reshape(image, [1, -1]))[0],
                      tf.int64)
  return tf.concat([tf.shape(image, out_type=tf.int64), hashed[None]], 0)


def _splice_many(data, positions, lengths, inserts) -> tf.Tensor:
  """data with `lengths[i]` bytes at `positions[i]` (sorted, not
  overlapping) replaced by `inserts[i]`, in one pass."""
  size = tf.cast(tf.strings.length(data), tf.int64)
  starts = tf.concat([[0], positions + lengths], 0)
  ends = tf.concat([positions, [size]], 0)
  kept = tf.strings.substr(data, starts, ends - starts)
  pieces = tf.reshape(tf.stack([kept[:-1], inserts], 1), [-1])
  return tf.strings.reduce_join(tf.concat([pieces, kept[-1:]], 0))


def _in_order(*assertions):
  """Runs assertion thunks one after the other: the first failure is the
  error (several failing at once would race)."""
  done = []
  for assertion in assertions:
    with tf.control_dependencies(done[-1:]):
      done.append(assertion())
  return done[-1]


# ------------------------------------------------------- JPEG strictness
#
# The build decodes JPEGs with libjpeg-turbo in strict mode (every libjpeg
# warning is an error). tf.io.decode_jpeg runs the same library and only
# counts the warnings, so a file cut short and given a new end marker (the
# rest of its scan filled with grey), damaged scan data and odd headers
# decode. This reproduces what libjpeg warns about:
#
#   headers    _JpegMarkers walks the markers as libjpeg reads them: bytes
#              that are no marker between markers, a JFIF major version
#              other than 1, an unknown Adobe colour transform, sequential
#              scans with progressive parameters, a progression that does
#              not follow from the scans before, restart markers missing,
#              extra or out of order
#   short data libjpeg fills an entropy-coded segment that ends before its
#              blocks do with zero bits. The file with filler bytes put
#              before each marker that closes such a segment decodes to the
#              same pixels when every segment was complete (the filler lies
#              after the data; libjpeg skips it) and to others when one was
#              short (libjpeg decodes the filler where it decoded zeros)
#   unused     in a file of one sequential scan without restart markers, the
#   data       last _TAIL data bytes complemented must change the pixels. If
#              they do not, they were never decoded; libjpeg reads at most
#              8 bytes ahead, so it reports them as extraneous data
#
# The comparisons decode at full scale (so that every DCT coefficient shows)
# and compare digests, one full-size image at a time. Not covered: scan data
# damaged so that a segment other than the only one of a sequential file
# ends early (extraneous bytes: a progressive scan, a restart interval), and
# a "bad Huffman code"; see tests/test_serving_strict.py for the rates.

# Starts with 1 bits where libjpeg fills with 0 bits, then mixes both, so
# that even the last few missing bits decode to other pixels (0 of 1,440
# files with 1-3 bytes cut before their end decoded alike; 0xAA 0x55 * 8
# missed 8); no 0xFF, so no marker.
_SEGMENT_FILLER = bytes.fromhex('e93ab571cd1e965bf20ca764d8398eb3')
_TAIL = 9  # Data bytes: more than libjpeg-turbo's bit reader fetches ahead.
_SOFS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
         0xCE, 0xCF)
_PROGRESSIVE_SOFS = (0xC2, 0xC6, 0xCA, 0xCE)
_SEQUENTIAL_HUFFMAN_SOFS = (0xC0, 0xC1)
_HUFFMAN_SOFS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7)
_STANDALONE_MARKERS = (0x01,) + tuple(range(0xD0, 0xD9))  # TEM, RSTn, SOI.
_MAX_COMPONENTS = 4
_JPEG_PROBLEMS = (
    '',
    'bytes that are no marker between its markers',
    'a JFIF header of an unknown major version',
    'an Adobe header with an unknown colour transform',
    'a sequential scan with progressive parameters',
    'a progressive scan that does not follow from the scans before it',
    'restart markers missing, extra or out of order',
)


def _is_any(value, options) -> tf.Tensor:
  return tf.reduce_any(tf.equal(value, tf.constant(options, tf.int64)))


def _ceil_div(a, b) -> tf.Tensor:
  return (a + b - 1) // tf.maximum(b, 1)


def _first_at_or_after(sorted_positions, pos) -> tf.Tensor:
  return tf.searchsorted(sorted_positions, tf.reshape(pos, [1]),
                         out_type=tf.int64)[0]


class _Frame:
  """The SOF header: kind, size and components (id, sampling factors)."""

  def __init__(self, r: _Bytes, pos, code):
    k = tf.range(_MAX_COMPONENTS, dtype=tf.int64)
    count = r.u8(pos + 9)
    sampling = r.u8(pos + 11 + 3 * k)
    self.fields = (
        _is_any(code, _PROGRESSIVE_SOFS),
        _is_any(code, _SEQUENTIAL_HUFFMAN_SOFS),
        r.uint(pos + 7, 2, False), r.uint(pos + 5, 2, False),
        tf.where(k < count, r.u8(pos + 10 + 3 * k), -1),
        tf.where(k < count, sampling // 16, 0),
        tf.where(k < count, sampling % 16, 0),
        _is_any(code, _HUFFMAN_SOFS))

  @staticmethod
  def none():
    zeros = tf.zeros([_MAX_COMPONENTS], tf.int64)
    return (tf.constant(False), tf.constant(False), _i64(0), _i64(0),
            zeros - 1, zeros, zeros, tf.constant(False))


class _JpegMarkers:
  """A JPEG's markers as libjpeg's reader sees them (TF ops).

  problem: int64, 0 or the index in _JPEG_PROBLEMS of the first warning
  libjpeg would give for the headers; scans: int64 [S, 4], start and end of
  each scan's entropy-coded data (the end is the marker after it), its
  number of components and restart interval; tables: int64 [D, 2], position
  and length of each DHT segment; segment_starts, segment_ends: int64 [K],
  where each entropy-coded segment's data starts and where the marker that
  closes it starts (fill bytes included); one_scan: a sequential Huffman
  file of one scan holding every component.
  """

  def __init__(self, r: _Bytes, data):
    self.r = r
    self.data_string = data
    first, second = r.b[:-1], r.b[1:]
    # 0xFF then a code: not 0x00 (a stuffed 0xFF in scan data) and not
    # 0xFF (a fill byte before the marker).
    is_marker = tf.logical_and(tf.equal(first, 0xFF), tf.logical_and(
        tf.not_equal(second, 0), tf.not_equal(second, 0xFF)))
    self.candidates = tf.where(is_marker)[:, 0]
    self.codes = tf.cast(tf.gather(second, self.candidates), tf.int64)
    is_rst = tf.logical_and(self.codes >= 0xD0, self.codes <= 0xD7)
    # Where each scan may end: the next marker that is no RSTn, else the
    # end of the data.
    self.closing = tf.concat([tf.boolean_mask(
        self.candidates, tf.logical_not(is_rst)), [r.n]], 0)
    self._walk()
    self._segments()
    self._complete_tables()

  def _scan(self, pos, length, frame, restart, coef_bits):
    """(end of the scan's data, problem or 0, coef_bits) for the SOS at pos:
    libjpeg's checks at the start of a scan (jdhuff.c, jdphuff.c) and of
    its restart markers (jdmarker.c)."""
    r = self.r
    progressive, sequential, width, height, ids, hs, vs, _ = frame
    count = r.u8(pos + 4)
    k = tf.range(_MAX_COMPONENTS, dtype=tf.int64)
    selectors = tf.where(k < count, r.u8(pos + 5 + 2 * k), -2)
    after = pos + 5 + 2 * count
    ss, se, approx = r.u8(after), r.u8(after + 1), r.u8(after + 2)
    ah, al = approx // 16, approx % 16
    start = pos + 2 + length
    end = tf.gather(self.closing, _first_at_or_after(self.closing, start))
    first = _first_at_or_after(self.candidates, start)
    last = _first_at_or_after(self.candidates, end)
    codes = self.codes[first:last]  # All RSTn: RST0..RST7 in turn.
    in_order = tf.reduce_all(tf.equal(
        codes, 0xD0 + tf.range(last - first, dtype=tf.int64) % 8))
    in_scan = tf.reduce_any(tf.equal(ids[:, None], selectors[None, :]), 1)
    hmax, vmax = tf.reduce_max(hs), tf.reduce_max(vs)
    one = tf.argmax(tf.cast(in_scan, tf.int32), output_type=tf.int64)
    mcus = tf.where(
        tf.equal(count, 1),
        _ceil_div(width * tf.gather(hs, one), 8 * hmax) *
        _ceil_div(height * tf.gather(vs, one), 8 * vmax),
        _ceil_div(width, 8 * hmax) * _ceil_div(height, 8 * vmax))
    expected = tf.where(restart > 0, _ceil_div(mcus, restart) - 1, _i64(0))
    restarts_ok = tf.logical_and(in_order, tf.equal(last - first, expected))
    not_sequential = tf.logical_and(sequential, tf.logical_not(
        tf.logical_and(tf.logical_and(tf.equal(ss, 0), tf.equal(se, 63)),
                       tf.equal(approx, 0))))
    coef = tf.range(64, dtype=tf.int64)
    band = tf.logical_and(
        tf.logical_and(in_scan[:, None], (coef >= ss)[None, :]),
        (coef <= se)[None, :])
    bogus = tf.logical_or(
        tf.reduce_any(tf.logical_and(band, tf.not_equal(
            tf.maximum(coef_bits, 0), ah))),
        tf.reduce_any(tf.logical_and(in_scan, tf.logical_and(
            ss > 0, coef_bits[:, 0] < 0))))
    bogus = tf.logical_and(progressive, bogus)
    coef_bits = tf.where(tf.logical_and(progressive, band), al, coef_bits)
    problem = tf.where(not_sequential, _i64(4), tf.where(
        bogus, _i64(5), tf.where(restarts_ok, _i64(0), _i64(6))))
    return end, problem, coef_bits

  def _walk(self):
    """One marker (or byte of junk) a step, from after SOI to EOI."""
    r = self.r

    def cond(pos, done, *_):
      return tf.logical_and(tf.logical_not(done), pos + 2 <= r.n)

    def body(pos, done, problem, frame, restart, jfif, adobe, coef_bits,
             scans, tables):
      byte, code = r.u8(pos), r.u8(pos + 1)
      length = r.uint(pos + 2, 2, False)
      fill = tf.logical_and(tf.equal(byte, 0xFF), tf.equal(code, 0xFF))
      junk = tf.logical_or(tf.not_equal(byte, 0xFF), tf.equal(code, 0))
      marker = tf.logical_not(tf.logical_or(junk, fill))

      def is_code(*codes):
        return tf.logical_and(marker, _is_any(code, codes))

      is_sos = is_code(0xDA)
      end, scan_problem, coef_bits = tf.cond(
          is_sos, lambda: self._scan(pos, length, frame, restart, coef_bits),
          lambda: (r.n, _i64(0), coef_bits))
      frame = tuple(tf.where(is_code(*_SOFS), new, old) for new, old in zip(
          _Frame(r, pos, code).fields, frame))
      is_jfif = tf.logical_and(is_code(0xE0), tf.logical_and(
          length >= 16, r.equals(pos + 4, b'JFIF\x00')))
      is_adobe = tf.logical_and(is_code(0xEE), tf.logical_and(
          length >= 14, r.equals(pos + 4, b'Adobe')))
      found = tf.where(junk, _i64(1), tf.where(
          tf.logical_and(is_jfif, tf.not_equal(r.u8(pos + 9), 1)), _i64(2),
          scan_problem))
      step = tf.where(tf.logical_not(marker), tf.where(fill, _i64(1), _i64(
          2)), tf.where(is_code(*_STANDALONE_MARKERS), _i64(2), 2 + length))
      return (tf.where(is_sos, end, pos + step), is_code(0xD9),
              tf.where(problem > 0, problem, found), frame,
              tf.where(is_code(0xDD), r.uint(pos + 4, 2, False), restart),
              tf.logical_or(jfif, is_jfif),
              tf.where(is_adobe, r.u8(pos + 15), adobe), coef_bits,
              tf.cond(is_sos, lambda: tf.concat([scans, tf.stack(
                  [pos + 2 + length, end, r.u8(pos + 4), restart])[None]], 0),
                      lambda: scans),
              tf.cond(is_code(0xC4), lambda: tf.concat(
                  [tables, tf.stack([pos, length])[None]], 0),
                      lambda: tables))

    state = (_i64(2), tf.constant(False), _i64(0), _Frame.none(), _i64(0),
             tf.constant(False), _i64(-1),
             tf.fill([_MAX_COMPONENTS, 64], _i64(-1)),
             tf.zeros([0, 4], tf.int64), tf.zeros([0, 2], tf.int64))
    invariants = tf.nest.map_structure(lambda t: t.shape, state)
    invariants = invariants[:-2] + (tf.TensorShape([None, 4]),
                                    tf.TensorShape([None, 2]))
    (_, _, problem, frame, _, jfif, adobe, _, self.scans,
     self.tables) = _walk(cond, body, state, invariants)
    components = tf.reduce_sum(tf.cast(frame[4] >= 0, tf.int64))
    # libjpeg's default_decompress_parms: the Adobe transform gives the
    # colour space of 3 (unless JFIF) and 4 component files.
    bad_adobe = tf.logical_and(adobe >= 0, tf.logical_or(
        tf.logical_and(tf.logical_and(tf.equal(components, 3),
                                      tf.logical_not(jfif)), adobe > 1),
        tf.logical_and(tf.equal(components, 4),
                       tf.logical_not(_is_any(adobe, (0, 2))))))
    self.problem = tf.where(problem > 0, problem,
                            tf.where(bad_adobe, _i64(3), _i64(0)))
    self.frame = frame
    self.components = components
    self.huffman = frame[7]

  def _segments(self):
    starts = self.scans[:, 0]
    ends = tf.concat([self.scans[:, 1], [-1]], 0)
    scan = tf.searchsorted(starts, self.candidates, side='right',
                           out_type=tf.int64) - 1
    scan = tf.where(scan >= 0, scan, tf.size(starts, out_type=tf.int64))
    inside = self.candidates <= tf.gather(ends, scan)
    marks = tf.boolean_mask(self.candidates, inside)
    low = tf.gather(tf.concat([starts, [0]], 0), tf.boolean_mask(scan, inside))
    b = self.r.b

    def after_fill(p):  # Fill bytes (0xFF) before a marker belong to it.
      return tf.logical_and(p > low, tf.equal(tf.gather(b, tf.maximum(
          p - 1, 0)), 0xFF))

    self.segment_ends = tf.while_loop(
        lambda p: tf.reduce_any(after_fill(p)),
        lambda p: [tf.where(after_fill(p), p - 1, p)], [marks])[0]
    # Where each segment's data starts: after SOS, or after an RSTn.
    self.segment_starts = tf.concat([starts[:1], marks[:-1] + 2], 0)
    # The tail check: one sequential Huffman scan holding every component.
    self.one_scan = tf.logical_and(self.frame[1], tf.logical_and(
        tf.equal(tf.shape(self.scans)[0], 1), tf.logical_and(
            tf.size(marks) > 0,
            tf.equal(self.scans[0, 2], self.components))))

  def _complete_tables(self):
    """table_edits: each DHT segment with its Huffman tables completed.

    Codes a table leaves unassigned are "bad codes" to libjpeg (a warning,
    then symbol 0): in a file decoded with completed tables they decode to
    a large value instead, so data that holds one decodes otherwise, while
    data that holds none decodes the same (canonical codes of the lengths
    already used keep their values: the new ones all come after them). All
    free codes of the longest length are assigned but the all-ones one
    (libjpeg refuses a table that uses it), then one code of each longer
    length. tables_complete: every table could be completed so.
    """
    r, segments = self.r, self.tables
    count = tf.shape(segments, out_type=tf.int64)[0]
    lengths = tf.range(1, 17, dtype=tf.int64)

    def table(q, end):
      """(the table at q completed, where the next starts, complete)."""
      kind, counts = r.u8(q), r.bytes(q + 1, 16)
      total = tf.reduce_sum(counts)
      valid = tf.logical_and(q + 17 + total <= end, total <= 256)
      longest = tf.reduce_max(tf.where(counts > 0, lengths, 0))
      used = tf.reduce_sum(tf.where(lengths <= longest, tf.bitwise.left_shift(
          counts, tf.maximum(longest - lengths, 0)), 0))
      free = tf.bitwise.left_shift(_i64(1), longest) - used
      room = tf.minimum(255 - tf.reduce_max(tf.where(
          tf.equal(lengths, longest), counts, 0)), 256 - total - (
              16 - longest))
      ok = tf.logical_and(tf.logical_and(valid, longest > 0),
                          tf.logical_and(free >= 1, free - 1 <= room))
      added = tf.where(ok, tf.where(
          tf.equal(lengths, longest), free - 1,
          tf.cast(lengths > longest, tf.int64)), _i64(0))
      symbol = _byte_string(tf.where(kind // 16 == 0, _i64(11), _i64(0x0A)))
      new = tf.strings.join([
          _byte_string(kind),
          tf.strings.reduce_join(_byte_string(counts + added)),
          _substr(self.data_string, q + 17, total),
          tf.strings.reduce_join(tf.fill([tf.reduce_sum(added)], symbol))])
      new = tf.where(valid, new, _substr(self.data_string, q, end - q))
      return new, tf.where(valid, q + 17 + total, end), ok

    def cond(i, *_):
      return i < count

    def body(i, q, pieces, owners, complete):
      end = segments[i, 0] + 2 + segments[i, 1]
      q = tf.where(q < 0, segments[i, 0] + 4, q)
      new, nxt, ok = tf.cond(q < end, lambda: table(q, end), lambda: (
          tf.constant(b''), end, tf.constant(True)))
      done = nxt >= end
      return (tf.where(done, i + 1, i), tf.where(done, _i64(-1), nxt),
              tf.concat([pieces, new[None]], 0),
              tf.concat([owners, i[None]], 0), tf.logical_and(complete, ok))

    state = (_i64(0), _i64(-1), tf.zeros([0], tf.string),
             tf.zeros([0], tf.int64), tf.constant(True))
    invariants = (tf.TensorShape([]), tf.TensorShape([]),
                  tf.TensorShape([None]), tf.TensorShape([None]),
                  tf.TensorShape([]))
    _, _, pieces, owners, complete = _walk(cond, body, state, invariants)
    joined = tf.strings.unsorted_segment_join(pieces, owners, count)
    size = 2 + tf.cast(tf.strings.length(joined), tf.int64)
    self.table_edits = (segments[:, 0], segments[:, 1] + 2, tf.strings.join([
        b'\xff\xc4', _byte_string(size // 256), _byte_string(size % 256),
        joined]))
    self.tables_complete = complete

  def _edited(self, positions, lengths, inserts) -> tf.Tensor:
    """The data with its tables completed and the given edits (which lie in
    scan data, apart from the tables)."""
    where, size, new = self.table_edits
    positions = tf.concat([where, positions], 0)
    lengths = tf.concat([size, lengths], 0)
    # A DHT may start where a scan's data ends: the insertion goes first.
    order = tf.argsort(2 * positions + tf.cast(lengths > 0, tf.int64))
    return _splice_many(self.data_string, tf.gather(positions, order),
                        tf.gather(lengths, order),
                        tf.gather(tf.concat([new, inserts], 0), order))

  def with_filler(self) -> tf.Tensor:
    """The data, tables completed, with _SEGMENT_FILLER before each
    segment's closing marker."""
    count = tf.size(self.segment_ends)
    return self._edited(self.segment_ends, tf.zeros([count], tf.int64),
                        tf.fill([count], _SEGMENT_FILLER))

  def with_tails_changed(self):
    """(with_filler() with the last _TAIL data bytes of each segment
    changed, bool [K]: whether the segment has that many; a stuffed 0xFF
    0x00 pair is one data byte). Every other bit is flipped (0x55 becomes
    0x00): the result holds no 0xFF, so no marker, and no run of 16 one
    bits, the only code a completed table leaves unassigned."""
    r = self.r
    starts, ends = self.segment_starts, self.segment_ends

    def back(p, i):
      pair = tf.logical_and(tf.equal(r.at(p - 1), 0),
                            tf.equal(r.at(p - 2), 0xFF))
      return tf.where(pair, p - 2, p - 1), i + 1

    pos = tf.while_loop(lambda p, i: i < _TAIL, back, (ends, 0))[0]
    enough = pos >= starts
    pos = tf.where(enough, pos, ends)
    window = ends[:, None] + tf.range(-2 * _TAIL, 0, dtype=tf.int64)
    tail = tf.cast(tf.gather(r.b, tf.maximum(window, 0)), tf.int64)
    new = tf.bitwise.bitwise_xor(tail, 0xAA)
    new = tf.where(tf.equal(new, 0xFF), _i64(0), new)
    new = tf.where(window >= pos[:, None], _byte_string(new), '')
    inserts = tf.strings.join([tf.strings.reduce_join(new, axis=1),
                               _SEGMENT_FILLER])
    return self._edited(pos, ends - pos, inserts), enough

  def mcu_grid(self):
    """(MCU height, width in pixels, MCUs a restart interval) of the scan
    of a one-scan file: its segments cover consecutive MCUs, row by row."""
    _, _, width, height, _, hs, vs, _ = self.frame
    single = tf.equal(self.scans[0, 2], 1)  # A one-component file.
    mcu_h = tf.where(single, _i64(8), 8 * tf.reduce_max(vs))
    mcu_w = tf.where(single, _i64(8), 8 * tf.reduce_max(hs))
    count = _ceil_div(width, mcu_w) * _ceil_div(height, mcu_h)
    restart = self.scans[0, 3]
    return mcu_h, mcu_w, tf.where(restart > 0, restart, tf.maximum(count, 1))


def _mcu_digests(image, mcu_h, mcu_w) -> tf.Tensor:
  """uint8 [MCUs, 8]: a FarmHash of each MCU's pixels, MCUs row by row."""
  shape = tf.shape(image, out_type=tf.int64)
  rows, cols = _ceil_div(shape[0], mcu_h), _ceil_div(shape[1], mcu_w)
  padded = tf.pad(image, [[0, rows * mcu_h - shape[0]],
                          [0, cols * mcu_w - shape[1]], [0, 0]])
  blocks = tf.reshape(padded, tf.stack([rows, mcu_h, cols, mcu_w, 3]))
  blocks = tf.transpose(blocks, [0, 2, 1, 3, 4])
  return tf.fingerprint(tf.reshape(blocks, tf.stack([rows * cols, -1])))


# ------------------------------------------------------------------ decoders


class _Decoder:
  """Per-format header checks and decoding of one input (TF ops only)."""

  def __init__(self, data, prefix, model_input: ModelInput):
    self.data = data
    self.prefix = prefix
    self.r = _Bytes(data)
    self.channels = model_input.channels
    self.max_pixels = int(model_input.max_pixels)
    self.min_side = max(model_input.stored_size)

  def _fail_unless(self, ok, *parts):
    message = tf.strings.join([self.prefix] + [
        p if isinstance(p, str) else tf.strings.as_string(p) for p in parts])
    return tf.debugging.Assert(ok, [message])

  def _size_checks(self, fmt: str, width, height) -> list:
    width, height = tf.cast(width, tf.int64), tf.cast(height, tf.int64)
    return [
        self._fail_unless(
            tf.logical_and(width > 0, height > 0),
            f'{fmt} header gives an invalid size ', width, 'x', height,
            ' (corrupt or truncated file)'),
        self._fail_unless(
            width * height <= self.max_pixels,
            f'{fmt} image of ', width, 'x', height, ' = ', width * height,
            f' pixels exceeds the serving limit of {self.max_pixels} pixels '
            '(max_pixels, the build\'s decompression-bomb limit); send a '
            'smaller image'),
    ]

  # Each format returns (uint8 [h, w, channels], EXIF orientation int64).

  def _refuse_empty(self, image, *parts):
    """image, after an error (the parts) if the decoder refused the data."""
    with tf.control_dependencies([self._fail_unless(tf.size(image) > 0,
                                                    *parts)]):
      return tf.identity(image)

  def jpeg(self):
    header = _decode_or_empty(lambda d: tf.image.extract_jpeg_shape(
        d, output_type=tf.int64)[None], self.data)
    shape = tf.concat([header, tf.zeros([1, 3], tf.int64)], 0)[0]
    height, width = shape[0], shape[1]
    markers = _JpegMarkers(self.r, self.data)
    start, end = _jpeg_exif(self.r)
    orientation = _tiff_orientation(self.r, start, end)
    checked = _in_order(
        lambda: self._fail_unless(tf.size(header) > 0, 'corrupt JPEG header '
                                  '(libjpeg cannot read it)'),
        lambda: tf.group(self._size_checks('JPEG', width, height)),
        lambda: self._fail_unless(
            tf.equal(markers.problem, 0), 'corrupt JPEG data (',
            tf.gather(tf.constant(_JPEG_PROBLEMS), markers.problem), ')'))
    # The build decodes at the smallest DCT scale that keeps both sides >=
    # the stored size (Pillow's draft); TF offers 1/2, 1/4, 1/8 of those.
    fits = [tf.logical_and((height + f - 1) // f >= self.min_side,
                           (width + f - 1) // f >= self.min_side)
            for f in (2, 4, 8)]
    index = tf.where(fits[2], 3, tf.where(fits[1], 2, tf.where(fits[0], 1, 0)))
    with tf.control_dependencies([checked]):
      image = _decode_or_empty(lambda d: tf.switch_case(index, [
          (lambda f=f: tf.io.decode_jpeg(d, channels=3, ratio=f,
                                         dct_method='INTEGER_ACCURATE'))
          for f in (1, 2, 4, 8)]), tf.identity(self.data))
    image = self._refuse_empty(image, 'corrupt JPEG data (libjpeg cannot '
                               'decode it)')
    with tf.control_dependencies([self._jpeg_data_checks(markers, image)]):
      image = tf.identity(image)
    return _to_channels(image, self.channels), orientation

  def _jpeg_data_checks(self, markers: _JpegMarkers, after):
    """Asserts that libjpeg would not warn about the scan data of a Huffman
    coded JPEG (see the JPEG strictness section)."""
    with tf.control_dependencies([after]):
      complete, used = tf.cond(markers.huffman,
                               lambda: self._jpeg_scan_data(markers),
                               lambda: (tf.constant(True), tf.constant(True)))
    short = self._fail_unless(complete, 'corrupt JPEG data (a scan ends '
                              'before its last block, or holds a bad Huffman '
                              'code: the file is cut short or damaged)')
    with tf.control_dependencies([short]):
      return self._fail_unless(used, 'corrupt JPEG data (bytes before a '
                               'marker are never decoded: the scan data is '
                               'damaged)')

  def _jpeg_scan_data(self, markers: _JpegMarkers):
    """(every segment complete and without bad codes, every tail decoded):
    full-scale decodes without fancy upsampling (so each MCU's pixels
    depend on its own data only), one at a time."""
    def full(data):
      return _decode_or_empty(lambda d: tf.io.decode_jpeg(
          d, channels=3, fancy_upscaling=False,
          dct_method='INTEGER_ACCURATE'), data)

    digest = _digest(full(self.data))
    with tf.control_dependencies([digest]):
      filled = full(markers.with_filler())
    mcu_h, mcu_w, interval = markers.mcu_grid()
    tails = tf.logical_and(tf.logical_and(
        markers.one_scan, markers.tables_complete), tf.size(filled) > 0)
    blocks = tf.cond(tails, lambda: _mcu_digests(filled, mcu_h, mcu_w),
                     lambda: tf.zeros([0, 8], tf.uint8))
    complete = tf.reduce_all(tf.equal(_digest(filled), digest))

    def tails_decoded():
      """Whether each segment's changed tail changed its MCUs' pixels."""
      changed, enough = markers.with_tails_changed()
      with tf.control_dependencies([blocks]):
        other = full(changed)
      moved = tf.cond(
          tf.reduce_all(tf.equal(tf.shape(other), tf.shape(filled))),
          lambda: tf.reduce_any(tf.not_equal(
              _mcu_digests(other, mcu_h, mcu_w), blocks), 1),
          lambda: tf.ones(tf.shape(blocks)[:1], tf.bool))
      segment = tf.range(tf.size(moved, out_type=tf.int64)) // interval
      seen = tf.math.unsorted_segment_max(
          tf.cast(moved, tf.int32), segment, tf.size(enough))
      return tf.reduce_all(tf.logical_or(tf.logical_not(enough), seen > 0))

    used = tf.cond(tf.logical_and(complete, tails), tails_decoded,
                   lambda: tf.constant(True))
    return complete, used

  def png(self):
    r = self.r
    width, height = r.uint(16, 4, False), r.uint(20, 4, False)
    depth, color_type = r.u8(24), r.u8(25)
    layout = _PngLayout(r, self.data)
    checked = _in_order(
        lambda: self._fail_unless(r.equals(12, b'IHDR'),
                                  'PNG has no IHDR header (corrupt file)'),
        lambda: tf.group(self._size_checks('PNG', width, height)),
        lambda: self._fail_unless(tf.equal(layout.problem, 0),
                                  layout.message))
    exif, exif_end, trns, trns_len = _png_chunks(r)
    orientation = _tiff_orientation(r, exif, exif_end)

    def decode16():
      values = self._refuse_empty(_decode_or_empty(
          lambda d: tf.io.decode_png(d, channels=0, dtype=tf.uint16),
          layout.for_decoder), _PNG_UNDECODABLE)
      # Pillow: 16-bit grey is scaled (round(v / 257), source_image.to_8bit);
      # every other 16-bit mode keeps the high byte.
      return tf.cond(
          tf.equal(color_type, 0),
          lambda: tf.cast((tf.cast(values, tf.int32) + 128) // 257, tf.uint8),
          lambda: tf.cast(tf.bitwise.right_shift(
              values, tf.constant(8, tf.uint16)), tf.uint8))

    def decode8():
      image = self._refuse_empty(_decode_or_empty(
          lambda d: tf.io.decode_png(d, channels=0), layout.for_decoder),
                                 _PNG_UNDECODABLE)
      # tRNS of 8-bit grey / RGB: one colour is transparent (TF keeps it
      # opaque; the build composites it onto white).
      key = r.uint(trns + 2 * tf.range(3, dtype=tf.int64), 2, False)
      keyed = tf.logical_and(trns >= 0, tf.logical_and(
          tf.equal(depth, 8), tf.logical_or(
              tf.logical_and(tf.equal(color_type, 0), trns_len >= 2),
              tf.logical_and(tf.equal(color_type, 2), trns_len >= 6))))

      def whiten():
        key_ = key[:tf.shape(image)[-1]]
        matches = tf.logical_and(tf.reduce_all(key_ <= 255), tf.reduce_all(
            tf.equal(image, tf.cast(tf.minimum(key_, 255), tf.uint8)),
            axis=-1, keepdims=True))
        return tf.where(matches, tf.constant(255, tf.uint8), image)

      return tf.cond(keyed, whiten, lambda: image)

    with tf.control_dependencies([checked]):
      image = tf.cond(tf.equal(depth, 16), decode16, decode8)
    return _to_channels(image, self.channels), orientation

  def bmp(self):
    r = self.r
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
    checked = _in_order(
        lambda: self._fail_unless(
            supported, 'BMP with ', bpp, ' bits per pixel, compression ',
            compression, ' and a ', header, '-byte header is not supported '
            'by the serving endpoint (only uncompressed 24/32-bit, or 8-bit '
            'grey); convert it to PNG or JPEG'),
        lambda: self._fail_unless(
            tf.logical_and(width > 0, rows > 0), 'BMP header gives an '
            'invalid size ', width, 'x', height, ' (corrupt or truncated '
            'file)'),
        lambda: tf.group(self._size_checks('BMP', width, rows)),
        lambda: self._fail_unless(
            r.n >= needed, 'BMP pixel data is cut short (truncated file): ',
            r.n, ' bytes, the header needs ', needed))
    with tf.control_dependencies([checked]):
      data = tf.strings.join([_substr(self.data, 0, exact), tf.strings.
                              reduce_join(tf.fill([tf.maximum(
                                  exact - r.n, 0)], b'\0'))])
    image = self._refuse_empty(_decode_or_empty(
        lambda d: tf.io.decode_bmp(d, channels=0), data),
                               'corrupt BMP data (the decoder cannot read it)')
    # 32-bit BMPs are read as RGB by Pillow (the 4th byte is padding).
    image = tf.cond(tf.equal(tf.shape(image)[-1], 4),
                    lambda: image[..., :3], lambda: image)
    return _to_channels(image, self.channels), _i64(1)

  def webp(self):
    r = self.r
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
    checks = [self._fail_unless(
        known, 'WebP has no VP8/VP8L/VP8X header (corrupt file)')]
    checks += self._size_checks('WebP', width, height)
    flags = r.u8(20)
    start, end = tf.cond(vp8x, lambda: _webp_exif(r),
                         lambda: (_i64(-1), _i64(-1)))
    orientation = _tiff_orientation(r, start, end)
    animated = tf.logical_and(vp8x, tf.equal(flags // 2 % 2, 1))
    opaque = tf.logical_and(vp8x, tf.equal(flags // 16 % 2, 0))
    with tf.control_dependencies(checks):
      # TF decodes an animation's first frame as RGBA but sizes its output
      # buffer by the alpha flag: without the flag it writes past the buffer
      # (heap corruption, TF 2.21). So an animation always gets the flag.
      data = tf.where(tf.logical_and(animated, opaque), _splice(
          self.data, 20, _byte_string(flags + 16), 1), self.data)
    image = self._refuse_empty(_decode_or_empty(_decode_still, data),
                               'corrupt WebP data (the decoder cannot read '
                               'it)')
    # An animation without the alpha flag is RGB to Pillow (RGBX).
    image = tf.cond(tf.logical_and(opaque, tf.equal(tf.shape(image)[-1], 4)),
                    lambda: image[..., :3], lambda: image)
    return _to_channels(image, self.channels), orientation

  def gif(self):
    """First frame only, its transparency onto white, on Pillow's canvas.

    TF's GIF decoder decodes every frame, paints transparency black and
    sizes the output by the largest frame, so the bytes are cut after the
    first frame (which also bounds the decoder's memory), its transparent
    colour is made white and opaque, and the frame is placed on Pillow's
    canvas (screen size, grown to fit the frame).
    """
    r = self.r
    screen_w, screen_h = r.uint(6, 2, True), r.uint(8, 2, True)
    flags = r.u8(10)
    has_gct = flags >= 128
    gct_size = tf.where(has_gct, 3 * tf.bitwise.left_shift(
        _i64(2), flags % 8), _i64(0))

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

    _, _, image_pos, gce, transparent = _walk(
        cond, body, (13 + gct_size, tf.constant(False), _i64(-1), _i64(-1),
                     _i64(-1)))
    left, top = r.uint(image_pos + 1, 2, True), r.uint(image_pos + 3, 2, True)
    frame_w = r.uint(image_pos + 5, 2, True)
    frame_h = r.uint(image_pos + 7, 2, True)
    frame_flags = r.u8(image_pos + 9)
    has_lct = frame_flags >= 128
    lct_size = tf.where(has_lct, 3 * tf.bitwise.left_shift(
        _i64(2), frame_flags % 8), _i64(0))
    palette = tf.where(has_lct, image_pos + 10,
                       tf.where(has_gct, _i64(13), _i64(-1)))
    palette_size = tf.where(has_lct, lct_size, gct_size)
    end = _skip_sub_blocks(r, image_pos + 10 + lct_size + 1)
    canvas_w = tf.maximum(screen_w, left + frame_w)
    canvas_h = tf.maximum(screen_h, top + frame_h)
    checks = [self._fail_unless(
        tf.logical_and(image_pos >= 0, end <= r.n),
        'GIF has no complete image within its first ', MAX_HEADER_STEPS,
        ' blocks (corrupt or truncated file)')]
    checks += self._size_checks('GIF', canvas_w, canvas_h)
    checks += self._size_checks('GIF frame', frame_w, frame_h)

    with tf.control_dependencies(checks):
      data = tf.strings.join([_substr(self.data, 0, end), b';'])
    data = _splice(data, image_pos + 1, b'\0\0\0\0', 4)  # Frame at 0, 0.
    keyed = tf.logical_and(transparent >= 0, gce >= 0)
    data = tf.where(keyed, _splice(data, gce, _byte_string(
        r.u8(gce) // 2 * 2), 1), data)
    whiten = tf.logical_and(tf.logical_and(transparent >= 0, palette >= 0),
                            3 * transparent + 3 <= palette_size)
    data = tf.where(whiten, _splice(data, palette + 3 * transparent,
                                   b'\xff\xff\xff', 3), data)
    frame = self._refuse_empty(_decode_or_empty(
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
    return _to_channels(image, self.channels), _i64(1)


def _sniff(data) -> tf.Tensor:
  """Format index (_JPEG.._WEBP) from the first bytes, -1 if none."""
  head = tf.strings.substr(tf.strings.join(
      [tf.strings.substr(data, 0, _HEAD), b'\0' * _HEAD]), 0, _HEAD)
  head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

  def starts(pos, expected):
    return tf.reduce_all(tf.equal(head[pos:pos + len(expected)],
                                  tf.constant(list(expected), tf.int64)))

  kind = tf.where(tf.logical_and(starts(0, b'RIFF'), starts(8, b'WEBP')),
                  _i64(_WEBP), _i64(-1))
  for index, pos, signature in reversed(_SIGNATURES):
    kind = tf.where(starts(pos, signature), _i64(index), kind)
  return kind


def preprocess_image(data, index, model_input: ModelInput) -> tf.Tensor:
  """One encoded source image (string []) -> uint8 [height, width, C].

  The pixels the model reads for that file in training: the build's
  conversion to the stored image, then ModelInput.read_resize. Raises
  InvalidArgumentError (at run time, naming `image_bytes[index]`) for input
  that is no image of an accepted format, or whose header says it is over
  model_input.max_pixels.
  """
  stored = model_input.stored_size
  channels = model_input.channels
  prefix = tf.strings.join(['image_bytes[', tf.strings.as_string(index),
                            ']: '])
  kind = _sniff(data)
  size = tf.strings.length(data)
  known = tf.debugging.Assert(kind >= 0, [tf.strings.join([
      prefix, 'not a JPEG, PNG, GIF, BMP or WebP image (',
      tf.strings.as_string(size), ' bytes): send the bytes of an image file'])])
  with tf.control_dependencies([known]):
    decoder = _Decoder(tf.identity(data), prefix, model_input)
    branches = [decoder.jpeg, decoder.png, decoder.gif, decoder.bmp,
                decoder.webp]
    image, orientation = tf.switch_case(
        tf.cast(tf.maximum(kind, 0), tf.int32), branches)
  image = _orient(image, orientation)
  image.set_shape([None, None, channels])

  def to_stored():
    resized = resize_modes.get(model_input.resize_mode).tensorflow(
        image, height=stored[0], width=stored[1])
    if model_input.image_format == 'jpeg':
      # What the build writes: the resized image as a JPEG at its quality.
      options = model_input.source_options()
      resized = model_input.decode(tf.io.encode_jpeg(
          resized, quality=options.jpeg_quality))
    return resized

  shape = tf.shape(image)
  at_stored = tf.logical_and(tf.equal(shape[0], stored[0]),
                             tf.equal(shape[1], stored[1]))
  image = tf.cond(at_stored, lambda: image, to_stored)
  image = tf.ensure_shape(image, [stored[0], stored[1], channels])
  return model_input.read_resize(image)
