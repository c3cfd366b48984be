"""The listed files travel to their chunks in runs, not as one element each.

A local runner holds a shuffle's elements in the launcher and each element
costs every step it crosses (encode, decode, a call): one per listed file
made the listing, the chunk step and the chunk shuffle grow with the file
count (100,000 files: ~1.3 s of an update's ~10 s). Instead each worker of
the listing sorts its files' (order key, relpath) entries by order key into
one run per bundle (at most FLUSH_ENTRIES each) and sends on a ListRun: the
run's keys and entry ends as arrays, and its entries, in a file of the
build's temporary folder when they are more than INLINE_BYTES (a local
runner's large bundles: the launcher does not hold them), else in the
element (a distributed runner's small bundles: no file and no read per
bundle on an object store). A file's chunk is its order key cut into
num_chunks ranges (chunk_format.chunk_of), so a run's files of one chunk
lie next to each other: `chunk_pieces` cuts each run into one piece a
chunk (an inline run's entries as bytes, a run file's as a byte range),
and the chunk shuffle carries about one element per chunk and run. The
chunk writer reads its pieces' entries (`entries`) with their order keys:
one range read per chunk and run file (a local runner's few, large runs),
none for inline runs.

Memory: a listing worker buffers at most FLUSH_ENTRIES entries (~100 B
each); the chunk step holds one run's arrays (16 B a file) and, inline,
its entries (~40 B a file, at most INLINE_BYTES). Temporary disk: ~40
bytes a file, until the build ends.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import numpy as np

from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import splits as splits_lib

# Most entries a listing worker buffers before it sends a run.
FLUSH_ENTRIES = 100_000
# Runs up to this size travel in their element, larger ones in a file.
INLINE_BYTES = 1 << 20
# An entry: the order key, the length of the relpath's bytes, which follow.
_ENTRY = struct.Struct('>dI')
_PREFIX = 'listed'  # Run file names (chunk_format.RUN_FILE_RE).
_KEYS, _ENDS = np.dtype('>f8'), np.dtype('>u8')


class ListRun(NamedTuple):
  """Listed files sorted by (order key, relpath): the keys and end offsets
  of their entries (arrays as bytes), and the entries: in `data`, or in
  the file at `path` (data None)."""
  path: Optional[str]
  keys: bytes
  ends: bytes
  data: Optional[bytes] = None


class ListPiece(NamedTuple):
  """The entries of one chunk's files from a run that travelled inline."""
  data: bytes


class ListRange(NamedTuple):
  """Where the entries of one chunk's files are in a run file."""
  path: str
  offset: int
  length: int


def write_run(run_dir: str, relpaths: list[str], *, seed: int) -> ListRun:
  """A ListRun of relpaths (UTF-8: the listing ignores names that are not),
  its entries written to a new file in run_dir when over INLINE_BYTES."""
  entries = sorted((splits_lib.order_key(p, seed=seed), p) for p in relpaths)
  pieces = [_ENTRY.pack(key, len(name)) + name
            for key, name in ((k, p.encode()) for k, p in entries)]
  keys = np.array([k for k, _ in entries], dtype=_KEYS).tobytes()
  ends = np.cumsum([len(p) for p in pieces], dtype=np.int64).astype(
      _ENDS).tobytes()
  data = b''.join(pieces)
  if len(data) <= INLINE_BYTES:
    return ListRun(None, keys, ends, data)
  path = file_io.new_path(run_dir, _PREFIX, '.bin')
  file_io.write_bytes(path, data)
  return ListRun(path, keys, ends)


def chunk_pieces(run: ListRun, num_files: int
                 ) -> list[tuple[int, ListPiece | ListRange]]:
  """(chunk, its files' entries) for each chunk with files in the run, for
  num_files listed in all: chunk_format.chunk_of's chunks, computed on the
  keys at once (the same float64 product, truncated). The entries of an
  inline run as bytes (ListPiece), those of a run file as where they are
  (ListRange: the shuffle then carries ~50 bytes a chunk, not 40 a file)."""
  keys = np.frombuffer(run.keys, dtype=_KEYS)
  if not len(keys):
    return []
  ends = np.frombuffer(run.ends, dtype=_ENDS).astype(np.int64)
  n = chunk_format.num_chunks(num_files)
  chunks = np.minimum(n - 1, (keys * n).astype(np.int64))
  firsts = np.flatnonzero(np.diff(chunks, prepend=-1))
  starts = np.concatenate([[0], ends[:-1]])
  lasts = np.append(firsts[1:], len(keys)) - 1
  pieces = []
  for i, j in zip(firsts.tolist(), lasts.tolist()):
    start, end = int(starts[i]), int(ends[j])
    pieces.append((int(chunks[i]), ListPiece(run.data[start:end])
                   if run.data is not None else
                   ListRange(run.path, start, end - start)))
  return pieces


def entries(piece: ListPiece | ListRange) -> list[tuple[float, str]]:
  """(order key, relpath) of each file of a chunk_pieces piece; IOError
  where a run file was cut short."""
  return read_entries(piece.data if isinstance(piece, ListPiece)
                      else file_io.read_keyed([piece]))


def read_entries(data: bytes) -> list[tuple[float, str]]:
  """(order key, relpath) of each entry in a ListPiece's bytes."""
  return [(key, name.decode()) for (key, _), name in file_io.unpack_entries(
      data, _ENTRY, 'a listed file')]
