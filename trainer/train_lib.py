"""train_and_evaluate: fit a model on a built dataset and write everything.

`python -m trainer.main` calls `train_and_evaluate` with a TrainConfig built
from its flags. What it writes to --model_dir is listed in trainer.config.
Everything that can refuse a run is checked before the first write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from pipelines import plots
from pipelines.common import cli
from pipelines.common import net
from pipelines.common import paths
from pipelines.common.errors import UserError
from pipelines.preprocessing.model_input import ModelInput
from pipelines.records_to_batches import input_pipeline
import tfrecords_schema
from trainer import callbacks as callbacks_lib
from trainer import config as config_lib
from trainer import export as export_lib
from trainer import mistakes
from trainer import model_table
from trainer import models
from trainer import multi_worker
from trainer import places
from trainer import report
from trainer.config import TrainConfig



def _say(message: str) -> None:
  print(f'[train] {message}', file=sys.stderr, flush=True)


def _validate(config: TrainConfig, spec) -> None:
  for flag, value, low in (('epochs', config.epochs, 1),
                           ('batch_size', config.batch_size, 1),
                           ('early_stopping_patience',
                            config.early_stopping_patience, 0)):
    if value < low:
      raise UserError(f'--{flag}={value} must be >= {low}')
  if not 0 < config.learning_rate < math.inf:  # NaN and inf fail too.
    raise UserError(f'--learning_rate={config.learning_rate} must be a '
                    'finite number > 0')
  if not 0 <= config.seed < 2**32:  # numpy's and tf.data's seed range.
    raise UserError(f'--seed={config.seed} must be in [0, {2**32 - 1}]')
  if config.optimizer not in config_lib.OPTIMIZERS:
    raise UserError(f'--optimizer={config.optimizer} is not one of '
                    f'{", ".join(config_lib.OPTIMIZERS)}')
  if config.distribution not in config_lib.DISTRIBUTIONS:
    raise UserError(f'--distribution={config.distribution} is not one of '
                    f'{", ".join(config_lib.DISTRIBUTIONS)}')
  if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
    raise UserError(f'--target_accuracy={config.target_accuracy} must be in '
                    '(0, 1]')
  config_lib.check_class_weight(config.class_weight)
  config_lib.check_fine_tuning(config)
  config_lib.architecture_args(config.model, conv_filters=config.conv_filters,
                               dense_units=config.dense_units)
  monitor = config.early_stopping_monitor
  if monitor not in config_lib.MONITORS:
    raise UserError(f'--early_stopping_monitor={monitor} is not one of '
                    f'{", ".join(config_lib.MONITORS)}')
  if not config.data_service_timeout > 0:
    raise UserError(f'--data_service_timeout={config.data_service_timeout} '
                    'must be > 0 (seconds)')
  if config.multi_worker_timeout < 1:
    raise UserError(f'--multi_worker_timeout={config.multi_worker_timeout} '
                    'must be >= 1 (seconds)')
  if config.data_service and config.distribution == 'multi_worker':
    raise UserError(
        '--data_service with --distribution=multi_worker is not supported: '
        'each worker reads its own part of the data; leave --data_service out '
        '(or train in one process through the service)')
  if config.data_service:
    _check_data_service(config.data_service)
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


def _check_data_service(address: str) -> tuple[str, int]:
  """(host, port) of a dispatcher that answers; UserError otherwise.

  Checked up front: tf.data retries an unreachable dispatcher forever.
  """
  host, port = net.host_port(address, 'data_service')
  reason = net.unreachable(host, port, timeout=10)
  if reason:
    raise UserError(
        f'--data_service={address}: no dispatcher answers at {host}:{port} '
        f'({reason}); start one with `python -m pipelines.data_service '
        f'dispatcher --port={port}` and its workers')
  return host, port


# A dispatcher that refuses connections this long (or half of
# --data_service_timeout, if less) is gone: a restart takes seconds.
DISPATCHER_GRACE_S = 30


class _Heartbeat(keras.callbacks.Callback):
  """Calls `beat` as batches go by (at most once a second)."""

  def __init__(self, beat):
    super().__init__()
    self._beat = beat
    self._last = 0.0

  def _tick(self, *unused_args, **unused_kwargs):
    now = time.monotonic()
    if now - self._last >= 1:
      self._last = now
      self._beat()

  on_train_batch_end = on_test_batch_end = _tick
  on_epoch_begin = on_epoch_end = _tick


@contextlib.contextmanager
def _service_watch(config: TrainConfig, dog, resumable):
  """Bounds every wait on --data_service; yields a heartbeat callback.

  The trainer blocks inside TensorFlow (holding the interpreter) while the
  service sends nothing, so the watchdog process (pipelines.common.watchdog)
  ends the run: when the dispatcher refuses connections for
  DISPATCHER_GRACE_S seconds (at most half the timeout), or when no batch came for
  --data_service_timeout seconds (no worker, or none that can read the
  data), each with one line naming the peer and the fix. Finished epochs
  are saved, so the same command resumes.
  """
  if not (dog and config.data_service):
    yield []
    return
  host, port = net.host_port(config.data_service, 'data_service')
  timeout = config.data_service_timeout
  resume = ('then rerun the same command (it resumes after the last '
            f'finished epoch, saved in --model_dir={config.model_dir})')
  start_worker = (f'python -m pipelines.data_service worker '
                  f'--dispatcher_address={host}:{port}')
  note_after = min(30.0, timeout / 2)

  def beat():
    epoch = len(resumable.rows) + 1
    dog.arm(timeout, (
        f'error: no batch from the tf.data service at {host}:{port} '
        f'(--data_service) for --data_service_timeout={timeout:g} s, in '
        f'epoch {epoch}: its dispatcher answers, but no worker delivers (none '
        'registered, or they cannot read --data_dir='
        f'{config.data_dir}); start workers ({start_worker}), {resume}'),
            note_after=note_after, note=(
                f'[train] no batch from the tf.data service at {host}:{port} '
                f'for {note_after:g} s: is a worker running? ({start_worker}); '
                f'waiting up to --data_service_timeout={timeout:g} s'))

  grace = min(DISPATCHER_GRACE_S, timeout / 2)
  dog.watch_peer(host, port, seconds=grace, message=(
      f'error: the tf.data service dispatcher at {host}:{port} '
      f'(--data_service) has refused connections for {grace:g} s; '
      f'restart it and its workers, {resume}'))
  beat()
  try:
    yield [_Heartbeat(beat)]
  finally:
    dog.clear()
    dog.forget_peer()


def _optimizer(name: str, learning_rate: float):
  return {'rmsprop': keras.optimizers.RMSprop, 'adam': keras.optimizers.Adam,
          'sgd': keras.optimizers.SGD}[name](learning_rate=learning_rate)


def _write_samples(batch, config: TrainConfig, spec, model_input: ModelInput,
                   *, augmented: bool) -> None:
  """train_samples.png: one training batch as the model receives it."""
  images, labels = batch
  labels = np.asarray(labels).reshape(len(images)).astype(int)
  _picture(config_lib.TRAIN_SAMPLES_FILE, lambda path: plots.plot_sample_grid(
      model_input.to_pixels(images), labels, spec.class_names, path,
      title='Training batch as the model sees it' +
      (' (augmented)' if augmented else '')), config)


def _write_model_summary(model, model_dir: str) -> None:
  """model_summary.txt: model.summary(), as Keras prints it."""
  lines = []
  model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
  with open(os.path.join(model_dir, config_lib.MODEL_SUMMARY_FILE), 'w',
            encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def _read_spec(data_dir: str):
  """The dataset's spec; any problem with it is a one-line UserError."""
  if os.path.isfile(data_dir):
    raise UserError(
        f'--data_dir={data_dir} is a file; pass the folder a `python -m '
        'pipelines.build` run wrote (its --output_dir)')
  places.check_data_dir_is_not_a_run(data_dir)
  try:
    return tfrecords_schema.read_dataset_spec(data_dir)
  except tfrecords_schema.DatasetError:
    raise  # A UserError already.
  except (ValueError, KeyError, TypeError, AttributeError, OSError,
          tf.errors.OpError) as e:
    detail = cli.one_line(e, 200)
    raise UserError(
        f'--data_dir={data_dir}: its {tfrecords_schema.metadata.METADATA_FILE} '
        f'cannot be read ({type(e).__name__}: {detail}); '
        f'{input_pipeline.rebuild_hint(data_dir)}') from None


