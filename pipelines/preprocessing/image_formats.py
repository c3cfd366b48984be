"""What the build (source_image, Pillow) and serving (TF ops) both know about
image files: the signatures that identify a format, and the EXIF orientation
tag and how to undo each orientation.

Defined once here so that the two readers cannot disagree on which bytes
are an image or which way is up; tests/pipelines/preprocessing/test_serving_formats.py checks both
sides against this table. No TensorFlow here (the build's Beam workers
import it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from PIL import Image


@dataclasses.dataclass(frozen=True)
class Signature:
  """Bytes that identify a format: `parts` (offset, bytes) must all match."""
  image_format: str  # Pillow's name of the format.
  parts: tuple[tuple[int, bytes], ...]


# The formats both readers accept, in the order they are tried (the first
# match wins).
SIGNATURES = (
    Signature('JPEG', ((0, b'\xff\xd8\xff'),)),
    Signature('PNG', ((0, b'\x89PNG\r\n\x1a\n'),)),
    Signature('GIF', ((0, b'GIF87a'),)),
    Signature('GIF', ((0, b'GIF89a'),)),
    Signature('BMP', ((0, b'BM'),)),
    Signature('WEBP', ((0, b'RIFF'), (8, b'WEBP'))),
)
# The formats, each once, in that order.
FORMATS = tuple(dict.fromkeys(s.image_format for s in SIGNATURES))


def sniff(header: bytes) -> Optional[str]:
  """The format (Pillow's name) whose signature header starts with, else
  None."""
  for signature in SIGNATURES:
    if all(header[pos:pos + len(part)] == part
           for pos, part in signature.parts):
      return signature.image_format
  return None


EXIF_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass(frozen=True)
class Orientation:
  """How to undo one EXIF orientation (like PIL.ImageOps.exif_transpose):
  Pillow's transposition, and the same as array ops on [H, W, ...]: swap
  the two axes if `swap_axes`, then reverse the axes in `reverse` (0: rows,
  1: columns)."""
  pillow: Image.Transpose
  swap_axes: bool
  reverse: tuple[int, ...]


# EXIF orientation 2..8 -> what undoes it (1, and any other value: nothing).
ORIENTATIONS = {
    2: Orientation(Image.Transpose.FLIP_LEFT_RIGHT, False, (1,)),
    3: Orientation(Image.Transpose.ROTATE_180, False, (0, 1)),
    4: Orientation(Image.Transpose.FLIP_TOP_BOTTOM, False, (0,)),
    5: Orientation(Image.Transpose.TRANSPOSE, True, ()),
    6: Orientation(Image.Transpose.ROTATE_270, True, (1,)),
    7: Orientation(Image.Transpose.TRANSVERSE, True, (0, 1)),
    8: Orientation(Image.Transpose.ROTATE_90, True, (0,)),
}
