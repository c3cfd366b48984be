"""The Beam pipeline: labelled image folders -> sharded, resized TFRecords.

Every input file is read once, and no step holds per-file data of the whole
dataset: the graph holds one element per class folder, and the global steps
see only per-chunk totals. Stages:

  launcher          top of --input_dir only: layout, classes, one task per
                    class folder (graph size grows with classes, not files)
  ListFolders       workers walk their class folders (local: byte-safe, with
                    the link policy; gs://, s3://: Beam's FileSystems);
                    every file is a candidate or ignored with a reason
  Chunk             chunk = floor(order_key(seed, path) * num_chunks), with
                    num_chunks from a global count: ~EXAMPLES_PER_CHUNK
                    files per chunk in a seeded order that mixes classes
  WriteChunks       per chunk, files in (order_key, path) order: read,
                    sha256, split = hash(seed, sha256) (or the split
                    folder), decode/validate/resize/encode; records go to one
                    chunk file per (chunk, split) with an index file (offset,
                    length, label, pixel sums, warning of each record) and
                    its byte total; bad files -> rejected
  Dedupe            GroupByKey on sha256 of (path, chunk, offset) references:
                    duplicates, label conflicts and leaks resolved per
                    content hash; only dropped copies come out
  ShardLayout       prefix sums over the (split, chunk) byte totals (a list
                    the size of the number of chunks) give each record its
                    offset in its split; shard = offset // shard_size
  ConcatShards      one element per (split, shard) from the layout, grouped
                    with the copies dropped in it; reads the index files of
                    the chunks its byte range covers and copies the kept
                    records' byte ranges (framed TFRecords concatenate);
                    class counts, train pixel sums and warnings come from
                    the indexes, so no per-image element crosses this step
  Statistics        train mean/std from exact integer sums (any order)
  Finalize          metadata.json, build_report.json, rejected.jsonl
                    (streamed from an iterable side input)
  launcher          TFDS metadata (dataset_info.json, features.json)

Memory: a worker holds one image at a time, whatever the number of images
per chunk, bundle or shard: its source file (at most --max_file_bytes; a
remote input adds READ_AHEAD files read ahead), its decoded pixels (at most
--max_image_pixels, JPEGs decoded at a reduced scale when the stored size
allows) and a few copies of its stored bytes (--image_size x channels for
raw; ~4 today, tested in tests/test_build_memory.py). The chunk writers
write each record before the next file is read; no step's elements carry
image bytes (only paths, hashes and per-chunk totals cross the shuffles);
shards are copied in _COPY_BLOCK pieces. So a worker's peak is its start-up
size plus a few stored images (2 worker processes, raw: 0.37 GiB at
4096x4096, 1.08 GiB at 8192x8192, the same for 6 or 12 images).

Everything is written under a hidden temporary folder next to --output_dir;
the launcher renames it into place only after the pipeline succeeded. Each
chunk and shard is a pure function of the input and flags (seeded order,
sorted within every group, deterministic record encoding), so one worker or
many, in one process or several, on any runner, write byte-identical shards.
"""

from __future__ import annotations

import array
import bisect
import collections
import concurrent.futures
import dataclasses
import fractions
import hashlib
import json
import math
import os
import posixpath
import sys
import time
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.common import paths
from pipelines.preprocessing import source_image
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import runner_options
from pipelines.folder_to_records import splits as splits_lib
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
from tfrecords_schema import schema

# Unit of parallel work: small enough that 2+ workers get even shares, large
# enough that Beam's per-element cost is noise next to 64 image decodes.
EXAMPLES_PER_CHUNK = 64
# Source files read ahead of the one being decoded, so that a cold disk or
# a bucket's round trips overlap decoding. Local files: the kernel is asked
# to fetch them (posix_fadvise WILLNEED; no thread, no bytes held by us).
# Remote ones (gs://, s3://): as many reader threads. A worker holds at most
# READ_AHEAD + 1 source files (each under --max_file_bytes).
READ_AHEAD = 3
CHUNKS_DIR = '_chunks'
_COPY_BLOCK = 16 << 20
# Tagged outputs.
REJECTED, IGNORED, COUNTS, FINDINGS, TOTALS, SUMS, WARNINGS, TIMES = (
    'rejected', 'ignored', 'counts', 'findings', 'totals', 'sums', 'warnings',
    'times')


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """Validated build settings (see `pipelines.build` for the flags)."""
  input_dir: str
  dataset_name: str
  class_names: tuple[str, ...]
  layout: str
  image: source_image.ImageOptions
  validation_fraction: float
  test_fraction: float
  seed: int
  shard_size_bytes: int