# The open folder of each --model_dir this process is training into, locked
# until the run returns (train_and_evaluate in a notebook, then the command
# on the same folder) or the process ends (the kernel drops it, even at
# kill -9).
_LOCKED: dict[str, int] = {}


def _lock_model_dir(model_dir: str) -> None:
  """An exclusive flock on the --model_dir folder, or UserError when another
  trainer holds it: two trainers on one run folder both resumed from the
  same checkpoint and wrote every output over each other's, each telling
  its user its own numbers."""
  path = os.path.realpath(model_dir)
  if path in _LOCKED:
    return
  _LOCKED[path] = paths.lock_exclusively(
      path, os.O_RDONLY | os.O_DIRECTORY, busy=(
          f'--model_dir={model_dir} is in use by another trainer (the folder '
          'is locked): wait for it to end and rerun this command to resume, '
          'or pass another --model_dir'))


def _run_stamp(model_dir: str) -> tuple:
  """(inode, size, mtime ns) of the run's state.json and metrics.json (None
  where absent). Both are replaced by rename, so any write changes it: the
  lock comes at the first write, after the state was read, and another
  trainer may have written the run in between."""
  stamp = []
  for rel in (os.path.join(config_lib.CHECKPOINT_DIR, config_lib.STATE_FILE),
              config_lib.METRICS_FILE):
    try:
      st = os.stat(os.path.join(model_dir, rel))
      stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
      stamp.append(None)
  return tuple(stamp)


def _unlock_model_dir(model_dir: str) -> None:
  fd = _LOCKED.pop(os.path.realpath(model_dir), None)
  if fd is not None:
    os.close(fd)  # Closing the only descriptor releases the flock.


