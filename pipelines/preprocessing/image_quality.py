"""Image-quality flags: measures of one decoded image, and the flags they raise.

The build reports, per file, which of FLAGS an image has; nothing is removed.
`measure` reads the image the build has already decoded (8-bit 'L' or 'RGB',
at whatever size the JPEG DCT scaling gave) plus the source's original size;
`flags` compares the measures with `Thresholds`; `parse` reads the
--quality_thresholds build flag.

Pixel measures are taken on a copy shrunk (never enlarged) so its longer side
is WORKING_SIDE, with a box (area-average) filter:
  * JPEG DCT scaling is itself close to an area average, and box shrinks
    compose, so an image decoded at full, 1/2 or 1/4 scale (>= WORKING_SIDE)
    yields nearly the same working copy and sharpness (within 15% on the
    photos of benchmarks/results/quality_flags.md, most within 3.5%). 256
    would see finer blur but would have to enlarge a 1/4-scale decode of a
    512 px photo, and enlarging invents blur; 96 or 112 separate blurred
    from ordinary images less well.
  * An image decoded smaller than WORKING_SIDE is measured at its own size:
    blur below its own pixel scale is not seen there (flags stay quiet
    rather than flag a whole small-image dataset as blurry).
  * It bounds the cost: ~0.8 ms for a 512x512 RGB image, mostly the
    conversion to luma and the shrink.

Every measure is computed from integer sums (exact) and one final float
division, then rounded, so the JSON a build writes is compact and identical
across runs and machines (given the same Pillow, whose 8-bit resampling is
fixed-point).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

BELOW, ABOVE = 'below', 'above'
# Flag -> (the Measures field it reads, the side of its threshold that
# raises it). Thresholds has one field per flag, of the same name.
RULES = {
    'blurry': ('sharpness', BELOW),
    'bright': ('luma_p05', ABOVE),
    'dark': ('luma_p95', BELOW),
    'grayscale': ('colour', BELOW),
    'low_information': ('luma_std', BELOW),
    'odd_aspect': ('aspect', ABOVE),
    'tiny': ('min_side', BELOW),
}
FLAGS = tuple(sorted(RULES))
# Longer side (pixels) of the copy the pixel measures are taken on.
WORKING_SIDE = 128
# Percentiles (of the luma histogram) behind the dark and bright measures.
_LOW_PERCENT, _HIGH_PERCENT = 5, 95
# Decimal places kept in Measures (after rounding).
_DECIMALS = 4
# What `parse` accepts to switch a flag (key=off) or all flags (off) off.
OFF = 'off'


def _threshold(default, help_text: str):
  """A Thresholds field: its default and the help text a flag shows."""
  return dataclasses.field(default=default, metadata={'help': help_text})


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """When each flag is raised; a field set to None switches its flag off.

  Each field is named after its flag (RULES says which measure it reads).
  The defaults were chosen with benchmarks/quality_flags.py; its results
  (benchmarks/results/quality_flags.md) give each one's false-flag rate on
  ordinary photos and detection rate on planted defects.
  """
  blurry: Optional[float] = _threshold(
      0.15, 'sharpness below this (variance of the 3x3 Laplacian over the '
      f'variance of luma, on a copy {WORKING_SIDE} px on its longer side; '
      '0 = flat, ~0.4-0.8 = sharp photo)')
  dark: Optional[float] = _threshold(
      0.2, 'luma 95th percentile (0..1) below this: even the brightest '
      'parts are dim')
  bright: Optional[float] = _threshold(
      0.8, 'luma 5th percentile (0..1) above this: even the darkest parts '
      'are washed out')
  low_information: Optional[float] = _threshold(
      0.01, 'luma standard deviation (0..1) below this: near-constant image')
  odd_aspect: Optional[float] = _threshold(
      3.0, 'original longer side over shorter side above this')
  tiny: Optional[int] = _threshold(
      32, 'original shorter side (pixels) below this')
  grayscale: Optional[float] = _threshold(
      0.01, 'colour datasets only: mean absolute difference (0..1) of the '
      'most different pair of channels below this: a grey image')

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None and not (isinstance(value, (int, float))
                                    and math.isfinite(value) and value >= 0):
        raise ValueError(
            f'quality threshold {field.name}={value!r} must be a finite '
            f'number >= 0 (or None to switch the flag off)')

  @functools.cached_property
  def rules(self) -> tuple[tuple[str, str, bool, float], ...]:
    """(flag, the measure it reads, whether below raises it, threshold) of
    each flag left on, in FLAGS order: made once (flags() runs for every
    file of a build, taken ones too)."""
    return tuple((name, RULES[name][0], RULES[name][1] == BELOW,
                  getattr(self, name)) for name in FLAGS
                 if getattr(self, name) is not None)


def parse(text: str) -> Thresholds:
  """Thresholds from a flag value like 'blurry=0.1,dark=0.2,tiny=off'.

  Unnamed keys keep their defaults; '' means all defaults; 'off' switches
  every flag off and 'key=off' one. Raises ValueError naming the bad key or
  value and listing the valid keys.
  """
  text = text.strip()
  if text.lower() == OFF:
    return Thresholds(**{name: None for name in FLAGS})
  fields = {field.name: field for field in dataclasses.fields(Thresholds)}
  values = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    key, sep, value = (part.strip() for part in item.partition('='))
    if not sep or key not in fields:
      raise ValueError(
          f'quality threshold {item!r}: expected key=value with key one of '
          f'{", ".join(FLAGS)} (or the whole value {OFF!r})')
    if key in values:
      raise ValueError(f'quality threshold {key!r} is given twice in {text!r}')
    values[key] = _parse_value(key, value, fields[key].default)
  return Thresholds(**values)


def _parse_value(key: str, value: str, default) -> Optional[float]:
  """One threshold's value: a number of its default's type, or None for off."""
  if value.lower() == OFF:
    return None
  kind, noun = (int, 'an integer') if isinstance(default, int) else (
      float, 'a number')
  try:
    number = kind(value)
  except ValueError:
    raise ValueError(
        f'quality threshold {key}={value!r} is not {noun} (default '
        f'{default}; {OFF!r} switches it off)') from None
  if not math.isfinite(number) or number < 0:
    raise ValueError(
        f'quality threshold {key}={value!r} must be >= 0 and finite')
  return number


def flag_help() -> str:
  """Help text for the --quality_thresholds flag: every key, its default and
  meaning (read from Thresholds, so it cannot drift)."""
  lines = [f'Comma-separated key=value; {OFF!r} switches all flags off and '
           f'key={OFF} one. Keys:']
  for field in dataclasses.fields(Thresholds):
    lines.append(f'  {field.name}={field.default}: {field.metadata["help"]}')
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class Measures:
  """What `measure` found in one image (rounded to _DECIMALS places).

  sharpness: variance of the 3x3 Laplacian over the variance of luma, on the
    working copy; independent of brightness and contrast; 0 for a flat
    image, ~0.4-0.8 for sharp photos, 20 for white noise.
  luma_p05, luma_p95: 5th and 95th percentiles of luma, 0..1.
  luma_std: standard deviation of luma, 0..1.
  aspect: original longer side / shorter side (>= 1).
  min_side: original shorter side, pixels.
  colour: mean absolute difference of the most different channel pair,
    0..1; None in 1-channel datasets.
  """
  sharpness: float
  luma_p05: float
  luma_p95: float
  luma_std: float
  aspect: float
  min_side: int
  colour: Optional[float]

  def as_dict(self) -> dict:
    """Field name -> value (for the JSON report; dataclasses.asdict, which
    deep-copies, took 7 µs an image)."""
    return {name: getattr(self, name) for name in MEASURE_FIELDS}


MEASURE_FIELDS = tuple(f.name for f in dataclasses.fields(Measures))


def working_copy(image: Image.Image) -> Image.Image:
  """The 'L' copy every measure (and the build's perceptual hashes) read:
  `image` in grey, box-shrunk so its longer side is at most WORKING_SIDE."""
  return _shrunk(image.convert('L') if image.mode != 'L' else image)


def working_size(width: int, height: int) -> tuple[int, int]:
  """(width, height) of the working copy of a width x height image: its
  longer side WORKING_SIDE, or the image's own size when that is smaller."""
  longer = max(width, height)
  if longer <= WORKING_SIDE:
    return width, height
  scale = WORKING_SIDE / longer
  return max(1, round(width * scale)), max(1, round(height * scale))


def _shrunk(luma: Image.Image) -> Image.Image:
  """`luma` box-shrunk to its working_size (never enlarged).

  One direct box resize: Pillow's faster reduce-then-resize
  (reducing_gap) ends with a near-identity resample when the reduced size
  is a pixel off, which smooths rows and moved a photo's sharpness by 25%
  between decode scales (benchmarks/quality_flags.py).
  """
  size = working_size(*luma.size)
  if size == luma.size:
    return luma
  return luma.resize(size, Image.Resampling.BOX)


def _laplacian_sums(values: np.ndarray) -> tuple[int, int]:
  """(sum, sum of squares) of the 3x3 Laplacian of int `[h, w]` values, exact.

  Edges are replicated, so any size works (a 1-pixel strip gets the 1-D
  Laplacian along its length).
  """
  padded = np.pad(values, 1, mode='edge')
  laplacian = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2]
               + padded[1:-1, 2:] - 4 * values)
  return (int(laplacian.sum(dtype=np.int64)),
          int(np.square(laplacian, dtype=np.int64).sum()))


