"""Crash-safe training state: checkpoints, history, early stopping, resume.

One callback owns everything that must survive a kill, so it can be saved
atomically at the end of each epoch and restored together:

  checkpoint/last.weights.h5   model + optimizer after the last finished epoch
  checkpoint/best.weights.h5   the best epoch so far (by the monitored metric)
  checkpoint/state.json        epochs done, history rows, early-stopping state
  history.csv                  one row per finished epoch (column `epoch`)

state.json is written last (write to a temp file, then rename): it is the
commit point. Rerunning after a kill restores the weights, optimizer, epoch
counter, history and early-stopping counters of the last finished epoch, so
the history has no repeated or missing epochs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

import keras

CHECKPOINT_DIR = 'checkpoint'
STATE_FILE = 'state.json'
LAST_WEIGHTS = 'last.weights.h5'
BEST_WEIGHTS = 'best.weights.h5'
HISTORY_FILE = 'history.csv'


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class ResumableTraining(keras.callbacks.Callback):
  """Checkpoint + history + early stopping + target accuracy, resumable.

  Args:
    model_dir: where checkpoint/ and history.csv live.
    monitor: metric for early stopping and the best epoch ('val_loss',
      'val_accuracy', ...); 'loss'-like metrics are minimized.
    patience: epochs without improvement before stopping (0 = never).
    target_accuracy: stop once training accuracy reaches it (the course's
      "stop at 99%" callback); None to disable.
    restore_best_weights: load the best epoch's weights when training ends.
    fingerprint: a dict describing the run; resuming a run with another
      fingerprint (other model, data, ...) is refused.
  """

  def __init__(self, model_dir: str, *, monitor: str = 'val_loss',
               patience: int = 0, target_accuracy: Optional[float] = None,
               restore_best_weights: bool = True,
               fingerprint: Optional[dict] = None):
    super().__init__()
    self.model_dir = model_dir
    self.checkpoint_dir = os.path.join(model_dir, CHECKPOINT_DIR)
    self.monitor = monitor
    self.mode = 'max' if 'acc' in monitor else 'min'
    self.patience = patience
    self.target_accuracy = target_accuracy
    self.restore_best_weights = restore_best_weights
    self.fingerprint = fingerprint or {}
    self.rows: list[dict] = []
    self.best: Optional[float] = None
    self.best_epoch: Optional[int] = None  # 1-based.
    self.wait = 0
    self.stopped_early = False
    self.stop_reason: Optional[str] = None
    self.resumed_from = 0

  def _path(self, name: str) -> str:
    return os.path.join(self.checkpoint_dir, name)

  def load_state(self) -> int:
    """Restores state (not weights) from disk; returns epochs already done."""
    path = self._path(STATE_FILE)
    if not os.path.exists(path):
      return 0
    with open(path) as f:
      state = json.load(f)
    if state.get('fingerprint') != self.fingerprint:
      raise ValueError(
          f'{self.model_dir} holds a run with other settings '
          f'({state.get("fingerprint")}); use a new --model_dir, or delete '
          'it to start over')
    self.rows = state['rows']
    self.best, self.best_epoch = state['best'], state['best_epoch']
    self.wait = state['wait']
    self.stopped_early = state['stopped_early']
    self.stop_reason = state.get('stop_reason')
    self.resumed_from = len(self.rows)
    # history.csv is written just after state.json: a kill between the two
    # leaves it one row short. The state is the truth; repair from it.
    self.write_history()
    return self.resumed_from

  @property
  def finished(self) -> bool:
    """True when a previous run already stopped (early or at a target)."""
    return self.stopped_early

  def on_train_begin(self, logs=None):
    if self.resumed_from and os.path.exists(self._path(LAST_WEIGHTS)):
      self.model.optimizer.build(self.model.trainable_variables)
      self.model.load_weights(self._path(LAST_WEIGHTS))
      self.model._initial_epoch = self.resumed_from  # pylint: disable=protected-access

  def _improved(self, value: float) -> bool:
    if self.best is None:
      return True
    return value < self.best if self.mode == 'min' else value > self.best

  def on_epoch_end(self, epoch, logs=None):
    logs = dict(logs or {})
    row = {'epoch': epoch + 1, **{k: float(v) for k, v in logs.items()}}
    self.rows.append(row)
    value = logs.get(self.monitor)
    if value is not None and not math.isnan(value) and self._improved(value):
      self.best, self.best_epoch, self.wait = float(value), epoch + 1, 0
      self.model.save_weights(self._path(BEST_WEIGHTS + '.tmp.weights.h5'))
      os.replace(self._path(BEST_WEIGHTS + '.tmp.weights.h5'),
                 self._path(BEST_WEIGHTS))
    else:
      self.wait += 1
    if self.patience and self.wait >= self.patience:
      self.stopped_early, self.stop_reason = True, (
          f'no {self.monitor} improvement in {self.patience} epochs')
    accuracy = logs.get('accuracy')
    if (self.target_accuracy is not None and accuracy is not None and
        accuracy >= self.target_accuracy):
      self.stopped_early, self.stop_reason = True, (
          f'training accuracy {accuracy:.4f} reached --target_accuracy='
          f'{self.target_accuracy}')
    if self.stopped_early:
      self.model.stop_training = True
    self._save(epoch)

  def _save(self, epoch: int) -> None:
    tmp = self._path('last.tmp.weights.h5')
    self.model.save_weights(tmp)
    os.replace(tmp, self._path(LAST_WEIGHTS))
    _atomic_write_text(self._path(STATE_FILE), json.dumps({
        'fingerprint': self.fingerprint, 'epochs_done': epoch + 1,
        'rows': self.rows, 'best': self.best, 'best_epoch': self.best_epoch,
        'wait': self.wait, 'stopped_early': self.stopped_early,
        'stop_reason': self.stop_reason}, indent=1))
    self.write_history()

  def write_history(self) -> None:
    keys = ['epoch'] + sorted({k for r in self.rows for k in r} - {'epoch'})
    tmp = os.path.join(self.model_dir, HISTORY_FILE + '.tmp')
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=keys)
      writer.writeheader()
      writer.writerows(self.rows)
    os.replace(tmp, os.path.join(self.model_dir, HISTORY_FILE))

  def on_train_end(self, logs=None):
    if self.restore_best_weights and os.path.exists(self._path(BEST_WEIGHTS)):
      self.model.load_weights(self._path(BEST_WEIGHTS))

  def prepare(self) -> None:
    os.makedirs(self.checkpoint_dir, exist_ok=True)