def _check_model_dir(model_dir: str) -> None:
  """--model_dir must be (or become) a folder; refused before any write."""
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise UserError(
        f'--model_dir={model_dir} is a file, not a folder; pass a new folder, '
        'or the --model_dir of the run to resume')
  parent = os.path.dirname(os.path.abspath(model_dir))
  while not os.path.exists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f'--model_dir={model_dir}: {parent} is a file, not a '
                    'folder; pass a folder path')
  for name in (config_lib.CHECKPOINT_DIR, config_lib.EXPORT_DIR,
               config_lib.TENSORBOARD_DIR):
    path = os.path.join(model_dir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(
          f'--model_dir={model_dir}: {path} is a file where the run keeps a '
          'folder; move it away, or pass a new --model_dir')
  special = paths.special_entry(model_dir) if os.path.isdir(model_dir) else None
  if special:  # The run reads and writes its files without looking first.
    raise UserError(
        f'--model_dir={model_dir}: {special[0]} is not a regular file but '
        f'{special[1]}; move it away, or pass a new --model_dir')


def _cache_files(config: TrainConfig, spec, size,
                 part: str = '') -> tuple[Any, Any]:
  """(train, validation) DatasetOptions.cache; checked before any write.

  A file cache holds decoded, resized images: its files are named after
  the dataset's digest and the size (PREFIX.<key>.train.*), so a rebuilt
  dataset or another --image_size never reads stale images. `part` names
  one worker's files of a multi-worker run (each reads its own images).
  """
  cache = config.cache
  if not cache:
    return None, None
  if cache == 'memory':
    return 'memory', 'memory'
  remote = paths.is_remote(cache)
  if cache.endswith('/') or (not remote and (
      cache.endswith(os.sep) or os.path.isdir(cache))):
    raise UserError(
        f'--cache={cache} is a folder; pass a file path prefix in it, e.g. '
        f'--cache={os.path.join(cache, "cache")}')
  if not remote:
    parent = os.path.dirname(os.path.abspath(cache))
    if not os.path.isdir(parent):
      raise UserError(
          f'--cache={cache}: the folder {parent} does not exist; create it '
          f'first (mkdir -p {parent}), or pass --cache=memory')
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f'--cache={cache}: the folder {parent} is not writable; '
                      'pass a --cache path in a folder you can write to')
  key = hashlib.sha256(
      f'{config_lib.dataset_digest(spec)} {size[0]}x{size[1]}'.encode()).hexdigest()[:12]
  files = tuple(f'{cache}.{key}.{split}{part}'
                for split in ('train', 'validation'))
  for prefix in files:
    for path in [] if remote else glob.glob(glob.escape(prefix) + '*'):
      kind = paths.special_kind(path)
      if kind:  # tf.data would wait on it forever.
        raise UserError(f'--cache={cache}: {path} is not a regular file but '
                        f'{kind}; delete {prefix}* and rerun')
    if tf.io.gfile.exists(prefix + '.index'):
      continue  # Complete: read, not written.
    locks = tf.io.gfile.glob(glob.escape(prefix) + '_*.lockfile')
    if locks:
      raise UserError(
          f'--cache={cache}: {locks[0]} exists: another run is filling this '
          'cache now, or a killed run left it; if no other run uses it, '
          f'delete {prefix}_* and rerun')
  return files


def _reading_errors(config: TrainConfig):
  """input_pipeline.reading_errors for this run's --data_dir and file
  --cache."""
  cache = config.cache if config.cache not in (None, '', 'memory') else None
  return input_pipeline.reading_errors(config.data_dir, cache=cache)


def _make_dataset(config: TrainConfig, split: str, model_input: ModelInput,
                  spec, **options):
  """input_pipeline.batches of --data_dir (its refusals are UserErrors that
  speak in flags)."""
  return input_pipeline.batches(
      config.data_dir, split, model_input,
      input_pipeline.DatasetOptions(**options), spec=spec)


def _cluster_task(config: TrainConfig):
  """This process's ClusterTask for --distribution=multi_worker, else None."""
  return config_lib.distribution_task(config.distribution,
                                      os.environ.get('TF_CONFIG'))


def run_model_input(config: TrainConfig, spec) -> ModelInput:
  """What the run's model reads: --image_size (default the stored size),
  normalized as --model's entry in trainer.model_table says."""
  return ModelInput.from_spec(
      spec, image_size=config.image_size,
      normalize=model_table.normalization(config.model))


def _build_model(config: TrainConfig, model_input: ModelInput,
                 num_classes: int):
  """The compiled model of this run (in the current strategy's scope)."""
  model = models.build_model(
      config.model, input_shape=model_input.shape,
      num_classes=num_classes, dropout=config.dropout,
      base_model=config.base_model, base_weights=config.base_weights,
      base_cutoff_layer=config.base_cutoff_layer,
      conv_filters=config.conv_filters, dense_units=config.dense_units)
  if config.fine_tune_from:  # Before any write: a wrong name is refused.
    models.fine_tune_layers(model, config.fine_tune_from)
  _compile(model, config, config.learning_rate, num_classes)
  return model


def _compile(model, config: TrainConfig, learning_rate: float,
             num_classes: int) -> None:
  model.compile(
      optimizer=_optimizer(config.optimizer, learning_rate),
      loss=models.loss(num_classes), metrics=['accuracy'],
      jit_compile=config.jit_compile)


def _start_fine_tuning(config: TrainConfig, model, num_classes: int) -> int:
  """The base trainable from --fine_tune_from, recompiled with
  --fine_tune_learning_rate (a fresh optimizer); trainable weight count."""
  count = models.unfreeze_from(model, config.fine_tune_from)
  _compile(model, config, config.fine_tune_learning_rate, num_classes)
  return count


