"""--distribution=multi_worker: a training loop for several machines.

Keras 3's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585: "Attempt to convert a value (PerReplica...)"), so
this mode trains with its own loop over the same model, optimizer and
`ResumableTraining` state, and keeps what fit + the callbacks do for a
single process:

  * the global batch is --batch_size, split evenly over every replica of
    every worker; gradients are summed across all of them each step (the
    strategy's collective all-reduce), so all workers hold the same weights;
  * each worker reads its own part of the training split (by shard file
    when the files share out evenly, else by record: see
    `input_pipeline.file_parts`), with its own shuffle and augmentation
    seeds; an epoch is `train images // batch_size` global steps;
  * validation each epoch: every worker evaluates the whole validation split
    with the (identical) weights; the chief's figures are broadcast so every
    worker takes the same early-stopping / target-accuracy decision;
  * history.csv, checkpoints, state.json, TensorBoard scalars and, after
    training, the model, export and pictures are written by the chief only;
    the other workers write nothing;
  * before any variable is made the workers agree (`agree_to_start`): a
    refusal on one stops all, and every worker must run the same flags from
    the same state (epochs done in the shared --model_dir);
  * SIGTERM on any worker stops every worker after the same step (the flag
    rides on the step's all-reduce, and on one more after validation); the
    last finished epoch is kept;
  * a worker that dies (kill -9, lost machine) makes the others stop with one
    line; rerunning every command resumes after the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from pipelines.common import cli
from pipelines.common.errors import UserError
from trainer import config as config_lib
from trainer import models

# Errors a collective raises when a peer is gone or unreachable.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.CancelledError,
               tf.errors.AbortedError, tf.errors.DeadlineExceededError,
               tf.errors.InternalError)


class PeerLost(UserError):
  """Another worker stopped or cannot be reached; rerun every worker."""


def peer_lost(error: Exception, after_epoch: Optional[int] = None) -> PeerLost:
  """PeerLost for a collective's error, with where a rerun resumes."""
  resumes = (f': training resumes after epoch {after_epoch}'
             if after_epoch is not None else '')
  return PeerLost(f'another worker stopped or cannot be reached '
                  f'({peer_reason(error)}); rerun the same command on every '
                  f'machine{resumes}')


def _say(message: str) -> None:
  print(f'[train] {message}', file=sys.stderr, flush=True)


def _stats(labels: tf.Tensor, outputs: tf.Tensor, per_example: tf.Tensor,
           binary: bool) -> tf.Tensor:
  """float32 [3]: loss sum, right predictions ('accuracy'), examples."""
  if binary:
    predicted = tf.cast(outputs > 0.5, tf.float32)  # As BinaryAccuracy.
    right = tf.equal(predicted, tf.cast(tf.reshape(labels, tf.shape(outputs)),
                                        tf.float32))
  else:
    right = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32),
                     tf.cast(tf.reshape(labels, [-1]), tf.int32))
  return tf.stack([tf.reduce_sum(per_example),
                   tf.reduce_sum(tf.cast(right, tf.float32)),
                   tf.cast(tf.shape(outputs)[0], tf.float32)])


class Cluster:
  """Small agreements between the workers (one all-reduce each).

  Usable as soon as the strategy exists, before any model: the workers
  check they can start and agree on the run before variables are made
  (making variables is already a collective).
  """

  def __init__(self, strategy):
    self.strategy = strategy
    # autograph=False here and below: TensorFlow control flow only, and
    # AutoGraph's rewriting is seconds of CPU per process (input_pipeline).
    self._broadcast = tf.function(self._broadcast_fn, autograph=False)
    self._sum = tf.function(self._sum_fn, autograph=False)

  def _broadcast_fn(self, values):
    def replica(values):
      context = tf.distribute.get_replica_context()
      first = tf.equal(context.replica_id_in_sync_group, 0)
      return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(
          first, values, tf.zeros_like(values)))
    return self.strategy.run(replica, args=(values,))

  def broadcast(self, values) -> np.ndarray:
    """The first replica's (the chief's) float64 values, on every worker."""
    out = self._broadcast(tf.constant(values, tf.float64))
    return self.strategy.experimental_local_results(out)[0].numpy()

  def any_worker(self, flag: bool) -> bool:
    """True on every worker when `flag` is True on any of them."""
    out = self._sum(tf.constant([float(flag)], tf.float64))
    return bool(self.strategy.experimental_local_results(out)[0].numpy()[0] > 0)

  def _sum_fn(self, value):
    def replica(value):
      # (identity: the reduction needs a value made on the replica's device)
      return tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, tf.identity(value))
    return self.strategy.run(replica, args=(value,))


