"""Shared absl entry-point helpers: one-line errors, quiet output, sizes.

Imports neither Beam nor TensorFlow, so every command starts fast.
"""

import atexit
import os
import re
import sys
import threading
from typing import Optional

from absl import flags
from absl import logging

from pipelines.common.errors import UserError

MAX_IMAGE_SIDE = 8192

# Start-up chatter of TensorFlow's C++ runtime and Beam's worker processes
# that says nothing to a user (a CPU machine has no CUDA driver; a Beam
# worker announces its channels). Matched against whole stderr lines.
_NOISE = re.compile('|'.join([
    r'^INFO:',  # Python logging's default format: Beam worker processes.
    r'All log messages before absl::InitializeLog\(\) is called',
    r'Could not find cuda drivers on your machine',
    r'failed call to cuInit',
    r'cpu_feature_guard\.cc',
    r'^To enable the following instructions:',
    r'oneDNN custom operations are on',
    r'Unable to register cu(DNN|FFT|BLAS) factory',
    r'apitools not found',
    r'semi_persistent_directory',
    r'computation placer already registered',
]))


def _forward(read_fd: int, write_fd: int) -> None:
  with os.fdopen(read_fd, 'rb') as pipe:
    for line in pipe:
      if not _NOISE.search(line.decode('utf-8', 'replace')):
        os.write(write_fd, line)


_UNFILTERED_STDERR = 2  # The real stderr once filter_noise has run.


def unfiltered_stderr() -> int:
  """A file descriptor of the real stderr (for a helper process whose last
  words must get out even when this process is killed)."""
  return _UNFILTERED_STDERR


def filter_noise() -> None:
  """Drops known start-up chatter from this process's (and children's) stderr.

  TensorFlow's C++ runtime prints CUDA-driver lines before its log level is
  read, and Beam's worker processes log their set-up at INFO to the stderr
  they inherit, so neither can be silenced by a setting. stderr (fd 2) is
  routed through a pipe; a thread forwards every line that is not noise.
  Everything else, warnings and tracebacks included, still gets through.
  `--verbosity=...` (or -v) on the command line turns the filter off.
  """
  if any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  global _UNFILTERED_STDERR
  original = os.dup(2)
  _UNFILTERED_STDERR = original
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  thread = threading.Thread(target=_forward, args=(read_fd, original),
                            daemon=True)
  thread.start()

  def restore():
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)  # Closes the pipe's last write end held here.
    thread.join(timeout=2)

  atexit.register(restore)


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


def parse_image_size(text: str, flag: str = 'image_size') -> tuple[int, int]:
  """'150' -> (150, 150); '300,200' or '300x200' -> (height=300, width=200)."""
  parts = [p.strip() for p in re.split(r'[,x]', str(text).strip())]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) == 1:
    sizes = sizes * 2
  if len(sizes) != 2 or not all(1 <= s <= MAX_IMAGE_SIDE for s in sizes):
    raise UserError(
        f'--{flag}={text} is not a size; pass one number (150) or '
        f'HEIGHT,WIDTH (300,200), each between 1 and {MAX_IMAGE_SIDE}')
  return sizes[0], sizes[1]


def port_in_use(port: int) -> Optional[str]:
  """Why `port` cannot be listened on here (e.g. 'Address already in use'),
  or None when it is free."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(('', port))
    except OSError as e:
      return e.strerror or str(e)
  return None


def one_line(text, limit: Optional[int] = None) -> str:
  """Any message (an exception too) as one line, white space collapsed, cut
  at `limit` characters: error lines must stay one line."""
  return ' '.join(str(text).split())[:limit]