def _epoch_notes(config: TrainConfig, spec, steps: int) -> list[str]:
  """What an epoch is when the batch size does not divide the training
  images, and the --class_weight weights: said, not left to be guessed."""
  lines = []
  count = spec.splits['train'].num_examples
  rest = count - steps * config.batch_size
  if rest:
    lines.append(
        f'an epoch is {steps} full batches of {config.batch_size} = '
        f'{steps * config.batch_size} of the {count} training images; the '
        f'shuffled stream runs on across epochs, so the other {rest} begin '
        'the next epoch (no image is left out for good)')
  weights = _class_weight(config, spec)
  if weights:
    shown = ', '.join(f'{name} {weights[i]:.3g}' for i, name in
                      enumerate(spec.class_names[:10]))
    more = (f', ... ({spec.num_classes} classes)' if spec.num_classes > 10
            else '')
    lines.append(f'--class_weight=balanced: loss weights {shown}{more}')
  return lines


def _class_weight(config: TrainConfig, spec):
  """Keras' class_weight for --class_weight (None for none), from the
  per-class train counts the build stored (nothing is read again)."""
  if config.class_weight != 'balanced':
    return None
  return config_lib.balanced_class_weights(spec.splits['train'].class_counts)


def _mirrored_strategy():
  """All local GPUs; without GPUs, all logical CPU devices (a test splits
  the CPU into two to check mirrored training against one device)."""
  gpus = tf.config.list_logical_devices('GPU')
  if gpus:
    return tf.distribute.MirroredStrategy()
  cpus = [d.name for d in tf.config.list_logical_devices('CPU')]
  return tf.distribute.MirroredStrategy(devices=cpus)


class Preempted(Exception):
  """Training stopped on SIGTERM; the last finished epoch is saved."""


@contextlib.contextmanager
def _preemptible(resumable):
  """SIGTERM (a cloud preemption) stops training after the current batch.

  The run's state stays that of the last finished epoch (the cut-short one
  is not recorded), so rerunning the same command resumes there.
  """
  import signal  # pylint: disable=g-import-not-at-top

  def stop(signum, frame):
    del signum, frame
    _say('SIGTERM: stopping after this batch; the last finished epoch is '
         'saved')
    resumable.preempted = True

  try:
    previous = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # Not the main thread: leave signals alone.
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _load_state(config: TrainConfig, resumable) -> int:
  """Epochs a saved run in --model_dir finished; its refusals as UserErrors
  (other settings are named as flags here: the config knows them)."""
  try:
    return resumable.load_state()  # Only reads.
  except callbacks_lib.SettingsMismatch as e:
    raise UserError(config_lib.settings_message(config, e.differences)
                    ) from None


def train_and_evaluate(config: TrainConfig, *, dog=None) -> dict:
  """Trains (or resumes) and writes model, export, history, metrics, plots.

  Everything that can refuse the run (flags, dataset, --model_dir, --cache,
  a saved run with other settings, a checkpoint that does not fit) is
  checked before the first file is written.

  dog: the process's pipelines.common.watchdog.Watchdog (trainer.main
  makes one): it bounds the waits on --data_service and on the workers of
  --distribution=multi_worker by ending the process. Without one (a library
  call), --data_service waits as long as TensorFlow does.
  """
  config = config_lib.with_tfds_data(config)
  spec = _read_spec(config.data_dir)  # Once per run.
  _validate(config, spec)
  task = _cluster_task(config)
  if not task:
    return _train(config, spec, None, dog=dog)
  # Before any other TensorFlow op: the strategy sets up the runtime.
  _say(f'multi_worker: {task.describe()}; waiting for every worker')
  strategy = multi_worker.start_strategy(
      task, timeout_s=config.multi_worker_timeout, dog=dog)
  try:
    return _train(config, spec, task, multi_worker.Cluster(strategy), dog)
  except multi_worker.PEER_ERRORS as e:
    raise multi_worker.peer_lost(e) from None


class _AlreadyFinished(Exception):
  """The run in --model_dir has nothing left to train and every result
  written; the message says so, `metrics` is its metrics.json."""

  def __init__(self, message: str, metrics: dict):
    super().__init__(message)
    self.metrics = metrics


def _check_not_finished(config: TrainConfig, resumable, done: int) -> None:
  """_AlreadyFinished when the saved run has trained all it will (--epochs
  reached, or stopped early) and wrote its results (metrics.json, written
  last, for these epochs; the export; predictions.csv): a rerun of a finished
  command then ends at once instead of evaluating and exporting again."""
  if not done:
    return
  if config.fine_tune_from and not _diverged(resumable):
    start = resumable.fine_tune_start
    if start is None or (done < start + config.fine_tune_epochs
                         and not resumable.stopped_early):
      return
  elif done < config.epochs and not resumable.stopped_early:
    return
  d = config.model_dir
  try:
    metrics = paths.read_json(os.path.join(d, config_lib.METRICS_FILE))
  except (OSError, ValueError):
    return  # Not finished writing: the run finishes again.
  if not isinstance(metrics, dict) or metrics.get('epochs_run') != done or not (
      os.path.isfile(os.path.join(d, config_lib.EXPORT_DIR, 'saved_model.pb'))
      and os.path.isfile(os.path.join(d, mistakes.PREDICTIONS_FILE))
      and 'evaluated_split' in metrics):
    return
  if resumable.stopped_early:
    why = (f'it stopped early after epoch {done} '
           f'({resumable.stop_reason or "early stopping"})')
    more = 'pass a new --model_dir to train again'
  elif config.fine_tune_from:
    why = (f'it trained {resumable.fine_tune_start} epoch(s) with the base '
           f'frozen and --fine_tune_epochs={config.fine_tune_epochs}')
    more = ('pass a larger --fine_tune_epochs to fine-tune on (--epochs no '
            'longer applies once fine-tuning began), or a new --model_dir to '
            'start over')
  else:
    why = f'it finished --epochs={done}'
    more = (f'pass --epochs above {done} to train on, or a new --model_dir '
            'to start over')
  raise _AlreadyFinished(
      f'nothing left to train in --model_dir={d}: {why}, and its model, '
      f'export and results are written; {more}', metrics)


