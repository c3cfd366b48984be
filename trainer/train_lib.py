"""train_and_evaluate: fit a model on a built dataset and write everything.

`python -m trainer.main` calls `train_and_evaluate` with plain arguments.
Writes to model_dir:

  best.keras                 the best epoch's model
  export/                    SavedModel, endpoint `serve(image_bytes)`
  model_config.json          what predict/export need (classes, size, norm)
  history.csv                one row per epoch (column `epoch`)
  metrics.json               best epoch's val metrics, test metrics, ...
  training_curves.png        accuracy and loss, train vs validation
  train_samples.png          a training batch as the model receives it
  confusion_matrix.png       on test (or validation), with
  classification_report.txt  per-class precision/recall/F1
  tensorboard/               TensorBoard logs
  checkpoint/                resume state (see trainer.callbacks)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from pipelines import augment as augment_lib
from pipelines import input_pipeline
from pipelines import preview
from pipelines.errors import UserError
from trainer import callbacks as callbacks_lib
from trainer import export as export_lib
from trainer import models
from trainer import report
import tfrecords_schema

OPTIMIZERS = ('rmsprop', 'adam', 'sgd')
DISTRIBUTIONS = ('default', 'mirrored')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on (flags of trainer.main, same names)."""
  data_dir: str
  model_dir: str
  model: str = 'small_cnn'
  epochs: int = 15
  batch_size: int = 32
  learning_rate: float = 1e-3
  optimizer: str = 'rmsprop'
  early_stopping_patience: int = 3
  early_stopping_monitor: str = 'val_loss'
  target_accuracy: Optional[float] = None
  augment: Any = None
  dropout: Optional[float] = None
  image_size: Optional[tuple[int, int]] = None
  seed: int = 0
  mixed_precision: bool = False
  jit_compile: bool = False
  distribution: str = 'default'
  base_model: str = 'inception_v3'
  base_weights: Optional[str] = None
  base_cutoff_layer: Optional[str] = None
  cache: Optional[str] = None

  def fingerprint(self) -> dict:
    """Settings a resumed run must share (epochs may grow)."""
    out = dataclasses.asdict(self)
    out.pop('epochs')
    out['augment'] = json.dumps(out['augment'], sort_keys=True, default=str)
    out['image_size'] = list(self.image_size) if self.image_size else None
    return out


def _say(message: str) -> None:
  print(f'[train] {message}', file=sys.stderr, flush=True)


def parse_augment(text: Optional[str]):
  """'course' / 'none' / 'rotation_range=40,horizontal_flip=true' -> value."""
  if not text or text == 'none':
    return None
  if text in augment_lib.PRESETS:
    return text
  options = {}
  for item in text.split(','):
    key, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'--augment={text}: {item!r} is not key=value; pass a '
                      f'preset ({", ".join(augment_lib.PRESETS)}) or '
                      'key=value,... (e.g. rotation_range=40,horizontal_flip=true)')
    key, value = key.strip(), value.strip()
    if value.lower() in ('true', 'false'):
      options[key] = value.lower() == 'true'
    elif ':' in value:  # Ranges: zoom_range=0.8:1.2.
      options[key] = [float(v) for v in value.split(':')]
    else:
      try:
        options[key] = float(value)
      except ValueError:
        options[key] = value
  try:
    augment_lib.resolve(options)
  except ValueError as e:
    raise UserError(f'--augment={text}: {e}') from None
  return options


def _validate(config: TrainConfig, spec) -> None:
  for flag, value, low in (('epochs', config.epochs, 1),
                           ('batch_size', config.batch_size, 1),
                           ('early_stopping_patience',
                            config.early_stopping_patience, 0)):
    if value < low:
      raise UserError(f'--{flag}={value} must be >= {low}')
  if not config.learning_rate > 0:
    raise UserError(f'--learning_rate={config.learning_rate} must be > 0')
  if config.optimizer not in OPTIMIZERS:
    raise UserError(f'--optimizer={config.optimizer} is not one of '
                    f'{", ".join(OPTIMIZERS)}')
  if config.distribution not in DISTRIBUTIONS:
    raise UserError(f'--distribution={config.distribution} is not one of '
                    f'{", ".join(DISTRIBUTIONS)}')
  if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
    raise UserError(f'--target_accuracy={config.target_accuracy} must be in '
                    '(0, 1]')
  monitor = config.early_stopping_monitor
  if monitor not in ('val_loss', 'val_accuracy', 'loss', 'accuracy'):
    raise UserError(f'--early_stopping_monitor={monitor} is not one of '
                    'val_loss, val_accuracy, loss, accuracy')
  for split in ('train', 'validation'):
    if not spec.splits.get(split) or not spec.splits[split].num_examples:
      raise UserError(
          f'--data_dir={config.data_dir} has an empty {split} split; rebuild '
          'it with pipelines.build (--validation_fraction > 0 for validation)')
  if spec.splits['train'].num_examples < config.batch_size:
    raise UserError(
        f'--batch_size={config.batch_size} is larger than the '
        f'{spec.splits["train"].num_examples} training images; pass a '
        'smaller --batch_size')


