"""Augmentation: geometry is right, fill modes as documented, each colour op
does what it says (and nothing when off), seeds reproduce."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.records_to_batches import augment
from tests import helpers


def _marked(size=21, row=10, col=15):
  image = np.zeros((1, size, size, 1), np.float32)
  image[0, row, col, 0] = 255.0
  return tf.constant(image)


def _warp(images, fill_mode='constant', cval=0.0, **params):
  n = images.shape[0]
  args = dict(rotation_deg=[0.0], shift_x=[0.0], shift_y=[0.0],
              shear_deg=[0.0], zoom_x=[1.0], zoom_y=[1.0], flip_x=[False],
              flip_y=[False])
  args.update(params)
  args = {k: tf.constant(v * n if len(v) == 1 else v) for k, v in args.items()}
  transforms = augment.transform_matrices(
      height=images.shape[1], width=images.shape[2], **args)
  return augment.warp(images, transforms, fill_mode=fill_mode,
                      cval=cval).numpy()


def _peak(out):
  return np.unravel_index(np.argmax(out[0, ..., 0]), out.shape[1:3])


def test_rotation_moves_a_marked_pixel_counter_clockwise():
  # 5 px right of the centre (10, 10); +90 deg puts it 5 px above.
  out = _warp(_marked(), rotation_deg=[90.0])
  assert _peak(out) == (5, 10)
  assert out[0, 5, 10, 0] == pytest.approx(255.0, abs=1e-3)
  out = _warp(_marked(), rotation_deg=[-90.0])
  assert _peak(out) == (15, 10)


def test_shift_and_zoom_move_a_marked_pixel():
  assert _peak(_warp(_marked(), shift_x=[3.0])) == (10, 18)
  assert _peak(_warp(_marked(), shift_y=[-4.0])) == (6, 15)
  # Zoom 0.5 samples half the field: 2x magnification about the centre.
  assert _peak(_warp(_marked(row=10, col=13), zoom_x=[0.5], zoom_y=[0.5])) == (
      10, 16)


def test_flip_matrix_is_exact():
  image = tf.random.uniform([2, 9, 7, 3], 0, 255, seed=1)
  out = _warp(image, flip_x=[True, False])
  np.testing.assert_allclose(out[0], image.numpy()[0, :, ::-1], atol=1e-3)
  np.testing.assert_allclose(out[1], image.numpy()[1], atol=1e-3)


def test_flip_only_augmentation_is_exact_reversal():
  images = tf.random.uniform([16, 8, 8, 3], 0, 255, seed=2)
  config = augment.AugmentConfig(horizontal_flip=True)
  out = augment.augment_batch(images, tf.constant([1, 2]), config).numpy()
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
  same = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
  assert all(f or s for f, s in zip(flipped, same))
  assert 0 < sum(flipped) < 16


def test_fill_modes_behave_as_documented():
  row = np.arange(1, 8, dtype=np.float32)  # a b c d e f g = 1..7
  image = tf.constant(np.tile(row, (5, 1))[None, :, :, None])

  def first_columns(mode):
    return _warp(image, fill_mode=mode, cval=99.0, shift_x=[2.0])[0, 2, :4, 0]

  np.testing.assert_allclose(first_columns('constant'), [99, 99, 1, 2])
  np.testing.assert_allclose(first_columns('nearest'), [1, 1, 1, 2])
  np.testing.assert_allclose(first_columns('wrap'), [6, 7, 1, 2])
  np.testing.assert_allclose(first_columns('reflect'), [2, 1, 1, 2])


def test_seeded_augmentation_reproduces_and_varies_with_seed():
  images = tf.random.uniform([4, 32, 32, 3], 0, 255, seed=3)
  config = augment.AugmentConfig(**augment.COURSE_AUGMENTATION)
  a = augment.augment_batch(images, tf.constant([5, 6]), config).numpy()
  b = augment.augment_batch(images, tf.constant([5, 6]), config).numpy()
  c = augment.augment_batch(images, tf.constant([5, 7]), config).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == (4, 32, 32, 3)
  assert a.min() >= 0 and a.max() <= 255


def test_brightness_and_channel_shift_follow_image_data_generator():
  images = tf.fill([2, 4, 4, 3], 100.0)
  out = augment.augment_batch(images, tf.constant([0, 1]), augment.AugmentConfig(
      brightness_range=(2.0, 2.0))).numpy()
  np.testing.assert_allclose(out, 200.0)
  ramp = tf.reshape(tf.range(48, dtype=tf.float32), [1, 4, 4, 3])
  out = augment.augment_batch(ramp, tf.constant([0, 1]), augment.AugmentConfig(
      channel_shift_range=50.0)).numpy()
  # Shifted, then clipped to each channel's own min..max.
  assert out.min() >= 0 and out.max() <= 47
  assert not np.allclose(out, ramp.numpy())


def _photos(n=6, size=24, low=60.0, high=190.0):
  """n real-photo crops as float32 [n, size, size, 3] in [low, high]: room
  to brighten, darken or stretch without clipping."""
  crops = helpers.distinct_crops(helpers.photo('coffee'), n, (size, size))
  return tf.constant(low + np.stack(list(crops)).astype(np.float32) *
                     ((high - low) / 255.0))


def _colour(images, seed=(3, 4), value_range=(0.0, 255.0), **options):
  return augment.augment_batch(images, tf.constant(seed),
                               augment.AugmentConfig(**options),
                               value_range=value_range).numpy()


def _saturation(x):
  """Mean distance of the channels from the pixel's luma, per image."""
  grey = (x * [0.299, 0.587, 0.114]).sum(-1, keepdims=True)
  return np.abs(x - grey).mean(axis=(1, 2, 3))


