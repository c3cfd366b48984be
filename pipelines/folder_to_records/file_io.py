"""The build's file I/O: read-ahead of source files, plain writes, and the
byte-range copies that concatenate chunk files into shards.

Workers touch files only through Beam's FileSystems (local, gs://, s3://,
hdfs:// with the matching Beam extras) and never import TensorFlow: a TF
import costs seconds and ~500 MB per worker process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import heapq
import io
import itertools
import os
import posixpath
import struct
import sys
import zlib
from typing import Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.common import paths


# Source files read ahead of the one being decoded, so that a cold disk or
# a bucket's round trips overlap decoding. Local files: the kernel is asked
# to fetch them (posix_fadvise WILLNEED; no thread, no bytes held by us).
# Remote ones (gs://, s3://): as many reader threads. A worker holds at most
# READ_AHEAD + 1 source files (each under --max_file_bytes).
READ_AHEAD = 3
_COPY_BLOCK = 16 << 20


# Workers touch files only through Beam's FileSystems (local, gs://, s3://,
# hdfs:// with the matching Beam extras) and never import TensorFlow: a TF
# import costs seconds and ~500 MB per worker process.
RAW = CompressionTypes.UNCOMPRESSED


def write_bytes(path: str, data: bytes) -> None:
  with FileSystems.create(path, compression_type=RAW) as f:
    f.write(data)


# Lines a sorted run holds; more are cut into several runs, merged at the end.
SORT_RUN_LINES = 200_000


def new_path(run_dir: str, prefix: str, suffix: str) -> str:
  """A fresh file name in run_dir (a retried bundle never meets its earlier
  attempt's files)."""
  import uuid  # pylint: disable=g-import-not-at-top
  return posixpath.join(run_dir, f'{prefix}-{uuid.uuid4().hex}{suffix}')


def in_global_window(value):
  """value as a DoFn's finish_bundle must emit it (it has no element's
  window). The window and timestamp made once (~2 µs each time), and set
  in one assignment, so threads that make them at once each set a whole
  one."""
  global _GLOBAL
  if _GLOBAL is None:
    from apache_beam.transforms import window  # pylint: disable=g-import-not-at-top
    from apache_beam.utils import windowed_value  # pylint: disable=g-import-not-at-top
    _GLOBAL = (windowed_value.WindowedValue,
               window.GlobalWindow().max_timestamp(), window.GlobalWindow())
  make, at, window_ = _GLOBAL
  return make(value, at, [window_])


_GLOBAL = None  # in_global_window's (WindowedValue, timestamp, window).


def write_keyed(run_dir: str, prefix: str, entries: list[tuple[int, bytes]],
                *, inline_bytes: int = -1):
  """Writes (key, bytes) entries to one new file in run_dir, sorted by key
  (stably: a key's entries keep their order); yields (key, (path, offset,
  length)) of each key's bytes there. Many small entries travel as a few
  ranges instead of one shuffle element each (the local runner holds a
  shuffle in memory and pays per element). Entries of at most inline_bytes
  in all are not written: (key, their bytes) instead (a distributed
  runner's small bundle: no file to create and read back; read_keyed
  takes both)."""
  if not entries:
    return
  entries.sort(key=lambda e: e[0])
  if sum(len(e) for _, e in entries) <= inline_bytes:
    for key, run in itertools.groupby(entries, key=lambda e: e[0]):
      yield key, b''.join(e for _, e in run)
    return
  path = new_path(run_dir, prefix, '.bin')
  write_bytes(path, b''.join(e for _, e in entries))
  offset = 0
  for key, run in itertools.groupby(entries, key=lambda e: e[0]):
    length = sum(len(e) for _, e in run)
    yield key, (path, offset, length)
    offset += length


def unpack_entries(data: bytes, header: struct.Struct, what: str
                   ) -> Iterator[tuple[tuple, bytes]]:
  """(header's fields, the bytes after them) of each entry of data, whose
  entries are a header (its last field: the length of the bytes after it)
  then those bytes: the keyed and run files' format. IOError where one
  runs past the end (`what`: the entry, for the message)."""
  at, end, size_of, unpack = 0, len(data), header.size, header.unpack_from
  while at < end:
    fields = unpack(data, at)
    at += size_of
    size = fields[-1]
    if at + size > end:
      raise IOError(f'{what} runs past the end of its range ({end} bytes): '
                    'a file of this build was cut short')
    yield fields, data[at:at + size]
    at += size


def read_keyed(pieces) -> bytes:
  """The bytes write_keyed gave one key: its inline bytes and (path,
  offset, length) ranges, one after another (in no set order)."""
  inline = [p for p in pieces if isinstance(p, bytes)]
  ranges = sorted(p for p in pieces if not isinstance(p, bytes))
  return b''.join(inline + list(range_blocks(ranges)))


def merge_keyed(runs: list, run_dir: str, prefix: str) -> list:
  """Runs of write_keyed (each a list of (key, (path, offset, length)) in
  key order, all in one file) as one: with several, merged into one new
  file, a key's bytes from each run in turn (each run's file read once,
  front to back, then deleted), so a key has one range whatever the
  number of runs."""
  runs = [run for run in runs if run]
  if len(runs) < 2:
    return runs[0] if runs else []
  path = new_path(run_dir, prefix, '.bin')
  by_key = collections.defaultdict(list)
  for i, run in enumerate(runs):
    for key, (_, _, length) in run:
      by_key[key].append((i, length))
  sources = [FileSystems.open(run[0][1][0], compression_type=RAW)
             for run in runs]
  merged, offset = [], 0
  try:
    with FileSystems.create(path, compression_type=RAW) as out:
      for key in sorted(by_key):
        length = 0
        for i, size in by_key[key]:
          data = sources[i].read(size)
          if len(data) != size:
            raise IOError(f'{runs[i][0][1][0]} ended early')
          out.write(data)
          length += size
        merged.append((key, (path, offset, length)))
        offset += length
  finally:
    for f in sources:
      f.close()
  FileSystems.delete([run[0][1][0] for run in runs])
  return merged


def write_run(run_dir: str, prefix: str, lines: list[str]) -> str:
  """Sorts lines (JSON: no line breaks) into a new run file; returns its
  path."""
  lines.sort()
  path = new_path(run_dir, prefix, '.jsonl')
  # One join, not an f-string a line (1.6 million pair lines: ~0.4 s).
  write_bytes(path, ('\n'.join(lines) + '\n').encode() if lines else b'')
  return path


class Merged(NamedTuple):
  """What merge_runs wrote: its lines, and the crc32 of its bytes."""
  lines: int
  crc32: int


def merge_runs(path: str, runs: Sequence[str], held: Sequence[str] = (),
               *, unique: bool = False) -> Merged:
  """Writes the lines of sorted run files (and of the sorted list held)
  to path in order, each line once when unique: every run read as it is
  merged, none held whole.

  Merged as the bytes of each line with its line end: UTF-8 keeps code
  point order, and JSON has no byte below the line end inside a line, so
  the order is the lines' order as text."""
  held_lines = (f'{line}\n'.encode() for line in held)
  written = crc = 0
  with FileSystems.create(path, compression_type=RAW) as out:
    merged = heapq.merge(held_lines, *(_run_lines(r) for r in runs))
    if unique:  # Equal lines are neighbours once merged.
      merged = (line for line, _ in itertools.groupby(merged))
    while block := list(itertools.islice(merged, 4096)):
      data = b''.join(block)
      out.write(data)
      crc = zlib.crc32(data, crc)
      written += len(block)
  return Merged(written, crc)


def write_sorted_lines(path: str, lines: Iterable[str], *,
                       run_dir: str) -> None:
  """Writes `lines` (JSON: no line breaks) to path in sorted order,
  whatever order they came in: a runner hands a side input's elements in
  no fixed order, and a report must be the same bytes from every run. At
  most SORT_RUN_LINES are held; past that, sorted runs go to run_dir and
  are merged."""
  runs, held = [], []
  for line in lines:
    held.append(line)
    if len(held) >= SORT_RUN_LINES:
      runs.append(write_run(run_dir, 'sort', held))
      held = []
  held.sort()
  merge_runs(path, runs, held)
  for run in runs:
    FileSystems.delete([run])


def _run_lines(run: str):
  """The lines of a run file (bytes, with their line ends), read as they
  are merged."""
  with FileSystems.open(run, compression_type=RAW) as f:
    yield from f


def log(message: str) -> None:
  """One stderr line, in one write: worker processes share the stream, and
  print()'s separate write of the line end let two workers' lines run
  together (`... 0 rejected[build] chunk 25: ...`), which the progress
  display then could not read. A pipe write this short is atomic."""
  line = f'[build] {message}\n'.encode('utf-8', 'backslashreplace')
  try:
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), line)
  except (AttributeError, OSError, ValueError):  # No real file (a test).
    print(line.decode('utf-8').rstrip('\n'), file=sys.stderr, flush=True)


