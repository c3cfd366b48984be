"""A preempted trainer (SIGTERM, as cloud GPU machines get) saves, says so
in one line, exits 143, and the same command resumes without losing or
repeating an epoch."""

import csv
import json
import signal
import subprocess
import sys
import time

from pipelines.folder_to_records import builder
from tests import helpers


def _history_epochs(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [int(row['epoch']) for row in csv.DictReader(f)]


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  helpers.make_photo_folder(tmp_path / 'images', per_class=8)
  builder.build(input_dir=str(tmp_path / 'images'),
                output_dir=str(tmp_path / 'data'), image_size='24',
                validation_fraction=0.25, seed=1, quiet=True, samples=False)
  model_dir = tmp_path / 'run'
  args = [f'--data_dir={tmp_path / "data"}', f'--model_dir={model_dir}',
          '--epochs=12', '--batch_size=4', '--early_stopping_patience=0']
  process = subprocess.Popen(
      [sys.executable, '-m', 'trainer.main', *args], cwd=helpers.REPO_ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  state = model_dir / 'checkpoint' / 'state.json'
  deadline = time.time() + 180
  while time.time() < deadline:
    if state.exists() and json.loads(state.read_text())['epochs_done'] >= 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr[-3000:]
  assert 'Traceback' not in stderr
  done = json.loads(state.read_text())['epochs_done']
  assert 2 <= done < 12
  assert f'preempted (SIGTERM) after epoch {done} of 12' in stderr
  assert _history_epochs(model_dir) == list(range(1, done + 1))
  assert not (model_dir / 'metrics.json').exists()  # Not finished: no export.
  result = helpers.run_cli('trainer.main', *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming after epoch {done}' in result.stderr
  assert _history_epochs(model_dir) == list(range(1, 13))
