"""A stopped trainer loses no finished epoch and repeats none: a preemption
(SIGTERM, as cloud GPU machines get) saves, says so in one line and exits
143; a kill -9 keeps every finished epoch; each time the same command
resumes after the last one."""

import csv
import json
import signal
import subprocess
import sys
import time

from tests import helpers

_EPOCHS = 12


def _history_epochs(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [int(row['epoch']) for row in csv.DictReader(f)]


def _start_and_stop(args, state, *, after: int, how: signal.Signals):
  """Starts the trainer, sends `how` once `after` epochs are saved."""
  process = subprocess.Popen(
      [sys.executable, '-m', 'trainer.main', *args], cwd=helpers.REPO_ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 180
  while time.time() < deadline and process.poll() is None:
    if state.exists() and json.loads(state.read_text())['epochs_done'] >= after:
      break
    time.sleep(0.05)
  process.send_signal(how)
  out, err = process.communicate(timeout=120)
  return process.returncode, out + err


def test_sigterm_and_kill_save_and_the_same_command_resumes(tmp_path):
  data = helpers.write_tiny_dataset(
      tmp_path / 'data', classes={'cats': 'chelsea', 'rockets': 'rocket'},
      per_class={'train': 12, 'validation': 6}, size=24).path
  model_dir = tmp_path / 'run'
  args = [f'--data_dir={data}', f'--model_dir={model_dir}',
          f'--epochs={_EPOCHS}', '--batch_size=4',
          '--early_stopping_patience=0']
  state = model_dir / 'checkpoint' / 'state.json'

  # Preempted: saves after the step, one line, exit 143, no export.
  status, output = _start_and_stop(args, state, after=2, how=signal.SIGTERM)
  assert status == 143, output[-3000:]
  assert 'Traceback' not in output
  done = json.loads(state.read_text())['epochs_done']
  assert 2 <= done < _EPOCHS - 3
  assert f'preempted (SIGTERM) after epoch {done} of {_EPOCHS}' in output
  assert _history_epochs(model_dir) == list(range(1, done + 1))
  assert not (model_dir / 'metrics.json').exists()

  # Resumed, then killed outright: finished epochs survive, in order.
  status, output = _start_and_stop(args, state, after=done + 2,
                                   how=signal.SIGKILL)
  assert status == -signal.SIGKILL
  assert f'resuming after epoch {done}' in output
  saved = json.loads(state.read_text())
  killed_at = saved['epochs_done']
  assert done + 2 <= killed_at < _EPOCHS
  assert [r['epoch'] for r in saved['rows']] == list(range(1, killed_at + 1))

  # The same command finishes the run without repeating an epoch.
  result = helpers.run_cli('trainer.main', *args)
  output = result.stdout + result.stderr
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming after epoch {killed_at}' in output
  assert f'Epoch {killed_at + 1}/{_EPOCHS}' in output
  assert f'Epoch {killed_at}/{_EPOCHS}' not in output
  assert _history_epochs(model_dir) == list(range(1, _EPOCHS + 1))
  assert (model_dir / 'metrics.json').exists()
