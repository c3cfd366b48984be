"""The course's CNNs and a transfer-learning model, sized from the dataset.

`build_model` takes the input shape (H, W, C) and class count and returns
an uncompiled `keras.Model` whose head follows the class count:

  2 classes   Dense(1, sigmoid)   + binary cross-entropy (the course's choice)
  3+ classes  Dense(K) logits     + sparse categorical cross-entropy

Which models exist, and each one's builder, arguments, normalization and
default dropout, is trainer.model_table (one entry per model). Inputs are
already normalized by the input pipeline as the entry says, so models hold
no rescaling layer and the exported serving function applies the same
normalization.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
from keras import layers

from trainer import config as config_lib
from trainer import model_table

MODELS = config_lib.MODELS
BASE_MODELS = config_lib.BASE_MODELS


ModelError = config_lib.ModelError


def head(x, num_classes: int, dropout: float):
  """Dropout (if any) + the class-count head, kept in float32."""
  if dropout:
    x = layers.Dropout(dropout)(x)
  if config_lib.single_unit(num_classes):
    return layers.Dense(1, activation='sigmoid', dtype='float32',
                        name='probability')(x)
  return layers.Dense(num_classes, dtype='float32', name='logits')(x)


def loss(num_classes: int, reduction: Optional[str] = 'sum_over_batch_size'
         ) -> keras.losses.Loss:
  """The loss of `head`'s output: binary cross-entropy on the sigmoid unit,
  sparse categorical cross-entropy on the logits. reduction=None gives one
  value per example (the multi-worker loop averages over the global batch).
  """
  if config_lib.single_unit(num_classes):
    return keras.losses.BinaryCrossentropy(reduction=reduction)
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction=reduction)


def conv_stack(inputs, num_classes: int, dropout: float, *, name: str,
               filters: tuple[int, ...], dense_units: int,
               dropout_before_dense: bool = False) -> keras.Model:
  """3x3 valid Conv(f)+ReLU, 2x2 max pooling for each f, Flatten, Dense.

  The course's CNNs (their filters in trainer.model_table). Dropout goes
  before the head, or (dropout_before_dense) between the convolutions and
  the dense layer. ModelError for inputs [B, H, W, C] too small to leave
  one pixel after the last pooling.
  """
  need = model_table.conv_stack_min_side(len(filters))
  config_lib.check_image_side(name, need, inputs.shape[1], inputs.shape[2])
  x = inputs
  for f in filters:
    x = layers.Conv2D(f, 3, activation='relu')(x)
    x = layers.MaxPooling2D(2)(x)
  x = layers.Flatten()(x)
  if dropout_before_dense and dropout:
    x = layers.Dropout(dropout)(x)
  x = layers.Dense(dense_units, activation='relu')(x)
  outputs = head(x, num_classes, 0.0 if dropout_before_dense else dropout)
  return keras.Model(inputs, outputs, name=name)


def dense(inputs, num_classes: int, dropout: float, *, name: str,
          dense_units: int) -> keras.Model:
  """Flatten, Dense(dense_units)+ReLU, head: the Fashion-MNIST notes'
  first model (128 units there); any input size."""
  x = layers.Flatten()(inputs)
  x = layers.Dense(dense_units, activation='relu')(x)
  return keras.Model(inputs, head(x, num_classes, dropout), name=name)


def transfer(inputs, num_classes, dropout, *, name: str, base_model: str,
             base_weights: Optional[str], base_cutoff_layer: Optional[str],
             dense_units: int = 1024):
  """A frozen Keras Applications base (truncated at a layer) + a new head.

  Pretrained weights cannot be downloaded at run time: `base_weights` must be
  a local file (e.g. inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5)
  or 'none' to start from random weights.
  """
  if base_weights is None:
    raise ModelError(
        '--model=transfer needs --base_weights=/path/to/notop_weights.h5: '
        'pretrained weights cannot be downloaded here, they must be a local '
        'file (or --base_weights=none to train the base from scratch)')
  if base_weights != 'none' and not os.path.isfile(base_weights):
    raise ModelError(
        f'--base_weights={base_weights} is not a file; pretrained weights '
        'cannot be downloaded here: pass a local weights file, or none')
  x = inputs
  if x.shape[-1] == 1:  # Grayscale data, RGB base: repeat the channel.
    x = layers.Concatenate(name='grey_to_rgb')([x, x, x])
  shape = tuple(x.shape[1:])
  application = getattr(keras.applications,
                        model_table.get_base(base_model).application)
  try:
    base = application(include_top=False, weights=None, input_shape=shape)
  except ValueError as e:
    raise ModelError(f'--base_model={base_model} cannot take {shape[0]}x'
                     f'{shape[1]} images ({e}); rebuild with a larger '
                     '--image_size or pass --image_size') from None
  if base_weights != 'none':
    base.load_weights(base_weights)
  base.trainable = False
  features = base.output
  if base_cutoff_layer:
    try:
      features = base.get_layer(base_cutoff_layer).output
    except ValueError:
      raise ModelError(
          f'--base_cutoff_layer={base_cutoff_layer} is not a layer of '
          f'{base_model}; e.g. ' + ' or '.join(
              f'{b.example_cutoff_layer} ({b.name})'
              for b in model_table.BASE_MODELS)) from None
  base = keras.Model(base.input, features, name=f'{base_model}_base')
  base.trainable = False
  y = base(x, training=False)
  y = layers.Flatten()(y)
  y = layers.Dense(dense_units, activation='relu')(y)
  return keras.Model(inputs, head(y, num_classes, dropout), name=name)


def unfreeze_from(model: keras.Model, layer: str) -> int:
  """Makes the --model=transfer base trainable from `layer` (by name) to
  its end; the layers before it stay frozen (its BatchNormalization layers
  keep inference statistics: the base is called with training=False).
  Returns how many weights are now trainable; ModelError naming the layer
  when the base has none of that name."""
  base, first = fine_tune_layers(model, layer)
  base.trainable = True
  for frozen in base.layers[:first]:
    frozen.trainable = False
  return len(model.trainable_weights)


def fine_tune_layers(model: keras.Model, layer: str):
  """(the transfer model's base, index of `layer` in it); ModelError naming
  the layer when the base has none of that name. Changes nothing."""
  bases = [l for l in model.layers if l.name.endswith('_base')]
  if not bases:
    raise ModelError(f'--fine_tune_from={layer}: --model={model.name} has no '
                     'base to fine-tune (use --model=transfer)')
  base = bases[0]
  names = [l.name for l in base.layers]
  if layer not in names:
    examples = ', '.join(f'{b.example_cutoff_layer} ({b.name})'
                         for b in model_table.BASE_MODELS)
    raise ModelError(
        f'--fine_tune_from={layer} is not a layer of the base {base.name} '
        f'({len(names)} layers, from {names[1]} to {names[-1]}); e.g. '
        f'{examples}')
  return base, names.index(layer)


def builder(entry: model_table.Model):
  """The function of this module that builds `entry`; LookupError naming
  the entry when there is none (a table entry without its builder)."""
  function = globals().get(entry.builder)
  if not callable(function):
    raise LookupError(
        f'trainer.model_table entry {entry.name!r} names builder '
        f'{entry.builder!r}, which trainer.models does not define: add '
        f'`def {entry.builder}(inputs, num_classes, dropout, *, name, ...)` '
        'to trainer/models.py')
  return function


def build_model(name: str, *, input_shape: tuple[int, int, int],
                num_classes: int, dropout: Optional[float] = None,
                base_model: str = BASE_MODELS[0],
                base_weights: Optional[str] = None,
                base_cutoff_layer: Optional[str] = None,
                conv_filters: Optional[tuple[int, ...]] = None,
                dense_units: Optional[int] = None) -> keras.Model:
  """Builds `name` for (H, W, C) inputs; ModelError when it cannot.

  conv_filters, dense_units: --conv_filters / --dense_units (None: the
  model's own, trainer.model_table).
  """
  config_lib.check_model_names(name, base_model)
  entry = model_table.get(name)
  dropout = entry.default_dropout if dropout is None else dropout
  if not 0 <= dropout < 1:
    raise ModelError(f'--dropout={dropout} must be in [0, 1)')
  inputs = keras.Input(input_shape, name='image')
  args = config_lib.architecture_args(name, conv_filters=conv_filters,
                                      dense_units=dense_units)
  if entry.uses_base_model:
    args.update(base_model=base_model, base_weights=base_weights,
                base_cutoff_layer=base_cutoff_layer)
  return builder(entry)(inputs, num_classes, dropout, name=entry.name, **args)
