"""Augmentation settings: one typed config, no TensorFlow.

`AugmentConfig` is what make_dataset, the trainer and the `ImageAugmentation`
layer take; `parse` turns the trainer's `--augment` text into one (string
parsing stays at the command line). `COURSE` is the course's
ImageDataGenerator set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

FILL_MODES = ('nearest', 'constant', 'reflect', 'wrap')
COURSE_AUGMENTATION = dict(
    rotation_range=40, width_shift_range=0.2, height_shift_range=0.2,
    shear_range=0.2, zoom_range=0.2, horizontal_flip=True, fill_mode='nearest')
PRESETS = {'course': COURSE_AUGMENTATION, 'none': {}}
# ImageDataGenerator arguments that are not augmentation, and where they went.
_MOVED = {
    'rescale': "normalize='rescale' in make_dataset (the trainer normalizes "
               'as its model needs)',
    'featurewise_center': "normalize='standardize'",
    'featurewise_std_normalization': "normalize='standardize'",
    'samplewise_center': "normalize='standardize'",
    'samplewise_std_normalization': "normalize='standardize'",
    'preprocessing_function': 'a map over the dataset',
    'validation_split': 'pipelines.build --validation_fraction',
}

Range = Union[float, Sequence[float]]


def _is_number(value) -> bool:
  """A finite int or float: NaN passes every `<` check and inf makes NaN
  coordinates, so either would train on NaN images."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_type(name: str, value, default_type: type) -> None:
  """ValueError naming the option when a value has the wrong kind."""
  if name == 'fill_mode':
    ok = isinstance(value, str)
  elif default_type is bool:
    ok = isinstance(value, bool)
  elif name == 'zoom_range':
    ok = _is_number(value) or _is_pair(value)
  elif default_type is type(None):  # Optional [low, high] ranges.
    ok = value is None or _is_pair(value)
  else:
    ok = _is_number(value)
  if not ok:
    kind = ('true or false' if default_type is bool else 'a [low, high] '
            'pair of finite numbers' if default_type is type(None) else
            'a finite number or a [low, high] pair' if name == 'zoom_range'
            else 'a name' if name == 'fill_mode' else 'a finite number')
    raise ValueError(f'{name}={value!r} must be {kind}')


def _is_pair(value) -> bool:
  return (isinstance(value, (list, tuple)) and len(value) == 2 and
          all(_is_number(v) for v in value))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Random augmentation settings (ImageDataGenerator names + extras).

  Each field is read by exactly one op registered in augment.OPS (a test
  checks it): a new field needs its op there.
  """
  rotation_range: float = 0.0
  width_shift_range: float = 0.0
  height_shift_range: float = 0.0
  shear_range: float = 0.0
  zoom_range: Range = 0.0
  horizontal_flip: bool = False
  vertical_flip: bool = False
  fill_mode: str = 'nearest'
  cval: float = 0.0
  brightness_range: Optional[Sequence[float]] = None
  channel_shift_range: float = 0.0
  crop_range: Optional[Sequence[float]] = None
  brightness_delta: float = 0.0
  contrast_range: Optional[Sequence[float]] = None
  saturation_range: Optional[Sequence[float]] = None
  hue_delta: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      _check_type(field.name, getattr(self, field.name),
                  type(getattr(AugmentConfig, field.name, None)))
    if self.fill_mode not in FILL_MODES:
      raise ValueError(f'fill_mode={self.fill_mode!r} is not one of {FILL_MODES}')
    for name in ('rotation_range', 'width_shift_range', 'height_shift_range',
                 'shear_range', 'channel_shift_range', 'brightness_delta',
                 'hue_delta'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 0')
    for name in ('brightness_range', 'contrast_range', 'saturation_range',
                 'crop_range'):
      value = getattr(self, name)
      if value is not None and (len(value) != 2 or value[0] > value[1]):
        raise ValueError(f'{name}={value} must be a [low, high] pair')
    if self.crop_range is not None and not 0 < self.crop_range[0] <= (
        self.crop_range[1]) <= 1:
      raise ValueError(f'crop_range={self.crop_range} must lie in (0, 1]')
    low, high = self.zoom_bounds
    if not 0 < low <= high:
      raise ValueError(f'zoom_range={self.zoom_range} must give zoom factors '
                       f'0 < low <= high (now {low:g} to {high:g}): a number '
                       'in [0, 1) or a [low, high] pair of positive factors')
    if self.hue_delta > 0.5:
      raise ValueError(f'hue_delta={self.hue_delta} must be <= 0.5')

  @classmethod
  def from_kwargs(cls, **kwargs: Any) -> 'AugmentConfig':
    """Like the constructor, with errors that say where a key went."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in kwargs:
      if key in _MOVED:
        raise ValueError(f'{key} is not augmentation here: use {_MOVED[key]}')
      if key not in known:
        raise ValueError(f'unknown augmentation {key!r}; known: '
                         f'{", ".join(sorted(known))}')
    return cls(**kwargs)

  @property
  def zoom_bounds(self) -> tuple[float, float]:
    if isinstance(self.zoom_range, (int, float)):
      return 1.0 - self.zoom_range, 1.0 + self.zoom_range
    return float(self.zoom_range[0]), float(self.zoom_range[1])

  @property
  def is_identity(self) -> bool:
    return self == AugmentConfig(fill_mode=self.fill_mode, cval=self.cval)


