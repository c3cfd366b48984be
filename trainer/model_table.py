"""Every model the trainer builds, one entry each; no TensorFlow.

A model is one `Model` entry in MODELS: its name (the --model value), the
builder that makes it (a function of trainer.models, named here so this
table stays TensorFlow-free: trainer.config reads it before TensorFlow
loads, so a --model typo is refused at once), that builder's arguments, how
the input pipeline normalizes its inputs, its default dropout, and whether
it stands on a --base_model. Everything else derives from it: the --model
choices and help (trainer.config, trainer.main), `models.build_model`, the
run's normalization (train_lib) and the --dropout default. tests/
test_model_table.py builds and trains every entry, so an entry whose
builder is missing fails there.

Builders are called as `builder(inputs, num_classes, dropout, name=...,
**args)`, plus base_model / base_weights / base_cutoff_layer for an entry
with `uses_base_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from pipelines.preprocessing import model_input as model_input_lib


@dataclasses.dataclass(frozen=True)
class Model:
  """One --model value and everything the trainer needs to know about it."""
  name: str
  builder: str  # A function of trainer.models.
  normalization: str  # One of model_input.NORMALIZATIONS.
  default_dropout: float  # --dropout when not given.
  description: str  # Architecture, for people (README, docs).
  args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  uses_base_model: bool = False  # Takes --base_model/--base_weights/...

  def __post_init__(self):
    if self.normalization not in model_input_lib.NORMALIZATIONS:
      raise ValueError(f'model {self.name!r}: normalization '
                       f'{self.normalization!r} is not one of '
                       f'{model_input_lib.NORMALIZATIONS}')
    if not 0 <= self.default_dropout < 1:
      raise ValueError(f'model {self.name!r}: default_dropout '
                       f'{self.default_dropout} is not in [0, 1)')


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """One --base_model of --model=transfer (a Keras Applications network)."""
  name: str
  application: str  # The class in keras.applications.
  example_cutoff_layer: str  # Named in --base_cutoff_layer's error.
  min_side: int  # Smallest input side Keras accepts for it.


# The first entry is the --model default. The course rescales its CNNs'
# inputs to [0, 1]; the Inception/MobileNet
# bases were trained on [-1, 1].
MODELS = (
    Model('small_cnn', 'conv_stack', 'rescale', 0.0,
          'The Fashion-MNIST CNN: Conv32-Pool-Conv64-Pool-Dense128',
          args=dict(filters=(32, 64), dense_units=128)),
    Model('dense', 'dense', 'rescale', 0.0,
          "The Fashion-MNIST notes' dense model: Flatten-Dense128-head",
          args=dict(dense_units=128)),
    Model('horses_humans', 'conv_stack', 'rescale', 0.0,
          'Conv16-32-64-64-64, each with max pooling, Dense512 (300x300 in '
          'the course)',
          args=dict(filters=(16, 32, 64, 64, 64), dense_units=512)),
    # The course drops out between the convolutions and the dense layer.
    Model('cats_dogs', 'conv_stack', 'rescale', 0.5,
          'Conv32-64-128-128 with pooling, Dropout, Dense512 (150x150 in the '
          'course)',
          args=dict(filters=(32, 64, 128, 128), dense_units=512,
                    dropout_before_dense=True)),
    Model('transfer', 'transfer', '[-1,1]', 0.2,
          'A frozen --base_model (truncated at --base_cutoff_layer), '
          'Dense1024, head', args=dict(dense_units=1024),
          uses_base_model=True),
)

BASE_MODELS = (
    BaseModel('inception_v3', 'InceptionV3', 'mixed7', 75),
    BaseModel('mobilenet_v2', 'MobileNetV2', 'block_13_expand_relu', 32),
)

MODEL_NAMES = tuple(m.name for m in MODELS)
BASE_MODEL_NAMES = tuple(b.name for b in BASE_MODELS)
_BY_NAME = {m.name: m for m in MODELS}
_BASE_BY_NAME = {b.name: b for b in BASE_MODELS}
if len(_BY_NAME) != len(MODELS) or len(_BASE_BY_NAME) != len(BASE_MODELS):
  raise ValueError('trainer.model_table: a name is listed twice')


def get(name: str) -> Model:
  """The entry of --model=name; KeyError if there is none (check first with
  trainer.config.check_model_names, which says it as a flag error)."""
  return _BY_NAME[name]


def normalization(name: str) -> str:
  """How the input pipeline normalizes --model=name's inputs (the default
  for a name that is not a model: build_model refuses it, by name)."""
  entry = _BY_NAME.get(name)
  return entry.normalization if entry else (
      model_input_lib.DEFAULT_NORMALIZATION)


def get_base(name: str) -> BaseModel:
  """The entry of --base_model=name; KeyError if there is none."""
  return _BASE_BY_NAME[name]


def conv_stack_min_side(num_convs: int) -> int:
  """Smallest input side a stack of 3x3 valid conv + 2x2 pool leaves >= 1."""
  side = 1
  for _ in range(num_convs):
    side = side * 2 + 2
  return side


def min_side(name: str, base_model: str,
             conv_filters: Optional[Sequence[int]] = None) -> int:
  """Smallest image side --model=name (on --base_model, with
  --conv_filters when given) can take; 1 for a builder with no minimum."""
  entry = get(name)
  if entry.uses_base_model:
    return get_base(base_model).min_side
  if 'filters' in entry.args:
    return conv_stack_min_side(len(conv_filters or entry.args['filters']))
  return 1


def architecture_args(name: str, *, conv_filters: Optional[Sequence[int]],
                      dense_units: Optional[int]) -> dict:
  """The builder arguments of --model=name with --conv_filters and
  --dense_units applied (None: the entry's own); ValueError naming the
  flag when the model has no such part or a value is not positive."""
  entry = get(name)
  args = dict(entry.args)
  for flag, key, value in (('conv_filters', 'filters', conv_filters),
                           ('dense_units', 'dense_units', dense_units)):
    if value is None:
      continue
    having = [m.name for m in MODELS if key in m.args]
    if key not in args:
      raise ValueError(f'--{flag} does not apply to --model={name}; it '
                       f'changes {", ".join(having)}')
    values = list(value) if key == 'filters' else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int)
                         or v < 1 for v in values):
      shown = ','.join(map(str, values))
      raise ValueError(f'--{flag}={shown}: expected positive integers, '
                       f'e.g. {"16,32,64" if key == "filters" else "512"}')
    args[key] = tuple(values) if key == 'filters' else value
  return args
