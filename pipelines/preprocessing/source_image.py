"""The build's conversion of one source file: read, decode/validate, to 8-bit,
resize, encode (Pillow; JPEGs decoded strictly with simplejpeg).

`read_source` reads a file safely (regular files only, bounded size, image
signature first); `process` turns its bytes into the stored image. Both are
deterministic (bytes in, bytes out): the Beam workers (`beam_build`), the
build benchmark's plain loop and `trainer.predict` run the same code, and a
test can check each op on real bytes.

A file that cannot be used raises `ImageRejected` with an `outcome` (one of
the report keys EMPTY, CORRUPT, UNSUPPORTED, TOO_LARGE, UNREADABLE,
NOT_A_FILE below) and a human reason; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import warnings
from typing import Optional

import numpy as np
from PIL import Image
from PIL import ImageFile
import simplejpeg

from pipelines.common import paths
from pipelines.preprocessing import image_formats
from pipelines.preprocessing import image_measures
from pipelines.preprocessing import image_quality
from pipelines.preprocessing import resize_modes
from tfrecords_schema import files

# Fail on truncated files instead of padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Extension (lower case) -> the Pillow format it promises (defined once,
# with the dataset format).
EXTENSION_FORMATS = files.IMAGE_EXTENSION_FORMATS
ACCEPTED_FORMATS = ('JPEG', 'MPO', 'PNG', 'BMP', 'GIF', 'WEBP')
# The --resize_mode choices, the first being the default (see resize_modes).
RESIZE_MODES = resize_modes.names()
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold.
# Larger files are refused before they are read. An 89-megapixel RGB BMP (the
# largest image the pixel limit lets through) is 268 MB.
DEFAULT_MAX_FILE_BYTES = 1 << 28  # 256 MiB.
DEFAULT_JPEG_QUALITY = 95
# Enough to identify any format Pillow knows (and the one the content claims)
# without reading a whole file.
_HEADER_BYTES = 4096
DEFAULT_BACKGROUND = (255, 255, 255)  # Alpha is composited onto white.

# Outcome keys for files that are not written (see the build report).
EMPTY = 'rejected_empty'
CORRUPT = 'rejected_corrupt'
UNSUPPORTED = 'rejected_unsupported_format'
TOO_LARGE = 'rejected_too_large'
UNREADABLE = 'rejected_unreadable'
NOT_A_FILE = 'rejected_not_a_regular_file'
class ImageRejected(Exception):
  """A file that cannot become an example; `outcome` is a report key."""

  def __init__(self, outcome: str, reason: str):
    super().__init__(reason)
    self.outcome = outcome
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How every image is stored: size, channels, resize mode and encoding."""
  height: int
  width: int
  channels: int = 3
  resize_mode: str = 'stretch'
  image_format: str = 'jpeg'
  jpeg_quality: int = DEFAULT_JPEG_QUALITY
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
  background: tuple[int, int, int] = DEFAULT_BACKGROUND
  # Perceptual hashes and quality measures of each image (image_measures):
  # the build turns them on when its near-duplicate search or a quality flag
  # needs them; predict, which needs only the stored bytes, does not.
  measure: bool = False


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
  """One stored image plus what the report and statistics need.

  `pixel_sum` / `pixel_sumsq` are float64 `[channels]` sums over the stored
  (resized, pre-encoding) uint8 pixels; `num_pixels` is height * width.
  """
  encoded: bytes
  original_height: int
  original_width: int
  pixel_sum: np.ndarray
  pixel_sumsq: np.ndarray
  num_pixels: int
  warning: Optional[str] = None
  # 64-bit perceptual hashes of the decoded image before resizing: whole
  # and centre (perceptual_hash.build_hashes); None unless options.measure.
  phashes: Optional[tuple[int, int]] = None
  # Quality measures of the decoded image (image_quality.Measures); None
  # unless options.measure.
  quality: Optional[image_quality.Measures] = None


def _reject_header(header: bytes, extension: str) -> None:
  """Raises the reason why a header that is no accepted image is rejected."""
  if not header:
    raise ImageRejected(EMPTY, 'empty file (0 bytes)')
  try:  # Pillow names other formats (TIFF, HEIF, ...) from the header alone.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      image_format = Image.open(io.BytesIO(header)).format
  except Exception:  # pylint: disable=broad-except
    image_format = None
  if image_format:
    raise ImageRejected(
        UNSUPPORTED, f'content is {image_format}, not one of JPEG, PNG, BMP, '
        'GIF, WebP; convert it to PNG or JPEG')
  raise ImageRejected(
      CORRUPT, f'not a readable image: content of this {extension or "extension-less"} '
      'file is not a known image format')


