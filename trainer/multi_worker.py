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
    when there are at least as many files as workers, else by record), with
    its own shuffle and augmentation seeds; an epoch is
    `train images // batch_size` global steps;
  * validation each epoch: every worker evaluates the whole validation split
    with the (identical) weights; the chief's figures are broadcast so every
    worker takes the same early-stopping / target-accuracy decision;
  * history.csv, checkpoints, state.json, TensorBoard scalars and, after
    training, the model, export and pictures are written by the chief only;
    the other workers write nothing;
  * resume: every worker reads the chief's state from the shared --model_dir
    and all check they agree (same epochs done, same settings) before
    training;
  * SIGTERM on any worker stops every worker after the same step (the flag
    rides on the step's all-reduce); the last finished epoch is kept;
  * a worker that dies (kill -9, lost machine) makes the others stop with one
    line; rerunning every command resumes after the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from pipelines.common import cli
from pipelines.common.errors import UserError

# Errors a collective raises when a peer is gone or unreachable.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.CancelledError,
               tf.errors.AbortedError, tf.errors.DeadlineExceededError,
               tf.errors.InternalError)


class PeerLost(UserError):
  """Another worker stopped or cannot be reached; rerun every worker."""


def _say(message: str) -> None:
  print(f'[train] {message}', file=sys.stderr, flush=True)


def per_example_loss(binary: bool) -> keras.losses.Loss:
  """The compiled loss, per example ([B]), as fit would average it."""
  if binary:
    return keras.losses.BinaryCrossentropy(reduction=None)
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction=None)


def _correct(labels: tf.Tensor, outputs: tf.Tensor, binary: bool) -> tf.Tensor:
  """Number of right predictions in a batch (float32 []), as 'accuracy'."""
  if binary:
    predicted = tf.cast(outputs >= 0.5, tf.float32)
    right = tf.equal(predicted, tf.cast(tf.reshape(labels, tf.shape(outputs)),
                                        tf.float32))
  else:
    right = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32),
                     tf.cast(tf.reshape(labels, [-1]), tf.int32))
  return tf.reduce_sum(tf.cast(right, tf.float32))


class Loop:
  """Distributed train step, local evaluation and cross-worker agreement.

  Args:
    strategy: the MultiWorkerMirroredStrategy the model was built under.
    model: a compiled Keras model (its optimizer is used).
    binary: one sigmoid unit (labels float32 [B, 1]) vs softmax logits.
    global_batch: images per step over all replicas.
    jit_compile: compile the per-replica forward/backward pass with XLA.
  """

  def __init__(self, strategy, model, *, binary: bool, global_batch: int,
               jit_compile: bool = False):
    self.strategy = strategy
    self.model = model
    self.binary = binary
    self.global_batch = global_batch
    self._loss = per_example_loss(binary)
    self._grads = tf.function(self._forward_backward, jit_compile=jit_compile)
    self.train_step = tf.function(self._train_step)
    self._eval_batch = tf.function(self._eval)
    self._broadcast = tf.function(self._broadcast_fn)
    self._sum = tf.function(self._sum_fn)

  def _forward_backward(self, images, labels):
    model = self.model
    with tf.GradientTape() as tape:
      outputs = tf.cast(model(images, training=True), tf.float32)
      per_example = self._loss(labels, outputs)
      loss = tf.nn.compute_average_loss(per_example,
                                        global_batch_size=self.global_batch)
      if model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled = model.optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, model.trainable_variables)
    stats = tf.stack([tf.reduce_sum(per_example),
                      _correct(labels, outputs, self.binary),
                      tf.cast(tf.shape(outputs)[0], tf.float32)])
    return grads, stats

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
    return tf.stack([tf.reduce_sum(self._loss(labels, outputs)),
                     _correct(labels, outputs, self.binary),
                     tf.cast(tf.shape(outputs)[0], tf.float32)])

  def evaluate(self, dataset) -> tuple[float, float]:
    """(mean loss, accuracy) over a local dataset of (images, labels)."""
    total = np.zeros(3)
    for images, labels in dataset:
      total += self._eval_batch(images, labels).numpy()
    return total[0] / total[2], total[1] / total[2]

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


def weights_digest(model) -> str:
  """sha256 (16 hex digits) of the model's weights: equal on every worker."""
  digest = hashlib.sha256()
  for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
  return digest.hexdigest()[:16]


def settings_digest(fingerprint: dict) -> float:
  """A number that is equal on two workers when their settings agree.

  Paths are left out (machines may mount the same data elsewhere).
  """
  kept = {k: v for k, v in fingerprint.items()
          if k not in ('data_dir', 'cache', 'base_weights')}
  text = json.dumps(kept, sort_keys=True, default=str)
  return float(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))


def check_agreement(loop: Loop, *, done: int, fingerprint: dict,
                    model_dir: str) -> None:
  """Every worker must resume from the same state with the same settings."""
  mine = np.array([done, settings_digest(fingerprint)], np.float64)
  chief = loop.broadcast(mine)
  if loop.any_worker(not np.array_equal(mine, chief)):
    raise UserError(
        f'the workers disagree: this one has {done} finished epochs and '
        f'{"the same" if mine[1] == chief[1] else "other"} settings, the '
        f'chief {int(chief[0])} epochs; run the same command (same flags) on '
        f'every machine, with --model_dir={model_dir} on storage they all '
        'share (a network file system or gs://...)')


def fit(loop: Loop, *, iterator, val_ds, resumable, epochs: int,
        steps_per_epoch: int, is_chief: bool,
        tensorboard_dir: Optional[str] = None,
        preempted: Callable[[], bool] = lambda: False) -> str:
  """Trains from resumable's state until done; returns how it ended.

  'done', 'stopped' (early stopping / target accuracy / NaN loss) or
  'preempted' (a SIGTERM on some worker: every worker stops after the same
  step and the cut epoch is not recorded). Raises PeerLost when another
  worker is gone.
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
          return 'preempted'
        total += out[:3]
      val_loss, val_accuracy = loop.evaluate(val_ds)
      val_loss, val_accuracy = loop.broadcast([val_loss, val_accuracy])
      logs = {'accuracy': total[1] / total[2], 'loss': total[0] / total[2],
              'val_accuracy': float(val_accuracy), 'val_loss': float(val_loss)}
      if math.isnan(logs['loss']):  # As TerminateOnNaN, but recorded.
        resumable.stopped_early, resumable.stop_reason = True, 'NaN loss'
      resumable.on_epoch_end(epoch, logs)
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
        return 'stopped'
    return 'done'
  except PEER_ERRORS as e:
    raise PeerLost(
        f'another worker stopped or cannot be reached ({peer_reason(e)}); '
        'rerun the same command on every machine: training resumes after '
        f'epoch {len(resumable.rows)}') from None


def peer_reason(error: Exception) -> str:
  """The line of a collective's error that says what happened to the peer."""
  text = str(getattr(error, 'message', None) or error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  useful = [line for line in lines if not re.match(
      r'(Graph execution error|Detected at node|\[\[|The error could be|'
      r'Additional GRPC)', line)]
  reason = (useful or lines or [type(error).__name__])[0]
  return cli.one_line(re.sub(r'\s*\[\[.*', '', reason), 200)
