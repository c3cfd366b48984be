"""A 64-bit DCT perceptual hash (pHash) for near-duplicate detection.

The build decodes every image once into a PIL image; `phash` turns it into a
64-bit int, and two images whose hashes are at most a few bits apart
(`distance`) are near-duplicates: the same photo resized, re-encoded,
slightly cropped or brightened. benchmarks/near_duplicates.py calibrates the
distance on real photos (results in benchmarks/results/near_duplicates.md).

The hash is bit-identical to `imagehash.phash(image)` (hash_size=8,
highfreq_factor=4), and `to_hex` gives the same 16 hex digits as
`str(imagehash.phash(image))`; tests/pipelines/preprocessing/
test_perceptual_hash.py checks both against imagehash. imagehash is not
used at run time because it imports scipy and PyWavelets into every Beam
worker for a dozen lines of numpy.

numpy and Pillow only: Beam workers import this module without TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8      # the hash is HASH_SIZE x HASH_SIZE bits: 64
_IMAGE_SIZE = 32   # HASH_SIZE * imagehash's highfreq_factor (4)
BITS = HASH_SIZE * HASH_SIZE
_HEX_DIGITS = BITS // 4
_HEX_CHARS = frozenset('0123456789abcdefABCDEF')


def _dct_matrix(n: int) -> np.ndarray:
  """The unnormalized DCT-II as a matrix: float64 [n, n].

  `_dct_matrix(n) @ x` equals `scipy.fftpack.dct(x, axis=0)` (type 2,
  norm=None): y[k] = 2 * sum_i x[i] * cos(pi * k * (2i + 1) / (2n)).
  """
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


# Only the HASH_SIZE lowest frequencies are kept, so only those rows of the
# 32x32 matrix are used: [8, 32].
_DCT = _dct_matrix(_IMAGE_SIZE)[:HASH_SIZE]
# Bit weights, most significant first: bit (r, c) of the 8x8 block is
# 2 ** (63 - (8 * r + c)), imagehash's row-major hex order.
_SHIFTS = np.arange(BITS - 1, -1, -1, dtype=np.uint64)


def _dct_axis0(x: np.ndarray) -> np.ndarray:
  """The 8 lowest DCT-II coefficients along axis 0: [32, n] -> [8, n].

  Row 0 of x is subtracted first: every row of the DCT matrix but the first
  sums to 0, so the result is the same, but a column of equal values gives
  exact zeros, as scipy's DCT does, instead of round-off whose sign would
  decide bits (flat images, or images that vary along one axis only).
  Row 0 (2 x the column sums) is computed directly for the same reason.
  """
  y = _DCT @ (x - x[:1])
  y[0] = 2.0 * x.sum(axis=0)
  return y


def low_frequencies(image: Image.Image) -> np.ndarray:
  """The image's lowest 2-D DCT-II coefficients: float64 [8, 8].

  Grey (Pillow's convert('L')), resized to 32x32 with LANCZOS, DCT along
  axis 0 then 1, as imagehash.phash does; [0, 0] is 4 x the sum of the grey
  levels.
  """
  grey = image.convert('L').resize((_IMAGE_SIZE, _IMAGE_SIZE),
                                   Image.Resampling.LANCZOS)
  pixels = np.asarray(grey, dtype=np.float64)  # [32, 32]
  return _dct_axis0(_dct_axis0(pixels).T).T


def phash(image: Image.Image) -> int:
  """The 64-bit perceptual hash of a PIL image (any mode, any size).

  Bit (r, c) is set when low-frequency coefficient [r, c] is above the median
  of the 64; the bits are packed row-major, most significant first, so
  `to_hex(phash(image)) == str(imagehash.phash(image))`.

  A flat (single-colour) image hashes to 0x8000000000000000, as with
  imagehash: all flat images are duplicates of each other.
  """
  coefficients = low_frequencies(image)
  bits = (coefficients > np.median(coefficients)).ravel().astype(np.uint64)
  return int(np.bitwise_or.reduce(bits << _SHIFTS))


def distance(a: int, b: int) -> int:
  """Hamming distance of two hashes: the number of bits that differ."""
  return (a ^ b).bit_count()


def to_hex(h: int) -> str:
  """A hash as 16 lower-case hex digits (imagehash's str(hash))."""
  if not 0 <= h < 1 << BITS:
    raise ValueError(f'a {BITS}-bit hash is an int in [0, 2**{BITS}); '
                     f'got {h!r}')
  return f'{h:0{_HEX_DIGITS}x}'


def from_hex(text: str) -> int:
  """The hash `to_hex` wrote (16 hex digits) back as an int."""
  if len(text) != _HEX_DIGITS or not all(c in _HEX_CHARS for c in text):
    raise ValueError(f'a {BITS}-bit hash is {_HEX_DIGITS} hex digits; '
                     f'got {text!r} ({len(text)} characters)')
  return int(text, 16)
