r"""Trains a CNN on a dataset built by `python -m pipelines.build`.

  python -m trainer.main --data_dir=data/photos --model_dir=runs/photos \
      --model=cats_dogs --epochs=15 --augment=course

Rerunning the same command after a kill resumes after the last finished
epoch. `--flagfile=run.flags` reads flags from a file.
"""

import dataclasses
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pipelines.common import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  # Before TensorFlow loads: its start-up chatter would bury a one-line error.
  cli.filter_noise()
  cli.skip_unused_imports()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.common import paths  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common import watchdog  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import places  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfrecords_schema import metadata as metadata_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every TrainConfig field is a flag of the same name and default (a test
# checks it); TensorFlow is imported only when training starts, so --help
# answers at once.
_D = config_lib.default
flags.DEFINE_string('data_dir', None, 'Dataset folder written by pipelines.build.')
flags.DEFINE_string('model_dir', None, 'Where the model, export, history and pictures go.')
flags.DEFINE_string('model', _D('model'), f'One of {", ".join(config_lib.MODELS)}.')
flags.DEFINE_integer('epochs', _D('epochs'), 'Maximum epochs.')
flags.DEFINE_integer('batch_size', _D('batch_size'), 'Images per batch.')
flags.DEFINE_float('learning_rate', _D('learning_rate'), 'Optimizer learning rate.')
flags.DEFINE_string('optimizer', _D('optimizer'), f'One of {", ".join(config_lib.OPTIMIZERS)}.')
flags.DEFINE_integer(
    'early_stopping_patience', _D('early_stopping_patience'),
    'Stop after this many epochs without improvement (0: never).')
flags.DEFINE_string(
    'early_stopping_monitor', _D('early_stopping_monitor'),
    f'One of {", ".join(config_lib.MONITORS)}.')
flags.DEFINE_float(
    'target_accuracy', _D('target_accuracy'),
    'Stop once training accuracy reaches this (e.g. 0.99).')
flags.DEFINE_string(
    'augment', augment_config.to_text(_D('augment')),
    "'course', 'none', or ImageDataGenerator-style key=value,... "
    '(rotation_range=40,horizontal_flip=true,zoom_range=0.8:1.2).')
flags.DEFINE_float('dropout', _D('dropout'), 'Dropout before the head; default per model.')
flags.DEFINE_string('image_size', _D('image_size'), 'N or HEIGHT,WIDTH; default: the stored size.')
flags.DEFINE_integer('seed', _D('seed'), 'Seed of initialization, shuffling and augmentation.')
flags.DEFINE_boolean(
    'mixed_precision', _D('mixed_precision'), 'float16 compute on GPU (bfloat16 on CPU).')
flags.DEFINE_boolean('jit_compile', _D('jit_compile'), 'Compile train steps with XLA.')
flags.DEFINE_string(
    'distribution', _D('distribution'),
    f'One of {", ".join(config_lib.DISTRIBUTIONS)} (mirrored: all local GPUs; '
    'multi_worker: every machine in TF_CONFIG, see README).')
flags.DEFINE_string(
    'base_model', _D('base_model'),
    f'--model=transfer base: {", ".join(config_lib.BASE_MODELS)}.')
flags.DEFINE_string(
    'base_weights', _D('base_weights'),
    '--model=transfer: local notop weights file (nothing is downloaded), or '
    'none for random weights.')
flags.DEFINE_string(
    'base_cutoff_layer', _D('base_cutoff_layer'),
    '--model=transfer: use the base up to this layer (e.g. mixed7).')
flags.DEFINE_string(
    'conv_filters', _D('conv_filters'),
    'Course CNNs: filters of each 3x3 conv + 2x2 pool block, e.g. 16,32,64 '
    "(default: the model's own, see README).")
flags.DEFINE_integer(
    'dense_units', _D('dense_units'),
    "Units of the dense layer before the head (default: the model's own: "
    '128 dense and small_cnn, 512 horses_humans and cats_dogs, 1024 '
    'transfer).')
flags.DEFINE_string(
    'class_weight', _D('class_weight'),
    f'One of {", ".join(config_lib.CLASS_WEIGHTS)}; balanced weighs each '
    "class's loss by n / (classes x its train images).")
flags.DEFINE_string(
    'fine_tune_from', _D('fine_tune_from'),
    '--model=transfer: after the --epochs with the base frozen, train the '
    'base from this layer on (e.g. mixed7) for --fine_tune_epochs more.')
flags.DEFINE_integer(
    'fine_tune_epochs', _D('fine_tune_epochs'),
    '--fine_tune_from: epochs of fine-tuning (early stopping applies anew).')
flags.DEFINE_float(
    'fine_tune_learning_rate', _D('fine_tune_learning_rate'),
    '--fine_tune_from: learning rate while fine-tuning (small: the base is '
    'pretrained).')
flags.DEFINE_string(
    'tfds', _D('tfds'),
    'Train on a TFDS image classification dataset instead of --data_dir: '
    'NAME[:VERSION], e.g. fashion_mnist (its train/test splits; validation '
    'carved from train when it has none). Imported once into --data_dir '
    '(default <tfds_data_dir>/image_toolkit/NAME/VERSION; never replaced).')
flags.DEFINE_string(
    'tfds_data_dir', _D('tfds_data_dir'),
    "--tfds: TFDS' data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string(
    'cache', _D('cache'), "'memory', or a file path prefix in an existing "
    'folder to cache decoded images on disk (files PREFIX.<dataset key>.'
    '<split>.*: a rebuilt dataset or another --image_size gets new ones).')
flags.DEFINE_string(
    'data_service', _D('data_service'),
    'grpc://HOST:PORT of a tf.data service dispatcher (python -m '
    'pipelines.data_service): training batches are made on its workers.')
flags.DEFINE_float(
    'data_service_timeout', _D('data_service_timeout'),
    '--data_service: seconds without a training batch from the service '
    'before the run stops with an error (a dispatcher that refuses '
    'connections stops it after 30 s, or half this if less).')
flags.DEFINE_integer(
    'multi_worker_timeout', _D('multi_worker_timeout'),
    '--distribution=multi_worker: seconds to wait for every worker in '
    'TF_CONFIG to start.')
FLAGS = flags.FLAGS


PREEMPTED_STATUS = 143  # 128 + SIGTERM, as if the signal had ended it.


def config_from_flags() -> config_lib.TrainConfig:
  """The TrainConfig the flags say; UserError for text that does not parse."""
  values = {}
  for field in dataclasses.fields(config_lib.TrainConfig):
    values[field.name] = FLAGS[field.name].value
  try:
    values['augment'] = augment_config.parse(values['augment'])
  except ValueError as e:
    raise UserError(f'--augment={values["augment"]}: {e}') from None
  if values['image_size']:
    values['image_size'] = cli.parse_image_size(values['image_size'])
  values['conv_filters'] = config_lib.parse_int_list(
      'conv_filters', values['conv_filters'])
  for flag in ('data_dir', 'model_dir', 'cache', 'base_weights',
               'tfds_data_dir'):
    if values[flag]:  # ~, file:// as the user means them.
      values[flag] = paths.expand(values[flag])
  return config_lib.TrainConfig(**values)


def _os_error(e: OSError) -> str:
  """An OSError nothing else caught: the file and the reason, one line."""
  where = e.filename or ''
  if e.filename2:
    where = f'{where} -> {e.filename2}'
  reason = e.strerror or str(e)
  return cli.one_line(f'{where}: {reason}; check that path (--model_dir, '
                   '--data_dir, --cache) and rerun' if where else
                   f'{reason}; check --model_dir, --data_dir and --cache')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.quiet_logs()
  if not (FLAGS.data_dir or FLAGS.tfds) or not FLAGS.model_dir:
    sys.exit('error: --model_dir and --data_dir (or --tfds) are required, '
             'e.g. --data_dir=data/photos --model_dir=runs/photos')
  try:
    config = config_from_flags()
    # Before TensorFlow loads (seconds): typos in these fail at once.
    config_lib.check_model_names(config.model, config.base_model)
    config_lib.architecture_args(config.model,
                                 conv_filters=config.conv_filters,
                                 dense_units=config.dense_units)
    config_lib.check_class_weight(config.class_weight)
    config_lib.check_fine_tuning(config)
    config = config_lib.with_tfds_data(config)  # TensorFlow loads for it.
    config_lib.distribution_task(config.distribution,
                                 os.environ.get('TF_CONFIG'))
    places.check_data_dir_is_not_a_run(config.data_dir)
    spec = metadata_lib.read_dataset_spec(config.data_dir)
    config_lib.check_image_size(config.model, config.base_model,
                                config.image_size or (spec.height, spec.width),
                                config.conv_filters)
    places.check_model_dir_place(config.model_dir, config.data_dir)
  except UserError as e:
    sys.exit(f'error: {cli.one_line(e)}')
  except OSError as e:
    sys.exit(f'error: {_os_error(e)}')
  except KeyboardInterrupt:  # E.g. during a --tfds import (seconds).
    sys.exit('error: interrupted (Ctrl-C) before training started; nothing '
             'was written (a --tfds import starts over next time)')
  dog = watchdog.Watchdog(_stop_lines(config), stderr=cli.unfiltered_stderr())
  try:
    _run(config, dog)
  finally:
    dog.close()


# Seconds the trainer has to stop by itself after SIGTERM (a preemption
# stops after the current step) or Ctrl-C before the watchdog kills it.
STOP_GRACE_S = {'SIGTERM': 20, 'SIGINT': 5}


def _stop_lines(config) -> dict:
  """What the watchdog says when it kills a trainer that did not stop."""
  import signal  # pylint: disable=g-import-not-at-top
  return {
      getattr(signal, name): (grace, (
          f'[train] {name}: training did not stop within {grace} s (blocked '
          'inside TensorFlow, e.g. waiting for input); killed. The last '
          f'finished epoch is saved in --model_dir={config.model_dir}: rerun '
          'the same command to resume'))
      for name, grace in STOP_GRACE_S.items()}


def _run(config, dog) -> None:
  """train_and_evaluate, every way it can end as one line and a status."""
  try:
    from trainer import train_lib  # pylint: disable=g-import-not-at-top
    train_lib.train_and_evaluate(config, dog=dog)
  except KeyboardInterrupt:
    sys.exit(f'error: interrupted (Ctrl-C); finished epochs are saved in '
             f'--model_dir={config.model_dir}: rerun the same command to '
             'resume')
  except UserError as e:
    sys.exit(f'error: {cli.one_line(e)}')
  except OSError as e:  # A disk or path problem no check foresaw.
    sys.exit(f'error: {_os_error(e)}')
  except Exception as e:  # pylint: disable=broad-except
    from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
    from trainer import train_lib  # pylint: disable=g-import-not-at-top
    if isinstance(e, train_lib.Preempted):
      print(f'[train] {e}', file=sys.stderr, flush=True)
      sys.exit(PREEMPTED_STATUS)
    if isinstance(e, train_lib.tf.errors.OpError):  # Raised inside TF.
      sys.exit(f'error: {input_pipeline.tf_message(e)}; check '
               '--model_dir, --data_dir and --cache')
    raise

if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
