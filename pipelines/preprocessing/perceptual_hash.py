"""A 64-bit DCT perceptual hash (pHash) for near-duplicate detection.

The build decodes every image once into a PIL image; `phash` turns it into a
64-bit int, and two images whose hashes are at most a few bits apart
(`distance`) are near-duplicates. benchmarks/near_duplicates.py calibrates
the distance on real photos (benchmarks/results/near_duplicates.md): at
distance <= 3 copies resized, JPEG re-encoded or brightened by 20% are
caught and no two different photos pair, but crops of 2% or more mostly
are not (a crop changes the scale of everything in the frame).

The hash is bit-identical to `imagehash.phash(image)` (hash_size=8,
highfreq_factor=4), and `to_hex` gives the same 16 hex digits as
`str(imagehash.phash(image))`; tests/pipelines/preprocessing/
test_perceptual_hash.py checks both against imagehash. (The only
differences found, 4 in about 6,800 random crops of photos, were images
under 5 px on a side, blown up to 32x32, where a coefficient equals the
median up to float round-off in imagehash too.) imagehash is not used at run
time because it imports scipy and PyWavelets into every Beam worker for a
dozen lines of numpy.

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


def _odd_rows(n: int) -> np.ndarray:
  """Odd rows of the unnormalized n-point DCT-II, on half the input.

  Row j, column i: 2 cos(pi (2j + 1)(2i + 1) / 2n), float64 [n / 4, n / 2]
  (the rows a `_low_dct` of n points uses).
  """
  k = 2 * np.arange(n // 4)[:, None] + 1
  i = np.arange(n // 2)[None, :]
  return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


# The DCT-II matrix split by the symmetry cos(pi k (2(n-1-i) + 1) / 2n) =
# (-1)^k cos(pi k (2i + 1) / 2n): odd coefficients of x are these rows times
# x[i] - x[n-1-i], and even ones the n/2-point DCT of x[i] + x[n-1-i].
# scipy's DCT (which imagehash uses) is structured the same way, so a
# mirror-symmetric, flat or one-directional image gives exact zeros in both
# instead of round-off whose sign would decide bits; one 32x32 matrix product
# would give the same coefficients but not those zeros.
_ODD_ROWS = {n: _odd_rows(n) for n in (32, 16, 8)}
# Bit weights, most significant first: bit (r, c) of the 8x8 block is
# 2 ** (63 - (8 * r + c)), imagehash's row-major hex order.
_SHIFTS = np.arange(BITS - 1, -1, -1, dtype=np.uint64)


def _low_dct(x: np.ndarray, count: int) -> np.ndarray:
  """The `count` lowest DCT-II coefficients along axis 0: [n, m] -> [count, m].

  scipy.fftpack.dct(x, axis=0)[:count] (type 2, norm=None):
  y[k] = 2 sum_i x[i] cos(pi k (2i + 1) / 2n); n a power of 2, count <= n/4.
  """
  if count == 1:
    return 2.0 * x.sum(axis=0, keepdims=True)
  half = len(x) // 2
  front, back = x[:half], x[:half - 1:-1]  # x[i] and x[n-1-i], i < n/2
  y = np.empty((count, x.shape[1]))
  y[0::2] = _low_dct(front + back, (count + 1) // 2)
  y[1::2] = _ODD_ROWS[len(x)][:count // 2] @ (front - back)
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
  return _low_dct(_low_dct(pixels, HASH_SIZE).T, HASH_SIZE).T


def phash(image: Image.Image) -> int:
  """The 64-bit perceptual hash of a PIL image (any mode, any size).

  Bit (r, c) is set when low-frequency coefficient [r, c] is above the median
  of the 64; the bits are packed row-major, most significant first, so
  `to_hex(phash(image)) == str(imagehash.phash(image))`.

  A flat (single-colour) image hashes to 1 << 63 (only [0, 0] is above the
  median 0), or 0 when black, as with imagehash: flat images pair with each
  other and with nothing else.
  """
  coefficients = low_frequencies(image)
  bits = (coefficients > np.median(coefficients)).ravel().astype(np.uint64)
  return int(np.bitwise_or.reduce(bits << _SHIFTS))


# The 8 lowest rows of the unnormalized 32-point DCT-II: float64 [8, 32].
_LOW_ROWS = 2.0 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (
    2 * np.arange(_IMAGE_SIZE)[None, :] + 1) / (2 * _IMAGE_SIZE))


def dct_rows() -> bytes:
  """The float64 [8, 32] DCT rows `_hash_of` multiplies by, as bytes (the
  compiled hash of image_measures uses the very same numbers)."""
  return np.ascontiguousarray(_LOW_ROWS, dtype=np.float64).tobytes()


def _hash_of(pixels: np.ndarray) -> int:
  """pHash bits of a float64 [32, 32] grey array (see phash), fast.

  Two matrix products; the coefficients are rounded to 6 decimals (they are
  sums of 8-bit levels times cosines, thousands for a photo), so those that
  are zero in exact arithmetic (flat or mirror-symmetric images) are 0 on
  every machine instead of round-off whose sign would decide bits. The
  median is the mean of the 32nd and 33rd smallest, as np.median's.
  """
  coefficients = np.round(_LOW_ROWS @ pixels @ _LOW_ROWS.T, 6).ravel()
  middle = np.partition(coefficients, (31, 32))[31:33]
  bits = (coefficients > (middle[0] + middle[1]) / 2).astype(np.uint64)
  return int(np.bitwise_or.reduce(bits << _SHIFTS))


# The share of each side the second hash of build_hashes leaves out: a copy
# cropped by a few % a side is near the original's centre, not its whole
# (benchmarks/results/near_duplicates.md). 5 px of a 128-px working copy.
# Chosen by recall over crops of 2-5% a side at distance 8 (calibration,
# 2026-12-04): 0.035 (4 px) caught 2% crops 0.974 but 5% crops 0.907; 0.04
# 0.956 and 0.960; 0.045-0.05 (6 px) 0.934 and 0.982; no false pair at
# d <= 9 with any. A change here changes every stored hash: bump
# reuse.FORMAT.
CENTRE_CROP = 0.04


def centre_crop(width: int, height: int) -> tuple[int, int]:
  """(dx, dy): the pixels the centre hash leaves out of each side of a
  width x height working copy."""
  return round(width * CENTRE_CROP), round(height * CENTRE_CROP)


def hash_of_pixels(pixels) -> int:
  """The pHash bits of 32x32 8-bit grey levels (an array or a PIL image), as
  build_hashes computes them."""
  return _hash_of(np.asarray(pixels, dtype=np.float64))


def build_hashes(luma: Image.Image) -> tuple[int, int]:
  """(hash of the whole image, hash of its centre) as the build stores them.

  luma: the 'L' working copy the quality measures use (image_quality.
  working_copy: box-shrunk to at most 128 px a side), shrunk again to 32x32
  with a box filter (~10x cheaper than phash's LANCZOS from the decoded
  image; within a few bits of it). The centre leaves out CENTRE_CROP of
  each side. Two images are near when either hash of one is near the whole
  hash of the other (near_duplicates). The reference: image_measures
  computes the same, compiled.
  """
  width, height = luma.size
  dx, dy = centre_crop(width, height)
  size = (_IMAGE_SIZE, _IMAGE_SIZE)
  whole = luma.resize(size, Image.Resampling.BOX)
  centre = luma.resize(size, Image.Resampling.BOX,
                       box=(dx, dy, width - dx, height - dy))
  return hash_of_pixels(whole), hash_of_pixels(centre)


def distance(a: int, b: int) -> int:
  """Hamming distance of two hashes: the number of bits that differ.

  `phash` sets 32 of its 64 bits (those above the median) unless
  coefficients tie, so two of them almost always differ in an even number
  of bits: distance <= 3 selects the same pairs as distance <= 2.
  """
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