class IndexEntry(NamedTuple):
  """One record of a chunk file, a JSON list per line of its index file.

  JSON escapes every control and non-ASCII character, so a path holding a
  line separator (U+2028, U+0085, ...) stays on its line.

  offset, length: its bytes in the chunk file; pixel_sum, pixel_sumsq: exact
  per-channel integer sums of the stored pixels and of their squares (the
  train statistics), num_pixels their count; warning: for the report.
  """
  offset: int
  length: int
  label: int
  pixel_sum: tuple[int, ...]
  pixel_sumsq: tuple[int, ...]
  num_pixels: int
  warning: Optional[str]
  relpath: str


def index_file(entries: Sequence[IndexEntry]) -> bytes:
  """The index file of a chunk file: a summary line, then one line per record.

  The summary (a JSON object) totals the records: [label, count] of each
  class present (sparse: a chunk of 64 holds at most 64 of 10,000 classes),
  pixel sums as a PixelSums triple and the [relpath, warning] pairs in
  record order. A shard that holds the whole chunk file, with no copy
  dropped from it (nearly every chunk), reads only that line; the record
  lines (JSON lists) serve the chunk files a shard boundary cuts and those
  holding a dropped duplicate.
  """
  summary = {
      'counts': sorted(collections.Counter(e.label for e in entries).items()),
      'sums': [[sum(c) for c in zip(*(e.pixel_sum for e in entries))],
               [sum(c) for c in zip(*(e.pixel_sumsq for e in entries))],
               sum(e.num_pixels for e in entries)],
      'warnings': [[e.relpath, e.warning] for e in entries if e.warning]}
  return ('\n'.join([json.dumps(summary)] + [json.dumps(e) for e in entries])
          + '\n').encode()


class ShardResult(NamedTuple):
  """One written shard file."""
  split: str
  index: int
  filename: str
  num_bytes: int
  num_examples: int
  class_counts: tuple[int, ...]


# Workers touch files only through Beam's FileSystems (local, gs://, s3://,
# hdfs:// with the matching Beam extras) and never import TensorFlow: a TF
# import costs seconds and ~500 MB per worker process.
_RAW = CompressionTypes.UNCOMPRESSED


def _write_bytes(path: str, data: bytes) -> None:
  with FileSystems.create(path, compression_type=_RAW) as f:
    f.write(data)


def _log(message: str) -> None:
  print(f'[build] {message}', file=sys.stderr, flush=True)


def copy_ranges(pieces: Sequence[tuple[str, int, int]], out_path: str) -> int:
  """Writes the byte ranges (path, offset, length) one after another to
  out_path; returns the bytes written. (os.copy_file_range was measured for
  local files: ~10% faster on this step's 0.15 s at 30,000 images, not worth
  a second code path.)"""
  num_bytes = 0
  with FileSystems.create(out_path, compression_type=_RAW) as out:
    for path, offset, length in pieces:
      with FileSystems.open(path, compression_type=_RAW) as f:
        f.seek(offset)
        remaining = length
        while remaining:
          block = f.read(min(remaining, _COPY_BLOCK))
          if not block:
            raise IOError(f'{path} ended before byte {offset + length}')
          out.write(block)
          remaining -= len(block)
          num_bytes += len(block)
  return num_bytes


def chunk_path(tmp_dir: str, index: int, split: str) -> str:
  return posixpath.join(tmp_dir, CHUNKS_DIR, f'{index:06d}-{split}.tfrecord')


def index_path(tmp_dir: str, index: int, split: str) -> str:
  return posixpath.join(tmp_dir, CHUNKS_DIR, f'{index:06d}-{split}.index')


def record_split(source: listing_lib.SourceFile, sha256: str,
                 config: BuildConfig) -> str:
  """The split a file's record is written to: its split folder, or a hash
  of its content."""
  return source.given_split or splits_lib.assign_split(
      sha256, seed=config.seed,
      validation_fraction=config.validation_fraction,
      test_fraction=config.test_fraction)


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