def _read_bounded(f, size_hint: Optional[int], *, extension: str,
                  max_bytes: int) -> bytes:
  """Reads an open binary file: header first, then at most max_bytes."""
  if size_hint is not None and size_hint > max_bytes:
    raise ImageRejected(
        TOO_LARGE, f'file is {size_hint} bytes, over the limit '
        f'--max_file_bytes={max_bytes}')
  header = f.read(_HEADER_BYTES)
  # Only the formats the build reads (image_formats.SIGNATURES) are read
  # past their header.
  if image_formats.sniff(header) is None:
    _reject_header(header, extension)
  chunks, size = [header], len(header)
  while len(chunks[-1]):
    chunk = f.read(min(1 << 20, max_bytes + 1 - size))
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
    if size > max_bytes:  # The file grew, or its size was not known.
      raise ImageRejected(
          TOO_LARGE, f'file is over the limit --max_file_bytes={max_bytes}')
  return b''.join(chunks)


def read_source(path: str, *,
                max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
  """The bytes of one source image file, read safely.

  Only regular files are read (a link is followed to its target): a FIFO, a
  device such as /dev/zero, a socket or a folder is rejected without being
  opened for reading. A file over `max_bytes` is rejected from its size, and
  one whose first bytes are no JPEG/PNG/GIF/BMP/WebP signature is rejected
  after reading only those, so no input can hang a reader or fill its memory.
  Paths with a scheme (gs://, s3://) are read through Beam's FileSystems.

  Raises:
    ImageRejected: with outcome UNREADABLE, NOT_A_FILE, TOO_LARGE, EMPTY,
      CORRUPT or UNSUPPORTED.
  """
  extension = os.path.splitext(path)[1]
  if paths.is_remote(path):
    from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
    try:
      size = FileSystems.get_filesystem(path).metadata(path).size_in_bytes
      with FileSystems.open(
          path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return _read_bounded(f, size, extension=extension,
                             max_bytes=max_bytes)
    except (OSError, IOError) as e:
      raise ImageRejected(UNREADABLE, f'cannot read ({e})') from None
  try:
    f, info = paths.open_regular(path)
  except paths.NotAFile as e:
    raise ImageRejected(NOT_A_FILE, f'not a regular file but {e}; only image '
                        'files are read') from None
  except OSError as e:
    raise ImageRejected(UNREADABLE, f'cannot read ({e.strerror})') from None
  with f:
    try:
      return _read_bounded(f, info.st_size, extension=extension,
                           max_bytes=max_bytes)
    except OSError as e:
      raise ImageRejected(UNREADABLE, f'cannot read ({e.strerror})') from None


def _check_bmp_size(data: bytes, *, max_pixels: int) -> None:
  """A BMP's width and height as the file means them (signed 32-bit; a
  negative height is a top-down BMP), which Pillow reads as unsigned: -5
  would be a 4294967291-pixel width, refused as too large. The serving
  export names the same values."""
  if data[:2] != b'BM' or len(data) < 26 or struct.unpack_from(
      '<I', data, 14)[0] < 40:  # Not a BITMAPINFOHEADER (or later) BMP.
    return
  width, height = struct.unpack_from('<ii', data, 18)
  if width <= 0 or height == 0:
    raise ImageRejected(
        CORRUPT, f'BMP header gives an invalid size {width}x{height} '
        '(corrupt or truncated file)')
  if width * abs(height) > max_pixels:
    raise ImageRejected(
        TOO_LARGE, f'{width}x{abs(height)} = {width * abs(height)} pixels '
        f'exceeds the decompression-bomb limit --max_image_pixels={max_pixels}')


def open_checked(data: bytes, *, extension: str,
                 max_pixels: int) -> tuple[Image.Image, Optional[str]]:
  """Opens image bytes (header only) and validates format and size.

  Returns:
    (lazy Pillow image, warning or None). A warning says the extension names
    another format than the content (the image is still used).
  """
  if not data:
    raise ImageRejected(EMPTY, 'empty file (0 bytes)')
  _check_bmp_size(data, max_pixels=max_pixels)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ImageRejected(TOO_LARGE, f'decompression bomb: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ImageRejected(
        CORRUPT, f'not a readable image: content of this {extension} file is '
        f'not a known image format ({type(e).__name__})') from None
  if image.format not in ACCEPTED_FORMATS:
    raise ImageRejected(
        UNSUPPORTED, f'content is {image.format}, not one of JPEG, PNG, BMP, '
        'GIF, WebP; convert it to PNG or JPEG')
  width, height = image.size
  if width * height > max_pixels:
    raise ImageRejected(
        TOO_LARGE, f'{width}x{height} = {width * height} pixels exceeds the '
        f'decompression-bomb limit --max_image_pixels={max_pixels}')
  warning = None
  expected = EXTENSION_FORMATS.get(extension.lower())
  actual = 'JPEG' if image.format == 'MPO' else image.format
  if expected and expected != actual:
    warning = f'extension {extension} but content is {actual}'
  return image, warning


def oriented_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) of a still-lazy image after its EXIF orientation."""
  width, height = image.size
  orientation = image_formats.ORIENTATIONS.get(_orientation(image))
  if orientation is not None and orientation.swap_axes:
    return width, height
  return height, width

# libjpeg colour spaces simplejpeg converts to 8-bit output itself.
_JPEG_TARGETS = {'Gray': 'GRAY', 'YCbCr': 'RGB', 'RGB': 'RGB'}


def _orientation(image: Image.Image) -> Optional[int]:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # "Corrupt EXIF data": no orientation.
      return image.getexif().get(image_formats.EXIF_ORIENTATION_TAG)
  except Exception:  # pylint: disable=broad-except
    return None  # A broken EXIF block does not make the image bad.


def _upright(pixels: Image.Image, source: Image.Image) -> Image.Image:
  """pixels with the EXIF orientation of source (often the same image)
  undone, like PIL.ImageOps.exif_transpose."""
  orientation = image_formats.ORIENTATIONS.get(_orientation(source))
  if orientation is None:
    return pixels
  return pixels.transpose(orientation.pillow)


def _decode_jpeg_strict(data: bytes, image: Image.Image, *,
                        min_side: int) -> Optional[Image.Image]:
  """JPEG bytes -> 'RGB'/'L' pixels, refusing what libjpeg only warns about.

  libjpeg fills a JPEG whose data ends early (or is cut and given a new end
  marker, or whose header lies about its size) with grey and only *warns*;
  Pillow does not surface that warning. simplejpeg's strict mode turns every
  libjpeg warning into an error. Like Pillow's `draft`, it decodes at a
  reduced DCT scale that keeps both sides >= min_side.

  Returns None for CMYK/YCCK files (after checking them strictly): Pillow
  decodes those, with Adobe's inverted-CMYK handling.
  """
  try:
    colorspace = simplejpeg.decode_jpeg_header(data)[2]
    target = _JPEG_TARGETS.get(colorspace)
    if target is None:
      simplejpeg.decode_jpeg(data, colorspace='CMYK', min_factor=8,
                             strict=True)
      return None
    pixels = simplejpeg.decode_jpeg(data, colorspace=target,
                                    min_height=min_side, min_width=min_side,
                                    strict=True)
  except ValueError as e:
    raise ImageRejected(CORRUPT, f'corrupt JPEG data ({e})') from None
  decoded = Image.fromarray(pixels[..., 0] if target == 'GRAY' else pixels)
  return _upright(decoded, image)


def _load_strict(image: Image.Image) -> None:
  """Decodes all pixel data of a lazy image; any decoder complaint rejects it.

  Must run before anything that may load the image behind our back: Pillow's
  PNG `getexif()` loads the pixels to look for a trailing eXIf chunk, and a
  failure there would leave a half-decoded image that a later load() keeps.
  """
  try:
    with warnings.catch_warnings():
      # A decoder warning means damaged data: refuse rather than guess.
      warnings.simplefilter('error')
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    raise ImageRejected(
        CORRUPT, f'truncated or corrupt image data ({type(e).__name__}: '
        f'{e})') from None


def load_pixels(image: Image.Image, *, min_side: int,
                data: Optional[bytes] = None) -> Image.Image:
  """Decodes pixels (JPEG at a reduced DCT scale when that keeps min_side).

  `data` (the file's bytes) enables the strict JPEG decoder; without it
  Pillow decodes JPEGs too. Returns an image with EXIF orientation applied.
  Raises ImageRejected on truncated or corrupt pixel data, including data
  the decoder only warns about.
  """
  if image.format in ('JPEG', 'MPO'):
    if data is not None:
      decoded = _decode_jpeg_strict(data, image, min_side=min_side)
      if decoded is not None:
        return decoded
    # JPEG can decode at 1/2, 1/4, 1/8 scale for almost no cost; draft keeps
    # both sides >= min_side so the final resize still only shrinks.
    image.draft(None, (min_side, min_side))
  _load_strict(image)
  return _upright(image, image)


def to_8bit(image: Image.Image, *, channels: int,
            background: tuple[int, int, int] = DEFAULT_BACKGROUND
            ) -> Image.Image:
  """Converts any Pillow mode to 8-bit 'RGB' (channels=3) or 'L' (channels=1).

  16-bit and 32-bit integer images are scaled (65535 -> 255), not clipped;
  float images in [0, 1] are scaled to [0, 255]; alpha (RGBA, LA, palette or
  tRNS transparency) is composited onto `background`; CMYK, YCbCr, LAB and
  HSV go through Pillow's conversions.
  """
  mode = image.mode
  if mode.startswith('I;16') or mode == 'I':
    values = np.asarray(image).astype(np.float64)
    image = Image.fromarray(
        np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), 'L')
  elif mode == 'F':
    values = np.asarray(image).astype(np.float64)
    if values.size and np.nanmax(values) <= 1.0:
      values = values * 255.0
    image = Image.fromarray(
        np.clip(np.round(np.nan_to_num(values)), 0, 255).astype(np.uint8), 'L')
  elif mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      'transparency' in image.info and mode in ('P', 'L', 'RGB', '1')):
    rgba = image.convert('RGBA')
    canvas = Image.new('RGBA', rgba.size, tuple(background) + (255,))
    image = Image.alpha_composite(canvas, rgba)
  target = 'RGB' if channels == 3 else 'L'
  if image.mode not in ('RGB', 'L', 'RGBA'):
    image = image.convert('RGB')  # Palette, 1-bit, CMYK, YCbCr, LAB, HSV.
  if image.mode != target:
    # Grey -> RGB replicates; RGB -> L uses ITU-R 601-2 luma; RGBA here is
    # already opaque (composited above).
    image = image.convert(target)
  return image


def resize(image: Image.Image, *, height: int, width: int,
           mode: str) -> Image.Image:
  """Resizes to exactly (height, width) like Keras' loader options.

  `mode` is one of RESIZE_MODES (resize_modes holds each one's Pillow and
  TensorFlow versions): stretch ignores the aspect ratio; crop centre-crops
  the largest region of the target aspect ratio, then resizes (Keras'
  crop_to_aspect_ratio); pad fits inside and pads the rest with black
  (Keras' pad_to_aspect_ratio). An image already at the size is returned.
  """
  if image.size == (width, height):
    return image
  return resize_modes.get(mode).pillow(image, height=height, width=width)


def encode(image: Image.Image, *, image_format: str,
           jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
  """Encodes an 8-bit 'RGB'/'L' image as JPEG, PNG or raw HWC uint8 bytes."""
  if image_format == 'raw':
    return image.tobytes()  # HWC uint8 ('RGB' or 'L'), one copy.
  buffer = io.BytesIO()
  if image_format == 'jpeg':
    image.save(buffer, format='JPEG', quality=jpeg_quality)
  elif image_format == 'png':
    image.save(buffer, format='PNG')
  else:
    raise ValueError(f'image_format={image_format!r} is not jpeg, png or raw')
  return buffer.getvalue()


# Exact per-channel sums of the stored pixels (compiled when built).
channel_sums = image_measures.channel_sums


def process(data: bytes, *, extension: str,
            options: ImageOptions) -> ProcessedImage:
  """Source file bytes -> stored image bytes (the whole per-image build step)."""
  image, warning = open_checked(data, extension=extension,
                                max_pixels=options.max_pixels)
  if image.format not in ('JPEG', 'MPO'):
    # JPEG's EXIF is in its header; other formats may keep it after the
    # pixels, so they are decoded (strictly) before the orientation is read.
    _load_strict(image)
  original_height, original_width = oriented_size(image)
  image = load_pixels(image, min_side=max(options.height, options.width),
                      data=data)
  image = to_8bit(image, channels=options.channels,
                  background=options.background)
  phashes, quality = None, None
  if options.measure:
    phashes, quality = image_measures.measure(
        image, original_size=(original_height, original_width),
        channels=options.channels)
  image = resize(image, height=options.height, width=options.width,
                 mode=options.resize_mode)
  pixel_sum, pixel_sumsq, num_pixels = channel_sums(image)
  return ProcessedImage(
      encoded=encode(image, image_format=options.image_format,
                     jpeg_quality=options.jpeg_quality),
      original_height=original_height,
      original_width=original_width,
      pixel_sum=pixel_sum,
      pixel_sumsq=pixel_sumsq,
      num_pixels=num_pixels,
      warning=warning,
      phashes=phashes,
      quality=quality,
  )
