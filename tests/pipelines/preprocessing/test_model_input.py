"""The one preprocessing definition and the input pipeline's small parts.

Each part is checked eagerly and inside `tf.data.Dataset.map` (graph mode),
on real photo pixels stored as PNG (lossless, so expected values are exact).
"""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.preprocessing.model_input import ModelInput
from pipelines.records_to_batches import augment_config
from pipelines.records_to_batches import input_pipeline
from tests import helpers
from tfrecords_schema import schema

STORED = (32, 48)


def _photo(size=STORED) -> np.ndarray:
  image = Image.fromarray(helpers.photo('chelsea')).resize(size[::-1])
  return np.asarray(image)


def _png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _record(array, label=1) -> bytes:
  return schema.encode_example(image=_png(array), label=label, filename='x',
                               sha256='0' * 64, original_height=1,
                               original_width=1)


def _model_input(**kwargs) -> ModelInput:
  values = dict(stored_height=STORED[0], stored_width=STORED[1], channels=3,
                image_format='png', height=STORED[0], width=STORED[1])
  values.update(kwargs)
  return ModelInput(**values)


def _both(fn, *args):
  """fn(*args) eagerly and inside Dataset.map: the two must agree."""
  eager = fn(*args)
  mapped = next(iter(tf.data.Dataset.from_tensors(args).map(fn)))
  eager, mapped = tf.nest.map_structure(np.asarray, (eager, mapped))
  tf.nest.map_structure(np.testing.assert_array_equal, eager, mapped)
  return eager


def test_decode_gives_the_stored_pixels():
  photo = _photo()
  image = _both(_model_input().decode, tf.constant(_png(photo)))
  assert image.dtype == np.uint8 and image.shape == (*STORED, 3)
  np.testing.assert_array_equal(image, photo)


def test_read_resize_is_identity_at_the_stored_size_and_resizes_otherwise():
  photo = tf.constant(_photo())
  np.testing.assert_array_equal(_both(_model_input().read_resize, photo),
                                photo)
  other = _model_input(height=24, width=40)
  resized = _both(other.read_resize, photo)
  assert resized.dtype == np.uint8 and resized.shape == (24, 40, 3)
  expected = np.asarray(Image.fromarray(_photo()).resize(
      (40, 24), Image.Resampling.BILINEAR), np.float64)
  assert np.abs(resized - expected).mean() < 3  # Both antialiased bilinear.


@pytest.mark.parametrize('normalize, low, high', [
    ('rescale', 0.0, 1.0), ('[-1,1]', -1.0, 1.0), ('none', 0.0, 255.0)])
def test_to_model_scales_and_to_pixels_inverts(normalize, low, high):
  model_input = _model_input(normalize=normalize)
  ramp = tf.constant(np.linspace(0, 255, 256).astype(np.uint8).reshape(
      1, 256, 1).repeat(3, axis=2))
  x = _both(model_input.to_model, ramp)
  assert x.dtype == np.float32
  np.testing.assert_allclose([x.min(), x.max()], [low, high], atol=1e-6)
  np.testing.assert_allclose(model_input.to_pixels(x) * 255.0,
                             np.asarray(ramp, np.float32), atol=1e-3)


def test_standardize_uses_the_train_statistics_and_inverts():
  model_input = _model_input(normalize='standardize', mean=(100.0, 50.0, 0.0),
                             std=(10.0, 5.0, 1.0))
  x = _both(model_input.to_model, tf.constant([[[110, 55, 3]]], tf.uint8))
  np.testing.assert_allclose(x, [[[1.0, 1.0, 3.0]]])
  np.testing.assert_allclose(model_input.to_pixels(x) * 255.0,
                             [[[110, 55, 3]]], atol=1e-3)
  with pytest.raises(ValueError, match='mean and std'):
    _model_input(normalize='standardize')
  with pytest.raises(ValueError, match='not one of'):
    _model_input(normalize='unit')


def test_source_options_are_the_builds_conversion():
  options = _model_input(image_format='raw', resize_mode='pad').source_options()
  assert (options.height, options.width) == STORED
  assert options.image_format == 'png' and options.resize_mode == 'pad'
  assert options.jpeg_quality == 95


def test_decode_example_is_deterministic_and_resizes():
  photo = _photo()
  model_input = _model_input(height=16, width=24)
  image, label = _both(lambda r: input_pipeline.decode_example(r, model_input),
                       tf.constant(_record(photo, label=2)))
  assert image.shape == (16, 24, 3) and image.dtype == np.uint8
  assert label == 2
  np.testing.assert_array_equal(
      image, model_input.read_resize(tf.constant(photo)).numpy())


def test_eval_parse_normalizes_and_encodes_labels():
  model_input = _model_input()
  images = tf.constant(np.stack([_photo(), _photo()[::-1]]))
  labels = tf.constant([0, 1], tf.int32)
  for mode, expected in (('int', [0, 1]),
                         ('categorical', [[1, 0, 0], [0, 1, 0]]),
                         ('binary', [[0.0], [1.0]])):
    x, y = _both(lambda i, l, m=mode: input_pipeline.eval_parse(
        i, l, model_input=model_input, label_mode=m, num_classes=3),
                 images, labels)
    np.testing.assert_allclose(x, images.numpy() / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, expected)


def test_train_parse_augments_with_its_seed_only():
  model_input = _model_input()
  images = tf.constant(np.stack([_photo()] * 4))
  labels = tf.constant([0, 1, 0, 1], tf.int32)
  config = augment_config.AugmentConfig(rotation_range=30,
                                        horizontal_flip=True)

  def parse(i, l, s):
    return input_pipeline.train_parse(
        i, l, s, model_input=model_input, augment=config, label_mode='int',
        num_classes=2)

  seed = tf.constant([1, 2], tf.int64)
  x, y = _both(parse, images, labels, seed)
  again, _ = parse(images, labels, seed)
  other, _ = parse(images, labels, tf.constant([3, 4], tf.int64))
  np.testing.assert_array_equal(x, again.numpy())  # Same seed, same batch.
  assert np.abs(x - other.numpy()).mean() > 0.01  # Another seed: another.
  plain = images.numpy() / 255.0
  assert np.abs(x - plain).mean() > 0.01  # It did augment.
  assert x.shape == plain.shape and 0 <= x.min() and x.max() <= 1
  np.testing.assert_array_equal(y, labels.numpy())
  unaugmented, _ = input_pipeline.train_parse(
      images, labels, seed, model_input=model_input, augment=None,
      label_mode='int', num_classes=2)
  np.testing.assert_allclose(unaugmented, plain, atol=1e-6)


def test_make_dataset_takes_only_a_typed_augment_config(tmp_path):
  with pytest.raises(TypeError, match='AugmentConfig'):
    input_pipeline.make_dataset(str(tmp_path), 'train', batch_size=2,
                                training=True, augment='course',
                                spec=_fake_spec())


def _fake_spec():
  from tfrecords_schema import metadata  # pylint: disable=g-import-not-at-top
  return metadata.DatasetSpec(
      name='x', class_names=('a', 'b'), height=STORED[0], width=STORED[1],
      channels=3, image_format='png', resize_mode='stretch', splits={})