def identity(f) -> Optional[list[int]]:
  """[size, modification time in ns] of an open local file; None for one
  without a descriptor (gs://, s3://, ...). Builds never write a file in
  place: one replaced (another build's rename) was written later, so its
  time differs. Not the device or inode: an NFS mount's device number
  differs between the machines of one build, and FUSE or CIFS mounts may
  number inodes per mount or anew each time."""
  try:
    info = os.fstat(f.fileno())
  except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
    return None
  return [info.st_size, info.st_mtime_ns]


def pin(pinned: dict, path: str, file_identity: list[int]) -> None:
  """Adds path's identity (as an earlier step saw it) to pinned; OSError
  ESTALE when another step saw another file at that path."""
  if pinned.setdefault(path, file_identity) != file_identity:
    raise OSError(errno.ESTALE, 'not the same file in every step of this '
                  'build', path)


def range_blocks(pieces: Iterable[tuple[str, int, int]],
                 pinned: Optional[Mapping[str, list[int]]] = None):
  """The bytes of the ranges (path, offset, length), one after another, in
  blocks of at most _COPY_BLOCK; IOError where a file ends early, and
  OSError ESTALE where a file of `pinned` (path -> its `identity` when an
  earlier step checked what it reads here) is no longer that file. A file
  is opened once for neighbouring pieces."""
  f = at_path = None
  try:
    for path, offset, length in pieces:
      if path != at_path:
        if f is not None:
          f.close()
          f = None
        checked = pinned.get(path) if pinned else None
        try:
          f, at_path = FileSystems.open(path, compression_type=RAW), path
        except OSError as e:
          if checked is None:
            raise
          raise OSError(errno.ESTALE, 'gone since an earlier step of this '
                        f'build checked it ({e})', path) from None
        if checked is not None and identity(f) != list(checked):
          raise OSError(errno.ESTALE, 'not the file an earlier step of this '
                        'build checked', path)
      f.seek(offset)
      remaining = length
      while remaining:
        block = f.read(min(remaining, _COPY_BLOCK))
        if not block:
          raise IOError(f'{path} ended before byte {offset + length}')
        yield block
        remaining -= len(block)
  finally:
    if f is not None:
      f.close()


