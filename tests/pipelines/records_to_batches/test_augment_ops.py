"""The augmentation op registry: every setting has its op, every op is
exercised, and each op's randomness is its own (seeded by its name)."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipelines.records_to_batches import augment
from pipelines.records_to_batches import augment_config
from tests import helpers

# One setting per registered op that makes it do something visible.
_EXAMPLES = {
    'horizontal_flip': dict(horizontal_flip=True),
    'vertical_flip': dict(vertical_flip=True),
    'zoom': dict(zoom_range=0.3),
    'shift': dict(width_shift_range=0.2, height_shift_range=0.2),
    'crop': dict(crop_range=(0.5, 0.8)),
    'rotation': dict(rotation_range=40),
    'shear': dict(shear_range=30),
    'fill': dict(rotation_range=40, fill_mode='constant', cval=255),
    'brightness': dict(brightness_range=(0.5, 1.5)),
    'channel_shift': dict(channel_shift_range=50.0),
    'brightness_delta': dict(brightness_delta=0.2),
    'contrast': dict(contrast_range=(0.5, 1.5)),
    'saturation': dict(saturation_range=(0.2, 1.8)),
    'hue': dict(hue_delta=0.2),
}


def _images(n=8, size=16):
  return tf.random.stateless_uniform([n, size, size, 3], [7, 8], 20, 235)


def _run(config, seed=(1, 2), images=None):
  images = _images() if images is None else images
  return augment.augment_batch(images, tf.constant(seed, tf.int64),
                               config).numpy()


def test_every_config_field_is_read_by_exactly_one_op():
  readers = {}
  for op in augment.OPS.values():
    for field in op.fields:
      readers.setdefault(field, []).append(op.name)
  fields = [f.name for f in dataclasses.fields(augment_config.AugmentConfig)]
  unread = [f for f in fields if f not in readers]
  assert not unread, (f'AugmentConfig fields {unread} are read by no op: '
                      'register one in pipelines/records_to_batches/'
                      'augment.py (augment.register)')
  shared = {f: ops for f, ops in readers.items() if len(ops) > 1}
  assert not shared, f'fields read by more than one op: {shared}'
  unknown = sorted(set(readers) - set(fields))
  assert not unknown, f'ops read fields AugmentConfig lacks: {unknown}'


def test_every_op_has_an_example_and_its_example_augments_reproducibly():
  missing = sorted(set(augment.OPS) - set(_EXAMPLES))
  assert not missing, f'add an example setting for ops {missing} to _EXAMPLES'
  images = _images()
  for name, options in _EXAMPLES.items():
    config = augment_config.AugmentConfig(**options)
    assert augment.OPS[name].active(config), name
    out = _run(config, images=images)
    assert out.shape == images.shape and out.dtype == np.float32, name
    assert np.abs(out - images.numpy()).mean() > 0.5, name
    np.testing.assert_array_equal(out, _run(config, images=images), name)
    assert not np.array_equal(out, _run(config, seed=(1, 3), images=images)
                              ), name
    assert 0 <= out.min() and out.max() <= 255, name


def test_an_off_config_activates_only_the_fill_op():
  config = augment_config.AugmentConfig()
  assert [op.name for op in augment.OPS.values() if op.active(config)] == [
      'fill']
  np.testing.assert_array_equal(_run(config), _images().numpy())


def test_op_seeds_depend_on_the_batch_seed_and_the_name_only():
  seed = tf.constant([5, 6], tf.int64)
  seeds = {name: tuple(augment.op_seed(seed, name).numpy())
           for name in augment.OPS}
  assert len(set(seeds.values())) == len(seeds)  # One stream per op.
  again = {name: tuple(augment.op_seed(seed, name).numpy())
           for name in reversed(augment.OPS)}
  assert again == seeds
  assert tuple(augment.op_seed(tf.constant([5, 7]), 'rotation').numpy()) != (
      seeds['rotation'])


def test_another_op_never_shifts_an_ops_random_draws(monkeypatch):
  rotation = augment_config.AugmentConfig(rotation_range=40)
  alone = _run(rotation)
  # A deterministic colour op on top: the rotation is the same one.
  doubled = _run(augment_config.AugmentConfig(rotation_range=40,
                                              brightness_range=(2.0, 2.0)))
  np.testing.assert_allclose(doubled, np.clip(alone * 2.0, 0, 255),
                             atol=1e-3)
  # A new op registered first (drawing random numbers) changes nothing.
  drawn = []

  def new_op(images, seed, config, *, batch, low, high, unit):
    del config, low, high, unit
    drawn.append(tf.random.stateless_uniform([batch], seed))
    return images

  ops = {'a_new_op': augment.Op('a_new_op', (), augment.COLOUR, new_op,
                                lambda c: True)}
  ops.update(augment.OPS)
  monkeypatch.setattr(augment, 'OPS', ops)
  np.testing.assert_array_equal(_run(rotation), alone)
  assert drawn


@pytest.mark.parametrize('channels', [1, 3])
def test_rgb_only_ops_leave_other_channel_counts_alone(channels):
  images = _images()[..., :channels]
  config = augment_config.AugmentConfig(saturation_range=(0.0, 0.0),
                                        hue_delta=0.3)
  out = _run(config, images=images)
  if channels == 1:
    np.testing.assert_array_equal(out, images.numpy())
  else:
    assert np.abs(out - images.numpy()).mean() > 1


def test_augmenting_inside_tf_data_logs_no_autograph_warning(tmp_path):
  # AutoGraph converts what a dataset map calls; the registry's Python (the
  # `active` lambdas) must stay out of it, or every run warns on stderr.
  script = tmp_path / 'augment_in_map.py'
  script.write_text(
      'import tensorflow as tf\n'
      'from pipelines.records_to_batches import augment, augment_config\n'
      'CONFIG = augment_config.AugmentConfig(\n'
      '    rotation_range=10, hue_delta=0.1, horizontal_flip=True)\n'
      '\n'
      'def augment_one(x):\n'
      '  return augment.augment_batch(x, tf.constant([1, 2]), CONFIG)\n'
      '\n'
      'ds = tf.data.Dataset.from_tensors(tf.zeros([2, 8, 8, 3]))\n'
      'print(next(iter(ds.map(augment_one))).shape)\n')
  result = subprocess.run(
      [sys.executable, str(script)], cwd=helpers.REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=str(helpers.REPO_ROOT)),
      capture_output=True, text=True, timeout=300, check=True)
  assert '(2, 8, 8, 3)' in result.stdout
  assert 'AutoGraph could not' not in result.stderr, result.stderr[-2000:]
