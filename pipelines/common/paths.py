"""Path checks that load TensorFlow only for remote paths (gs://, s3://).

Local paths go through `os`, so a mistyped path is refused in a second, not
after TensorFlow's start-up; remote ones go through `tf.io.gfile`.
"""

import os
import shutil
import stat
import urllib.parse

from pipelines.common.errors import UserError


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


_FILE_URL = 'file://'
_LOCAL_HOSTS = ('', 'localhost')


def _file_url_path(url: str) -> str:
  """The local path of file:///abs or file://localhost/abs, percent-decoded
  (file:///a%20b is '/a b'). The rest is taken as path text: a '?' or '#'
  stays in the name instead of silently cutting it off. UserError for a
  file URL of another host or without a path."""
  host, slash, rest = url[len(_FILE_URL):].partition('/')
  if host.lower() not in _LOCAL_HOSTS:
    raise UserError(
        f'{url!r} names the host {host!r}: only local file URLs are read '
        '(file:///abs/path or file://localhost/abs/path); pass the path '
        'itself, or mount that host\'s folder here')
  if not slash:
    raise UserError(f'{url!r} names no path: write file:///abs/path or '
                    'the plain path')
  return urllib.parse.unquote('/' + rest, errors='surrogateescape')


def expand(path: str) -> str:
  """A user's path flag as the tools use it.

  `~` and `~user` are expanded (local paths only); file:///abs and
  file://localhost/abs become the local path /abs, percent-decoded as in a
  file URL; other schemes (gs://, s3://) and '' are returned unchanged, so
  overlap checks and messages compare and show real paths. UserError for a
  file URL that names another host or no path.
  """
  if path[:len(_FILE_URL)].lower() == _FILE_URL:
    return _file_url_path(path)
  if is_remote(path):
    return path
  return os.path.expanduser(path)


def _check_regular(info: os.stat_result) -> None:
  for is_kind, kind in _FILE_KINDS:
    if is_kind(info.st_mode):
      raise NotAFile(kind)


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


def _remote(path: str, call):
  """call(tf.io.gfile); TensorFlow's errors (not found, denied) as OSError,
  as the local calls raise them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return call(tf.io.gfile)
  except tf.errors.OpError as e:
    raise OSError(f'{path}: {e.message}') from None


def exists(path: str) -> bool:
  if is_remote(path):
    return _remote(path, lambda gfile: gfile.exists(path))
  return os.path.exists(path)


def isdir(path: str) -> bool:
  if is_remote(path):
    return _remote(path, lambda gfile: gfile.isdir(path))
  return os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names of a folder (local: byte-safe, never a UnicodeDecodeError)."""
  if is_remote(path):
    return [e.rstrip('/') for e in _remote(path, lambda g: g.listdir(path))]
  return os.listdir(path)


# Kinds of folder entries, as list_entries names them.
FILE, FOLDER, LINK, OTHER = 'file', 'folder', 'link', 'other'


def _kind(mode: int) -> str:
  if stat.S_ISLNK(mode):
    return LINK
  if stat.S_ISDIR(mode):
    return FOLDER
  return FILE if stat.S_ISREG(mode) else OTHER


def list_entries(path: str) -> list[tuple[str, str]]:
  """(name, kind) of each entry of a folder, sorted; kind is FILE, FOLDER,
  LINK (never followed) or OTHER (FIFO, socket, device). Object stores have
  no links: their entries are FOLDER when listed with a trailing '/', else
  FILE."""
  if is_remote(path):
    names = _remote(path, lambda gfile: gfile.listdir(path))
    return sorted((n.rstrip('/'), FOLDER if n.endswith('/') else FILE)
                  for n in names)
  with os.scandir(path) as it:
    return sorted((e.name, _kind(e.stat(follow_symlinks=False).st_mode))
                  for e in it)


def remove_tree(path: str) -> None:
  """Removes a folder and everything in it. Local links inside are unlinked,
  never followed: tf.io.gfile.rmtree follows a link to a folder and empties
  the folder it points to, so it is used for object stores only."""
  if is_remote(path):
    _remote(path, lambda gfile: gfile.rmtree(path))
  else:
    shutil.rmtree(path)


def read_text(path: str, *, max_bytes: int) -> str:
  """A small UTF-8 text file. ValueError (saying why, after "is") for a
  local path that is not a regular file (a FIFO never blocks, a device is
  never read), is over max_bytes, or is not UTF-8; OSError when it cannot
  be opened (remote errors too)."""
  if is_remote(path):
    def read(gfile):
      with gfile.GFile(path, 'r') as f:
        return f.read()
    return _remote(path, read)
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