def add_range(pieces: list, path, offset: int, length: int) -> None:
  """Appends the byte range (path, offset, length) to pieces (lists of
  three), joined to the last one when it ends where this one starts."""
  last = pieces[-1] if pieces else None
  if last is not None and last[0] == path and last[1] + last[2] == offset:
    last[2] += length
  else:
    pieces.append([path, offset, length])


def copy_ranges(pieces: Sequence[tuple[str, int, int]], out_path: str,
                pinned: Optional[Mapping[str, list[int]]] = None) -> int:
  """Writes the byte ranges (path, offset, length) one after another to
  out_path (range_blocks: files of `pinned` checked); returns the bytes
  written. (os.copy_file_range was measured for local files: ~10% faster
  on this step's 0.15 s at 30,000 images, not worth a second code path.)"""
  num_bytes = 0
  with FileSystems.create(out_path, compression_type=RAW) as out:
    for block in range_blocks(pieces, pinned):
      out.write(block)
      num_bytes += len(block)
  return num_bytes


def read_ahead(executor: concurrent.futures.Executor, read, items, *,
               depth: int):
  """Futures of read(item), in order, with at most `depth` submitted beyond
  the one the caller waits on (a failed read raises from its .result())."""
  pending = collections.deque()
  for item in items:
    pending.append(executor.submit(read, item))
    if len(pending) > depth:
      yield pending.popleft()
  while pending:
    yield pending.popleft()


class _ReadWhenAsked:
  """read(item) run by .result(), in the caller's thread (a Future's face)."""

  def __init__(self, read, item):
    self._read, self._item = read, item

  def result(self):
    return self._read(self._item)


def prefetched(read, prefetch, items, *, depth: int):
  """Like read_ahead, without threads: prefetch(item) is called `depth`
  items before read(item) runs (in the caller's thread, from .result())."""
  items = list(items)
  for item in items[:depth]:
    prefetch(item)
  for i, item in enumerate(items):
    if i + depth < len(items):
      prefetch(items[i + depth])
    yield _ReadWhenAsked(read, item)


def prefetch_local(path: str, *, max_bytes: int) -> None:
  """Asks the kernel to start reading a local regular file into its page
  cache, and returns at once. Anything else is left alone for read_source to
  report: a file over max_bytes (refused from its size, so a huge or sparse
  file costs no I/O), devices (never opened), FIFOs (O_NONBLOCK: no hang)."""
  try:
    f, info = paths.open_regular(path)
  except (OSError, paths.NotAFile):  # Missing, or no regular file.
    return
  with f:
    if info.st_size <= max_bytes and hasattr(os, 'posix_fadvise'):  # macOS: no.
      try:
        os.posix_fadvise(f.fileno(), 0, info.st_size, os.POSIX_FADV_WILLNEED)
      except OSError:  # Only a hint: read_source reads the file either way.
        pass
