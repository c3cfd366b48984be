"""Stored image -> model input, and back to pixels: defined once.

    spec = tfrecords_schema.read_dataset_spec(data_dir)
    model_input = ModelInput.from_spec(spec, image_size=(96, 96))
    image = model_input.decode(example['image'])     # uint8 [sh, sw, C]
    image = model_input.read_resize(image)           # uint8 [h, w, C]
    x = model_input.to_model(image)                  # float32 [h, w, C]
    pixels = model_input.to_pixels(x)                # float32 in [0, 1]

The reader (make_dataset), evaluation, the sample pictures, the serving
export and trainer.predict all call these methods, so what training saw and
what a served model sees cannot drift apart. `source_options()` is the
build's conversion of a source file (preprocessing.source_image, Pillow),
which trainer.predict runs and the serving export reproduces in TensorFlow
(preprocessing.serving). The record is saved with a model as part of
`model_config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from pipelines.preprocessing import source_image

NORMALIZATIONS = ('rescale', 'standardize', '[-1,1]', 'none')
DEFAULT_NORMALIZATION = 'rescale'


@dataclasses.dataclass(frozen=True)
class ModelInput:
  """How a dataset's stored images become a model's inputs.

  stored_*: the shape the build stored (metadata.json); height/width: the
  size the model reads (the trainer's --image_size, default the stored
  size); normalize: one of NORMALIZATIONS, `mean`/`std` the train split's
  per-channel statistics on 0..255 (for 'standardize'). resize_mode,
  jpeg_quality and max_pixels are the build's, for source files.
  """
  stored_height: int
  stored_width: int
  channels: int
  image_format: str
  height: int
  width: int
  normalize: str = DEFAULT_NORMALIZATION
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None
  resize_mode: str = 'stretch'
  jpeg_quality: Optional[int] = None
  max_pixels: int = source_image.DEFAULT_MAX_PIXELS

  def __post_init__(self):
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f'normalize={self.normalize!r} is not one of '
                       f'{NORMALIZATIONS}')
    if self.normalize == 'standardize' and (self.mean is None or
                                            self.std is None):
      raise ValueError('normalize=standardize needs the train split\'s '
                       'mean and std, and the dataset has no train split')

  @classmethod
  def from_spec(cls, spec, *,
                image_size: Union[None, int, tuple[int, int]] = None,
                normalize: str = DEFAULT_NORMALIZATION) -> 'ModelInput':
    """For a DatasetSpec, read at image_size (default: the stored size)."""
    size = (spec.height, spec.width)
    if image_size is not None:
      size = ((image_size, image_size) if isinstance(image_size, int)
              else tuple(image_size))
    return cls(stored_height=spec.height, stored_width=spec.width,
               channels=spec.channels, image_format=spec.image_format,
               height=int(size[0]), width=int(size[1]), normalize=normalize,
               mean=spec.mean, std=spec.std, resize_mode=spec.resize_mode,
               jpeg_quality=spec.jpeg_quality)

  @property
  def stored_size(self) -> tuple[int, int]:
    return (self.stored_height, self.stored_width)

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) the model reads."""
    return (self.height, self.width)

  @property
  def shape(self) -> tuple[int, int, int]:
    """The model's input shape, [height, width, channels]."""
    return (self.height, self.width, self.channels)

  def decode(self, encoded):
    """Stored image bytes (scalar string) -> uint8 [stored_h, stored_w, C]."""
    from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
    return schema.decode_image(encoded, image_format=self.image_format,
                               height=self.stored_height,
                               width=self.stored_width, channels=self.channels)

  def read_resize(self, images):
    """uint8 [..., stored_h, stored_w, C] -> uint8 [..., h, w, C].

    Antialiased bilinear, rounded back to uint8 (so a cache after it stays
    small); unchanged when the sizes agree.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.size == self.stored_size:
      return images
    return round_to_uint8(tf.image.resize(images, self.size, antialias=True))

  def to_model(self, images):
    """Pixels (uint8 or float on 0..255) [..., C] -> float32 model input.

    rescale: [0, 1] (the course's `rescale=1./255`); standardize: (x - mean)
    / std with the train split's statistics; '[-1,1]': Inception / MobileNet
    inputs; none: 0..255 floats.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    images = tf.cast(images, tf.float32)
    if self.normalize == 'rescale':
      return images * (1.0 / 255.0)
    if self.normalize == '[-1,1]':
      return images * (1.0 / 127.5) - 1.0
    if self.normalize == 'standardize':
      return (images - tf.constant(self.mean, tf.float32)) / tf.constant(
          self._std, tf.float32)
    return images

  def to_pixels(self, inputs):
    """The inverse of to_model, for pictures: float32 [..., C] in [0, 1].

    Works on numpy arrays or tensors (numpy in, numpy out).
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    x = np.asarray(inputs, np.float32)
    if self.normalize == 'rescale':
      pixels = x
    elif self.normalize == '[-1,1]':
      pixels = (x + 1.0) / 2.0
    elif self.normalize == 'standardize':
      pixels = (x * np.asarray(self._std, np.float32) +
                np.asarray(self.mean, np.float32)) / 255.0
    else:
      pixels = x / 255.0
    return np.clip(pixels, 0.0, 1.0)

  @property
  def _std(self) -> tuple[float, ...]:
    return tuple(max(s, 1e-6) for s in self.std)

  def source_options(self) -> source_image.ImageOptions:
    """The build's conversion of a source file into this stored image.

    'raw' datasets store pixels, which PNG holds losslessly.
    """
    return source_image.ImageOptions(
        height=self.stored_height, width=self.stored_width,
        channels=self.channels, resize_mode=self.resize_mode,
        image_format='png' if self.image_format == 'raw' else
        self.image_format,
        jpeg_quality=self.jpeg_quality or source_image.DEFAULT_JPEG_QUALITY,
        max_pixels=self.max_pixels)


def round_to_uint8(values):
  """float pixels on the 0..255 scale [...] -> uint8 [...], rounded and
  clipped (the read-time resize, the serving export's resize, augmented
  batches sent by a tf.data service)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), tf.uint8)