class WriteChunk(beam.DoFn):
  """(chunk index, relpaths) -> (sha256 digest, (relpath, chunk, offset)) per
  record, for the dedupe shuffle.

  Writes a chunk file and its index file per split; 'totals': (split, chunk,
  bytes written) for each chunk file. Files are written in (order_key, path)
  order, whatever order the runner grouped them in. Files that cannot become
  an example go to 'rejected' with a reason.
  """

  def __init__(self, config: BuildConfig, tmp_dir: str):
    self._config = config
    self._tmp_dir = tmp_dir
    self._reader = None
    self._labels = {name: i for i, name in enumerate(config.class_names)}

  def setup(self):
    if paths.is_remote(self._config.input_dir):  # Local: no thread.
      self._reader = concurrent.futures.ThreadPoolExecutor(
          READ_AHEAD, thread_name_prefix='read-ahead')

  def teardown(self):
    if self._reader:
      self._reader.shutdown(wait=False, cancel_futures=True)

  def _read(self, relpath: str) -> bytes:
    return source_image.read_source(
        posixpath.join(self._config.input_dir, relpath),
        max_bytes=self._config.image.max_file_bytes)

  def _convert(self, source: listing_lib.SourceFile, reads
               ) -> tuple[bytes, source_image.ProcessedImage]:
    """(sha256 digest of the file, its stored image) for the next read of
    `reads`; raises ImageRejected, or the read's own error.

    Takes the read itself, so that once the file is converted neither the
    caller nor a read-ahead future holds its bytes.
    """
    data = next(reads).result()
    processed = source_image.process(
        data, extension=posixpath.splitext(source.relpath)[1],
        options=self._config.image)
    return hashlib.sha256(data).digest(), processed

  def process(self, element):
    index, relpaths = element
    config = self._config
    start_time = time.time()
    if self._reader is None:  # Called outside Beam (tests, profiling).
      self.setup()  # Makes reader threads for remote files only.
    files = [listing_lib.source_file(p, config.layout) for p in sorted(
        relpaths, key=lambda p: (splits_lib.order_key(p, seed=config.seed), p))]
    relpaths = [f.relpath for f in files]
    if self._reader is None:  # Local files.
      reads = prefetched(self._read, lambda p: prefetch_local(
          posixpath.join(config.input_dir, p),
          max_bytes=config.image.max_file_bytes), relpaths, depth=READ_AHEAD)
    else:
      reads = read_ahead(self._reader, self._read, relpaths, depth=READ_AHEAD)
    writers, offsets, indexes, written = {}, collections.Counter(), {}, 0
    try:
      for source in files:
        try:
          digest, processed = self._convert(source, reads)
        except source_image.ImageRejected as e:
          yield beam.pvalue.TaggedOutput(REJECTED, splits_lib.Dropped(
              source.relpath, e.outcome, e.reason))
          continue
        except Exception as e:  # pylint: disable=broad-except
          yield beam.pvalue.TaggedOutput(REJECTED, splits_lib.Dropped(
              source.relpath, source_image.UNREADABLE,
              f'cannot read or decode ({type(e).__name__}: {e})'))
          continue
        sha = digest.hex()
        split = record_split(source, sha, config)
        label = self._labels[source.class_name]
        # One image in flight (see "Memory" above): the stored image lives
        # until its Example is made, the Example until it is framed, and the
        # record until it is written, before the next file is read.
        example = schema.encode_example(
            image=processed.encoded, label=label, filename=source.relpath,
            sha256=sha, original_height=processed.original_height,
            original_width=processed.original_width)
        entry = (label, [int(v) for v in processed.pixel_sum],
                 [int(v) for v in processed.pixel_sumsq],
                 processed.num_pixels, processed.warning, source.relpath)
        del processed
        if split not in writers:
          writers[split] = FileSystems.create(
              chunk_path(self._tmp_dir, index, split), compression_type=_RAW)
          indexes[split] = []
        record = schema.frame_record(example)
        del example
        writers[split].write(record)
        length = len(record)
        del record
        indexes[split].append(IndexEntry(offsets[split], length, *entry))
        # The dedupe shuffle carries only this (the runner may hold it all).
        yield digest, (source.relpath, index, offsets[split])
        offsets[split] += length
        written += 1
    finally:
      for writer in writers.values():
        writer.close()
    for split, entries in indexes.items():
      _write_bytes(index_path(self._tmp_dir, index, split),
                   index_file(entries))
    _log(f'chunk {index + 1}: {written} written, {len(files) - written} '
         'rejected')
    for split, num_bytes in sorted(offsets.items()):
      yield beam.pvalue.TaggedOutput(TOTALS, (split, index, num_bytes))
    yield beam.pvalue.TaggedOutput(TIMES, (start_time, time.time()))


