"""JPEG: size from the header, libjpeg's strictness, EXIF, decode (TF ops).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing.serving.byte_reads import Bytes
from pipelines.preprocessing.serving.byte_reads import byte_string
from pipelines.preprocessing.serving.byte_reads import first_true
from pipelines.preprocessing.serving.byte_reads import i64
from pipelines.preprocessing.serving.byte_reads import substr
from pipelines.preprocessing.serving.byte_reads import walk
from pipelines.preprocessing.serving.exif import tiff_orientation
from pipelines.preprocessing.serving.pixels import to_channels
from pipelines.preprocessing.serving.source import Source
from pipelines.preprocessing.serving.source import decode_or_empty
from pipelines.preprocessing.serving.source import in_order


def _jpeg_exif(r: Bytes):
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
    step = tf.where(tf.logical_or(junk, fill), i64(1),
                    tf.where(standalone, i64(2), 2 + length))
    return (pos + step, tf.where(exif, pos + 10, start),
            tf.where(exif, tf.minimum(pos + 2 + length, r.n), end),
            tf.logical_or(stop, exif))

  _, start, end, _ = walk(cond, body, (i64(2), i64(-1), i64(-1),
                                        tf.constant(False)))
  return start, end


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
# a "bad Huffman code"; see _known_gap in tests/pipelines/preprocessing/test_export_hostile.py.

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

  def __init__(self, r: Bytes, pos, code):
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
    return (tf.constant(False), tf.constant(False), i64(0), i64(0),
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

  def __init__(self, r: Bytes, data):
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
    self._walk_markers()
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
    # The data's end when the scan header runs past it (a cut file): a
    # gather out of range would race the check that names the input.
    end = tf.gather(self.closing, tf.minimum(
        _first_at_or_after(self.closing, start),
        tf.size(self.closing, tf.int64) - 1))
    first = _first_at_or_after(self.candidates, start)
    last = _first_at_or_after(self.candidates, end)
    codes = self.codes[first:last]  # All RSTn: RST0..RST7 in turn.
    in_order = tf.reduce_all(tf.equal(
        codes, 0xD0 + tf.range(last - first, dtype=tf.int64) % 8))
    in_scan = tf.reduce_any(tf.equal(ids[:, None], selectors[None, :]), 1)
    hmax, vmax = tf.reduce_max(hs), tf.reduce_max(vs)
    # ArgMax's answer (0 when none), total on an empty mask.
    one = first_true(in_scan) % tf.maximum(tf.size(in_scan, tf.int64), 1)
    mcus = tf.where(
        tf.equal(count, 1),
        _ceil_div(width * tf.gather(hs, one), 8 * hmax) *
        _ceil_div(height * tf.gather(vs, one), 8 * vmax),
        _ceil_div(width, 8 * hmax) * _ceil_div(height, 8 * vmax))
    expected = tf.where(restart > 0, _ceil_div(mcus, restart) - 1, i64(0))
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
    problem = tf.where(not_sequential, i64(4), tf.where(
        bogus, i64(5), tf.where(restarts_ok, i64(0), i64(6))))
    return end, problem, coef_bits

  def _walk_markers(self):
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
          lambda: (r.n, i64(0), coef_bits))
      frame = tuple(tf.where(is_code(*_SOFS), new, old) for new, old in zip(
          _Frame(r, pos, code).fields, frame))
      is_jfif = tf.logical_and(is_code(0xE0), tf.logical_and(
          length >= 16, r.equals(pos + 4, b'JFIF\x00')))
      is_adobe = tf.logical_and(is_code(0xEE), tf.logical_and(
          length >= 14, r.equals(pos + 4, b'Adobe')))
      found = tf.where(junk, i64(1), tf.where(
          tf.logical_and(is_jfif, tf.not_equal(r.u8(pos + 9), 1)), i64(2),
          scan_problem))
      step = tf.where(tf.logical_not(marker), tf.where(fill, i64(1), i64(
          2)), tf.where(is_code(*_STANDALONE_MARKERS), i64(2), 2 + length))
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

    state = (i64(2), tf.constant(False), i64(0), _Frame.none(), i64(0),
             tf.constant(False), i64(-1),
             tf.fill([_MAX_COMPONENTS, 64], i64(-1)),
             tf.zeros([0, 4], tf.int64), tf.zeros([0, 2], tf.int64))
    invariants = tf.nest.map_structure(lambda t: t.shape, state)
    invariants = invariants[:-2] + (tf.TensorShape([None, 4]),
                                    tf.TensorShape([None, 2]))
    (_, _, problem, frame, _, jfif, adobe, _, self.scans,
     self.tables) = walk(cond, body, state, invariants)
    # The first scan's row, -1s where there is none (a file cut short before
    # SOS): ops outside a tf.cond run whatever the checks say, and a failing
    # slice could race the check that names the input (and win).
    self.first_scan = tf.concat([self.scans, tf.fill([1, 4], i64(-1))], 0)[0]
    components = tf.reduce_sum(tf.cast(frame[4] >= 0, tf.int64))
    # libjpeg's default_decompress_parms: the Adobe transform gives the
    # colour space of 3 (unless JFIF) and 4 component files.
    bad_adobe = tf.logical_and(adobe >= 0, tf.logical_or(
        tf.logical_and(tf.logical_and(tf.equal(components, 3),
                                      tf.logical_not(jfif)), adobe > 1),
        tf.logical_and(tf.equal(components, 4),
                       tf.logical_not(_is_any(adobe, (0, 2))))))
    self.problem = tf.where(problem > 0, problem,
                            tf.where(bad_adobe, i64(3), i64(0)))
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
            tf.equal(self.first_scan[2], self.components))))

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
      free = tf.bitwise.left_shift(i64(1), longest) - used
      room = tf.minimum(255 - tf.reduce_max(tf.where(
          tf.equal(lengths, longest), counts, 0)), 256 - total - (
              16 - longest))
      ok = tf.logical_and(tf.logical_and(valid, longest > 0),
                          tf.logical_and(free >= 1, free - 1 <= room))
      added = tf.where(ok, tf.where(
          tf.equal(lengths, longest), free - 1,
          tf.cast(lengths > longest, tf.int64)), i64(0))
      symbol = byte_string(tf.where(kind // 16 == 0, i64(11), i64(0x0A)))
      new = tf.strings.join([
          byte_string(kind),
          tf.strings.reduce_join(byte_string(counts + added)),
          substr(self.data_string, q + 17, total),
          tf.strings.reduce_join(tf.fill([tf.reduce_sum(added)], symbol))])
      new = tf.where(valid, new, substr(self.data_string, q, end - q))
      return new, tf.where(valid, q + 17 + total, end), ok

    def cond(i, *_):
      return i < count

    def body(i, q, pieces, owners, complete):
      end = segments[i, 0] + 2 + segments[i, 1]
      q = tf.where(q < 0, segments[i, 0] + 4, q)
      new, nxt, ok = tf.cond(q < end, lambda: table(q, end), lambda: (
          tf.constant(b''), end, tf.constant(True)))
      done = nxt >= end
      return (tf.where(done, i + 1, i), tf.where(done, i64(-1), nxt),
              tf.concat([pieces, new[None]], 0),
              tf.concat([owners, i[None]], 0), tf.logical_and(complete, ok))

    state = (i64(0), i64(-1), tf.zeros([0], tf.string),
             tf.zeros([0], tf.int64), tf.constant(True))
    invariants = (tf.TensorShape([]), tf.TensorShape([]),
                  tf.TensorShape([None]), tf.TensorShape([None]),
                  tf.TensorShape([]))
    _, _, pieces, owners, complete = walk(cond, body, state, invariants)
    joined = tf.strings.unsorted_segment_join(pieces, owners, count)
    size = 2 + tf.cast(tf.strings.length(joined), tf.int64)
    self.table_edits = (segments[:, 0], segments[:, 1] + 2, tf.strings.join([
        b'\xff\xc4', byte_string(size // 256), byte_string(size % 256),
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
    new = tf.where(tf.equal(new, 0xFF), i64(0), new)
    new = tf.where(window >= pos[:, None], byte_string(new), '')
    inserts = tf.strings.join([tf.strings.reduce_join(new, axis=1),
                               _SEGMENT_FILLER])
    return self._edited(pos, ends - pos, inserts), enough

  def mcu_grid(self):
    """(MCU height, width in pixels, MCUs a restart interval) of the scan
    of a one-scan file: its segments cover consecutive MCUs, row by row."""
    _, _, width, height, _, hs, vs, _ = self.frame
    single = tf.equal(self.first_scan[2], 1)  # A one-component file.
    mcu_h = tf.where(single, i64(8), 8 * tf.reduce_max(vs))
    mcu_w = tf.where(single, i64(8), 8 * tf.reduce_max(hs))
    count = _ceil_div(width, mcu_w) * _ceil_div(height, mcu_h)
    restart = self.first_scan[3]
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


def decode(src: Source):
  """JPEG: header and strictness checks, then a decode at the build's DCT
  scale."""
  header = decode_or_empty(lambda d: tf.image.extract_jpeg_shape(
      d, output_type=tf.int64)[None], src.data)
  shape = tf.concat([header, tf.zeros([1, 3], tf.int64)], 0)[0]
  height, width = shape[0], shape[1]
  markers = _JpegMarkers(src.r, src.data)
  start, end = _jpeg_exif(src.r)
  orientation = tiff_orientation(src.r, start, end)
  checked = in_order(
      lambda: src.fail_unless(tf.size(header) > 0, 'corrupt JPEG header '
                                '(libjpeg cannot read it)'),
      lambda: tf.group(src.size_checks('JPEG', width, height)),
      lambda: src.fail_unless(
          tf.equal(markers.problem, 0), 'corrupt JPEG data (',
          tf.gather(tf.constant(_JPEG_PROBLEMS), markers.problem), ')'))
  # The build decodes at the smallest DCT scale that keeps both sides >=
  # the stored size (Pillow's draft); TF offers 1/2, 1/4, 1/8 of those.
  fits = [tf.logical_and((height + f - 1) // f >= src.min_side,
                         (width + f - 1) // f >= src.min_side)
          for f in (2, 4, 8)]
  index = tf.where(fits[2], 3, tf.where(fits[1], 2, tf.where(fits[0], 1, 0)))
  with tf.control_dependencies([checked]):
    image = decode_or_empty(lambda d: tf.switch_case(index, [
        (lambda f=f: tf.io.decode_jpeg(d, channels=3, ratio=f,
                                       dct_method='INTEGER_ACCURATE'))
        for f in (1, 2, 4, 8)]), tf.identity(src.data))
  image = src.refuse_empty(image, 'corrupt JPEG data (libjpeg cannot '
                             'decode it)')
  with tf.control_dependencies([_data_checks(src, markers, image)]):
    image = tf.identity(image)
  return to_channels(image, src.channels), orientation


def _data_checks(src: Source, markers: _JpegMarkers, after):
  """Asserts that libjpeg would not warn about the scan data of a Huffman
  coded JPEG (see the JPEG strictness section)."""
  with tf.control_dependencies([after]):
    complete, used = tf.cond(markers.huffman,
                             lambda: _scan_data(src, markers),
                             lambda: (tf.constant(True), tf.constant(True)))
  short = src.fail_unless(complete, 'corrupt JPEG data (a scan ends '
                            'before its last block, or holds a bad Huffman '
                            'code: the file is cut short or damaged)')
  with tf.control_dependencies([short]):
    return src.fail_unless(used, 'corrupt JPEG data (bytes before a '
                             'marker are never decoded: the scan data is '
                             'damaged)')


def _scan_data(src: Source, markers: _JpegMarkers):
  """(every segment complete and without bad codes, every tail decoded):
  full-scale decodes without fancy upsampling (so each MCU's pixels
  depend on its own data only), one at a time."""
  def full(data):
    return decode_or_empty(lambda d: tf.io.decode_jpeg(
        d, channels=3, fancy_upscaling=False,
        dct_method='INTEGER_ACCURATE'), data)

  digest = _digest(full(src.data))
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