def _hsv(x):
  return tf.image.rgb_to_hsv(np.clip(x, 0, 255) / 255.0).numpy()


@pytest.mark.parametrize('off', [
    dict(brightness_range=(1.0, 1.0)), dict(channel_shift_range=0.0),
    dict(brightness_delta=0.0), dict(contrast_range=(1.0, 1.0)),
    dict(saturation_range=(1.0, 1.0)), dict(hue_delta=0.0)])
def test_each_colour_op_at_its_neutral_setting_changes_nothing(off):
  images = _photos()
  np.testing.assert_allclose(_colour(images, **off), images.numpy(),
                             atol=1e-3)


def test_brightness_delta_adds_one_offset_per_image():
  images = _photos()
  delta = _colour(images, brightness_delta=0.2) - images.numpy()
  per_image = delta[:, :1, :1, :1]
  np.testing.assert_allclose(delta, np.broadcast_to(per_image, delta.shape),
                             atol=1e-3)
  assert (np.abs(per_image) <= 0.2 * 255 + 1e-3).all()
  assert np.abs(per_image).min() > 0 and np.ptp(per_image) > 5
  # Given on the 0..255 scale: a [0, 1] image moves by at most 0.2.
  unit = _colour(images / 255.0, value_range=(0.0, 1.0), brightness_delta=0.2)
  np.testing.assert_allclose(unit, (images.numpy() + per_image) / 255.0,
                             atol=1e-5)


@pytest.mark.parametrize('factor', [0.5, 1.5])
def test_contrast_scales_the_spread_about_each_image_mean(factor):
  images = _photos()
  out = _colour(images, contrast_range=(factor, factor))
  x = images.numpy()
  np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)),
                             atol=1e-2)
  np.testing.assert_allclose(out.std(axis=(1, 2)), factor * x.std(axis=(1, 2)),
                             rtol=1e-4)


