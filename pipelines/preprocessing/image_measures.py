"""What the build measures of each decoded image: two perceptual hashes and
the quality measures, in one pass.

`measure` returns exactly what the reference gives,
`perceptual_hash.build_hashes(image_quality.working_copy(image))` and
`image_quality.measure(image, ...)` (Pillow and numpy), but computes it in
the compiled `_measures` extension (setup.py builds it) when that is
importable: ~0.14 ms an image instead of ~0.6 ms in the build's workers,
where it ran at every image (BUILD_NOTES.md, issue 19). Without the
extension (no C compiler at install) the reference runs: the same values,
slower. tests/pipelines/preprocessing/test_image_measures.py holds the two
equal on real photos of every size class.

numpy and Pillow only: Beam workers import this module without TensorFlow.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from pipelines.preprocessing import image_quality
from pipelines.preprocessing import perceptual_hash

try:
  from pipelines.preprocessing import _measures as compiled  # pylint: disable=g-import-not-at-top
except ImportError:  # Not built (no C compiler at install): the reference.
  compiled = None


def _compiled_call(function, image: Image.Image, *args):
  """function(pixels, width, height, bands, *args) with an 'L' or 'RGB'
  image's bytes (Image.tobytes(), a copy).

  Not Pillow's memory through its Arrow export: Pillow (12.3) exports the
  start of its memory block, which is not the first row when
  PILLOW_ALIGNMENT pads rows (wrong pixels, silently), and crashes
  exporting an image that shares a numpy array's memory (review,
  2026-12-05).
  """
  return function(image.tobytes(), image.width, image.height,
                  len(image.getbands()), *args)


# perceptual_hash's DCT table, for the compiled hash (the same float64s).
_DCT_ROWS = perceptual_hash.dct_rows()


def measure(image: Image.Image, *, original_size: tuple[int, int],
            channels: int, use_compiled: Optional[bool] = None
            ) -> tuple[tuple[int, int], image_quality.Measures]:
  """((whole hash, centre hash), Measures) of one decoded image.

  Args: as image_quality.measure; use_compiled: None for the compiled pass
  when built, False for the reference (tests compare the two).
  """
  image_quality.check_image(image, original_size=original_size,
                            channels=channels)
  if use_compiled is None:
    use_compiled = compiled is not None
  if not use_compiled:
    luma = image_quality.working_copy(image)
    return (perceptual_hash.build_hashes(luma),
            image_quality.measure(image, original_size=original_size,
                                  channels=channels, luma=luma))
  width, height = image.size
  work_width, work_height = image_quality.working_size(width, height)
  dx, dy = perceptual_hash.centre_crop(work_width, work_height)
  hashes, sums, colour = _compiled_call(
      compiled.measure, image, work_width, work_height, dx, dy,
      image_quality.colour_factor(width, height) if channels == 3 else 0,
      _DCT_ROWS)
  return hashes, image_quality.from_sums(
      image_quality.Sums(*sums, colour), original_size=original_size)


_LEVELS = np.arange(256, dtype=np.float64)


def channel_sums(image: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
  """Exact per-channel sum and sum of squares of an 8-bit image.

  Returns float64 `[C]`, float64 `[C]`, and the pixel count. Compiled when
  built ('L' and 'RGB'); otherwise from Pillow's 256-bin histogram per
  channel, counted in C without a copy of the pixels (numpy's bincount
  would first widen each channel to int64: 8 bytes a pixel). The same
  values either way (integers, exact in float64).
  """
  num_pixels = image.width * image.height
  if compiled is not None and image.mode in ('L', 'RGB'):
    total, squares = _compiled_call(compiled.channel_sums, image)
    return (np.asarray(total, dtype=np.float64),
            np.asarray(squares, dtype=np.float64), num_pixels)
  hists = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256)
  return hists @ _LEVELS, hists @ np.square(_LEVELS), num_pixels