class ListFolder(beam.DoFn):
  """FolderTask -> the relpath of each candidate; 'ignored' for the rest;
  'counts': (candidates, ignored) of the task. A Dropped (what the launcher
  ignored at the top level) passes through to 'ignored'."""

  def __init__(self, input_dir: str, exclude: Sequence[str]):
    self._input_dir = input_dir
    self._exclude = tuple(exclude)

  def process(self, task: listing_lib.FolderTask | splits_lib.Dropped):
    if isinstance(task, splits_lib.Dropped):
      yield beam.pvalue.TaggedOutput(IGNORED, task)
      yield beam.pvalue.TaggedOutput(COUNTS, (0, 1))
      return
    files = ignored = 0
    for item in listing_lib.list_folder(self._input_dir, task,
                                        exclude=self._exclude):
      if isinstance(item, listing_lib.SourceFile):
        files += 1
        yield item.relpath  # All the shuffle needs (see source_file).
      else:
        ignored += 1
        yield beam.pvalue.TaggedOutput(IGNORED, splits_lib.Dropped(
            item.relpath, item.outcome, item.reason))
    yield beam.pvalue.TaggedOutput(COUNTS, (files, ignored))


def chunk_of(relpath: str, num_chunks: int, *, seed: int) -> int:
  """The chunk of a file: its seeded order key cut into num_chunks ranges."""
  return min(num_chunks - 1, int(splits_lib.order_key(
      relpath, seed=seed) * num_chunks))


def resolve_duplicates(element, *, config: BuildConfig):
  """(sha256 digest, (relpath, chunk, offset) of each copy) -> the dropped
  copies as (split, chunk, offset); 'rejected' and 'findings' for
  duplicates, conflicts and leaks. A unique file (nearly all) gives nothing:
  it stays where it was written."""
  digest, refs = element
  refs = {r[0]: r for r in refs}
  if len(refs) == 1:
    return
  sha = digest.hex()
  sources = {p: listing_lib.source_file(p, config.layout) for p in refs}
  _, dropped, finding = splits_lib.resolve_same_bytes(
      sha, [splits_lib.FileEntry(p, s.class_name, s.given_split, sha)
            for p, s in sources.items()],
      seed=config.seed, validation_fraction=config.validation_fraction,
      test_fraction=config.test_fraction)
  for d in dropped:
    _, chunk, offset = refs[d.relpath]
    yield record_split(sources[d.relpath], sha, config), chunk, offset
    yield beam.pvalue.TaggedOutput(REJECTED, d)
  if finding:
    yield beam.pvalue.TaggedOutput(FINDINGS, finding)


class SplitChunks(NamedTuple):
  """The chunk files of one split, in chunk order (= byte order): parallel
  int64 arrays (24 bytes a chunk file in every worker that reads them)."""
  ids: array.array
  starts: array.array  # Where each chunk file's bytes begin in the split.
  sizes: array.array

  def start_of(self, chunk: int) -> int:
    return self.starts[bisect.bisect_left(self.ids, chunk)]

  def size_of(self, chunk: int) -> int:
    return self.sizes[bisect.bisect_left(self.ids, chunk)]