class Loop:
  """The distributed train step and the local evaluation.

  Args:
    cluster: the Cluster of the strategy the model was built under.
    model: a compiled Keras model (its optimizer is used), with
      `models.head`'s output.
    num_classes: 2 trains one sigmoid unit (labels float32 [B, 1]), more
      softmax logits (labels int32 [B]), as `models.head`.
    global_batch: images per step over all replicas.
    jit_compile: compile the per-replica forward/backward pass with XLA.
    class_weight: class -> weight of its examples' loss (--class_weight).
  """

  def __init__(self, cluster: 'Cluster', model, *, num_classes: int,
               global_batch: int, jit_compile: bool = False,
               class_weight: Optional[dict] = None):
    self.cluster = cluster
    self.strategy = cluster.strategy
    self.model = model
    self.binary = config_lib.single_unit(num_classes)
    self.global_batch = global_batch
    self._loss = models.loss(num_classes, reduction=None)
    # --class_weight: each example's loss times its class's weight, as
    # Keras' fit(class_weight=...) does.
    self._class_weight = None if class_weight is None else tf.constant(
        [class_weight.get(k, 1.0) for k in range(num_classes)], tf.float32)
    self._grads = tf.function(self._forward_backward, jit_compile=jit_compile,
                              autograph=False)
    self.train_step = tf.function(self._train_step, autograph=False)
    self._eval_batch = tf.function(self._eval, autograph=False)

  def _forward_backward(self, images, labels):
    model = self.model
    with tf.GradientTape() as tape:
      outputs = tf.cast(model(images, training=True), tf.float32)
      per_example = self._loss(labels, outputs)
      if self._class_weight is not None:
        classes = (tf.cast(tf.round(labels[:, 0]), tf.int32) if self.binary
                   else tf.cast(labels, tf.int32))
        per_example *= tf.gather(self._class_weight, classes)
      loss = tf.nn.compute_average_loss(per_example,
                                        global_batch_size=self.global_batch)
      if model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled = model.optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, model.trainable_variables)
    return grads, _stats(labels, outputs, per_example, self.binary)

  def _train_step(self, iterator, stop: tf.Tensor) -> tf.Tensor:
    """One global step -> [loss sum, right, examples, stop votes] (all workers)."""
    def replica_step(images, labels):
      grads, stats = self._grads(images, labels)
      self.model.optimizer.apply_gradients(
          zip(grads, self.model.trainable_variables))
      return tf.concat([stats, [stop]], axis=0)
    images, labels = next(iterator)
    per_replica = self.strategy.run(replica_step, args=(images, labels))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                axis=None)

  def _eval(self, images, labels):
    outputs = tf.cast(self.model(images, training=False), tf.float32)
    return _stats(labels, outputs, self._loss(labels, outputs), self.binary)

  def evaluate(self, dataset) -> tuple[float, float]:
    """(mean loss, accuracy) over a local dataset of (images, labels)."""
    total = np.zeros(3)
    for images, labels in dataset:
      total += self._eval_batch(images, labels).numpy()
    return total[0] / total[2], total[1] / total[2]


def weights_digest(model) -> str:
  """sha256 (16 hex digits) of the model's weights: equal on every worker."""
  digest = hashlib.sha256()
  for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
  return digest.hexdigest()[:16]


PATH_KEYS = ('data_dir', 'cache', 'base_weights')  # May differ per machine.


def _digest(value) -> float:
  """48 bits of sha256 of a JSON value: exact in a float64."""
  text = json.dumps(value, sort_keys=True, default=str)
  return float(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))


def agree_to_start(cluster: Cluster, *, error: Optional[UserError],
                   settings: dict, done: int, model_dir: str) -> None:
  """Every worker starts the same run, or none does (before any variable).

  error: this worker's own refusal (bad flag, dataset, --model_dir, ...),
  raised on it; the others stop with a line pointing to it. settings: the
  run's fingerprint with --epochs (paths left out: machines may mount the
  same data elsewhere); done: epochs finished in the state this worker read.
  """
  if cluster.any_worker(error is not None):
    if error is not None:
      raise error
    raise UserError('another worker refused to start (its error line says '
                    'why); fix it and rerun the command on every machine')
  keys = sorted(k for k in settings if k not in PATH_KEYS)
  mine = np.array([done] + [_digest(settings[k]) for k in keys], np.float64)
  chief = cluster.broadcast(mine)
  differs = [k for k, a, b in zip(keys, mine[1:], chief[1:]) if a != b]
  if not cluster.any_worker(bool(differs) or mine[0] != chief[0]):
    return
  if differs:
    raise UserError(
        'the workers were started with other flags: '
        + ', '.join(f'--{k}' for k in differs) + ' differ from the chief\'s; '
        'run the same command on every machine (only TF_CONFIG differs)')
  if mine[0] != chief[0]:
    raise UserError(
        f'this worker finds {done} finished epochs in --model_dir={model_dir}, '
        f'the chief {int(chief[0])}: every machine must see the same '
        '--model_dir (one folder on shared storage, e.g. NFS)')
  raise UserError('another worker disagrees with the chief (its error line '
                  'says how); run the same command on every machine')


