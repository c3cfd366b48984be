"""The listed files travel to their chunks through files, not as elements.

A local runner holds a shuffle's elements in the launcher and each element
costs every step it crosses (encode, decode, a call): one per listed file
made the listing, the chunk step and the chunk shuffle grow with the file
count (100,000 files: ~1.3 s of an update's ~10 s). Instead each worker of
the listing writes its files' (order key, relpath) entries, sorted by order
key, to one run file per bundle (at most FLUSH_ENTRIES each) and sends on
a ListRun: the file and its keys and entry ends as arrays. A file's chunk is
its order key cut into num_chunks ranges (chunk_format.chunk_of), so a
run's files of one chunk lie next to each other: `chunk_ranges` cuts each
run into one ListRange a chunk, and the chunk shuffle carries about one
element per chunk and run. The chunk writer reads its ranges
(read_range) and gets the order keys with the paths.

Memory: a listing worker buffers at most FLUSH_ENTRIES entries (~100 B
each); a ListRun element carries 16 bytes a file of its run (1.6 MB at
FLUSH_ENTRIES). Temporary disk: ~60 bytes a file, until the build ends.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import splits as splits_lib

# Most entries a listing worker buffers before it writes a run.
FLUSH_ENTRIES = 100_000
# An entry: the order key, the length of the relpath's bytes, which follow.
_ENTRY = struct.Struct('>dI')
_PREFIX = 'listed'  # Run file names (chunk_format.RUN_FILE_RE).
_KEYS, _ENDS = np.dtype('>f8'), np.dtype('>u8')


class ListRun(NamedTuple):
  """A run file of listed files, sorted by (order key, relpath): its path,
  and the keys and end offsets of its entries (arrays as bytes)."""
  path: str
  keys: bytes
  ends: bytes


class ListRange(NamedTuple):
  """The entries of one chunk in a run file."""
  path: str
  offset: int
  length: int


def write_run(run_dir: str, relpaths: list[str], *, seed: int) -> ListRun:
  """Writes relpaths' entries, sorted by (order key, relpath), to a new run
  file in run_dir (UTF-8: the listing ignores names that are not)."""
  entries = sorted((splits_lib.order_key(p, seed=seed), p) for p in relpaths)
  data = [_ENTRY.pack(key, len(name)) + name
          for key, name in ((k, p.encode()) for k, p in entries)]
  path = file_io.new_path(run_dir, _PREFIX, '.bin')
  file_io.write_bytes(path, b''.join(data))
  ends = np.cumsum([len(d) for d in data], dtype=np.int64)
  return ListRun(path, np.array([k for k, _ in entries], dtype=_KEYS
                                ).tobytes(), ends.astype(_ENDS).tobytes())


def chunk_ranges(run: ListRun, num_files: int
                 ) -> list[tuple[int, ListRange]]:
  """(chunk, ListRange) for each chunk with files in the run, for
  num_files listed in all: chunk_format.chunk_of's chunks, computed on the
  keys at once (the same float64 product, truncated)."""
  keys = np.frombuffer(run.keys, dtype=_KEYS)
  if not len(keys):
    return []
  ends = np.frombuffer(run.ends, dtype=_ENDS).astype(np.int64)
  n = chunk_format.num_chunks(num_files)
  chunks = np.minimum(n - 1, (keys * n).astype(np.int64))
  firsts = np.flatnonzero(np.diff(chunks, prepend=-1))
  starts = np.concatenate([[0], ends[:-1]])
  lasts = np.append(firsts[1:], len(keys)) - 1
  return [(int(chunks[i]), ListRange(run.path, int(starts[i]),
                                     int(ends[j] - starts[i])))
          for i, j in zip(firsts, lasts)]


def read_range(data: bytes) -> list[tuple[float, str]]:
  """(order key, relpath) of each entry in a ListRange's bytes."""
  entries, at = [], 0
  while at < len(data):
    key, size = _ENTRY.unpack_from(data, at)
    at += _ENTRY.size
    if at + size > len(data):
      raise IOError(f'a listed file runs past the end of its range '
                    f'({len(data)} bytes): a run file was cut short')
    entries.append((key, data[at:at + size].decode()))
    at += size
  return entries