def resolve(augment: Union[None, bool, str, Mapping, AugmentConfig]
            ) -> Optional[AugmentConfig]:
  """For the Keras layer's keyword form only; libraries take AugmentConfig.

  None/False -> None; True or 'course' -> the course set; dict -> config;
  an identity config -> None.
  """
  if augment is None or augment is False:
    return None
  if augment is True:
    augment = 'course'
  if isinstance(augment, str):
    if augment not in PRESETS:
      raise ValueError(f'augment={augment!r} is not a preset '
                       f'({", ".join(PRESETS)}) or a dict of options')
    augment = PRESETS[augment]
  if isinstance(augment, Mapping):
    augment = AugmentConfig.from_kwargs(**augment)
  if not isinstance(augment, AugmentConfig):
    raise ValueError(f'augment={augment!r} is not a preset name, a dict or '
                     'an AugmentConfig')
  return None if augment.is_identity else augment


COURSE = AugmentConfig(**COURSE_AUGMENTATION)


def parse(text: Optional[str]) -> Optional[AugmentConfig]:
  """--augment text -> AugmentConfig (None for 'none' or nothing).

  'course', or ImageDataGenerator-style key=value,... with true/false,
  numbers and low:high ranges (rotation_range=40,zoom_range=0.8:1.2).
  Raises ValueError with a message that names the bad item.
  """
  if not text or text == 'none':
    return None
  if text in PRESETS:
    return resolve(text)
  options = {}
  for item in text.split(','):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'{item!r} is not key=value; pass a preset '
                       f'({", ".join(PRESETS)}) or key=value,... (e.g. '
                       'rotation_range=40,horizontal_flip=true)')
    key, value = key.strip(), value.strip()
    if value.lower() in ('true', 'false'):
      options[key] = value.lower() == 'true'
    elif ':' in value:  # Ranges: zoom_range=0.8:1.2.
      try:
        options[key] = tuple(float(v) for v in value.split(':'))
      except ValueError:
        raise ValueError(f'{item!r}: a range is low:high numbers') from None
    else:
      try:
        options[key] = float(value)
      except ValueError:
        options[key] = value
  return resolve(options)


def to_text(config: Optional[AugmentConfig]) -> str:
  """The inverse of parse: the --augment text for a config."""
  if config is None:
    return 'none'
  if config == COURSE:
    return 'course'
  default = AugmentConfig()
  items = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if value == getattr(default, field.name):
      continue
    if isinstance(value, (list, tuple)):
      text = ':'.join(f'{v:g}' for v in value)
    elif isinstance(value, bool):
      text = str(value).lower()
    elif isinstance(value, float):
      text = f'{value:g}'
    else:
      text = str(value)
    items.append(f'{field.name}={text}')
  return ','.join(items)