def _train(config: TrainConfig, spec, task, cluster=None, dog=None) -> dict:
  """train_and_evaluate after the checks that need no TensorFlow runtime:
  prepare (every refusal, before any write), fit, then the chief finishes."""
  try:
    return _train_locked(config, spec, task, cluster, dog)
  finally:
    _unlock_model_dir(config.model_dir)


def _train_locked(config: TrainConfig, spec, task, cluster, dog) -> dict:
  """_train's steps; the chief locks --model_dir before its first write."""
  try:
    run = _prepare(config, spec, task, cluster)
  except _AlreadyFinished as finished:
    _say(str(finished))
    _summary(config, finished.metrics, finished.metrics['evaluated_split'])
    return finished.metrics
  train_seconds = _fit(config, run, dog)
  if run.resumable.preempted:
    raise Preempted(
        f'preempted (SIGTERM{" on a worker" if task else ""}) after epoch '
        f'{len(run.resumable.rows)} of {config.epochs}; its state is saved in '
        f'{config.model_dir}: rerun the same command'
        f'{" on every machine" if task else ""} to resume')
  if not run.is_chief:
    _say(f'worker done after epoch {len(run.resumable.rows)}; the chief '
         f'writes the model and results to {config.model_dir}')
    return {}
  return _finish(config, run, train_seconds)


@dataclasses.dataclass
class _Run:
  """A prepared run: what fit and finish work on."""
  spec: Any
  task: Any  # config.ClusterTask, or None.
  cluster: Any  # multi_worker.Cluster, or None.
  strategy: Any
  model_input: ModelInput
  resumable: callbacks_lib.ResumableTraining
  done: int  # Epochs a saved run finished.
  stamp: tuple  # _run_stamp when the saved state was read.
  is_chief: bool
  model: keras.Model
  train_dataset: Callable[[int], tf.data.Dataset]  # Of the batch size.
  val_ds: tf.data.Dataset

  @property
  def binary(self) -> bool:
    return config_lib.single_unit(self.spec.num_classes)


def _prepare(config: TrainConfig, spec, task, cluster) -> _Run:
  """Every check, the saved state, the model (restored) and the datasets;
  nothing is written. In a cluster, every worker agrees to start first."""
  try:  # A worker's refusal stops every worker (agree_to_start).
    if cluster and config.batch_size % cluster.strategy.num_replicas_in_sync:
      replicas = cluster.strategy.num_replicas_in_sync
      raise UserError(
          f'--batch_size={config.batch_size} must be a multiple of the '
          f'{replicas} replicas of the cluster (it is the global batch, '
          'split evenly); pass e.g. --batch_size='
          f'{max(1, config.batch_size // replicas) * replicas}')
    model_input = run_model_input(config, spec)
    _check_model_dir(config.model_dir)
    places.check_model_dir_place(config.model_dir, config.data_dir)
    part = f'.part{task.id_in_cluster}of{task.num_workers}' if task else ''
    train_cache, val_cache = _cache_files(config, spec, model_input.size,
                                          part)
    is_chief = task is None or task.is_chief
    resumable = callbacks_lib.ResumableTraining(
        config.model_dir, monitor=config.early_stopping_monitor,
        patience=config.early_stopping_patience,
        target_accuracy=config.target_accuracy, restore_best_weights=True,
        fingerprint=config.fingerprint(spec), same=config_lib.same_setting,
        write=is_chief)
    stamp = _run_stamp(config.model_dir)
    done = _load_state(config, resumable)
    if not cluster:
      _check_not_finished(config, resumable, done)
    error = None
  except UserError as e:
    if not cluster:
      raise
    error, done = e, 0
  if cluster:
    # The settings from the config: a refusal may come before `resumable`.
    multi_worker.agree_to_start(
        cluster, error=error, done=done, model_dir=config.model_dir,
        settings=dict(config.fingerprint(spec), epochs=config.epochs))
    strategy = cluster.strategy
  num_classes = spec.num_classes
  label_mode = 'binary' if config_lib.single_unit(num_classes) else 'int'

  keras.utils.set_random_seed(config.seed)
  if config.mixed_precision:
    gpu = bool(tf.config.list_physical_devices('GPU'))
    keras.mixed_precision.set_global_policy(
        'mixed_float16' if gpu else 'mixed_bfloat16')
  if not task:
    strategy = (_mirrored_strategy() if config.distribution == 'mirrored'
                else tf.distribute.get_strategy())
  with strategy.scope():
    model = _build_model(config, model_input, num_classes)
    if resumable.fine_tune_start is not None and done > (
        resumable.fine_tune_start):
      # The saved optimizer state is that of the fine-tuning phase.
      _start_fine_tuning(config, model, num_classes)
    resumable.set_model(model)
    resumable.restore_weights()  # Before any write: a misfit is refused.

  # One iterator for the whole run (repeat + steps_per_epoch): no per-epoch
  # iterator turnover, and the shuffle buffer stays warm.
  # A worker of a multi-worker run reads its own part (see multi_worker).
  shard = (task.num_workers, task.id_in_cluster) if task else None

  def train_dataset(batch_size):
    return _make_dataset(
        config, 'train', model_input, spec, batch_size=batch_size,
        training=True, augment=config.augment, seed=config.seed,
        repeat=True, cache=train_cache, data_service=config.data_service,
        shard=shard, label_mode=label_mode)
  val_ds = _make_dataset(
      config, 'validation', model_input, spec, batch_size=config.batch_size,
      training=False, cache=val_cache, label_mode=label_mode)
  return _Run(spec=spec, task=task, cluster=cluster, strategy=strategy,
              model_input=model_input, resumable=resumable, done=done,
              stamp=stamp, is_chief=is_chief, model=model,
              train_dataset=train_dataset, val_ds=val_ds)


