"""Resize modes (--resize_mode): each one registered once, in both libraries.

The build and trainer.predict resize with Pillow (source_image.resize); the
serving export must do the same in TensorFlow ops (serving), since a
SavedModel cannot call Pillow. So a mode is one `ResizeMode` holding both
implementations side by side, and both callers dispatch through `get`:

  pillow(image, height=, width=)      PIL.Image -> PIL.Image of that size
  tensorflow(image, height=, width=)  uint8 [h, w, C] -> [height, width, C]

A mode without both halves cannot be registered (the dataclass needs both,
and `__post_init__` refuses a missing one), so forgetting the TensorFlow half
fails at import; tests/pipelines/preprocessing/test_resize_modes.py runs every registered mode's two
halves on real photos and checks that they agree.

Adding a mode: write its two functions below, next to each other, and one
`_register(ResizeMode(...))` call; source_image.RESIZE_MODES (the build's
--resize_mode choices), source_image.resize and the serving export follow.

TensorFlow is imported inside the TensorFlow halves only: the build's Beam
workers import this module (through source_image) without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from PIL import Image

# Pillow's BILINEAR is a triangle filter, widened (antialiased) when
# shrinking. TensorFlow computes the same with tf.image.resize(antialias=True)
# or ScaleAndTranslate('triangle', antialias=True).
_RESAMPLE = Image.Resampling.BILINEAR


@dataclasses.dataclass(frozen=True)
class ResizeMode:
  """One resize mode: its name and its Pillow and TensorFlow implementations.

  Both are called with keyword arguments height and width (ints, the output
  size) and must give the same pixels up to resampling round-off.
  """
  name: str
  pillow: Callable[..., Image.Image]
  tensorflow: Callable[..., Any]

  def __post_init__(self):
    for half in ('pillow', 'tensorflow'):
      if not callable(getattr(self, half)):
        raise TypeError(
            f'resize mode {self.name!r} needs both a Pillow and a TensorFlow '
            f'implementation; its {half} half is {getattr(self, half)!r}')


_REGISTRY: dict[str, ResizeMode] = {}


def _register(mode: ResizeMode) -> None:
  if mode.name in _REGISTRY:
    raise ValueError(f'resize mode {mode.name!r} is registered twice')
  _REGISTRY[mode.name] = mode


def names() -> tuple[str, ...]:
  """The registered modes in registration order (the first is the default)."""
  return tuple(_REGISTRY)


def describe() -> str:
  """Every mode and the first sentence of its Pillow half's docstring: the
  --resize_mode help, so a new mode documents itself."""
  parts = []
  for mode in _REGISTRY.values():
    doc = ' '.join((mode.pillow.__doc__ or '').split())
    parts.append(f'{mode.name}: {doc.split(". ")[0].rstrip(".")}')
  return '; '.join(parts) + '.'


def get(name: str) -> ResizeMode:
  """The registered mode `name`; ValueError naming the choices otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f'resize mode {name!r} is not one of {names()}') from None


def _round_to_uint8(values):
  from pipelines.preprocessing import model_input  # pylint: disable=g-import-not-at-top
  return model_input.round_to_uint8(values)


# ------------------------------------------------------------------ stretch


def _stretch_pillow(image: Image.Image, *, height: int,
                    width: int) -> Image.Image:
  """Ignores the aspect ratio."""
  return image.resize((width, height), _RESAMPLE)


def _stretch_tf(image, *, height: int, width: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return _round_to_uint8(tf.image.resize(image, [height, width],
                                         antialias=True))


_register(ResizeMode('stretch', pillow=_stretch_pillow,
                     tensorflow=_stretch_tf))


# --------------------------------------------------------------------- crop


def _crop_pillow(image: Image.Image, *, height: int,
                 width: int) -> Image.Image:
  """Centre-crops the largest region of the target aspect ratio, then
  resizes (Keras' crop_to_aspect_ratio). The box is fractional: Pillow
  resamples it without rounding to whole pixels."""
  src_w, src_h = image.size
  scale = min(src_w / width, src_h / height)
  crop_w, crop_h = width * scale, height * scale
  left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
  return image.resize((width, height), _RESAMPLE,
                      box=(left, top, left + crop_w, top + crop_h))


def _crop_tf(image, *, height: int, width: int):
  """The same floating-point box as Pillow's (so a 1x20000 image still has
  a crop), as a scale and translation of the triangle filter."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  src_h, src_w = shape[0], shape[1]
  scale = tf.minimum(src_w / width, src_h / height)  # Source px per output.
  left = (src_w - width * scale) / 2
  top = (src_h - height * scale) / 2
  out = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=tf.constant([height, width]),
      scale=tf.cast(tf.stack([1 / scale, 1 / scale]), tf.float32),
      translation=tf.cast(tf.stack([-top / scale, -left / scale]),
                          tf.float32),
      kernel_type='triangle', antialias=True)
  return _round_to_uint8(out[0])


_register(ResizeMode('crop', pillow=_crop_pillow, tensorflow=_crop_tf))


# ---------------------------------------------------------------------- pad


def _pad_pillow(image: Image.Image, *, height: int,
                width: int) -> Image.Image:
  """Fits inside and pads the rest with black, centred (Keras'
  pad_to_aspect_ratio)."""
  src_w, src_h = image.size
  scale = max(src_w / width, src_h / height)
  new_w = min(width, max(1, round(src_w / scale)))
  new_h = min(height, max(1, round(src_h / scale)))
  canvas = Image.new(image.mode, (width, height), 0)
  canvas.paste(image.resize((new_w, new_h), _RESAMPLE),
               ((width - new_w) // 2, (height - new_h) // 2))
  return canvas


def _pad_tf(image, *, height: int, width: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  src_h, src_w = shape[0], shape[1]
  scale = tf.maximum(src_w / width, src_h / height)
  # Python's round() (half to even) is tf.round's.
  new_w = tf.cast(tf.clip_by_value(tf.round(src_w / scale), 1, width),
                  tf.int32)
  new_h = tf.cast(tf.clip_by_value(tf.round(src_h / scale), 1, height),
                  tf.int32)
  resized = _round_to_uint8(tf.image.resize(image, tf.stack([new_h, new_w]),
                                            antialias=True))
  return tf.image.pad_to_bounding_box(resized, (height - new_h) // 2,
                                      (width - new_w) // 2, height, width)


_register(ResizeMode('pad', pillow=_pad_pillow, tensorflow=_pad_tf))
