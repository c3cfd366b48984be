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

Resuming checks before it writes anything: `load_state` only reads (a run
with other settings is refused with the settings that differ), and
`restore_weights` loads the checkpoint into the model before training, so a
checkpoint that does not fit the model is refused while the old run's files
are untouched.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Optional

import keras

from pipelines.common import cli
from pipelines.common import paths
from pipelines.common.errors import UserError
from trainer import config as config_lib

CHECKPOINT_DIR = config_lib.CHECKPOINT_DIR
STATE_FILE = config_lib.STATE_FILE
LAST_WEIGHTS = 'last.weights.h5'
BEST_WEIGHTS = 'best.weights.h5'
HISTORY_FILE = config_lib.HISTORY_FILE


class SettingsMismatch(ValueError):
  """The saved run has another fingerprint; `differences` names what differs.

  differences: (key, saved value, current value) for each differing key.
  """

  def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
    super().__init__(message)
    self.differences = differences


class CheckpointMismatch(UserError):
  """The saved weights are missing, damaged, or do not fit the model.

  path: the weights file; detail: what went wrong, in a few words. The
  message is the trainer's (it names --model_dir).
  """

  def __init__(self, message: str, *, path: str, detail: str):
    super().__init__(message)
    self.path = path
    self.detail = detail


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
      fingerprint (other model, data, ...) is refused. Keys only one side
      has (a run saved by another version) are not compared.
    same: optional `same(key, saved, current) -> bool` for values that are
      equal in other spellings; default `==`.
    write: False on the workers of a multi-worker run that are not the
      chief: they keep the same state in memory and write nothing.
  """

  def __init__(self, model_dir: str, *, monitor: str = 'val_loss',
               patience: int = 0, target_accuracy: Optional[float] = None,
               restore_best_weights: bool = True,
               fingerprint: Optional[dict] = None,
               same: Optional[Callable[[str, Any, Any], bool]] = None,
               write: bool = True):
    super().__init__()
    self.write = write
    self.model_dir = model_dir
    self.checkpoint_dir = os.path.join(model_dir, CHECKPOINT_DIR)
    self.monitor = monitor
    self.mode = 'max' if 'acc' in monitor else 'min'
    self.patience = patience
    self.target_accuracy = target_accuracy
    self.restore_best_weights = restore_best_weights
    self.fingerprint = fingerprint or {}
    self._same = same or (lambda key, saved, current: saved == current)
    # Set (e.g. by a SIGTERM handler) to stop after the current batch; the
    # run's state stays that of the last finished epoch.
    self.preempted = False
    self._restored = False
    self.rows: list[dict] = []
    self.best: Optional[float] = None
    self.best_epoch: Optional[int] = None  # 1-based.
    self.wait = 0
    self.stopped_early = False
    self.stop_reason: Optional[str] = None
    self.diverged = False  # The last epoch run had non-finite numbers.
    self.resumed_from = 0
    # Epochs finished before fine-tuning began (--fine_tune_from); None
    # until the first fine-tuning epoch is recorded.
    self.fine_tune_start: Optional[int] = None

  def _path(self, name: str) -> str:
    return os.path.join(self.checkpoint_dir, name)

  def differences(self, saved: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for each key both fingerprints hold that differs."""
    return [(key, saved[key], value) for key, value in self.fingerprint.items()
            if key in saved and not self._same(key, saved[key], value)]

  def load_state(self) -> int:
    """Restores state (not weights) from disk; returns epochs already done.

    Only reads: raises SettingsMismatch for a run with other settings and
    UserError (naming --model_dir) for a damaged state file, before
    anything is written.
    Call `prepare()` afterwards (it also repairs history.csv).
    """
    path = self._path(STATE_FILE)
    if not os.path.isfile(path):
      return 0
    try:
      state = paths.read_json(path)
      saved = state.get('fingerprint') or {}
      differences = self.differences(saved)
      if not differences:
        rows = [dict(r) for r in state['rows']]
        best, best_epoch = state['best'], state['best_epoch']
        wait, stopped_early = int(state['wait']), bool(state['stopped_early'])
        stop_reason = state.get('stop_reason')
        fine_tune_start = state.get('fine_tune_start')
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise UserError(
          f'--model_dir={self.model_dir}: {path} is damaged '
          f'({type(e).__name__}: {e}); delete {self.checkpoint_dir} to start '
          'over, or use a new --model_dir') from None
    if differences:
      raise SettingsMismatch(
          f'{self.model_dir} holds a run with other settings ('
          + '; '.join(f'{k}: {a!r} in the saved run, {b!r} now'
                      for k, a, b in differences)
          + f'); use a new model_dir, or delete {self.checkpoint_dir} to '
          'start over', differences)
    self.rows = rows
    self.best, self.best_epoch = best, best_epoch
    self.wait, self.stopped_early = wait, stopped_early
    self.stop_reason = stop_reason
    self.fine_tune_start = fine_tune_start
    self.resumed_from = len(self.rows)
    return self.resumed_from

  def _load_weights(self, path: str) -> None:
    """Loads a checkpoint into the model; CheckpointMismatch if it cannot.

    The optimizer is built first: the files hold its variables too, and an
    unbuilt optimizer makes Keras skip them with a warning.
    """
    if not os.path.isfile(path):
      raise self._mismatch(path, 'the file is missing')
    try:
      optimizer = getattr(self.model, 'optimizer', None)
      if optimizer is not None and not optimizer.built:
        optimizer.build(self.model.trainable_variables)
      self.model.load_weights(path)
    except Exception as e:  # pylint: disable=broad-except
      # h5py, Keras and TF raise many types for a file of another model or a
      # damaged one; all mean the same to the run.
      detail = f'{type(e).__name__}: ' + cli.one_line(e, 200)
      raise self._mismatch(path, detail) from None

  def _mismatch(self, path: str, detail: str) -> CheckpointMismatch:
    return CheckpointMismatch(
        f'--model_dir={self.model_dir}: its checkpoint {path} does not '
        f'match this model and dataset, or is damaged ({detail}); pass a '
        f'new --model_dir, or delete {self.checkpoint_dir}/ to start over',
        path=path, detail=detail)

  def restore_weights(self) -> None:
    """After load_state: loads the last epoch's model + optimizer state.

    Call it before writing anything (and inside the distribution strategy's
    scope): a checkpoint that does not fit fails here, not inside fit().
    """
    if self.resumed_from and not self._restored:
      self._load_weights(self._path(LAST_WEIGHTS))
      self._restored = True

  def on_train_begin(self, logs=None):
    if self.resumed_from:
      self.restore_weights()
      self.model._initial_epoch = self.resumed_from  # pylint: disable=protected-access

  def _improved(self, value: float) -> bool:
    if self.best is None:
      return True
    return value < self.best if self.mode == 'min' else value > self.best

  def on_train_batch_end(self, batch, logs=None):
    if self.preempted:
      self.model.stop_training = True  # Ends the epoch after this batch.

  def on_epoch_end(self, epoch, logs=None):
    if self.preempted:
      return  # A cut-short epoch is not finished: nothing is recorded.
    logs = dict(logs or {})
    row = {'epoch': epoch + 1, **{k: float(v) for k, v in logs.items()}}
    bad = sorted(k for k, v in row.items() if not math.isfinite(v))
    if bad:
      self._diverged(epoch, row, bad)
      return
    self.rows.append(row)
    value = logs.get(self.monitor)
    if value is not None and not math.isnan(value) and self._improved(value):
      self.best, self.best_epoch, self.wait = float(value), epoch + 1, 0
      if self.write:
        self._save_best()
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
    if self.write:
      self._save(epoch)

  def _diverged(self, epoch: int, row: dict, bad: list) -> None:
    """An epoch whose loss or metrics are not finite (NaN, inf) ended
    training. It is not recorded, and its weights are not saved: the run's
    state stays that of the last finite epoch, with the stop reason, so a
    rerun of the same command ends the same way instead of training on
    NaN weights (the in-memory model is NaN until on_train_end restores
    the best epoch)."""
    shown = ', '.join(f'{k} {row[k]}' for k in bad)
    self.stopped_early, self.stop_reason = True, (
        f'training diverged in epoch {epoch + 1} ({shown})')
    self.diverged = True
    self.model.stop_training = True
    if self.write:
      self._save_state(epoch)

  def _save_best(self) -> None:
    tmp = self._path(BEST_WEIGHTS + '.tmp.weights.h5')
    self.model.save_weights(tmp)
    os.replace(tmp, self._path(BEST_WEIGHTS))

  def _save(self, epoch: int) -> None:
    tmp = self._path('last.tmp.weights.h5')
    self.model.save_weights(tmp)
    os.replace(tmp, self._path(LAST_WEIGHTS))
    self._save_state(epoch + 1)

  def _save_state(self, epochs_done: int) -> None:
    _atomic_write_text(self._path(STATE_FILE), json.dumps({
        'fingerprint': self.fingerprint, 'epochs_done': epochs_done,
        'rows': self.rows, 'best': self.best, 'best_epoch': self.best_epoch,
        'wait': self.wait, 'stopped_early': self.stopped_early,
        'stop_reason': self.stop_reason,
        'fine_tune_start': self.fine_tune_start}, indent=1, allow_nan=False))
    self.write_history()

  def write_history(self) -> None:
    keys = ['epoch'] + sorted({k for r in self.rows for k in r} - {'epoch'})
    tmp = os.path.join(self.model_dir, HISTORY_FILE + '.tmp')
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=keys)
      writer.writeheader()
      writer.writerows(self.rows)
    os.replace(tmp, os.path.join(self.model_dir, HISTORY_FILE))

  def start_fine_tuning(self) -> None:
    """Fine-tuning begins after the epochs recorded so far: early stopping
    starts afresh (its patience counts fine-tuning epochs); the best epoch
    is kept, so the final model is the best of both phases; the next fit
    continues from here without reloading weights."""
    self.fine_tune_start = len(self.rows)
    self.stopped_early, self.stop_reason, self.wait = False, None, 0
    self.resumed_from, self._restored = len(self.rows), True

  def on_train_end(self, logs=None):
    if self.preempted:
      return
    if self.restore_best_weights and os.path.exists(self._path(BEST_WEIGHTS)):
      self._load_weights(self._path(BEST_WEIGHTS))

  def prepare(self) -> None:
    """Creates checkpoint/; after a resume, repairs history.csv."""
    if not self.write:
      return
    os.makedirs(self.checkpoint_dir, exist_ok=True)
    if self.resumed_from:
      # history.csv is written just after state.json: a kill between the
      # two leaves it one row short. The state is the truth; repair from it.
      self.write_history()