def _optimizer(name: str, learning_rate: float):
  return {'rmsprop': keras.optimizers.RMSprop, 'adam': keras.optimizers.Adam,
          'sgd': keras.optimizers.SGD}[name](learning_rate=learning_rate)


def _predict_labels(model, ds, binary: bool) -> tuple[np.ndarray, np.ndarray]:
  labels, predictions = [], []
  for images, batch_labels in ds:
    outputs = model(images, training=False).numpy()
    predictions.append((outputs[:, 0] >= 0.5).astype(np.int64) if binary
                       else outputs.argmax(axis=1))
    labels.append(np.asarray(batch_labels).reshape(len(outputs)).astype(
        np.int64))
  return np.concatenate(labels), np.concatenate(predictions)


def _write_samples(train_ds, config, spec, normalize: str, *,
                   augmented: bool) -> None:
  """train_samples.png: one training batch as the model receives it."""
  images, labels = next(iter(train_ds.take(1)))
  images = images.numpy().astype(np.float32)
  if normalize == '[-1,1]':
    images = (images + 1.0) / 2.0
  elif normalize == 'standardize':
    images = (images * np.array(spec.std) + np.array(spec.mean)) / 255.0
  labels = np.asarray(labels).reshape(len(images)).astype(int)
  preview.plot_sample_grid(
      images, labels, spec.class_names,
      os.path.join(config.model_dir, 'train_samples.png'),
      title='Training batch as the model sees it' +
      (' (augmented)' if augmented else ''))