def fit(loop: Loop, *, iterator, val_ds, resumable, epochs: int,
        steps_per_epoch: int, is_chief: bool,
        tensorboard_dir: Optional[str] = None,
        preempted: Callable[[], bool] = lambda: False) -> None:
  """Trains from resumable's state to --epochs, or until it stops.

  How it ended is on `resumable`: `stopped_early` (early stopping, target
  accuracy, NaN loss) or `preempted` (a SIGTERM on some worker: every worker
  stops after the same step and the cut epoch is not recorded). Raises
  PeerLost when another worker is gone.
  """
  model = loop.model
  model.stop_training = False
  writers = None
  if is_chief and tensorboard_dir:
    writers = {split: tf.summary.create_file_writer(f'{tensorboard_dir}/{split}')
               for split in ('train', 'validation')}
  start_epoch = len(resumable.rows)
  try:
    for epoch in range(start_epoch, epochs):
      start = time.perf_counter()
      total = np.zeros(3)
      for _ in range(steps_per_epoch):
        out = loop.train_step(iterator, tf.constant(float(preempted()))).numpy()
        if out[3] > 0:
          resumable.preempted = True
          return
        total += out[:3]
      val_loss, val_accuracy = loop.evaluate(val_ds)
      if loop.cluster.any_worker(preempted()):  # SIGTERM while validating.
        resumable.preempted = True
        return
      val_loss, val_accuracy = loop.cluster.broadcast([val_loss, val_accuracy])
      logs = {'accuracy': total[1] / total[2], 'loss': total[0] / total[2],
              'val_accuracy': float(val_accuracy), 'val_loss': float(val_loss)}
      resumable.on_epoch_end(epoch, logs)  # Non-finite numbers stop it.
      if is_chief:
        seconds = time.perf_counter() - start
        _say(f'epoch {epoch + 1}/{epochs} - {seconds:.0f}s - '
             + ' - '.join(f'{k}: {v:.4f}' for k, v in logs.items()))
        if writers:
          for split, prefix in (('train', ''), ('validation', 'val_')):
            with writers[split].as_default(step=epoch):
              for name in ('loss', 'accuracy'):
                tf.summary.scalar(f'epoch_{name}', logs[prefix + name])
            writers[split].flush()
      if model.stop_training:
        return
  except PEER_ERRORS as e:
    raise peer_lost(e, after_epoch=len(resumable.rows)) from None


def peer_reason(error: Exception) -> str:
  """The line of a collective's error that says what happened to the peer."""
  text = str(getattr(error, 'message', None) or error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  useful = [line for line in lines if not re.match(
      r'(Graph execution error|Detected at node|\[\[|The error could be|'
      r'Additional GRPC|File "|Traceback|\^)', line)]
  telling = [line for line in useful if re.search(
      r'abort|heartbeat|unavailable|connect|socket|reset|unhealthy|closed|'
      r'deadline', line, re.IGNORECASE)]
  reason = (telling or useful or [type(error).__name__])[0]
  return cli.one_line(re.sub(r'\s*\[\[.*', '', reason), 200)


def _check_port(task) -> None:
  """UserError naming this task's port when something already listens there."""
  port = int(task.address.rpartition(':')[2])
  reason = cli.port_in_use(port)
  if reason:
    raise UserError(
        f'TF_CONFIG gives this {task.task_type} {task.task_index} the '
        f'address {task.address}, but port {port} is in use here '
        f'({reason}); stop what listens there (an earlier run?) or '
        'change the port in TF_CONFIG on every machine')


def start_strategy(task, *, timeout_s: int, dog=None):
  """MultiWorkerMirroredStrategy once every worker of TF_CONFIG has joined.

  Creating the strategy blocks inside TensorFlow until every task is up,
  holding the interpreter (no Python handler or thread runs; TensorFlow
  also takes SIGTERM over). The watchdog process (pipelines.common.watchdog;
  a new one when `dog` is None) bounds the wait: if the cluster is not
  complete after `timeout_s`, it prints one error line and ends this
  process (exit status 137). SIGTERM is given back its default action once
  the strategy exists.
  """
  import signal  # pylint: disable=g-import-not-at-top
  from pipelines.common import watchdog  # pylint: disable=g-import-not-at-top
  _check_port(task)
  message = (
      f'error: not every worker of TF_CONFIG joined within '
      f'--multi_worker_timeout={timeout_s} s (this is {task.describe()}); '
      'start the same command on every machine TF_CONFIG lists, check they '
      'reach each other on those ports, or raise --multi_worker_timeout')
  own = dog is None
  if own:
    dog = watchdog.Watchdog({}, stderr=cli.unfiltered_stderr())
  dog.arm(timeout_s, message)
  try:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  finally:
    dog.clear()
    if own:
      dog.close()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  return strategy
