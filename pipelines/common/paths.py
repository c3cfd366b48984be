"""Path checks that load TensorFlow only for remote paths (gs://, s3://).

Local paths go through `os`, so a mistyped path is refused in a second, not
after TensorFlow's start-up; remote ones go through `tf.io.gfile`.
"""

import os
import posixpath
import shutil
import stat
import urllib.parse

from pipelines.common.errors import UserError
# Defined with the dataset format (which reads metadata.json with them and
# imports nothing of pipelines); the same functions here.
from tfrecords_schema.files import exists  # pylint: disable=unused-import
from tfrecords_schema.files import is_remote  # pylint: disable=unused-import
from tfrecords_schema.files import isdir  # pylint: disable=unused-import
from tfrecords_schema.files import listdir  # pylint: disable=unused-import
from tfrecords_schema.files import makedirs  # pylint: disable=unused-import
from tfrecords_schema.files import open_binary  # pylint: disable=unused-import
from tfrecords_schema.files import NotAFile  # pylint: disable=unused-import
from tfrecords_schema.files import open_regular  # pylint: disable=unused-import
from tfrecords_schema.files import read_json  # pylint: disable=unused-import
from tfrecords_schema.files import SMALL_JSON_BYTES  # pylint: disable=unused-import
from tfrecords_schema.files import special_entry  # pylint: disable=unused-import
from tfrecords_schema.files import special_kind  # pylint: disable=unused-import
from tfrecords_schema.files import read_text  # pylint: disable=unused-import
from tfrecords_schema.files import remove  # pylint: disable=unused-import
from tfrecords_schema.files import write_bytes  # pylint: disable=unused-import
from tfrecords_schema.files import remote as _remote


_FILE_URL = 'file://'
_LOCAL_HOSTS = ('', 'localhost')


def lock_exclusively(path: str, flags: int, *, busy: str) -> int:
  """An open file descriptor of local `path` (os.open with flags, mode 0o644
  for a file it creates) holding an exclusive flock, or UserError(busy)
  when another process holds it. The kernel drops the lock when the
  descriptor is closed or the process ends (kill -9 included)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  fd = os.open(path, flags, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise UserError(busy) from None
  return fd


def is_within(path: str, parent: str, *,
              backslash_separates: bool = False) -> bool:
  """True when path is parent or below it, compared as normalized
  '/'-separated text (pass real paths to see through links).
  backslash_separates: a '\\' separates names too (the build's overlap check
  of --input_dir and --output_dir)."""
  if backslash_separates:
    path, parent = path.replace('\\', '/'), parent.replace('\\', '/')
  path, parent = posixpath.normpath(path), posixpath.normpath(parent)
  return path == parent or path.startswith(parent.rstrip('/') + '/')


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