def train_and_evaluate(config: TrainConfig) -> dict:
  """Trains (or resumes) and writes model, export, history, metrics, plots."""
  try:
    spec = tfrecords_schema.read_dataset_spec(config.data_dir)
  except tfrecords_schema.DatasetError as e:
    raise UserError(str(e)) from None
  _validate(config, spec)
  augment = config.augment
  if isinstance(augment, str) and augment not in augment_lib.PRESETS:
    augment = parse_augment(augment)
  size = tuple(config.image_size or (spec.height, spec.width))
  num_classes = spec.num_classes
  binary = num_classes == 2
  normalize = models.NORMALIZATION.get(config.model, 'rescale')
  label_mode = 'binary' if binary else 'int'
  os.makedirs(config.model_dir, exist_ok=True)

  keras.utils.set_random_seed(config.seed)
  if config.mixed_precision:
    gpu = bool(tf.config.list_physical_devices('GPU'))
    keras.mixed_precision.set_global_policy(
        'mixed_float16' if gpu else 'mixed_bfloat16')
  strategy = (tf.distribute.MirroredStrategy()
              if config.distribution == 'mirrored'
              else tf.distribute.get_strategy())
  try:
    with strategy.scope():
      model = models.build_model(
          config.model, input_shape=(*size, spec.channels),
          num_classes=num_classes, dropout=config.dropout,
          base_model=config.base_model, base_weights=config.base_weights,
          base_cutoff_layer=config.base_cutoff_layer)
      model.compile(
          optimizer=_optimizer(config.optimizer, config.learning_rate),
          loss=(keras.losses.BinaryCrossentropy() if binary else
                keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
          metrics=['accuracy'], jit_compile=config.jit_compile)
  except models.ModelError as e:
    raise UserError(str(e)) from None

  common = dict(image_size=size, normalize=normalize, label_mode=label_mode)
  train_count = spec.splits['train'].num_examples
  steps_per_epoch = max(1, train_count // config.batch_size)
  # One iterator for the whole run (repeat + steps_per_epoch): no per-epoch
  # iterator turnover, and the shuffle buffer stays warm.
  train_ds = input_pipeline.make_dataset(
      config.data_dir, 'train', batch_size=config.batch_size, training=True,
      augment=augment, seed=config.seed, repeat=True, cache=config.cache,
      **common)
  val_ds = input_pipeline.make_dataset(
      config.data_dir, 'validation', batch_size=config.batch_size,
      training=False, cache=config.cache and 'memory', **common)

  _write_samples(train_ds, config, spec, normalize,
                 augmented=augment is not None)
  resumable = callbacks_lib.ResumableTraining(
      config.model_dir, monitor=config.early_stopping_monitor,
      patience=config.early_stopping_patience,
      target_accuracy=config.target_accuracy, restore_best_weights=True,
      fingerprint=config.fingerprint())
  resumable.prepare()
  try:
    done = resumable.load_state()
  except ValueError as e:
    raise UserError(str(e)) from None
  _say(f'{config.model} on {size[0]}x{size[1]}x{spec.channels}, '
       f'{num_classes} classes, {train_count} train / '
       f'{spec.splits["validation"].num_examples} validation images, '
       f'{model.count_params():,} parameters'
       + (f'; resuming after epoch {done}' if done else ''))
  start = time.perf_counter()
  if done < config.epochs and not resumable.finished:
    model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
              validation_data=val_ds, verbose=2, shuffle=False, callbacks=[
                  resumable, keras.callbacks.TerminateOnNaN(),
                  keras.callbacks.TensorBoard(
                      os.path.join(config.model_dir, 'tensorboard'))])
  else:
    resumable.set_model(model)
    resumable.on_train_end()
  train_seconds = time.perf_counter() - start
  return _finish(config, spec, model, resumable, size=size,
                 normalize=normalize, binary=binary, common=common,
                 train_seconds=train_seconds)


def _finish(config, spec, model, resumable, *, size, normalize, binary, common,
            train_seconds) -> dict:
  """Evaluation, pictures, metrics.json, best model and serving export."""
  rows = resumable.rows
  if not rows:
    raise UserError(f'no epoch finished in {config.model_dir}; check the '
                    'logs above (NaN loss?)')
  best_epoch = resumable.best_epoch or rows[-1]['epoch']
  best = next(r for r in rows if r['epoch'] == best_epoch)
  model_path = os.path.join(config.model_dir, 'best.keras')
  model.save(model_path)
  eval_split = 'test' if spec.splits.get('test') and spec.splits[
      'test'].num_examples else 'validation'
  eval_ds = input_pipeline.make_dataset(
      config.data_dir, eval_split, batch_size=config.batch_size,
      training=False, **common)
  labels, predictions = _predict_labels(model, eval_ds, binary)
  matrix = report.confusion_matrix(labels, predictions, spec.num_classes)
  per_class = report.per_class_report(matrix, spec.class_names)
  metrics = {
      'val_accuracy': best.get('val_accuracy'),
      'val_loss': best.get('val_loss'),
      'best_epoch': best_epoch,
      'epochs_run': len(rows),
      'stopped_early': resumable.stopped_early,
      'stop_reason': resumable.stop_reason,
      'monitor': config.early_stopping_monitor,
      'class_names': list(spec.class_names),
      'train_seconds_this_run': round(train_seconds, 1),
      'evaluated_split': eval_split,
      'per_class': per_class,
  }
  if eval_split == 'test':
    test_loss, test_accuracy = model.evaluate(eval_ds, verbose=0)
    metrics['test_accuracy'] = float(test_accuracy)
    metrics['test_loss'] = float(test_loss)
  with open(os.path.join(config.model_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  with open(os.path.join(config.model_dir, 'classification_report.txt'),
            'w') as f:
    f.write(f'{eval_split} split\n{report.format_report(per_class)}\n')
  report.plot_training_curves(
      rows, os.path.join(config.model_dir, 'training_curves.png'))
  report.plot_confusion_matrix(
      matrix, spec.class_names,
      os.path.join(config.model_dir, 'confusion_matrix.png'),
      title=f'Confusion matrix ({eval_split} split)')
  export_lib.export(model, config.model_dir, {
      'model': config.model, 'class_names': list(spec.class_names),
      'height': size[0], 'width': size[1], 'channels': spec.channels,
      'normalize': normalize, 'mean': spec.mean, 'std': spec.std,
      'resize_mode': spec.resize_mode, 'image_format': spec.image_format,
      'jpeg_quality': spec.jpeg_quality,
      'stored_height': spec.height, 'stored_width': spec.width})
  _summary(config, metrics, eval_split)
  return metrics


def _summary(config, metrics: dict, eval_split: str) -> None:
  lines = [
      f'best epoch {metrics["best_epoch"]} of {metrics["epochs_run"]}'
      + (f' (stopped: {metrics["stop_reason"]})'
         if metrics['stopped_early'] else ''),
      f'validation accuracy {metrics["val_accuracy"]:.4f}, loss '
      f'{metrics["val_loss"]:.4f}',
  ]
  if 'test_accuracy' in metrics:
    lines.append(f'test accuracy {metrics["test_accuracy"]:.4f}')
  d = config.model_dir
  lines.append(f'model: {d}/best.keras, serving export: {d}/export')
  lines.append(f'pictures: {d}/training_curves.png, {d}/confusion_matrix.png '
               f'({eval_split}); metrics: {d}/metrics.json')
  print('\n'.join(lines))
