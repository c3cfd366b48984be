"""Shared absl entry-point helpers: one-line flag errors, quiet logs."""

import sys

from absl import flags
from absl import logging


def flags_parser(*, known_only: bool):
  """An `app.run(flags_parser=...)` that turns flag errors into one line.

  known_only=True leaves unknown flags in argv (the build passes them to
  Beam).
  """

  def parse(argv):
    try:
      return flags.FLAGS(argv, known_only=known_only)
    except flags.Error as e:
      sys.exit(f'error: {e}')

  return parse


def quiet_logs() -> None:
  """WARNING and up from absl/Beam/TF Python loggers unless --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
