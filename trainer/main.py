r"""Trains a CNN on a dataset built by `python -m pipelines.build`.

  python -m trainer.main --data_dir=data/photos --model_dir=runs/photos \
      --model=cats_dogs --epochs=15 --augment=course

Rerunning the same command after a kill resumes after the last finished
epoch. `--flagfile=run.flags` reads flags from a file.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pipelines.common import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  # Before TensorFlow loads: its start-up chatter would bury a one-line error.
  cli.filter_noise()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Dataset folder written by pipelines.build.')
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Where the model, export, history and pictures go.')
_MODEL = flags.DEFINE_string('model', 'small_cnn', f'One of {", ".join(models.MODELS)}.')
_EPOCHS = flags.DEFINE_integer('epochs', 15, 'Maximum epochs.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 1e-3, 'Optimizer learning rate.')
_OPTIMIZER = flags.DEFINE_string('optimizer', 'rmsprop', f'One of {", ".join(train_lib.OPTIMIZERS)}.')
_PATIENCE = flags.DEFINE_integer(
    'early_stopping_patience', 3, 'Stop after this many epochs without improvement (0: never).')
_MONITOR = flags.DEFINE_string(
    'early_stopping_monitor', 'val_loss', 'val_loss, val_accuracy, loss or accuracy.')
_TARGET_ACCURACY = flags.DEFINE_float(
    'target_accuracy', None, 'Stop once training accuracy reaches this (e.g. 0.99).')
_AUGMENT = flags.DEFINE_string(
    'augment', 'none', "'course', 'none', or ImageDataGenerator-style "
    "key=value,... (rotation_range=40,horizontal_flip=true,zoom_range=0.8:1.2).")
_DROPOUT = flags.DEFINE_float('dropout', None, 'Dropout before the head; default per model.')
_IMAGE_SIZE = flags.DEFINE_string('image_size', None, 'N or HEIGHT,WIDTH; default: the stored size.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of initialization, shuffling and augmentation.')
_MIXED_PRECISION = flags.DEFINE_boolean(
    'mixed_precision', False, 'float16 compute on GPU (bfloat16 on CPU).')
_JIT_COMPILE = flags.DEFINE_boolean('jit_compile', False, 'Compile train steps with XLA.')
_DISTRIBUTION = flags.DEFINE_string('distribution', 'default', 'default or mirrored (all local GPUs).')
_BASE_MODEL = flags.DEFINE_string(
    'base_model', 'inception_v3', f'--model=transfer base: {", ".join(models.BASE_MODELS)}.')
_BASE_WEIGHTS = flags.DEFINE_string(
    'base_weights', None, '--model=transfer: local notop weights file (nothing is '
    'downloaded), or none for random weights.')
_BASE_CUTOFF = flags.DEFINE_string(
    'base_cutoff_layer', None, '--model=transfer: use the base up to this layer (e.g. mixed7).')
_CACHE = flags.DEFINE_string(
    'cache', None, "'memory', or a file path prefix in an existing folder to "
    'cache decoded images on disk (files PREFIX.<dataset key>.<split>.*: a '
    'rebuilt dataset or another --image_size gets new ones).')


def _one_line(text) -> str:
  return ' '.join(str(text).split())


def _os_error(e: OSError) -> str:
  """An OSError nothing else caught: the file and the reason, one line."""
  where = e.filename or ''
  if e.filename2:
    where = f'{where} -> {e.filename2}'
  reason = e.strerror or str(e)
  return _one_line(f'{where}: {reason}; check that path (--model_dir, '
                   '--data_dir, --cache) and rerun' if where else
                   f'{reason}; check --model_dir, --data_dir and --cache')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.quiet_logs()
  if not _DATA_DIR.value or not _MODEL_DIR.value:
    sys.exit('error: --data_dir and --model_dir are required, e.g. '
             '--data_dir=data/photos --model_dir=runs/photos')
  try:
    train_lib.train_and_evaluate(train_lib.TrainConfig(
        data_dir=_DATA_DIR.value, model_dir=_MODEL_DIR.value,
        model=_MODEL.value, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
        early_stopping_patience=_PATIENCE.value,
        early_stopping_monitor=_MONITOR.value,
        target_accuracy=_TARGET_ACCURACY.value,
        augment=train_lib.parse_augment(_AUGMENT.value),
        dropout=_DROPOUT.value,
        image_size=(cli.parse_image_size(_IMAGE_SIZE.value)
                    if _IMAGE_SIZE.value else None),
        seed=_SEED.value, mixed_precision=_MIXED_PRECISION.value,
        jit_compile=_JIT_COMPILE.value, distribution=_DISTRIBUTION.value,
        base_model=_BASE_MODEL.value, base_weights=_BASE_WEIGHTS.value,
        base_cutoff_layer=_BASE_CUTOFF.value, cache=_CACHE.value))
  except UserError as e:
    sys.exit(f'error: {_one_line(e)}')
  except OSError as e:  # A disk or path problem no check foresaw.
    sys.exit(f'error: {_os_error(e)}')
  except train_lib.tf.errors.OpError as e:  # Idem, raised inside TensorFlow.
    sys.exit(f'error: {_one_line(train_lib.tf_message(e))}; check '
             '--model_dir, --data_dir and --cache')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
