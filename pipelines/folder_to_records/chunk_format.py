"""Chunk files: the unit of parallel work and its on-disk format.

A chunk is ~EXAMPLES_PER_CHUNK files in a seeded order that mixes classes
(chunk_of); its records go to one chunk file per split, and everything
else to one meta file (meta_file): each chunk file's index (index_file: a
summary line, then one IndexEntry per record) and the chunk's images.jsonl
lines.
"""

from __future__ import annotations

import collections
import json
import posixpath
import zlib
from typing import NamedTuple, Optional, Sequence

from pipelines.folder_to_records import splits as splits_lib


# Unit of parallel work: small enough that 2+ workers get even shares, large
# enough that Beam's per-element cost is noise next to 64 image decodes.
EXAMPLES_PER_CHUNK = 64
CHUNKS_DIR = '_chunks'
# The sorted runs file_io.write_run and the keyed files file_io.write_keyed
# leave in the chunk folder.
RUN_FILE_RE = (r'(sort|pairs)-[0-9a-f]{32}\.jsonl'
               r'|(bands|earlier|listed|references)-[0-9a-f]{32}\.bin')
# A chunk file: chunk, split, the writing attempt (chunk_path).
CHUNK_FILE_RE = r'\d{6,}-(train|validation|test)-[0-9a-f]{16}\.tfrecord'


class IndexEntry(NamedTuple):
  """One record of a chunk file, a JSON list per line of its index file.

  JSON escapes every control and non-ASCII character, so a path holding a
  line separator (U+2028, U+0085, ...) stays on its line.

  offset, length: its place in the chunk's byte stream of its split (what
  the shard layout cuts); pixel_sum, pixel_sumsq: exact per-channel integer
  sums of the stored pixels and of their squares (the train statistics),
  num_pixels their count; warning: for the report; source: where its bytes
  are, [LOCAL, position] in the chunk file, or [i, position] in the earlier
  build's file i (reuse.Source.shards) that an incremental build copies it
  from without writing it again; None: the chunk file at offset.
  """
  offset: int
  length: int
  label: int
  pixel_sum: tuple[int, ...]
  pixel_sumsq: tuple[int, ...]
  num_pixels: int
  warning: Optional[str]
  relpath: str
  source: Optional[tuple[int, int]] = None


# IndexEntry.source's file for the chunk file itself.
LOCAL = -1


def where(entry: IndexEntry) -> tuple[int, int]:
  """(file, position) of an entry's bytes (IndexEntry.source)."""
  return (LOCAL, entry.offset) if entry.source is None else tuple(
      entry.source)


def index_file(entries: Sequence[IndexEntry],
               pinned: Optional[dict[int, list[int]]] = None,
               file_name: Optional[str] = None) -> bytes:
  """The index of a chunk file: a summary line, then one line per record.

  The summary (a JSON object) totals the records: [label, count] of each
  class present (sparse: a chunk of 64 holds at most 64 of 10,000 classes),
  pixel sums as a PixelSums triple, the [relpath, warning] pairs in
  record order, the records' bytes as [file, position, length] pieces in
  order (IndexEntry.source; neighbours joined: one piece for a chunk file
  of records built here), the chunk file's name (file_name; None when every
  record is elsewhere) and, for each earlier file a piece is in, its
  file_io.identity when its records were checked (pinned). A shard that
  holds the whole chunk, with no copy dropped from it (nearly every chunk),
  reads only that line; the record lines (JSON lists) serve the chunks a
  shard boundary cuts and those holding a dropped duplicate.
  """
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  pieces = []
  for e in entries:
    file_io.add_range(pieces, *where(e), e.length)
  summary = {
      'counts': sorted(collections.Counter(e.label for e in entries).items()),
      'sums': [[sum(c) for c in zip(*(e.pixel_sum for e in entries))],
               [sum(c) for c in zip(*(e.pixel_sumsq for e in entries))],
               sum(e.num_pixels for e in entries)],
      'warnings': [[e.relpath, e.warning] for e in entries if e.warning],
      'pieces': pieces,
      'file': file_name,
      'pinned': {str(i): v for i, v in sorted((pinned or {}).items())}}
  return ('\n'.join([json.dumps(summary)] + [json.dumps(e) for e in entries])
          + '\n').encode()


def chunk_path(tmp_dir: str, index: int, split: str, attempt: str) -> str:
  """A chunk file of one attempt at the chunk (16 hex digits): two attempts
  (a retry, a runner's backup) may take different records from an earlier
  build as they are, so each meta file names its own attempt's files."""
  return posixpath.join(tmp_dir, CHUNKS_DIR,
                        f'{index:06d}-{split}-{attempt}.tfrecord')


_META_SUFFIX = '-meta.jsonl'
# The meta file's section of the chunk's images.jsonl lines.
IMAGES = 'images'


