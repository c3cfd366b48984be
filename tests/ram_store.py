"""An object store inside the test process: TensorFlow's ram:// file system,
reachable from the build's three file layers the way gs:// is.

A build touches an object store through Beam's FileSystems (workers),
tf.io.gfile (the launcher) and etils' epath (TFDS's metadata writer). ram://
is in tf.io.gfile only; `RamFileSystem` serves it to Beam and `use()`
registers it with epath. Two ways ram:// differs from gs:// are evened out,
so the build meets an object store's behaviour and not TensorFlow's:
  * writing a file again appends to it there; an object store replaces the
    object (`use()` makes ram:// replace);
  * its reader raises OutOfRangeError at the end of a file; Beam's gcsio
    reader is a Python file that returns b'' (`_Reader`);
  * a file opened for writing and closed with nothing written is not
    made; an object store holds an empty object.
In-process runners only: each process has its own ram://.
"""

from __future__ import annotations

import io
import os
import posixpath

from apache_beam.io import filesystem
import tensorflow as tf

SCHEME = 'ram'


class _Reader(io.RawIOBase):
  """A tf.io.gfile.GFile as a raw Python binary file (b'' at the end)."""

  def __init__(self, gfile, size: int):
    super().__init__()
    self._file, self._size, self._position = gfile, size, 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._position

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position,
            io.SEEK_END: self._size}[whence]
    self._position = max(0, base + offset)
    return self._position

  def readinto(self, buffer):
    count = min(len(buffer), self._size - self._position)
    if count <= 0:
      return 0
    self._file.seek(self._position)
    data = self._file.read(count)
    buffer[:len(data)] = data
    self._position += len(data)
    return len(data)

  def close(self):
    self._file.close()
    super().close()


class RamFileSystem(filesystem.FileSystem):
  """Beam's view of ram:// (an object store: flat names, prefix listing)."""

  # Tests set this to make reads of matching paths fail as a remote read
  # can (an error that is not an OSError).
  failing_reads = None

  @classmethod
  def scheme(cls):
    return SCHEME

  def join(self, basepath, *paths):
    return posixpath.join(basepath, *paths)

  def split(self, path):
    return posixpath.split(path)

  def mkdirs(self, path):
    tf.io.gfile.makedirs(path)

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    base = (dir_or_prefix if dir_or_prefix.endswith('/')
            else posixpath.dirname(dir_or_prefix)).rstrip('/')
    if not tf.io.gfile.isdir(base):
      return
    for root, _, names in tf.io.gfile.walk(base):
      for name in names:
        path = posixpath.join(root, name)
        if path.startswith(dir_or_prefix):
          yield self.metadata(path)

  def _open(self, path, mode, compression_type):
    compression_type = filesystem.FileSystem._get_compression_type(  # pylint: disable=protected-access
        path, compression_type)
    if mode == 'rb' and self.failing_reads and self.failing_reads(path):
      raise RuntimeError(f'{path}: 503 Service Unavailable (test)')
    raw = tf.io.gfile.GFile(path, mode)
    if mode == 'rb':
      raw = io.BufferedReader(_Reader(raw, tf.io.gfile.stat(path).length))
    if compression_type == filesystem.CompressionTypes.UNCOMPRESSED:
      return raw
    return filesystem.CompressedFile(raw, compression_type=compression_type)

  def create(self, path, mime_type='application/octet-stream',
             compression_type=filesystem.CompressionTypes.AUTO):
    f = self._open(path, 'wb', compression_type)
    f.write(b'')  # The object exists once closed, even when left empty.
    return f

  def open(self, path, mime_type='application/octet-stream',
           compression_type=filesystem.CompressionTypes.AUTO):
    return self._open(path, 'rb', compression_type)

  def copy(self, source_file_names, destination_file_names):
    for source, destination in zip(source_file_names, destination_file_names):
      tf.io.gfile.copy(source, destination, overwrite=True)

  def rename(self, source_file_names, destination_file_names):
    for source, destination in zip(source_file_names, destination_file_names):
      tf.io.gfile.rename(source, destination, overwrite=True)

  def exists(self, path):
    return tf.io.gfile.exists(path)

  def size(self, path):
    return tf.io.gfile.stat(path).length

  def last_updated(self, path):
    return tf.io.gfile.stat(path).mtime_nsec / 1e9

  def checksum(self, path):
    return str(self.size(path))

  def metadata(self, path):
    stat = tf.io.gfile.stat(path)
    return filesystem.FileMetadata(path, stat.length, stat.mtime_nsec / 1e9)

  def delete(self, paths):
    errors = {}
    for path in paths:
      try:
        if tf.io.gfile.isdir(path):
          tf.io.gfile.rmtree(path)
        else:
          tf.io.gfile.remove(path)
      except tf.errors.OpError as e:
        errors[path] = e
    if errors:
      raise filesystem.BeamIOError('Delete failed', errors)


def use(monkeypatch) -> None:
  """Makes ram:// an object store for this test (undone after it)."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  from etils.epath import register  # pylint: disable=g-import-not-at-top
  from tensorflow.python.lib.io import file_io  # pylint: disable=g-import-not-at-top
  prefix = f'{SCHEME}://'
  # epath maps gs://bucket to /gs/bucket and back, and picks tf.io.gfile
  # for the schemes it knows; ram:// is given the same treatment.
  monkeypatch.setattr(gpath, '_URI_PREFIXES', gpath._URI_PREFIXES + (prefix,))  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {SCHEME})  # pylint: disable=protected-access
  monkeypatch.setitem(gpath._URI_MAP_ROOT, prefix, f'/{SCHEME}/')  # pylint: disable=protected-access
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, SCHEME,  # pylint: disable=protected-access
                      gpath._PREFIX_TO_BACKEND['gs'])  # pylint: disable=protected-access
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, prefix, gpath.PosixGPath)  # pylint: disable=protected-access
  opened = file_io.FileIO.__init__

  def replacing(self, name, mode='r'):
    path = os.fsdecode(file_io.compat.path_to_str(name))
    if (path.startswith(prefix) and 'w' in mode
        and file_io.file_exists_v2(path)):
      file_io.delete_file_v2(path)
    opened(self, name, mode)

  monkeypatch.setattr(file_io.FileIO, '__init__', replacing)
  monkeypatch.setattr(RamFileSystem, 'failing_reads', None)


def copy_out(remote: str, local: str) -> None:
  """Copies a ram:// folder's files into a new local folder."""
  tf.io.gfile.makedirs(local)
  for name in tf.io.gfile.listdir(remote):
    tf.io.gfile.copy(posixpath.join(remote, name),
                     posixpath.join(local, name))


def copy_in(local: str, remote: str) -> None:
  """Copies a local folder's files (recursively) to a ram:// folder."""
  for root, _, names in os.walk(local):
    relative = os.path.relpath(root, local)
    target = remote if relative == '.' else posixpath.join(remote, relative)
    tf.io.gfile.makedirs(target)
    for name in names:
      tf.io.gfile.copy(os.path.join(root, name), posixpath.join(target, name))