def shard_layout(totals, *, shard_size_bytes: int) -> dict:
  """[(split, chunk, bytes written)] -> the shard layout, from prefix sums
  over the chunk list, in chunk order:

    'chunks': {split: SplitChunks};
    'num_shards': {split: n}.

  It has one entry per (split, chunk), never one per image. Offsets count
  every written record (a dropped duplicate's bytes too), so a shard holds
  up to shard_size bytes of kept records.
  """
  chunks = {}
  for split, chunk, num_bytes in sorted(totals):
    if split not in chunks:
      chunks[split] = SplitChunks(*(array.array('q') for _ in range(3)))
    c = chunks[split]
    c.starts.append(c.starts[-1] + c.sizes[-1] if c.ids else 0)
    c.ids.append(chunk)
    c.sizes.append(num_bytes)
  return {'chunks': chunks, 'num_shards': {
      split: max(1, -(-(c.starts[-1] + c.sizes[-1]) // shard_size_bytes))
      for split, c in chunks.items()}}


def shard_keys(layout: dict):
  """Every (split, shard) of the layout, each as ((split, shard), None)."""
  for split, num_shards in sorted(layout['num_shards'].items()):
    for shard in range(num_shards):
      yield (split, shard), None


def shard_of(offset: int, num_shards: int, shard_size_bytes: int) -> int:
  """The shard of a record starting `offset` bytes into its split: shard s
  holds [s * shard_size, (s + 1) * shard_size), the last one the rest."""
  return min(offset // shard_size_bytes, num_shards - 1)


def shard_of_drop(drop, layout: dict, *, shard_size_bytes: int):
  """(split, chunk, offset) of a dropped copy -> ((split, shard), (chunk,
  offset)): the shard whose byte range holds its record."""
  split, chunk, offset = drop
  start = layout['chunks'][split].start_of(chunk)
  shard = shard_of(start + offset, layout['num_shards'][split],
                   shard_size_bytes)
  return (split, shard), (chunk, offset)


class PixelSums(beam.CombineFn):
  """Exact per-channel integer sums of train pixels: same in any order."""

  def create_accumulator(self):
    return None

  def add_input(self, acc, sums):
    """sums: (per-channel sums, per-channel sums of squares, pixel count)."""
    return self.add(acc, sums)

  @staticmethod
  def add(a, b):
    """The sum of two (sums, sums of squares, count) triples (None: 0)."""
    if a is None or b is None:
      return b if a is None else a
    return (tuple(x + y for x, y in zip(a[0], b[0])),
            tuple(x + y for x, y in zip(a[1], b[1])), a[2] + b[2])

  def merge_accumulators(self, accumulators):
    out = None
    for acc in accumulators:
      out = self.add(out, acc)
    return out

  def extract_output(self, acc):
    return acc


def mean_std(sums) -> tuple[Optional[tuple[float, ...]],
                            Optional[tuple[float, ...]]]:
  """Exact integer sums -> per-channel mean/std (0..255), or (None, None)."""
  if not sums or not sums[2]:
    return None, None
  total, total_sq, n = sums
  mean = [fractions.Fraction(t, n) for t in total]
  variance = [max(fractions.Fraction(q, n) - m * m, 0)
              for q, m in zip(total_sq, mean)]
  return (tuple(round(float(m), 4) for m in mean),
          tuple(round(math.sqrt(v), 4) for v in variance))


class ConcatShard(beam.DoFn):
  """((split, shard), [None, (chunk, offset) of each copy dropped in it]) ->
  ShardResult, with 'sums' (train pixel sums) and 'warnings' of its records.

  Its records are those whose offset in the split lies in [shard *
  shard_size, (shard + 1) * shard_size) (the last shard: to the end), read
  chunk by chunk from the index files; kept ones are copied as byte ranges.
  A chunk file wholly inside the shard with no copy dropped from it is taken
  whole, from its index's summary line; only cut chunk files and those with
  a dropped copy are read record by record. Nothing is written for a shard
  whose records were all dropped.
  """

  def __init__(self, tmp_dir: str, config: BuildConfig):
    self._tmp_dir = tmp_dir
    self._config = config

  def _chunks(self, split: str, shard: int, layout: dict):
    """(chunk, whole) of each chunk file with bytes in the shard, in offset
    order; whole: all its bytes are in the shard."""
    size = self._config.shard_size_bytes
    chunks = layout['chunks'][split]
    shard_at = lambda offset: shard_of(offset, layout['num_shards'][split],
                                       size)
    first = max(0, bisect.bisect_right(chunks.starts, shard * size) - 1)
    for i in range(first, len(chunks.ids)):
      start, last = chunks.starts[i], shard_at(
          chunks.starts[i] + chunks.sizes[i] - 1)
      if shard_at(start) > shard:
        break
      if last >= shard:
        yield chunks.ids[i], shard_at(start) == last

  def _records(self, split: str, shard: int, layout: dict, chunk: int,
               lines: Sequence[bytes]):
    """The IndexEntry of each record of the chunk file in the shard, from
    its index's record lines."""
    start = layout['chunks'][split].start_of(chunk)
    for line in lines:
      # Lines are in offset order and start '[offset,': only the lines
      # in this shard's range are parsed (shards may be far smaller than a
      # chunk file).
      at = shard_of(start + int(line[1:line.index(b',')]),
                    layout['num_shards'][split], self._config.shard_size_bytes)
      if at > shard:
        break
      if at == shard:
        yield IndexEntry(*json.loads(line))

  def process(self, element, layout):
    (split, shard), values = element
    dropped = {v for v in values if v is not None}
    dropped_from = {chunk for chunk, _ in dropped}
    filename = schema.shard_filename(self._config.dataset_name, split, shard,
                                     layout['num_shards'][split])
    counts = [0] * len(self._config.class_names)
    sums, pieces, warnings = None, [], []

    def add(chunk_sums, path, offset, length):
      nonlocal sums
      if split == 'train':
        sums = PixelSums.add(sums, (tuple(chunk_sums[0]), tuple(chunk_sums[1]),
                                    chunk_sums[2]))
      if pieces and pieces[-1][0] == path and sum(
          pieces[-1][1:]) == offset:  # Neighbours: one byte range.
        pieces[-1] = (path, pieces[-1][1], pieces[-1][2] + length)
      else:
        pieces.append((path, offset, length))

    for chunk, whole in self._chunks(split, shard, layout):
      path = chunk_path(self._tmp_dir, chunk, split)
      with FileSystems.open(index_path(self._tmp_dir, chunk, split),
                            compression_type=_RAW) as f:
        summary = json.loads(f.readline())
        if whole and chunk not in dropped_from:  # The summary says it all.
          for label, n in summary['counts']:
            counts[label] += n
          warnings.extend(summary['warnings'])
          add(summary['sums'], path, 0, layout['chunks'][split].size_of(chunk))
          continue
        lines = f.read().split(b'\n')[:-1]
      for entry in self._records(split, shard, layout, chunk, lines):
        if (chunk, entry.offset) in dropped:
          continue
        counts[entry.label] += 1
        if entry.warning:
          warnings.append((entry.relpath, entry.warning))
        add((entry.pixel_sum, entry.pixel_sumsq, entry.num_pixels), path,
            entry.offset, entry.length)
    for relpath, warning in warnings:
      yield beam.pvalue.TaggedOutput(WARNINGS, {'path': relpath,
                                                'warning': warning})
    if not pieces:
      return
    num_bytes = copy_ranges(pieces, posixpath.join(self._tmp_dir, filename))
    if sums is not None:
      yield beam.pvalue.TaggedOutput(SUMS, sums)
    yield ShardResult(split, shard, filename, num_bytes, sum(counts),
                      tuple(counts))


def finalize(_, listed: tuple[int, int], *, config: BuildConfig,
             tmp_dir: str, shards: list, stats, findings, warnings, rejected,
             times) -> None:
  """Writes metadata.json, build_report.json and rejected.jsonl (plain JSON).

  `rejected` is an iterable side input, written to rejected.jsonl as it is
  read (never held); shards has one entry per shard file, findings and
  warnings one per problem found. The launcher adds the TFDS files (which
  need TensorFlow) after the run.
  """
  num_seen = sum(listed)  # (candidates, ignored) of the listing.
  mean, std = mean_std(stats)
  split_specs = {}
  for split in metadata_lib.SPLITS:
    mine = sorted((s for s in shards if s.split == split),
                  key=lambda s: s.index)
    counts = [sum(c) for c in zip(*(s.class_counts for s in mine))] or (
        [0] * len(config.class_names))
    split_specs[split] = metadata_lib.SplitSpec(
        name=split, shards=tuple(s.filename for s in mine),
        shard_lengths=tuple(s.num_examples for s in mine),
        num_bytes=sum(s.num_bytes for s in mine),
        class_counts=tuple(int(n) for n in counts))
  spec = metadata_lib.DatasetSpec.from_build(metadata_lib.BuiltDataset(
      config=config, splits=split_specs, mean=mean, std=std))
  _write_bytes(posixpath.join(tmp_dir, metadata_lib.METADATA_FILE),
               json.dumps(spec.to_json_dict(), indent=2).encode())

  outcomes = collections.Counter()
  with FileSystems.create(posixpath.join(tmp_dir, metadata_lib.REJECTED_FILE),
                          compression_type=_RAW) as f:
    for d in rejected:  # Streamed: one line at a time.
      outcomes[d.outcome] += 1
      f.write((json.dumps({'path': d.relpath, 'reason': d.reason,
                           'outcome': d.outcome}) + '\n').encode())
  written = sum(s.num_examples for s in shards)
  not_written = sum(outcomes.values())
  counts = {'seen': num_seen, 'written': written,
            **dict(sorted(outcomes.items()))}
  if written + not_written != num_seen:
    raise AssertionError(
        f'bookkeeping bug: {written} written + {not_written} not written '
        f'!= {num_seen} seen')
  by_kind = collections.defaultdict(list)
  for f in sorted(findings, key=lambda f: f['sha256']):
    by_kind[f['kind']].append(report_lib.Finding(**f))
  times = list(times)
  report = report_lib.BuildReport(
      dataset_name=config.dataset_name,
      input_dir=config.input_dir,
      layout=config.layout,
      class_names=tuple(config.class_names),
      image=dataclasses.asdict(config.image),
      seed=config.seed,
      validation_fraction=config.validation_fraction,
      test_fraction=config.test_fraction,
      counts=counts,
      splits={
          name: report_lib.SplitSummary(
              total=s.num_examples, num_shards=len(s.shards),
              num_bytes=s.num_bytes,
              per_class=dict(zip(config.class_names, s.class_counts)))
          for name, s in split_specs.items()},
      train_mean=mean,
      train_std=std,
      bytes_written=sum(s.num_bytes for s in split_specs.values()),
      duplicates=tuple(by_kind[splits_lib.DUPLICATE]),
      conflicts=tuple(by_kind[splits_lib.LABEL_CONFLICT]),
      leaks=tuple(by_kind[splits_lib.LEAK]),
      warnings=tuple(report_lib.FileWarning(**w) for w in sorted(
          warnings, key=lambda w: w['path'])),
      classes_without_examples=splits_lib.classes_without_examples(
          config.class_names, {name: s.class_counts
                               for name, s in split_specs.items()}),
      # First chunk start to last chunk end: the steady-state write time.
      write_stage_s=round(max((t[1] for t in times), default=0.0) -
                          min((t[0] for t in times), default=0.0), 3),
  )
  _write_bytes(posixpath.join(tmp_dir, report_lib.REPORT_FILE),
               report.to_json().encode())
  _log(f'finalized: {written} written, {not_written} not written')


def _spread(pcoll, name: str, key):
  """Keys elements, groups, unkeys: the runner deals the keys out evenly."""
  return (pcoll
          | f'Key{name}' >> beam.Map(lambda x: (key(x), x))
          | f'Spread{name}' >> beam.GroupByKey()
          | f'Unkey{name}' >> beam.FlatMap(lambda kv: kv[1]))


def _combine(pcoll, name: str, combine_fn):
  """A global combine without Beam's default for no input (one stage and
  four transforms less each): its side input gives the default instead."""
  return pcoll | name >> beam.CombineGlobally(combine_fn).without_defaults()


def build_pipeline(pipeline: beam.Pipeline, *, config: BuildConfig,
                   plan: listing_lib.InputPlan, tmp_dir: str,
                   exclude: Sequence[str] = ()) -> None:
  """Adds the whole build to `pipeline` (see the module docstring).

  Fewer transforms make a faster launch (graph building and Beam's
  translation scale with them) and fewer stages a shorter run: the global
  combines have no default value, and the top-level ignored files travel
  with the folder tasks.
  """
  seed = config.seed
  size = config.shard_size_bytes
  ignored = [splits_lib.Dropped(i.relpath, i.outcome, i.reason)
             for i in plan.ignored]
  listed = (
      # No Create reshuffle: _spread deals the folders out (one stage less).
      _spread(pipeline | 'Folders' >> beam.Create(
          list(plan.folders) + ignored, reshuffle=False),
              'Folders', lambda t: t.relpath)
      | 'ListFolders' >> beam.ParDo(ListFolder(config.input_dir, exclude)
                                    ).with_outputs(IGNORED, COUNTS,
                                                   main='files'))
  counts = beam.pvalue.AsSingleton(
      _combine(listed[COUNTS], 'Counts',
               beam.combiners.TupleCombineFn(sum, sum)), default_value=(0, 0))
  written = (
      listed.files
      | 'Chunk' >> beam.Map(
          lambda p, c: (chunk_of(p, num_chunks(c[0]), seed=seed), p), counts)
      | 'GroupChunks' >> beam.GroupByKey()
      | 'WriteChunks' >> beam.ParDo(WriteChunk(config, tmp_dir)).with_outputs(
          REJECTED, TOTALS, TIMES, main='records'))
  layouts = (_combine(written[TOTALS], 'AllTotals',
                      beam.combiners.ToListCombineFn())
             | 'ShardLayout' >> beam.Map(shard_layout, shard_size_bytes=size))
  layout = beam.pvalue.AsSingleton(
      layouts, default_value=shard_layout([], shard_size_bytes=size))
  deduped = (
      written.records
      | 'GroupBySha' >> beam.GroupByKey()
      | 'Dedupe' >> beam.FlatMap(resolve_duplicates, config=config
                                 ).with_outputs(REJECTED, FINDINGS,
                                                main='dropped'))
  shards = (
      (layouts | 'ShardKeys' >> beam.FlatMap(shard_keys),
       deduped.dropped | 'ShardOfDrop' >> beam.Map(
           shard_of_drop, layout, shard_size_bytes=size))
      | 'AllShardKeys' >> beam.Flatten()
      | 'GroupShards' >> beam.GroupByKey()
      | 'ConcatShards' >> beam.ParDo(ConcatShard(tmp_dir, config), layout
                                     ).with_outputs(SUMS, WARNINGS,
                                                    main='shards'))
  stats = _combine(shards[SUMS], 'PixelSums', PixelSums())
  rejected = ((listed[IGNORED], written[REJECTED], deduped[REJECTED])
              | 'AllRejected' >> beam.Flatten())
  _ = (
      pipeline
      | 'Once' >> beam.Create([None])
      | 'Finalize' >> beam.Map(
          finalize, counts, config=config, tmp_dir=tmp_dir,
          shards=beam.pvalue.AsList(shards.shards),
          stats=beam.pvalue.AsSingleton(stats, default_value=None),
          findings=beam.pvalue.AsIter(deduped[FINDINGS]),
          warnings=beam.pvalue.AsIter(shards[WARNINGS]),
          rejected=beam.pvalue.AsIter(rejected),
          times=beam.pvalue.AsIter(written[TIMES])))


def num_chunks(num_files: int) -> int:
  """How many chunks the files are cut into: ~EXAMPLES_PER_CHUNK each."""
  return max(1, -(-num_files // EXAMPLES_PER_CHUNK))


def run_pipeline(*, config: BuildConfig, plan: listing_lib.InputPlan,
                 tmp_dir: str, beam_args: Sequence[str],
                 exclude: Sequence[str] = ()) -> float:
  """Runs the build into tmp_dir, adds the TFDS metadata; returns seconds."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  tf.io.gfile.makedirs(posixpath.join(tmp_dir, CHUNKS_DIR))
  start = time.perf_counter()  # After imports, as the benchmark's plain loop.
  with beam.Pipeline(options=PipelineOptions(
      runner_options.pipeline_args(beam_args))
                     ) as pipeline:
    build_pipeline(pipeline, config=config, plan=plan, tmp_dir=tmp_dir,
                   exclude=exclude)
  paths.remove_tree(posixpath.join(tmp_dir, CHUNKS_DIR))  # Links unlinked.
  spec = metadata_lib.read_dataset_spec(tmp_dir)
  if any(s.shards for s in spec.splits.values()):  # TFDS needs a shard.
    metadata_lib.write_dataset_metadata(
        tmp_dir, spec,
        description=f'Images from {config.input_dir}, built by pipelines.build.')
  return time.perf_counter() - start
