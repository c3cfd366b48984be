"""The settings of a build: BuildSettings (the flags) and their checks.

make_config validates every setting and returns the BuildConfig the Beam
graph runs with; every mistake is a UserError naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Optional

from pipelines.common.cli import parse_image_size
from pipelines.common.errors import UserError
from pipelines.folder_to_records import build_config
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import near_duplicates
from pipelines.preprocessing import image_quality
from pipelines.preprocessing import source_image
from tfrecords_schema import schema


DEFAULT_IMAGE_SIZE = '150'
DEFAULT_SHARD_SIZE_MB = 64.0


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Every setting of a build: the flags of pipelines.build, same names and
  defaults (the flags are defined from these fields; a test checks it)."""
  input_dir: str
  output_dir: str
  image_size: str = DEFAULT_IMAGE_SIZE
  resize_mode: str = source_image.RESIZE_MODES[0]
  image_format: str = schema.IMAGE_FORMATS[0]
  jpeg_quality: int = source_image.DEFAULT_JPEG_QUALITY
  channels: int = 3
  validation_fraction: float = 0.2
  test_fraction: float = 0.0
  seed: int = 0
  dataset_name: Optional[str] = None
  shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
  max_image_pixels: int = source_image.DEFAULT_MAX_PIXELS
  max_file_bytes: int = source_image.DEFAULT_MAX_FILE_BYTES
  overwrite: bool = False
  allow_missing_eval_classes: bool = False
  near_duplicate_distance: int = near_duplicates.DEFAULT_DISTANCE
  quality_thresholds: str = ''  # image_quality.parse: '' = the defaults.
  stratified: bool = False
  reuse_from: Optional[str] = None  # An earlier build (reuse.py).
  update: bool = False  # --output_dir is the earlier build, replaced.
  verify_reuse: bool = False  # Hash every file before taking its record.
# Whole names only (fullmatch: `$` would let a trailing line break through).
_NAME_RE = re.compile(r'[a-z][a-z0-9_]*')


def default_dataset_name(input_dir: str) -> str:
  """A TFDS-friendly name from the input folder: 'Horse-or-Human' -> 'horse_or_human'."""
  base = posixpath.basename(input_dir.replace('\\', '/').rstrip('/'))
  name = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')
  if not name or not name[0].isalpha():
    name = f'images_{name}' if name else 'images'
  return name


def check_range(flag: str, value: float, low: float, high: float,
                 fix: str) -> None:
  if not low <= value <= high:
    raise UserError(f'--{flag}={value} is out of range; {fix}')


def make_config(settings: BuildSettings, *, input_dir: str,
                listing: listing_lib.InputPlan) -> build_config.BuildConfig:
  """Validates every setting; raises UserError naming the value and the fix.

  input_dir: the resolved --input_dir.
  """
  s = settings
  image_size, resize_mode, image_format = (s.image_size, s.resize_mode,
                                           s.image_format)
  jpeg_quality, channels, seed = s.jpeg_quality, s.channels, s.seed
  validation_fraction, test_fraction = s.validation_fraction, s.test_fraction
  shard_size_mb, dataset_name = s.shard_size_mb, s.dataset_name
  max_image_pixels, max_file_bytes = s.max_image_pixels, s.max_file_bytes
  height, width = parse_image_size(image_size)
  if resize_mode not in source_image.RESIZE_MODES:
    raise UserError(f'--resize_mode={resize_mode} is not one of '
                    f'{", ".join(source_image.RESIZE_MODES)}')
  if image_format not in schema.IMAGE_FORMATS:
    raise UserError(f'--image_format={image_format} is not one of '
                    f'{", ".join(schema.IMAGE_FORMATS)}')
  if channels not in (1, 3):
    raise UserError(f'--channels={channels} is not 1 (grayscale) or 3 (RGB)')
  check_range('jpeg_quality', jpeg_quality, 1, 100, f'pass 1..100 ({source_image.DEFAULT_JPEG_QUALITY} default)')
  check_range('validation_fraction', validation_fraction, 0.0, 0.99,
               'pass a fraction in [0, 1), e.g. 0.2')
  check_range('test_fraction', test_fraction, 0.0, 0.99,
               'pass a fraction in [0, 1), e.g. 0.1')
  if validation_fraction + test_fraction >= 1.0:
    raise UserError(
        f'--validation_fraction={validation_fraction} + --test_fraction='
        f'{test_fraction} leaves no training images; keep their sum below 1')
  check_range('shard_size_mb', shard_size_mb, 0.001, 1 << 20,
               'pass a positive size in MB, e.g. 64')
  check_range('max_image_pixels', max_image_pixels, 1, 1 << 40,
               f'pass a positive pixel count (default {source_image.DEFAULT_MAX_PIXELS})')
  check_range('near_duplicate_distance', s.near_duplicate_distance, 0,
              near_duplicates.MAX_DISTANCE,
              f'pass 0 (no search) to {near_duplicates.MAX_DISTANCE} bits '
              f'(default {near_duplicates.DEFAULT_DISTANCE})')
  try:
    quality = image_quality.parse(s.quality_thresholds)
  except ValueError as e:
    raise UserError(f'--quality_thresholds={s.quality_thresholds}: {e}'
                    ) from None
  name = dataset_name or default_dataset_name(input_dir)
  if not _NAME_RE.fullmatch(name):
    raise UserError(f'--dataset_name={name!r} must be lower_snake_case '
                    '(letters, digits, _; starting with a letter)')
  return build_config.BuildConfig(
      input_dir=input_dir, dataset_name=name,
      class_names=listing.class_names, layout=listing.layout,
      image=source_image.ImageOptions(
          height=height, width=width, channels=channels,
          resize_mode=resize_mode, image_format=image_format,
          jpeg_quality=int(jpeg_quality), max_pixels=int(max_image_pixels),
          max_file_bytes=int(max_file_bytes),
          measure=bool(s.near_duplicate_distance) or any(
              v is not None for v in dataclasses.astuple(quality))),
      validation_fraction=float(validation_fraction),
      test_fraction=float(test_fraction), seed=int(seed),
      shard_size_bytes=int(shard_size_mb * (1 << 20)),
      near_duplicate_distance=int(s.near_duplicate_distance),
      quality=quality,
      stratified=bool(s.stratified) and
      listing.layout != listing_lib.SPLIT_FOLDERS_LAYOUT)


# Settings a pre-split --input_dir (train/, validation/, test/) makes moot.
_SPLIT_BY_HASH = ('validation_fraction', 'test_fraction', 'stratified')


def _shown(value) -> str:
  """A flag value as typed: true/false, or a number without trailing zeros."""
  return str(value).lower() if isinstance(value, bool) else f'{value:g}'


def moot_settings(s: BuildSettings, layout: str) -> list[str]:
  """Lines naming each setting given a value that has no effect here.

  In the split-folders layout the folders are the splits, so the split
  fractions change nothing (the report then records them as null); one
  left at its default is not named.
  """
  if layout != listing_lib.SPLIT_FOLDERS_LAYOUT:
    return []
  defaults = BuildSettings(input_dir='', output_dir='')
  return [f'--{name}={_shown(getattr(s, name))} has no effect: --input_dir is '
          'split already (its train/, validation/ and test/ folders are the '
          'splits); drop the flag, or put the class folders directly in '
          '--input_dir to split by hash'
          for name in _SPLIT_BY_HASH
          if getattr(s, name) != getattr(defaults, name)]
