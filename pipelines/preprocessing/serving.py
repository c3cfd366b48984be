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
  decode          JPEG at the largest DCT scale (1/2, 1/4, 1/8) that keeps
                  both sides >= the stored size, like the build's draft
                  decode; 16-bit PNG to 8 bits like Pillow; the first frame
                  of an animated GIF or WebP only
  EXIF            orientation tag 0x0112 of JPEG (APP1), PNG (eXIf) and WebP
                  (EXIF chunk) applied like PIL.ImageOps.exif_transpose
  to 8 bits       alpha (RGBA, LA, palette or tRNS transparency, GIF
                  transparency) composited onto white exactly like
                  Pillow's alpha_composite; RGB -> L with ITU-R 601-2 luma
  stored size     resized to the dataset's stored size with its resize mode
                  (stretch / crop / pad, Pillow's geometry), and for a JPEG
                  dataset re-encoded at its quality as the build stores it
  read size       the same tf.image.resize the input pipeline applies when
                  the trainer's --image_size differs from the stored size
  normalize       the model's normalization

An image that is already at the stored size (what the build wrote, and what
`trainer.predict` sends after running the build's own Pillow path) skips the
stored-size step, so stored images are decoded exactly as in training.
Images of a request are decoded one at a time, so a request never holds
more than one full-size image.
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.preprocessing import source_image
from pipelines.preprocessing.model_input import ModelInput
from pipelines.preprocessing.model_input import round_to_uint8
# How many JPEG segments / PNG, WebP chunks / GIF blocks are walked looking
# for metadata before giving up (then: no EXIF orientation).
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


def _walk(cond, body, state):
  """tf.while_loop with a step counter capped at MAX_HEADER_STEPS."""
  def loop_cond(steps, *s):
    return tf.logical_and(steps < MAX_HEADER_STEPS, cond(*s))

  def loop_body(steps, *s):
    return (steps + 1, *body(*s))

  return tf.while_loop(loop_cond, loop_body, (tf.constant(0), *state))[1:]


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


def _resize_stored(image: tf.Tensor, height: int, width: int,
                   mode: str) -> tf.Tensor:
  """uint8 -> uint8 [height, width, C] with source_image.resize's geometry.

  Pillow's BILINEAR is a triangle filter widened when shrinking, which is
  what ScaleAndTranslate('triangle', antialias) computes; crop resamples the
  same floating-point box as Pillow (no rounding to whole pixels, so a 1x20000
  image still has a crop), pad uses its rounding and black border.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  src_h, src_w = shape[0], shape[1]
  if mode == 'stretch':
    return round_to_uint8(tf.image.resize(image, [height, width],
                                        antialias=True))
  if mode == 'crop':
    scale = tf.minimum(src_w / width, src_h / height)  # Source px per output.
    left = (src_w - width * scale) / 2
    top = (src_h - height * scale) / 2
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=tf.constant([height, width]),
        scale=tf.cast(tf.stack([1 / scale, 1 / scale]), tf.float32),
        translation=tf.cast(tf.stack([-top / scale, -left / scale]),
                            tf.float32),
        kernel_type='triangle', antialias=True)
    return round_to_uint8(out[0])
  if mode == 'pad':
    scale = tf.maximum(src_w / width, src_h / height)
    # Python's round() (half to even) is tf.round's.
    new_w = tf.cast(tf.clip_by_value(tf.round(src_w / scale), 1, width),
                    tf.int32)
    new_h = tf.cast(tf.clip_by_value(tf.round(src_h / scale), 1, height),
                    tf.int32)
    resized = round_to_uint8(tf.image.resize(image, tf.stack([new_h, new_w]),
                                           antialias=True))
    return tf.image.pad_to_bounding_box(resized, (height - new_h) // 2,
                                        (width - new_w) // 2, height, width)
  raise ValueError(f'resize mode {mode!r} is not one of '
                   f'{source_image.RESIZE_MODES}')


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

  def jpeg(self):
    shape = tf.cast(tf.image.extract_jpeg_shape(self.data), tf.int64)
    height, width = shape[0], shape[1]
    checks = self._size_checks('JPEG', width, height)
    start, end = _jpeg_exif(self.r)
    orientation = _tiff_orientation(self.r, start, end)
    # The build decodes at the smallest DCT scale that keeps both sides >=
    # the stored size (Pillow's draft); TF offers 1/2, 1/4, 1/8 of those.
    fits = [tf.logical_and((height + f - 1) // f >= self.min_side,
                           (width + f - 1) // f >= self.min_side)
            for f in (2, 4, 8)]
    index = tf.where(fits[2], 3, tf.where(fits[1], 2, tf.where(fits[0], 1, 0)))
    with tf.control_dependencies(checks):
      image = tf.switch_case(index, [
          (lambda f=f: tf.io.decode_jpeg(self.data, channels=3, ratio=f,
                                         dct_method='INTEGER_ACCURATE'))
          for f in (1, 2, 4, 8)])
    return _to_channels(image, self.channels), orientation

  def png(self):
    r = self.r
    width, height = r.uint(16, 4, False), r.uint(20, 4, False)
    depth, color_type = r.u8(24), r.u8(25)
    checks = [self._fail_unless(r.equals(12, b'IHDR'),
                                'PNG has no IHDR header (corrupt file)')]
    checks += self._size_checks('PNG', width, height)
    exif, exif_end, trns, trns_len = _png_chunks(r)
    orientation = _tiff_orientation(r, exif, exif_end)

    def decode16():
      values = tf.io.decode_png(self.data, channels=0, dtype=tf.uint16)
      # Pillow: 16-bit grey is scaled (round(v / 257), source_image.to_8bit);
      # every other 16-bit mode keeps the high byte.
      return tf.cond(
          tf.equal(color_type, 0),
          lambda: tf.cast((tf.cast(values, tf.int32) + 128) // 257, tf.uint8),
          lambda: tf.cast(tf.bitwise.right_shift(
              values, tf.constant(8, tf.uint16)), tf.uint8))

    def decode8():
      image = tf.io.decode_png(self.data, channels=0)
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

    with tf.control_dependencies(checks):
      image = tf.cond(tf.equal(depth, 16), decode16, decode8)
    return _to_channels(image, self.channels), orientation

  def bmp(self):
    r = self.r
    header = r.uint(14, 4, True)
    width = r.uint(18, 4, True)
    height = r.uint(22, 4, True)
    height = tf.abs(tf.where(height >= 2**31, height - 2**32, height))
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
    checks = [self._fail_unless(
        supported, 'BMP with ', bpp, ' bits per pixel, compression ',
        compression, ' and a ', header, '-byte header is not supported by the '
        'serving endpoint (only uncompressed 24/32-bit, or 8-bit grey); '
        'convert it to PNG or JPEG')]
    checks += self._size_checks('BMP', width, height)
    with tf.control_dependencies(checks):
      image = tf.io.decode_bmp(self.data, channels=0)
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
      image = tf.io.decode_image(data, channels=0, expand_animations=False)
    image.set_shape([None, None, None])
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
    frame = tf.io.decode_gif(data)[0]

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
    resized = _resize_stored(image, stored[0], stored[1],
                             model_input.resize_mode)
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
