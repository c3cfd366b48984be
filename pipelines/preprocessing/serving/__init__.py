"""Source image bytes -> the model's pixels, in TensorFlow ops only.

The serving export (trainer.export, endpoint `serve`) takes raw image files
(JPEG, PNG, GIF, BMP, WebP: the formats the build accepts) and must not call
Pillow, so this package reproduces source_image's conversion in TF ops, then
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
also where a TensorFlow decoder refuses the data (see
source.decode_or_empty).

One module a job; a format's reader is one module with one `decode(src)`:

  __init__    preprocess_image: sniff the format (image_formats.SIGNATURES,
              the build's table), run its reader, orient, resize, re-encode
  jpeg png gif bmp webp
              the readers: header size checks, strictness, EXIF location,
              decode; each returns (uint8 [h, w, channels], orientation)
  source      Source: one input, its error prefix and limits, the checks
              every reader uses; decode_or_empty, in_order
  byte_reads  Bytes (bounds-checked reads), string edits, capped walks
  exif        the orientation tag in a TIFF block; orient (the table of
              image_formats.ORIENTATIONS, shared with the build)
  pixels      alpha onto white, luma, channels: Pillow's conversions
  crc32       zlib's CRC-32 of many ranges at once (PNG chunks)
"""

from __future__ import annotations

import functools

import tensorflow as tf
from tensorflow.python.ops import cond_v2  # pylint: disable=g-direct-tensorflow-import

from pipelines.preprocessing import image_formats
from pipelines.preprocessing import resize_modes
from pipelines.preprocessing.model_input import ModelInput
from pipelines.preprocessing.serving import bmp
from pipelines.preprocessing.serving import byte_reads
from pipelines.preprocessing.serving import exif
from pipelines.preprocessing.serving import gif
from pipelines.preprocessing.serving import jpeg
from pipelines.preprocessing.serving import png
from pipelines.preprocessing.serving import source
from pipelines.preprocessing.serving import webp
from pipelines.preprocessing.serving.byte_reads import MAX_HEADER_STEPS  # pylint: disable=unused-import
from pipelines.preprocessing.serving.byte_reads import i64

# Image format (image_formats' name) -> its reader, for every format with a
# signature: one without a reader (or a reader without a signature) fails
# here, at import.
_READERS = {'JPEG': jpeg.decode, 'PNG': png.decode, 'GIF': gif.decode,
            'BMP': bmp.decode, 'WEBP': webp.decode}
if tuple(_READERS) != image_formats.FORMATS:
  raise ImportError(f'serving reads {tuple(_READERS)}, but image_formats '
                    f'identifies {image_formats.FORMATS}')
_FORMATS = tuple(_READERS)
_HEAD = 32  # Bytes of header every format's sniffing and size need.


def _sniff(data) -> tf.Tensor:
  """Index in _READERS of the format whose signature data starts with
  (image_formats.SIGNATURES, the first match), -1 if none."""
  head = tf.strings.substr(tf.strings.join(
      [tf.strings.substr(data, 0, _HEAD), b'\0' * _HEAD]), 0, _HEAD)
  head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

  def starts(pos, expected):
    return tf.reduce_all(tf.equal(head[pos:pos + len(expected)],
                                  tf.constant(list(expected), tf.int64)))

  kind = i64(-1)
  for signature in reversed(image_formats.SIGNATURES):
    matches = tf.reduce_all(tf.stack([
        starts(pos, part) for pos, part in signature.parts]))
    kind = tf.where(matches, i64(_FORMATS.index(signature.image_format)),
                    kind)
  return kind


def _unknown_format(index, size) -> tf.Tensor:
  """The refusal of bytes of no accepted format (string [])."""
  return tf.strings.join([
      'image_bytes[', tf.strings.as_string(index), ']: not a JPEG, PNG, GIF, '
      'BMP or WebP image (', tf.strings.as_string(size), ' bytes): send the '
      'bytes of an image file'])


def known_formats(encoded) -> tf.Tensor:
  """string [N] -> the same, once every element is of an accepted format.

  Checked for the whole request before any image is read, so a request
  with such bytes is refused without decoding the images before them
  (preprocess_image checks each image again, for callers of it alone; the
  32-byte header sniff is cheap). Raises InvalidArgumentError naming the
  first such `image_bytes[i]`.
  """
  unknown = tf.map_fn(_sniff, encoded, fn_output_signature=tf.int64) < 0
  first = byte_reads.first_true(unknown)
  size = tf.strings.length(tf.gather(tf.concat([encoded, ['']], 0), first))
  ok = tf.debugging.Assert(tf.logical_not(tf.reduce_any(unknown)),
                           [_unknown_format(first, size)])
  with tf.control_dependencies([ok]):
    return tf.identity(encoded)


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
  known = tf.debugging.Assert(kind >= 0, [_unknown_format(index, size)])
  with tf.control_dependencies([known]):
    src = source.Source(tf.identity(data), prefix, model_input)
    # Bytes of no known format go to a branch that reads nothing, and the
    # dispatch stays a Case op that runs only the branch it picks. Lowered
    # to Switch/Merge inside the serving map's loop (TensorFlow's default),
    # a reader of another format was seen, under load, to run on an input
    # and fail first ("Reduction axis 0 is empty"), with a message naming
    # no input, despite the control dependency.
    unknown = lambda: (tf.zeros([1, 1, channels], tf.uint8), i64(1))
    image, orientation = cond_v2.indexed_case(
        tf.cast(tf.where(kind >= 0, kind, i64(len(_READERS))), tf.int32),
        [functools.partial(read, src) for read in _READERS.values()]
        + [unknown], name='format', lower_using_switch_merge=False)
  image = exif.orient(image, orientation)
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