def _fit(config: TrainConfig, run: _Run, dog) -> float:
  """Writes the run's first files (the chief), trains; seconds it took.

  Trains up to --epochs unless the saved run already finished; SIGTERM
  stops after the current batch (run.resumable.preempted).
  """
  spec, task, resumable, model = run.spec, run.task, run.resumable, run.model
  size = run.model_input.size
  num_classes = spec.num_classes
  train_count = spec.splits['train'].num_examples
  steps_per_epoch = max(1, train_count // config.batch_size)
  with _service_watch(config, dog, resumable) as heartbeat:
    # A damaged train shard often shows here already.
    with _reading_errors(config):
      # From a dataset of its own: iterating the training dataset would
      # advance its seeded shuffle and augmentation generators.
      sample_batch = next(iter(run.train_dataset(config.batch_size).take(1)))

    if task:
      loop = multi_worker.Loop(run.cluster, model, num_classes=num_classes,
                               global_batch=config.batch_size,
                               jit_compile=config.jit_compile,
                               class_weight=_class_weight(config, spec))

    # Every check passed: from here on, the run writes (the chief only).
    if run.is_chief:
      os.makedirs(config.model_dir, exist_ok=True)
      _lock_model_dir(config.model_dir)
      if _run_stamp(config.model_dir) != run.stamp:
        raise UserError(
            f'--model_dir={config.model_dir} was written by another trainer '
            'while this one started (it has ended now); nothing was written '
            'by this one: rerun this command to resume from that run')
      resumable.prepare()
      _write_model_summary(model, config.model_dir)
      _write_samples(sample_batch, config, spec, run.model_input,
                     augmented=config.augment is not None)
    _say(f'{config.model} on {cli.image_shape(*size, spec.channels)}, '
         f'{num_classes} classes, {train_count} train / '
         f'{spec.splits["validation"].num_examples} validation images, '
         f'{model.count_params():,} parameters'
         + (f'; resuming after epoch {run.done}' if run.done else ''))
    for line in _epoch_notes(config, spec, steps_per_epoch):
      _say(line)
    start = time.perf_counter()
    to_train = run.done < config.epochs and not resumable.stopped_early
    if task and to_train:
      replicas = run.strategy.num_replicas_in_sync
      iterator = iter(run.strategy.distribute_datasets_from_function(
          lambda context: run.train_dataset(config.batch_size // replicas)))
      with _reading_errors(config), _preemptible(
          resumable):
        multi_worker.fit(
            loop, iterator=iterator, val_ds=run.val_ds, resumable=resumable,
            epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            is_chief=run.is_chief, preempted=lambda: resumable.preempted,
            tensorboard_dir=os.path.join(config.model_dir,
                                         config_lib.TENSORBOARD_DIR))
      _say(f'weights after epoch {len(resumable.rows)}: sha256 '
           f'{multi_worker.weights_digest(model)} (the same on every worker)')
      if run.is_chief and not resumable.preempted:
        resumable.on_train_end()
    elif not task:
      _fit_phases(config, run, steps_per_epoch, heartbeat, to_train)
    elif run.is_chief:
      resumable.on_train_end()
  return time.perf_counter() - start


def _diverged(resumable) -> bool:
  """Training diverged, in this process or in the saved run."""
  return resumable.diverged or (resumable.stop_reason or '').startswith(
      'training diverged')


def _fit_phases(config: TrainConfig, run: _Run, steps_per_epoch: int,
                heartbeat, to_train: bool) -> None:
  """Keras fit in one process: up to --epochs with a frozen base, then
  (--fine_tune_from) up to --fine_tune_epochs more with the base trainable
  from that layer, each phase resumable; the model ends with its best
  weights (of the fine-tuning phase when there is one)."""
  resumable, model = run.resumable, run.model

  def fit(end: int) -> None:
    with _reading_errors(config), _preemptible(
        resumable):
      model.fit(run.train_dataset(config.batch_size),
                steps_per_epoch=steps_per_epoch, epochs=end,
                initial_epoch=len(resumable.rows),
                validation_data=run.val_ds, verbose=2, shuffle=False,
                class_weight=_class_weight(config, run.spec),
                callbacks=[
                    *heartbeat, resumable, keras.callbacks.TerminateOnNaN(),
                    keras.callbacks.TensorBoard(os.path.join(
                        config.model_dir, config_lib.TENSORBOARD_DIR))])

  def stopped() -> bool:
    return resumable.preempted or _diverged(resumable) or not resumable.rows

  if resumable.fine_tune_start is None:
    if to_train:
      fit(config.epochs)  # Ends with the best frozen-base weights.
    else:
      resumable.on_train_end()
    if not config.fine_tune_from or stopped():
      return
    count = _start_fine_tuning(config, model, run.spec.num_classes)
    resumable.start_fine_tuning()
    start = resumable.fine_tune_start
    _say(f'fine-tuning from {config.fine_tune_from}: epochs {start + 1}-'
         f'{start + config.fine_tune_epochs}, {count} trainable weights, '
         f'learning rate {config.fine_tune_learning_rate:g}')
  end = resumable.fine_tune_start + config.fine_tune_epochs
  if len(resumable.rows) < end and not resumable.stopped_early and not (
      stopped()):
    fit(end)
  elif not resumable.preempted:
    resumable.on_train_end()


def _finish(config: TrainConfig, run: _Run, train_seconds: float) -> dict:
  """Evaluation, metrics.json, best model and serving export, then pictures.

  A run with no epoch that finished with finite numbers (a diverged one)
  is refused: nothing is saved or exported. Pictures come last and never
  stop the run: the model and its numbers are written whatever they cost.
  """
  spec, resumable, model = run.spec, run.resumable, run.model
  if run.task:
    # Evaluation, saving and export on a plain copy: no collectives, and the
    # files are those a single-process run writes.
    weights = model.get_weights()
    model = _build_model(config, run.model_input, spec.num_classes)
    model.set_weights(weights)
  rows = resumable.rows
  if not rows:
    why = resumable.stop_reason or 'no epoch finished (see the logs above)'
    raise UserError(
        f'{why}, and no epoch finished with finite numbers, so no model was '
        f'saved or exported; lower --learning_rate (now '
        f'{config.learning_rate:g}), e.g. 10x, and train into a new '
        f'--model_dir (or delete {os.path.join(config.model_dir, config_lib.CHECKPOINT_DIR)} '
        'to start this one over)')
  if resumable.diverged or (resumable.stop_reason or '').startswith(
      'training diverged'):
    _say(f'warning: {resumable.stop_reason}; the model is epoch '
         f'{resumable.best_epoch or rows[-1]["epoch"]}\'s, the best finite one')
  best_epoch = resumable.best_epoch or rows[-1]['epoch']
  best = next(r for r in rows if r['epoch'] == best_epoch)
  model_path = os.path.join(config.model_dir, config_lib.BEST_MODEL_FILE)
  model.save(model_path)
  eval_split = 'test' if spec.splits.get('test') and spec.splits[
      'test'].num_examples else 'validation'
  evaluated = _evaluate_by_file(config, run, model)
  scored = evaluated.of_split(eval_split)
  matrix = report.confusion_matrix(scored.labels, scored.predicted,
                                   spec.num_classes)
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
  if resumable.fine_tune_start is not None:
    metrics['fine_tune_start'] = resumable.fine_tune_start
  weights = _class_weight(config, spec)
  if weights:
    metrics['class_weights'] = {name: round(weights[i], 6)
                                for i, name in enumerate(spec.class_names)}
  suspect_rows = mistakes.suspects(evaluated.labels, evaluated.probs)
  suspects = mistakes.suspect_report(evaluated, spec.class_names,
                                     splits=_evaluation_splits(spec),
                                     found=suspect_rows)
  metrics['suspect_labels'] = suspects['suspects']
  if eval_split == 'test':
    # From the same pass as predictions.csv (Keras' loss per image, and
    # the argmax the export uses): no second pass over the test split.
    metrics['test_accuracy'] = float(np.mean(scored.predicted ==
                                             scored.labels))
    metrics['test_loss'] = float(np.mean(scored.losses))
  with open(os.path.join(config.model_dir, config_lib.CLASS_REPORT_FILE),
            'w') as f:
    f.write(f'{eval_split} split\n{report.format_report(per_class)}\n')
  mistakes.write_predictions(
      os.path.join(config.model_dir, mistakes.PREDICTIONS_FILE), evaluated,
      spec.class_names)
  with open(os.path.join(config.model_dir, mistakes.SUSPECTS_FILE), 'w',
            encoding='utf-8') as f:
    json.dump(suspects, f, indent=2, allow_nan=False, ensure_ascii=False)
  export_lib.export(model, config.model_dir, config_lib.ModelConfig(
      model=config.model, class_names=spec.class_names,
      model_input=run.model_input))
  _picture(config_lib.CURVES_FILE, lambda path: plots.plot_training_curves(
      rows, path), config)
  _picture(config_lib.CONFUSION_FILE, lambda path: plots.plot_confusion_matrix(
      matrix, spec.class_names, path,
      title=f'Confusion matrix ({eval_split} split)'), config)
  _picture(mistakes.MISTAKES_FILE, lambda path: _gallery(
      config, run, evaluated, mistakes.gallery_order(
          evaluated.labels, evaluated.probs), path, suspects=False), config)
  stale = os.path.join(config.model_dir, mistakes.SUSPECTS_PICTURE)
  if not suspects['suspects'] and os.path.exists(stale):
    os.remove(stale)  # An earlier finish's picture would contradict the JSON.
  if suspects['suspects']:
    _picture(mistakes.SUSPECTS_PICTURE, lambda path: _gallery(
        config, run, evaluated, suspect_rows, path, suspects=True), config)
  # Last: a rerun takes metrics.json for these epochs to mean that every
  # result is written (_check_not_finished).
  with open(os.path.join(config.model_dir, config_lib.METRICS_FILE),
            'w') as f:
    json.dump(report.json_ready(metrics), f, indent=2, allow_nan=False)
  _summary(config, metrics, eval_split)
  return metrics


def _evaluation_splits(spec) -> list[str]:
  """The splits reported by file: validation, and test when it has images."""
  return [s for s in ('validation', 'test')
          if spec.splits.get(s) and spec.splits[s].num_examples]


def _evaluate_by_file(config: TrainConfig, run: _Run, model
                      ) -> mistakes.Evaluated:
  """The model's class probabilities for every image of the evaluation
  splits, with its file and given label (one pass over each split)."""
  files, splits, labels, probs, losses = [], [], [], [], []
  loss = models.loss(run.spec.num_classes, reduction=None)
  for split in _evaluation_splits(run.spec):
    ds = input_pipeline.labelled_files(
        config.data_dir, split, run.model_input,
        batch_size=config.batch_size, spec=run.spec)
    with _reading_errors(config):
      for images, batch_labels, batch_files in ds:
        outputs = tf.cast(model(images, training=False), tf.float32)
        targets = (tf.cast(batch_labels[:, None], tf.float32) if run.binary
                   else batch_labels)
        losses.append(loss(targets, outputs).numpy())
        outputs = outputs.numpy()
        probs.append(mistakes.probabilities(
            outputs, num_classes=run.spec.num_classes))
        labels.append(batch_labels.numpy().astype(np.int64))
        files.extend(f.decode('utf-8', 'surrogateescape')
                     for f in batch_files.numpy())
        splits.extend([split] * len(outputs))
  k = run.spec.num_classes
  return mistakes.Evaluated(
      files=files, splits=splits,
      labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
      probs=np.concatenate(probs) if probs else np.zeros((0, k)),
      losses=np.concatenate(losses) if losses else np.zeros(0))


def _gallery(config: TrainConfig, run: _Run, evaluated: mistakes.Evaluated,
             order, path: str, *, suspects: bool) -> None:
  """mistakes.png (order: mistakes.gallery_order) or suspect_labels.png
  (order: the suspects, least self-confident first), at most
  mistakes.GALLERY_SIZE images, read back from their records."""
  shown = [int(i) for i in order[:mistakes.GALLERY_SIZE]]
  if not shown:
    return
  names = run.spec.class_names
  guess = evaluated.predicted
  start = {}  # First row of each split in `evaluated`.
  for i, split in enumerate(evaluated.splits):
    start.setdefault(split, i)
  images = {}
  for split, first in start.items():
    rows = [i for i in shown if evaluated.splits[i] == split]
    found = input_pipeline.pictures(config.data_dir, split, run.model_input,
                                    [i - first for i in rows], spec=run.spec)
    images.update({first + j: image for j, image in found.items()})
  captions, right = [], []
  for i in shown:
    given, other = int(evaluated.labels[i]), int(guess[i])
    name = evaluated.files[i]  # As in predictions.csv, shortened.
    name = name if len(name) <= 30 else name[:13] + '...' + name[-14:]
    if suspects:
      captions.append(f'labelled {names[given]}\nmodel: {names[other]} '
                      f'{evaluated.probs[i, other]:.0%}\n{name}')
      right.append(False)
    else:
      captions.append(f'{names[other]} {evaluated.probs[i, other]:.0%}\n'
                      f'(given {names[given]})\n{name}')
      right.append(given == other)
  pixels = np.stack([images[i] for i in shown]).astype(np.float32) / 255.0
  wrong = int(np.sum(guess != evaluated.labels))
  title = (f'{len(shown)} images whose label the model contradicts '
           f'(confident learning), least sure of their label first'
           if suspects else
           f'{wrong} of {len(guess)} evaluation images wrong; wrong first, '
           'most confident first')
  plots.plot_prediction_gallery(pixels, captions, right, path, title=title)


def _picture(name: str, draw, config: TrainConfig) -> None:
  """Draws one picture into --model_dir; a failure is a warning line, never
  the end of a run whose model is already written."""
  try:
    draw(os.path.join(config.model_dir, name))
  except Exception as e:  # pylint: disable=broad-except
    _say(f'warning: {name} could not be drawn ({type(e).__name__}: '
         f'{cli.one_line(e, 200)}); the model and metrics are written')


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
  c = config_lib
  lines.append(f'model: {d}/{c.BEST_MODEL_FILE}, serving export: '
               f'{d}/{c.EXPORT_DIR}')
  lines.append(f'pictures: {d}/{c.CURVES_FILE}, {d}/{c.CONFUSION_FILE} '
               f'({eval_split}), {d}/{c.TRAIN_SAMPLES_FILE}; metrics: '
               f'{d}/{c.METRICS_FILE}')
  m = mistakes
  lines.append(f'mistakes by file: {d}/{m.MISTAKES_FILE}, every prediction: '
               f'{d}/{m.PREDICTIONS_FILE}')
  count = metrics.get('suspect_labels', 0)
  lines.append(f'{count} image(s) whose label the model contradicts: '
               f'{d}/{m.SUSPECTS_FILE}'
               + (f', {d}/{m.SUSPECTS_PICTURE}' if count else ''))
  print('\n'.join(lines))