def _percentile_levels(luma: Image.Image) -> tuple[int, int]:
  """The smallest levels with at least _LOW_PERCENT and _HIGH_PERCENT of an
  'L' image's pixels at or below them."""
  cumulative = np.cumsum(np.asarray(luma.histogram(), dtype=np.int64))
  n = int(cumulative[-1])
  return (int(np.argmax(cumulative * 100 >= _LOW_PERCENT * n)),
          int(np.argmax(cumulative * 100 >= _HIGH_PERCENT * n)))


# The colour measure reads block averages about this many pixels on the
# longer side (a mean: the scale hardly matters, and small is fast).
_COLOUR_SIDE = 32


def colour_factor(width: int, height: int) -> int:
  """The Image.reduce factor of the colour measure's block averages."""
  return max(1, max(width, height) // _COLOUR_SIDE)


def _colour_sums(rgb: Image.Image) -> tuple[int, int]:
  """(largest channel-pair sum of absolute differences, block count) over
  whole-block averages about _COLOUR_SIDE on the longer side (a fast
  Image.reduce; the exact scale hardly matters for a mean)."""
  factor = colour_factor(*rgb.size)
  pixels = np.asarray(rgb.reduce(factor) if factor > 1 else rgb,
                      dtype=np.int16)
  largest = max(
      int(np.abs(pixels[..., i] - pixels[..., j]).sum(dtype=np.int64))
      for i, j in ((0, 1), (1, 2), (0, 2)))
  return largest, pixels.shape[0] * pixels.shape[1]


class Sums(NamedTuple):
  """The exact integer sums every pixel measure is computed from.

  n, total, squares: pixel count, sum and sum of squares of the working
    copy's levels.
  laplacian_total, laplacian_squares: sum and sum of squares of its 3x3
    Laplacian (edges replicated).
  low, high: the levels of the _LOW_PERCENT and _HIGH_PERCENT percentiles.
  colour: (largest channel-pair absolute difference sum, block count), or
    None for 1-channel datasets.
  The reference (`sums`) and the compiled pass (image_measures) both give
  these; `from_sums` turns them into Measures, so the two cannot differ
  after the sums.
  """
  n: int
  total: int
  squares: int
  laplacian_total: int
  laplacian_squares: int
  low: int
  high: int
  colour: Optional[tuple[int, int]]


def check_image(image: Image.Image, *, original_size: tuple[int, int],
                channels: int) -> None:
  """Raises ValueError unless `measure` can take these arguments."""
  if channels not in (1, 3):
    raise ValueError(f'channels={channels!r} must be 1 or 3')
  if image.mode != 'RGB' and not (channels == 1 and image.mode == 'L'):
    raise ValueError(
        f'image mode {image.mode!r} with channels={channels}: expected '
        f'{"RGB" if channels == 3 else "L or RGB"} (source_image.to_8bit)')
  if min(original_size) < 1:
    raise ValueError(f'original_size={original_size!r} must be positive '
                     '(height, width)')


def sums(image: Image.Image, *, channels: int,
         luma: Optional[Image.Image] = None) -> Sums:
  """The Sums of one decoded image, with Pillow and numpy (the reference).

  image, channels: as `measure`; luma: working_copy(image), when the caller
  made it already.
  """
  if luma is None:
    luma = working_copy(image)
  values = np.asarray(luma).astype(np.int32)
  laplacian_total, laplacian_squares = _laplacian_sums(values)
  low, high = _percentile_levels(luma)
  return Sums(
      n=values.size,
      total=int(values.sum(dtype=np.int64)),
      squares=int(np.square(values, dtype=np.int64).sum()),
      laplacian_total=laplacian_total,
      laplacian_squares=laplacian_squares,
      low=low,
      high=high,
      colour=_colour_sums(image) if channels == 3 else None)


def from_sums(pixel_sums: Sums, *, original_size: tuple[int, int]
              ) -> Measures:
  """Measures from the Sums and the source's (height, width), rounded."""
  s = pixel_sums
  spread = s.n * s.squares - s.total * s.total  # n^2 x variance
  laplacian_spread = s.n * s.laplacian_squares - s.laplacian_total ** 2
  height, width = original_size
  return Measures(
      sharpness=round(laplacian_spread / spread if spread else 0.0,
                      _DECIMALS),
      luma_p05=round(s.low / 255, _DECIMALS),
      luma_p95=round(s.high / 255, _DECIMALS),
      luma_std=round(math.sqrt(spread) / s.n / 255, _DECIMALS),
      aspect=round(max(height, width) / min(height, width), _DECIMALS),
      min_side=int(min(height, width)),
      colour=None if s.colour is None else round(
          s.colour[0] / s.colour[1] / 255, _DECIMALS))


def measure(image: Image.Image, *, original_size: tuple[int, int],
            channels: int, luma: Optional[Image.Image] = None) -> Measures:
  """Measures one decoded image (the reference; image_measures.measure gives
  the same, compiled, with the hashes).

  Args:
    image: the decoded 8-bit image, 'RGB' when channels is 3 ('L' or 'RGB'
      when 1), at any size (e.g. a reduced JPEG DCT scale).
    original_size: (height, width) of the source before any scaling.
    channels: the dataset's channel count, 1 or 3; colour is measured (and
      the grayscale flag possible) only for 3.
    luma: working_copy(image), when the caller made it already.

  Returns:
    Measures, rounded.
  """
  check_image(image, original_size=original_size, channels=channels)
  return from_sums(sums(image, channels=channels, luma=luma),
                   original_size=original_size)


def flags(measures, thresholds: Thresholds = Thresholds()
          ) -> tuple[str, ...]:
  """The flags (sorted names from FLAGS) that `measures` raise.

  measures: a Measures, or its as_dict() (an earlier build's images.jsonl
  line: an incremental build takes those without making a Measures).
  Each compares its RULES measure with its threshold (strictly); None, as a
  threshold or a measure (colour in 1-channel datasets), raises nothing. A
  low_information image is not also called blurry: a flat image has no
  edges to be sharp or blurred.
  """
  values = measures if isinstance(measures, dict) else measures.__dict__
  raised = [name for name, field, below, threshold in thresholds.rules
            if (value := values[field]) is not None
            and (value < threshold if below else value > threshold)]
  if 'low_information' in raised and 'blurry' in raised:
    raised.remove('blurry')
  return tuple(raised)


def measures_dict(measures) -> Optional[dict]:
  """A Measures as a dict in field order, what a build's images.jsonl line
  holds; an earlier build's dict of one as it is (a taken line's, held to
  that order by reuse's check); None for None."""
  if measures is None or isinstance(measures, dict):
    return measures
  return measures.as_dict()
