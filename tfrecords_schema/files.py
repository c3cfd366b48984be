"""Small file reads that load TensorFlow only for remote paths (gs://, s3://).

Local paths go through `os`, so a mistyped path is refused in a second, not
after TensorFlow's start-up; remote ones go through `tf.io.gfile`. The
dataset format reads its metadata with these; pipelines.common.paths
re-exports them with the build's other path helpers.
"""

import json
import os
import stat
from typing import Optional

# Extension (lower case) -> the Pillow format it promises: the files a
# build reads as images (pipelines.preprocessing.source_image checks the
# promise; listing and trainer.predict pick files by it). MPO is what many
# cameras write into .jpg files (JPEG with a second preview frame).
IMAGE_EXTENSION_FORMATS = {
    '.jpg': 'JPEG', '.jpeg': 'JPEG', '.jpe': 'JPEG', '.jfif': 'JPEG',
    '.png': 'PNG', '.bmp': 'BMP', '.gif': 'GIF', '.webp': 'WEBP',
}


# What a local path can be instead of a regular file, as error text says it.
_FILE_KINDS = ((stat.S_ISFIFO, 'a FIFO (named pipe)'),
               (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'),
               (stat.S_ISSOCK, 'a socket'),
               (stat.S_ISDIR, 'a folder'))


class NotAFile(ValueError):
  """A local path that is not a regular file; str(e) says what it is."""


def is_remote(path: str) -> bool:
  return '://' in path


def _check_regular(info: os.stat_result) -> None:
  for is_kind, kind in _FILE_KINDS:
    if is_kind(info.st_mode):
      raise NotAFile(kind)


def special_entry(folder: str) -> Optional[tuple[str, str]]:
  """(path, what it is) of the first entry below a local folder that is a
  FIFO, a device or a socket (links followed to what they point at), or
  None (also for remote folders, which hold objects only).

  For folders a tool hands to code that opens every file in it blindly
  (TensorFlow's SavedModel and checkpoint readers, TFDS, Beam, the run's
  own writers): a FIFO there blocks its reader or writer forever, a link to
  /dev/zero never ends. Folders are walked, links to folders not followed.
  """
  if is_remote(folder):
    return None
  for root, folders, names in os.walk(folder):
    for name in sorted(names + folders):
      path = os.path.join(root, name)
      kind = special_kind(path)
      if kind:
        return path, kind
  return None


def special_kind(path: str) -> Optional[str]:
  """What a local path is (link followed) when it is a FIFO, a device or a
  socket, as error text says it; None for a regular file, a folder or a
  dangling link (nothing to block on)."""
  try:
    info = os.stat(path)
  except OSError:
    return None
  if stat.S_ISDIR(info.st_mode):
    return None
  try:
    _check_regular(info)
  except NotAFile as e:
    return str(e)
  return None


def open_regular(path: str):
  """(unbuffered binary file, its fstat) of a local regular file, opened so
  that nothing can block or be read by accident: devices are refused from
  stat before any open; a FIFO swapped in after that is opened O_NONBLOCK
  (no wait for a writer) and refused from fstat. NotAFile, or OSError when
  the path cannot be opened. The file is blocking again once returned."""
  _check_regular(os.stat(path))
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  f = os.fdopen(fd, 'rb', buffering=0)
  try:
    info = os.fstat(fd)
    _check_regular(info)
    os.set_blocking(fd, True)
  except BaseException:
    f.close()
    raise
  return f, info


def remote(path: str, call):
  """call(tf.io.gfile); TensorFlow's errors (not found, denied) as OSError,
  as the local calls raise them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return call(tf.io.gfile)
  except tf.errors.OpError as e:
    raise OSError(f'{path}: {e.message}') from None


def exists(path: str) -> bool:
  if is_remote(path):
    return remote(path, lambda gfile: gfile.exists(path))
  return os.path.exists(path)


def isdir(path: str) -> bool:
  if is_remote(path):
    return remote(path, lambda gfile: gfile.isdir(path))
  return os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names of a folder (local: byte-safe, never a UnicodeDecodeError)."""
  if is_remote(path):
    return [e.rstrip('/') for e in remote(path, lambda g: g.listdir(path))]
  return os.listdir(path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole small file (a picture, a page): local through `open`,
  remote through `tf.io.gfile` (Pillow and matplotlib open local paths only,
  so they render into memory and hand the bytes here)."""
  if is_remote(path):
    def write(gfile):
      with gfile.GFile(path, 'wb') as f:
        f.write(data)
    remote(path, write)
    return
  with open(path, 'wb') as f:
    f.write(data)


def open_binary(path: str):
  """A file opened for reading bytes: local through `open`, remote through
  `tf.io.gfile`."""
  if is_remote(path):
    return remote(path, lambda gfile: gfile.GFile(path, 'rb'))
  return open(path, 'rb')  # pylint: disable=consider-using-with


def remove(path: str) -> None:
  """Removes one file (local: unlinked; a link itself, never its target)."""
  if is_remote(path):
    remote(path, lambda gfile: gfile.remove(path))
    return
  os.unlink(path)


def makedirs(path: str) -> None:
  """A folder and its parents, made where missing."""
  if is_remote(path):
    remote(path, lambda gfile: gfile.makedirs(path))
    return
  os.makedirs(path, exist_ok=True)


# The JSON files the tools read back from folders they wrote (a run's
# state.json and metrics.json, an import's source file): KBs; one larger
# was not written by them.
SMALL_JSON_BYTES = 1 << 26


def read_json(path: str, *, max_bytes: int = SMALL_JSON_BYTES):
  """A small JSON file, read as read_text reads (a FIFO or device in its
  place is refused without blocking, nothing past max_bytes is read).
  ValueError (saying why) when it is not such a file or not JSON; OSError
  when it cannot be opened."""
  return json.loads(read_text(path, max_bytes=max_bytes))


def read_text(path: str, *, max_bytes: int) -> str:
  """A small UTF-8 text file. ValueError (saying why, after "is") for a
  local path that is not a regular file (a FIFO never blocks, a device is
  never read), is over max_bytes, or is not UTF-8; OSError when it cannot
  be opened (remote errors too)."""
  if is_remote(path):
    def read(gfile):
      with gfile.GFile(path, 'r') as f:
        return f.read()
    return remote(path, read)
  try:
    f, _ = open_regular(path)
  except NotAFile as e:
    raise ValueError(f'is not a regular file but {e}') from None
  with f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    raise ValueError(f'is over {max_bytes} bytes')
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'is not UTF-8 text ({e})') from None
