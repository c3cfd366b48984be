"""trainer.model_table: every entry builds, trains a step, and is what the
trainer uses; the table (and trainer.config) load without TensorFlow."""

import json
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from tests import helpers
from trainer import config as config_lib
from trainer import model_table
from trainer import models
from trainer import train_lib

# Every (model, base model) pair: a model on a base is built on each base.
_PAIRS = [(m.name, base) for m in model_table.MODELS
          for base in (model_table.BASE_MODEL_NAMES if m.uses_base_model
                       else (None,))]


def _smallest_side(entry, base) -> int:
  """The smallest input side the entry builds at (its refusal names it)."""
  if base is not None:
    return model_table.get_base(base).min_side
  try:
    models.build_model(entry.name, input_shape=(1, 1, 3), num_classes=2)
  except models.ModelError as e:
    return int(re.search(r'at least (\d+)x', str(e)).group(1))
  return 1


def _build(entry, base, side, **kwargs):
  extra = dict(base_model=base, base_weights='none') if base else {}
  return models.build_model(entry.name, input_shape=(side, side, 3),
                            num_classes=3, **extra, **kwargs)


def _dropout_rates(model) -> list[float]:
  return [layer.rate for layer in model.layers
          if isinstance(layer, keras.layers.Dropout)]


@pytest.mark.parametrize('name,base', _PAIRS)
def test_every_entry_builds_trains_a_step_with_its_dropout(name, base):
  entry = model_table.get(name)
  models.builder(entry)  # A missing builder: LookupError naming the entry.
  side = _smallest_side(entry, base)
  # The check trainer.main makes before TensorFlow loads agrees.
  assert side == model_table.min_side(name, base or
                                      model_table.BASE_MODEL_NAMES[0])
  model = _build(entry, base, side)
  assert model.name == name
  want = [entry.default_dropout] if entry.default_dropout else []
  assert _dropout_rates(model) == pytest.approx(want)
  assert _dropout_rates(_build(entry, base, side, dropout=0.3)) == [
      pytest.approx(0.3)]
  model.compile('adam', keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  x = np.random.default_rng(0).random((2, side, side, 3), np.float32)
  before = [w.numpy().copy() for w in model.trainable_weights]
  assert np.isfinite(model.train_on_batch(x, np.array([0, 2])))
  assert any(not np.array_equal(a, b.numpy())
             for a, b in zip(before, model.trainable_weights))
  if side > 8:  # One pixel less is refused as a ModelError.
    with pytest.raises(models.ModelError):
      _build(entry, base, side - 1)


def test_a_missing_builder_is_a_loud_error():
  entry = model_table.Model('not_built', 'no_such_builder', 'rescale', 0.0,
                            'nothing')
  with pytest.raises(LookupError, match="'not_built' names builder "
                     "'no_such_builder', which trainer.models does not"):
    models.builder(entry)


def test_the_run_normalizes_as_each_entry_says():
  spec = types.SimpleNamespace(
      height=32, width=32, channels=3, image_format='png', mean=(1.0,) * 3,
      std=(2.0,) * 3, resize_mode='stretch', jpeg_quality=None)
  for entry in model_table.MODELS:
    config = config_lib.TrainConfig(data_dir='d', model_dir='m',
                                    model=entry.name)
    assert train_lib.run_model_input(config, spec).normalize == (
        entry.normalization)


def test_choices_and_flags_come_from_the_table():
  assert config_lib.MODELS == tuple(m.name for m in model_table.MODELS)
  assert config_lib.BASE_MODELS == tuple(
      b.name for b in model_table.BASE_MODELS)
  assert config_lib.default('model') == model_table.MODELS[0].name
  assert config_lib.default('base_model') == model_table.BASE_MODELS[0].name
  with pytest.raises(config_lib.ModelError,
                     match='choose one of ' + ', '.join(config_lib.MODELS)):
    config_lib.check_model_names('resnet', config_lib.BASE_MODELS[0])


def test_a_bad_entry_is_refused_when_the_table_loads():
  with pytest.raises(ValueError, match='normalization'):
    model_table.Model('m', 'conv_stack', '[0,1]', 0.0, 'x')
  with pytest.raises(ValueError, match='default_dropout'):
    model_table.Model('m', 'conv_stack', 'rescale', 1.0, 'x')


@pytest.mark.parametrize('module', ['trainer.model_table', 'trainer.config'])
def test_the_table_and_config_import_no_tensorflow(module):
  code = (f'import sys, json, {module}; print(json.dumps(sorted(m for m in '
          "('tensorflow', 'keras') if m in sys.modules)))")
  result = subprocess.run([sys.executable, '-c', code], cwd=helpers.REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          check=True)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_size_check_before_tensorflow_agrees_with_the_builders():
  # trainer.main refuses too-small images before TensorFlow loads, from the
  # table; each builder refuses the same sizes, with the same sentence.
  for entry in model_table.MODELS:
    for base in model_table.BASE_MODELS:
      need = model_table.min_side(entry.name, base.name)
      config_lib.check_image_size(entry.name, base.name, (need, need + 5))
      with pytest.raises(config_lib.ModelError, match=f'at least {need}x'):
        config_lib.check_image_size(entry.name, base.name, (need + 5, need - 1))


def _conv_filters(model) -> list[int]:
  return [l.filters for l in model.layers
          if isinstance(l, keras.layers.Conv2D)]


def _dense_units(model) -> list[int]:
  return [l.units for l in model.layers if isinstance(l, keras.layers.Dense)]


def test_conv_filters_and_dense_units_change_the_course_models():
  small = model_table.get('small_cnn')
  default = _build(small, None, 32)
  assert _conv_filters(default) == [32, 64] and _dense_units(default) == [
      128, 3]
  changed = _build(small, None, 32, conv_filters=(8, 16, 24), dense_units=20)
  assert _conv_filters(changed) == [8, 16, 24]
  assert _dense_units(changed) == [20, 3]
  # Three blocks need larger images than two: both checks agree.
  need = model_table.min_side('small_cnn', 'inception_v3', (8, 16, 24))
  assert need == model_table.conv_stack_min_side(3) > model_table.min_side(
      'small_cnn', 'inception_v3')
  with pytest.raises(config_lib.ModelError, match=f'at least {need}x'):
    _build(small, None, need - 1, conv_filters=(8, 16, 24))
  with pytest.raises(config_lib.ModelError, match='--conv_filters=8,16,24'):
    config_lib.check_image_size('small_cnn', 'inception_v3',
                                (need - 1, need), (8, 16, 24))
  # The notes' dense model: Flatten, Dense128, head; --dense_units too.
  dense = _build(model_table.get('dense'), None, 28)
  assert _dense_units(dense) == [128, 3] and not _conv_filters(dense)
  assert _dense_units(_build(model_table.get('dense'), None, 28,
                             dense_units=512)) == [512, 3]


@pytest.mark.parametrize('model, kwargs, message', [
    ('dense', dict(conv_filters=(16,)), '--conv_filters does not apply to '
     '--model=dense; it changes small_cnn, horses_humans, cats_dogs'),
    ('small_cnn', dict(conv_filters=(16, 32.5)), 'expected positive'),
    ('transfer', dict(conv_filters=(16,)), 'does not apply to --model=transfer'),
    ('small_cnn', dict(conv_filters=(16, 0)), '--conv_filters=16,0: expected '
     'positive integers'),
    ('small_cnn', dict(conv_filters=()), 'expected positive integers'),
    ('cats_dogs', dict(dense_units=-5), '--dense_units=-5: expected positive'),
])
def test_architecture_flags_are_refused_where_they_do_not_fit(model, kwargs,
                                                              message):
  kwargs = {'conv_filters': None, 'dense_units': None, **kwargs}
  with pytest.raises(config_lib.ModelError, match=re.escape(message)):
    config_lib.architecture_args(model, **kwargs)


def test_conv_filters_flag_text_parses_or_names_the_flag():
  assert config_lib.parse_int_list('conv_filters', '16, 32,64') == (16, 32, 64)
  assert config_lib.parse_int_list('conv_filters', '') is None
  with pytest.raises(config_lib.UserError, match='--conv_filters=16;32'):
    config_lib.parse_int_list('conv_filters', '16;32')


def test_balanced_class_weights_follow_the_train_counts():
  assert config_lib.balanced_class_weights([10, 10]) == {0: 1.0, 1: 1.0}
  weights = config_lib.balanced_class_weights([90, 10, 20])
  assert weights == pytest.approx({0: 120 / 270, 1: 120 / 30, 2: 120 / 60})
  # Weighted, every class contributes the same total: n / K.
  assert [w * c for w, c in zip(weights.values(), [90, 10, 20])] == (
      pytest.approx([40, 40, 40]))
