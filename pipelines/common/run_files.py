"""The names a training run (trainer.main's --model_dir) writes, defined once.

TensorFlow-free and without the trainer, so the build can tell a training
run from a folder of images (a run inside --input_dir would otherwise turn
checkpoint/, export/ and tensorboard/ into classes).
"""

import os

CHECKPOINT_DIR = 'checkpoint'
STATE_FILE = 'state.json'  # In CHECKPOINT_DIR: the resume state.
EXPORT_DIR = 'export'
MODEL_CONFIG_FILE = 'model_config.json'
TENSORBOARD_DIR = 'tensorboard'


def is_training_run(folder: str) -> bool:
  """True for a local --model_dir of trainer.main (resumable or finished)."""
  return (os.path.isfile(os.path.join(folder, CHECKPOINT_DIR, STATE_FILE)) or
          os.path.isfile(os.path.join(folder, MODEL_CONFIG_FILE)))
