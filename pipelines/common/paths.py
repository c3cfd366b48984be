"""Path checks that load TensorFlow only for remote paths (gs://, s3://).

Local paths go through `os`, so a mistyped path is refused in a second, not
after TensorFlow's start-up; remote ones go through `tf.io.gfile`.
"""

import os
import stat


def is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names of a folder (local: byte-safe, never a UnicodeDecodeError)."""
  if is_remote(path):
    return [e.rstrip('/') for e in _gfile().listdir(path)]
  return os.listdir(path)


def read_text(path: str, *, max_bytes: int) -> str:
  """A small UTF-8 text file. ValueError (saying why, after "is") for a
  local path that is not a regular file (a FIFO never blocks, a device is
  never read), is over max_bytes, or is not UTF-8."""
  if is_remote(path):
    with _gfile().GFile(path, 'r') as f:
      return f.read()
  with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), 'rb') as f:
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
      raise ValueError('is not a regular file')
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    raise ValueError(f'is over {max_bytes} bytes')
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'is not UTF-8 text ({e})') from None