def test_saturation_moves_colours_away_from_or_to_grey():
  images = _photos()
  x = images.numpy()
  grey = _colour(images, saturation_range=(0.0, 0.0))
  np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-3)
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-3)
  np.testing.assert_allclose(grey[..., 0],
                             (x * [0.299, 0.587, 0.114]).sum(-1), atol=1e-3)
  vivid = _colour(images, saturation_range=(1.5, 1.5))
  assert (_saturation(vivid) > 1.3 * _saturation(x)).all()
  dull = _colour(images, saturation_range=(0.5, 0.5))
  np.testing.assert_allclose(_saturation(dull), 0.5 * _saturation(x),
                             rtol=1e-4)


def test_hue_rotates_hue_only_by_one_amount_per_image():
  images = _photos()
  before, after = _hsv(images.numpy()), _hsv(_colour(images, hue_delta=0.1))
  coloured = before[..., 1] > 0.15  # Hue is defined where there is colour.
  shift = np.mod(after[..., 0] - before[..., 0] + 0.5, 1.0) - 0.5
  rotations = []
  for i in range(len(shift)):
    s = shift[i][coloured[i]]
    assert np.abs(s - np.median(s)).max() < 0.02  # One rotation per image.
    rotations.append(np.median(s))
  rotations = np.abs(rotations)
  assert rotations.max() <= 0.1 + 0.01 and rotations.max() > 0.03
  assert np.ptp(rotations) > 0.01  # Sampled per image.
  np.testing.assert_allclose(after[..., 1:], before[..., 1:], atol=0.02)


def test_colour_jitter_together_keeps_the_range():
  images = tf.random.uniform([8, 16, 16, 3], 0, 255, seed=4)
  config = augment.AugmentConfig(brightness_delta=0.2, contrast_range=(0.5, 1.5),
                                 saturation_range=(0.5, 1.5), hue_delta=0.1)
  out = augment.augment_batch(images, tf.constant([1, 1]), config).numpy()
  assert 0 <= out.min() and out.max() <= 255
  assert np.abs(out - images.numpy()).mean() > 5


def test_image_data_generator_arguments_are_validated():
  with pytest.raises(ValueError, match="normalize='rescale'"):
    augment.resolve({'rescale': 1 / 255})
  with pytest.raises(ValueError, match="unknown augmentation 'rotaton_range'"):
    augment.resolve({'rotaton_range': 40})
  with pytest.raises(ValueError, match='fill_mode'):
    augment.resolve({'fill_mode': 'mirror'})
  assert augment.resolve('course') == augment.AugmentConfig(
      **augment.COURSE_AUGMENTATION)
  assert augment.resolve({}) is None and augment.resolve(None) is None


def test_keras_layer_augments_only_in_training_and_round_trips(tmp_path):
  layer = augment.ImageAugmentation(value_range=(0, 1), seed=3,
                                    **augment.COURSE_AUGMENTATION)
  images = tf.random.uniform([4, 24, 24, 3], seed=5)
  np.testing.assert_array_equal(layer(images, training=False), images)
  trained = layer(images, training=True).numpy()
  assert not np.allclose(trained, images.numpy())
  assert 0 <= trained.min() and trained.max() <= 1
  model = keras.Sequential([keras.Input((24, 24, 3)), layer,
                            keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(2)])
  path = str(tmp_path / 'm.keras')
  model.save(path)
  again = keras.models.load_model(path)
  np.testing.assert_allclose(again(images), model(images), atol=1e-6)
  assert again.layers[0].config == layer.config


def test_augment_works_inside_tf_data_map():
  images = tf.random.uniform([6, 16, 16, 3], 0, 255, seed=6)
  config = augment.AugmentConfig(rotation_range=30, horizontal_flip=True)
  ds = tf.data.Dataset.from_tensors(images).map(
      lambda x: augment.augment_batch(x, tf.constant([1, 2]), config))
  eager = augment.augment_batch(images, tf.constant([1, 2]), config)
  np.testing.assert_allclose(next(iter(ds)).numpy(), eager.numpy(), atol=1e-4)
