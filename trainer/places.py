"""Where a run may live: --data_dir and --model_dir checked against each
other, the dataset's photo folder and any dataset around them.

TensorFlow-free: trainer.main calls these before TensorFlow loads, so a
misplaced folder is refused in a second, before anything is written.
"""

from __future__ import annotations

import os
from typing import Optional

from pipelines.common import paths
from pipelines.common import run_files
from pipelines.common.errors import UserError
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
from trainer import config as config_lib


def _read_json(path: str) -> Optional[dict]:
  try:
    data = paths.read_json(path)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def check_data_dir_is_not_a_run(data_dir: str) -> None:
  """UserError naming the dataset a run trained on when --data_dir is that
  run's --model_dir (and no dataset)."""
  if (paths.is_remote(data_dir) or not run_files.is_training_run(data_dir) or
      os.path.exists(os.path.join(data_dir, metadata_lib.METADATA_FILE))):
    return
  state = _read_json(os.path.join(data_dir, config_lib.CHECKPOINT_DIR,
                                  config_lib.STATE_FILE)) or {}
  trained_on = (state.get('fingerprint') or {}).get('data_dir') or 'DATASET'
  raise UserError(
      f'--data_dir={data_dir} is a training run (a --model_dir), not a '
      f'dataset; pass the dataset it was trained on: --data_dir={trained_on}')


def _photo_folder(data_dir: str) -> Optional[str]:
  """The --input_dir the dataset was built from (its build report)."""
  report = report_lib.read_build_report(data_dir, ours_only=False,
                                        max_bytes=paths.SMALL_JSON_BYTES)
  source = report.input_dir if report else ''
  return os.path.realpath(source) if source and not (
      paths.is_remote(source)) else None


def _dataset_around(folder: str) -> Optional[str]:
  """The nearest folder at or above `folder` that holds a built dataset."""
  current = folder
  while True:
    if os.path.isfile(os.path.join(current, metadata_lib.METADATA_FILE)):
      meta = _read_json(os.path.join(current, metadata_lib.METADATA_FILE))
      if meta and meta.get('toolkit') == metadata_lib.TOOLKIT_MARKER:
        return current
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent


def check_model_dir_place(model_dir: str, data_dir: str) -> None:
  """Refuses a --model_dir on an object store, and one that is, is inside
  or holds a dataset folder or the photo folder the dataset was built from.

  A run inside a dataset is deleted by the rebuild the trainer's own hints
  suggest (--overwrite); a run inside the photo folder becomes classes
  (checkpoint/, export/) at the next build; a run folder that holds them
  mixes the run's files with the user's data.
  """
  if paths.is_remote(model_dir):
    raise UserError(
        f'--model_dir={model_dir} is on an object store, which cannot rename '
        'files: a run moves each checkpoint and its state into place once '
        'whole; give a local folder (or a shared file system mounted on '
        'every machine, e.g. with gcsfuse) and copy the finished run to the '
        'bucket')
  run = os.path.realpath(model_dir)
  places = {}
  if not paths.is_remote(data_dir):
    places[os.path.realpath(data_dir)] = f'the dataset --data_dir={data_dir}'
    photos = _photo_folder(data_dir)
    if photos:
      places[photos] = (f'the photo folder {photos} that --data_dir='
                        f'{data_dir} was built from')
  around = _dataset_around(run)
  if around:
    places.setdefault(around, f'the dataset folder {around}')
  for place, what in places.items():
    if paths.is_within(run, place):
      relation = 'is' if run == place else 'is inside'
    elif paths.is_within(place, run):
      relation = 'holds'
    else:
      continue
    raise UserError(
        f'--model_dir={model_dir} {relation} {what}; a run must live apart '
        'from datasets and photos (a rebuild with --overwrite would delete '
        'it, and a build would read its files as images): pass a --model_dir '
        'outside both, e.g. runs/NAME')