def meta_path(tmp_dir: str, index: int) -> str:
  """The chunk's one file of everything but records (meta_file)."""
  return posixpath.join(tmp_dir, CHUNKS_DIR, f'{index:06d}{_META_SUFFIX}')


def meta_pattern(tmp_dir: str) -> str:
  """A glob of every chunk's meta file (names sort in chunk order)."""
  return posixpath.join(tmp_dir, CHUNKS_DIR, f'*{_META_SUFFIX}')


def meta_file(indexes: dict[str, Sequence[IndexEntry]],
              image_lines: Sequence[str],
              pinned: Optional[dict[int, list[int]]] = None,
              files: Optional[dict[str, str]] = None) -> bytes:
  """A chunk's meta file: the index of each split's records (index_file;
  pinned, and files: split -> its chunk file's name, see there) and the
  chunk's lines of images.jsonl (one per decoded file), as sections after
  a first line (JSON) that maps each section's name (the split, or IMAGES)
  to its [start, length] in bytes after that line.

  One file instead of one per split and one for the lines: creating a file
  cost ~0.5-1 ms on the test VM with two workers writing (GCS: an object
  each), a third of an update's write step at 30,000 files.
  """
  sections = [(split, index_file(entries, pinned, (files or {}).get(split)))
              for split, entries in sorted(indexes.items())]
  sections.append((IMAGES, ''.join(f'{line}\n' for line in image_lines
                                   ).encode()))
  header, at = {}, 0
  for name, data in sections:
    header[name] = [at, len(data)]
    at += len(data)
  return b''.join([json.dumps(header).encode(), b'\n'] +
                  [data for _, data in sections])


def read_section(path: str, name: str) -> bytes:
  """Section `name` (a split, or IMAGES) of the meta file at path; b'' when
  the chunk has none."""
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  with file_io.FileSystems.open(path, compression_type=file_io.RAW) as f:
    header = json.loads(f.readline())
    if name not in header:
      return b''
    start, length = header[name]
    f.seek(f.tell() + start)
    data = f.read(length)
  if len(data) != length:
    raise IOError(f'{path} ends inside its section {name!r}')
  return data


def read_index(tmp_dir: str, index: int, split: str
               ) -> tuple[dict, list[bytes]]:
  """(summary, record lines) of a chunk file's index (index_file)."""
  lines = read_section(meta_path(tmp_dir, index), split).split(b'\n')
  return json.loads(lines[0]), lines[1:-1]


def image_line(relpath: str, split: str, sha256: str,
               phashes: Optional[tuple[int, int]], flags: Sequence[str],
               quality: Optional[dict], *, file_stat: tuple[int, int],
               entry: IndexEntry, original_size: tuple[int, int]) -> str:
  """A file's line of images.jsonl: what the build measured of it (hashes
  and quality null when it measured nothing: see ImageOptions.measure),
  plus what an incremental build needs to take its record instead of
  building it (pipelines/folder_to_records/reuse.py): the source file's
  size and modification time (file_stat), and of its record the length
  (framed), pixel sums and warning (entry), and the source's size after
  EXIF orientation (height, width); last, 'check': a crc32 of the line
  before it."""
  whole, centre = (f'{h:016x}' for h in phashes) if phashes else (None, None)
  text = json.dumps({'path': relpath, 'split': split, 'sha256': sha256,
                     'phash': whole, 'phash_centre': centre,
                     'flags': list(flags), 'quality': quality,
                     'file_bytes': file_stat[0], 'mtime_ns': file_stat[1],
                     'record_bytes': entry.length,
                     'original_size': list(original_size),
                     'pixel_sum': list(entry.pixel_sum),
                     'pixel_sumsq': list(entry.pixel_sumsq),
                     'num_pixels': entry.num_pixels,
                     'warning': entry.warning})
  # A crc32 of the line before it: an update takes none of an edited or
  # damaged line (reuse.checked_line).
  return f'{text[:-1]}, "check": {zlib.crc32(text.encode())}}}'


def checked_text(raw: bytes) -> Optional[bytes]:
  """An images.jsonl line (bytes) without its line end when its checksum
  (image_line's 'check': a crc32 of the line before it) holds; None
  otherwise."""
  text = raw.rstrip(b'\n')
  cut = text.rfind(b', "check": ')
  try:
    if cut < 0 or int(text[cut + 11:-1]) != zlib.crc32(text[:cut] + b'}'):
      return None
  except ValueError:
    return None
  return text


def chunk_of(relpath: str, num_chunks: int, *, seed: int) -> int:
  """The chunk of a file: its seeded order key cut into num_chunks ranges."""
  return min(num_chunks - 1, int(splits_lib.order_key(
      relpath, seed=seed) * num_chunks))


def num_chunks(num_files: int) -> int:
  """How many chunks the files are cut into: ~EXAMPLES_PER_CHUNK each."""
  return max(1, -(-num_files // EXAMPLES_PER_CHUNK))
