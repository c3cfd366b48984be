"""PNG: size, chunk checks as Pillow reads them, tRNS, EXIF, decode (TF ops).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.serving.byte_reads import Bytes
from pipelines.preprocessing.serving.byte_reads import byte_string
from pipelines.preprocessing.serving.byte_reads import first_true
from pipelines.preprocessing.serving.byte_reads import fourcc
from pipelines.preprocessing.serving.byte_reads import i64
from pipelines.preprocessing.serving.byte_reads import substr
from pipelines.preprocessing.serving.byte_reads import walk
from pipelines.preprocessing.serving.crc32 import crc32
from pipelines.preprocessing.serving.exif import tiff_orientation
from pipelines.preprocessing.serving.pixels import to_channels
from pipelines.preprocessing.serving.source import Source
from pipelines.preprocessing.serving.source import decode_or_empty
from pipelines.preprocessing.serving.source import in_order


def _png_chunks(r: Bytes):
  """(eXIf start, end, tRNS start, length) from the chunk list; -1 if none."""
  iend, exif_type, trns_type = (fourcc(b'IEND'), fourcc(b'eXIf'),
                                fourcc(b'tRNS'))

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

  minus = i64(-1)
  _, exif, exif_end, trns, trns_len = walk(
      cond, body, (i64(8), minus, minus, minus, minus))
  return exif, exif_end, trns, trns_len


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

  def __init__(self, r: Bytes, data):
    self.r, self.data = r, data
    first = self._before_image_data()
    members = self._image_chunks(first)
    after = self._after_image_data(members)
    problem = tf.where(self.problem > 0, self.problem, tf.where(
        after >= 0, i64(4), i64(0)))
    name = substr(data, tf.where(self.problem > 0, self.at, after) + 4, 4)
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
    idat, iend = fourcc(b'IDAT'), fourcc(b'IEND')

    def cond(pos, first, problem, at, chunks):
      return tf.logical_and(tf.logical_and(first < 0, tf.equal(problem, 0)),
                            pos + 8 <= r.n)

    def body(pos, first, problem, at, chunks):
      length, kind, named = self._header(pos)
      found = tf.logical_and(named, tf.equal(kind, idat))
      end = tf.logical_and(named, tf.equal(kind, iend))
      cut = tf.logical_and(named, pos + 12 + length > r.n)
      problem = tf.where(tf.logical_not(named), i64(1), tf.where(
          tf.logical_and(cut, tf.logical_not(tf.logical_or(found, end))),
          i64(2), i64(0)))
      keep = tf.logical_not(tf.logical_or(tf.logical_or(found, end),
                                          problem > 0))
      chunks = tf.cond(keep, lambda: tf.concat(
          [chunks, tf.stack([pos, length])[None]], 0), lambda: chunks)
      return (tf.where(end, r.n, pos + 12 + length),
              tf.where(found, pos, first), problem, pos, chunks)

    state = (i64(8), i64(-1), i64(0), i64(0), tf.zeros([0, 2], tf.int64))
    invariants = (tf.TensorShape([]),) * 4 + (tf.TensorShape([None, 2]),)
    _, first, problem, at, chunks = walk(cond, body, state, invariants)
    # Pillow checks the CRC of each chunk it read before the image data.
    starts, lengths = chunks[:, 0], chunks[:, 1]
    limit = tf.where(first >= 0, first, r.n)
    crcs = crc32(r.b[:limit], starts + 4, starts + 8 + lengths)
    bad = tf.not_equal(crcs, r.uint(starts + 8 + lengths, 4, False))
    index = first_true(bad)
    any_bad = tf.reduce_any(bad)
    self.problem = tf.where(problem > 0, problem, tf.where(
        any_bad, i64(3), i64(0)))
    self.at = tf.where(problem > 0, at, tf.where(any_bad, tf.gather(
        tf.concat([starts, [0]], 0), index), i64(0)))
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
        i64(1), k) <= count, step, (i64(0), jump, reach))[2]
    return tf.boolean_mask(starts, reach)

  def _after_image_data(self, members):
    """Position of the chunk after the image data that Pillow finds cut
    short (its load_end), else -1."""
    r = self.r
    last = tf.concat([[i64(-1)], members], 0)[-1]
    start = tf.where(last >= 0, last + 12 + r.uint(last, 4, False), r.n)
    stops = tf.constant([fourcc(b'IEND'), fourcc(b'fcTL')], tf.int64)

    def cond(pos, cut):
      length, kind, named = self._header(pos)
      return tf.logical_and(tf.logical_and(cut < 0, pos + 8 <= r.n),
                            tf.logical_and(named, tf.logical_not(
                                tf.reduce_any(tf.equal(kind, stops)))))

    def body(pos, cut):
      length = r.uint(pos, 4, False)
      return pos + 12 + length, tf.where(pos + 8 + length > r.n, pos, cut)

    return walk(cond, body, (start, i64(-1)))[1]

  def _rebuilt(self, first, members):
    """The chunks before `first`, one IDAT with the image data, IEND."""
    lengths = self.r.uint(members, 4, False)
    chunk = tf.strings.join([b'IDAT', tf.strings.reduce_join(
        tf.strings.substr(self.data, members + 8, lengths))])
    size = tf.cast(tf.strings.length(chunk), tf.int64)
    crc = crc32(tf.io.decode_raw(chunk, tf.uint8), tf.zeros([1], tf.int64),
                 size[None])[0]
    return tf.strings.join([substr(self.data, 0, first), _be32(size - 4),
                            chunk, _be32(crc), _PNG_IEND])


def _be32(value) -> tf.Tensor:
  """The 4-byte big-endian string of value (0 .. 2^32 - 1)."""
  shifts = tf.constant([24, 16, 8, 0], tf.int64)
  return tf.strings.reduce_join(byte_string(tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(value, shifts), 0xFF)))


_PNG_UNDECODABLE = ('corrupt PNG data (the decoder cannot read its image '
                    'data: truncated or damaged)')


def decode(src: Source):
  """PNG: IHDR size, the chunks Pillow checks, tRNS, EXIF, 8/16-bit decode."""
  r = src.r
  width, height = r.uint(16, 4, False), r.uint(20, 4, False)
  depth, color_type = r.u8(24), r.u8(25)
  layout = _PngLayout(r, src.data)
  checked = in_order(
      lambda: src.fail_unless(r.equals(12, b'IHDR'),
                                'PNG has no IHDR header (corrupt file)'),
      lambda: tf.group(src.size_checks('PNG', width, height)),
      lambda: src.fail_unless(tf.equal(layout.problem, 0),
                                layout.message))
  exif, exif_end, trns, trns_len = _png_chunks(r)
  orientation = tiff_orientation(r, exif, exif_end)

  def decode16():
    values = src.refuse_empty(decode_or_empty(
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
    image = src.refuse_empty(decode_or_empty(
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
  return to_channels(image, src.channels), orientation
