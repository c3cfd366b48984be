"""The build's per-element steps (Beam DoFns and maps): list folders, write
chunks, resolve duplicates, concatenate shards. See beam_build for the graph.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import posixpath
import struct
import time
import uuid
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.common import paths
from pipelines.common import walk
from pipelines.folder_to_records import build_config
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import listed_files
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import near_duplicates
from pipelines.folder_to_records import reuse
from pipelines.folder_to_records import runner_options
from pipelines.folder_to_records import shard_math
from pipelines.folder_to_records import splits as splits_lib
from pipelines.folder_to_records import statistics
from pipelines.preprocessing import image_quality
from pipelines.preprocessing import source_image
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import schema


# Tagged outputs.
(REJECTED, IGNORED, COUNTS, FINDINGS, TOTALS, SUMS, WARNINGS, TIMES, KEPT,
 FLAGGED, REUSED) = ('rejected', 'ignored', 'counts', 'findings', 'totals',
                    'sums', 'warnings', 'times', 'kept', 'flagged', 'reused')


def listed_path(element) -> str:
  """The relpath of a listed file: the element itself, or its first item
  when the split came with it ((relpath, split), --stratified)."""
  return element if isinstance(element, str) else element[0]


def listed_source(element, layout: str) -> listing_lib.SourceFile:
  """The SourceFile of a listed file; a split that came with it
  (--stratified) is its given split, as a split folder's would be."""
  if isinstance(element, str):
    return listing_lib.source_file(element, layout)
  relpath, split = element
  return dataclasses.replace(listing_lib.source_file(relpath, layout),
                             given_split=split)


def record_split(source: listing_lib.SourceFile, sha256: str,
                 config: build_config.BuildConfig) -> str:
  """The split a file's record is written to: its split folder, or a hash
  of its content."""
  return source.given_split or splits_lib.assign_split(
      sha256, seed=config.seed,
      validation_fraction=config.validation_fraction,
      test_fraction=config.test_fraction)


# The dedupe shuffle carries references in bulk, as the listing does
# (listed_files): a chunk writer keeps a short reference of each record it
# wrote (pack_reference), and at most FLUSH_REFERENCES of them it writes as
# one file sorted by bucket (reference_bucket: ~REFERENCES_PER_BUCKET
# records a bucket, all copies of one content in one), sending on only
# (bucket, (file, offset, length)); a small bundle's (up to
# listed_files.INLINE_BYTES) go as (bucket, bytes), with no file. The
# dedupe step reads a bucket's pieces and groups them by content hash
# (dedupe_bucket). One element per record crossed three steps before: ~1 s
# of a 100,000-file update. A writer holds at most FLUSH_REFERENCES
# references (~100 B each), the dedupe step one bucket (~0.5 KB a reference
# once read: ~2 MB), whatever the file count; only the files of a bundle
# that succeeded are named downstream.
FLUSH_REFERENCES = 20_000
REFERENCES_PER_BUCKET = 4096
MIN_BUCKETS = 16  # For the workers to share.
# digest, chunk, offset, flags (_HASHED, _TAKEN), whole and centre hash, the
# given split (index in _GIVEN), the relpath's length; then its bytes.
_REFERENCE = struct.Struct('>32sIQBQQBI')
_GIVEN = (None, *metadata_lib.SPLITS)
_HASHED, _TAKEN = 1, 2  # Hashes follow; the record was the earlier build's.


def pack_reference(digest: bytes, relpath: str, chunk: int, offset: int,
                   phashes, given_split, taken: bool = False) -> bytes:
  """One record's reference for the dedupe step, as bytes. taken: the
  record was taken from the earlier build (an update's carried search:
  near_carry)."""
  name = relpath.encode()
  whole, centre = phashes or (0, 0)
  return _REFERENCE.pack(
      digest, chunk, offset,
      (_HASHED if phashes is not None else 0) | (_TAKEN if taken else 0),
      whole, centre, _GIVEN.index(given_split), len(name)) + name


def reference_buckets(num_files: int) -> int:
  """Buckets of the dedupe step for num_files listed files."""
  return max(MIN_BUCKETS, -(-num_files // REFERENCES_PER_BUCKET))


def reference_bucket(digest: bytes, *, salt: bytes, buckets: int) -> int:
  """A content hash's bucket: a hash keyed by the build's random salt, so
  that no one can make files whose hashes share a bucket (a sha256 prefix
  takes ~buckets tries a file to match) and load one worker with them all.
  Which bucket a record lands in changes nothing in the output."""
  return int.from_bytes(hashlib.blake2b(
      digest, key=salt, digest_size=8).digest(), 'big') % buckets


def read_references(data: bytes) -> dict[bytes, list[tuple]]:
  """pack_reference's bytes, one after another -> {digest: [(relpath,
  chunk, offset, phashes, given split, taken)]}."""
  groups = {}
  for (digest, chunk, offset, bits, whole, centre, given, _), name in (
      file_io.unpack_entries(data, _REFERENCE, 'a record reference')):
    groups.setdefault(digest, []).append((
        name.decode(), chunk, offset,
        (whole, centre) if bits & _HASHED else None, _GIVEN[given],
        bool(bits & _TAKEN)))
  return groups


def dedupe_bucket(element, *, config: build_config.BuildConfig):
  """(bucket, its pieces: bytes, or (file, offset, length) ranges, from
  file_io.write_keyed) -> resolve_duplicates' outputs for each content hash
  in it (a unique file with no search: none, without a call)."""
  _, pieces = element
  groups = read_references(file_io.read_keyed(pieces))
  search = config.near_duplicate_distance > 0
  for digest in sorted(groups):
    references = groups[digest]
    if len(references) > 1 or search:
      yield from resolve_duplicates((digest, references), config=config)


class WriteChunk(beam.DoFn):
  """(chunk index, its listed files) -> the records' references for the
  dedupe step, as (bucket, a file range or bytes) (see FLUSH_REFERENCES).

  Writes a chunk file per split and one meta file (their indexes and the
  chunk's images.jsonl lines); 'totals': (split, chunk, bytes written) for
  each chunk file. Files are written in (order_key, path) order, whatever
  order the runner grouped them in. Files that cannot become an example go
  to 'rejected' with a reason. In an incremental build the chunk's group
  also holds where the earlier build's records of its paths are
  (reuse.Earlier): an unchanged file's record is taken from there instead
  of being built (reuse.py); 'reused': (taken, built, damaged, gone)
  counts.
  """

  def __init__(self, config: build_config.BuildConfig, tmp_dir: str):
    self._config = config
    self._tmp_dir = tmp_dir
    # One per build, made where the graph is (every worker gets this one).
    self._salt = os.urandom(16)
    self._reader = None
    self._records = None  # The earlier build's open files (reuse.Records).
    self._labels = {name: i for i, name in enumerate(config.class_names)}
    self._references = []  # Not yet written (pack_reference).

  def setup(self):
    runner_options.quick_worker_exit()
    if paths.is_remote(self._config.input_dir):  # Local: no thread.
      self._reader = concurrent.futures.ThreadPoolExecutor(
          file_io.READ_AHEAD, thread_name_prefix='read-ahead')

  def teardown(self):
    if self._reader:
      self._reader.shutdown(wait=False, cancel_futures=True)
    if self._records:
      self._records.close()

  def _read(self, relpath: str) -> bytes:
    return source_image.read_source(
        posixpath.join(self._config.input_dir, relpath),
        max_bytes=self._config.image.max_file_bytes)

  def _reads(self, relpaths: Sequence[str]):
    """A read (a future-like with .result()) of each of relpaths, in order,
    read ahead."""
    config = self._config
    if self._reader is None:  # Local files.
      return file_io.prefetched(self._read, lambda p: file_io.prefetch_local(
          posixpath.join(config.input_dir, p),
          max_bytes=config.image.max_file_bytes), relpaths,
          depth=file_io.READ_AHEAD)
    return file_io.read_ahead(self._reader, self._read, relpaths,
                              depth=file_io.READ_AHEAD)

  def _convert(self, source: listing_lib.SourceFile, data: bytes
               ) -> source_image.ProcessedImage:
    """A file's stored image; raises ImageRejected, or Pillow's error."""
    return source_image.process(
        data, extension=posixpath.splitext(source.relpath)[1],
        options=self._config.image)

  def _plan(self, files, olds: dict, records):
    """Which files are read: (to read, {relpath: (file stat, old line, Old,
    old line's text) of each file whose earlier record may be taken}). A
    file taken without reading (reuse.unchanged) is not read at all."""
    candidates, to_read = {}, []
    source = self._config.reuse
    lines = records.lines([olds[f.relpath] for f in files
                           if f.relpath in olds]) if records else {}
    for f in files:
      old = olds.pop(f.relpath, None)
      try:
        file_stat = reuse.stat(posixpath.join(self._config.input_dir,
                                              f.relpath))
      except OSError:
        file_stat = None  # Read below, which says why.
      line, text = lines.get(f.relpath, (None, None))
      candidates[f.relpath] = (file_stat, line, old, text)
      if line is None or file_stat is None or not reuse.unchanged(
          line, file_stat, source):
        to_read.append(f.relpath)
    return to_read, candidates

  def process(self, element, counts: tuple[int, int] = (0, 0)):
    """element: (chunk index, its items); counts: the listing's (files,
    ignored)."""
    index, items = element
    config = self._config
    buckets = reference_buckets(counts[0])
    start_time = time.time()
    if self._reader is None:  # Called outside Beam (tests, profiling).
      self.setup()  # Makes reader threads for remote files only.
    olds, listed = {}, []  # listed: (order key, relpath, listed element)
    for item in items:
      if isinstance(item, reuse.Earlier):
        olds.update((old.relpath, old) for old in reuse.read_olds(item))
      elif isinstance(item, (listed_files.ListPiece, listed_files.ListRange)):
        listed.extend((key, p, p) for key, p in listed_files.entries(item))
      else:
        relpath = listed_path(item)
        listed.append((splits_lib.order_key(relpath, seed=config.seed),
                       relpath, item))
    listed.sort(key=lambda k: k[:2])
    files = [listed_source(item, config.layout) for _, _, item in listed]
    if config.reuse and self._records is None:  # Open for every chunk.
      self._records = reuse.Records(config.reuse)
    records = self._records
    to_read, candidates = self._plan(files, olds, records)
    reads, to_read = self._reads(to_read), set(to_read)
    writers, offsets, indexes, written = {}, collections.Counter(), {}, 0
    names = {}  # split -> its chunk file's name
    # Bytes in each split's chunk file (records taken where they are, from
    # a pinned earlier shard, are not written again), and those shards.
    file_offsets, pinned = collections.Counter(), {}
    attempt = uuid.uuid4().hex[:16]  # chunk_format.chunk_path
    image_lines, flag_counts = [], collections.Counter()
    taken = damaged = 0
    try:
      for source in files:
        file_stat, line, old, old_text = candidates[source.relpath]
        label = self._labels[source.class_name]
        data = reused = None
        as_is = False
        try:
          if source.relpath in to_read:
            data = next(reads).result()
          if line is not None:
            sha = (hashlib.sha256(data).hexdigest() if data is not None
                   else line['sha256'])
            if sha == line['sha256']:
              reused, as_is = records.read(old, line, label) or (None, False)
              if reused is None:
                damaged += 1
              else:
                processed = reuse.processed(line)
          if reused is not None:
            digest = bytes.fromhex(sha)
          else:
            if data is None:  # A damaged record of a file not read.
              data = self._read(source.relpath)
            processed = self._convert(source, data)
            digest = hashlib.sha256(data).digest()
          if file_stat is None:  # Remote, or gone since: as read.
            file_stat = (len(data), None)
        except source_image.ImageRejected as e:
          yield beam.pvalue.TaggedOutput(REJECTED, walk.Skipped(
              source.relpath, e.outcome, e.reason))
          continue
        except Exception as e:  # pylint: disable=broad-except
          yield beam.pvalue.TaggedOutput(REJECTED, walk.Skipped(
              source.relpath, source_image.UNREADABLE,
              f'cannot read or decode ({type(e).__name__}: {e})'))
          continue
        del data
        sha = digest.hex()
        split = record_split(source, sha, config)
        # One image in flight (see "Memory" above): the stored image lives
        # until its Example is made, the Example until it is framed, and the
        # record until it is written, before the next file is read.
        taken_line, place = None, None
        if reused is not None:
          record, reused = reused, None  # The bytes a full build writes.
          taken, taken_line = taken + 1, line
          if as_is:  # Copied from there by the shard step, not written.
            place = [old.shard, old.offset]
            pinned[old.shard] = records.pinned[old.shard]
        else:
          record = schema.frame_record(schema.encode_example(
              image=processed.encoded, label=label, filename=source.relpath,
              sha256=sha, original_height=processed.original_height,
              original_width=processed.original_width))
        if place is None:
          place = [chunk_format.LOCAL, file_offsets[split]]
          file_offsets[split] += len(record)
        entry = chunk_format.IndexEntry(
            offsets[split], len(record), label,
            list(map(int, processed.pixel_sum)),
            list(map(int, processed.pixel_sumsq)),
            processed.num_pixels, processed.warning, source.relpath, place)
        phashes = processed.phashes
        if phashes and not near_duplicates.searched(
            processed.original_height, processed.original_width):
          phashes_for_search = None
        else:
          phashes_for_search = phashes
        flags = (image_quality.flags(processed.quality, config.quality)
                 if processed.quality else ())
        flag_counts.update(flags)
        if taken_line is not None and (
            split == taken_line['split']
            and flags == tuple(taken_line['flags'])
            and entry.length == taken_line['record_bytes']
            and tuple(file_stat) == (taken_line['file_bytes'],
                                     taken_line['mtime_ns'])):
          # Every other value of the line was read from it: the line a
          # full build writes is the earlier one (reuse.differences holds
          # the two to each other in the tests).
          image_lines.append(old_text)
        else:
          image_lines.append(chunk_format.image_line(
              source.relpath, split, sha, phashes, flags,
              image_quality.measures_dict(processed.quality),
              file_stat=file_stat, entry=entry,
              original_size=(processed.original_height,
                             processed.original_width)))
        del processed
        if place[0] == chunk_format.LOCAL:
          if split not in writers:
            path = chunk_format.chunk_path(self._tmp_dir, index, split,
                                           attempt)
            names[split] = posixpath.basename(path)
            writers[split] = FileSystems.create(
                path, compression_type=file_io.RAW)
          writers[split].write(record)
        del record
        indexes.setdefault(split, []).append(entry)
        # What the dedupe step needs of the record (through a file).
        self._references.append((reference_bucket(
            digest, salt=self._salt, buckets=buckets), pack_reference(
                digest, source.relpath, index, offsets[split],
                phashes_for_search, source.given_split,
                taken=taken_line is not None)))
        offsets[split] += entry.length
        written += 1
    finally:
      for writer in writers.values():
        writer.close()
    if image_lines:
      file_io.write_bytes(chunk_format.meta_path(self._tmp_dir, index),
                          chunk_format.meta_file(indexes, image_lines, pinned,
                                                 names))
    file_io.log(f'chunk {index + 1}: {written} written, {len(files) - written} '
         'rejected')
    for split, num_bytes in sorted(offsets.items()):
      yield beam.pvalue.TaggedOutput(TOTALS, (split, index, num_bytes))
    if flag_counts:
      yield beam.pvalue.TaggedOutput(FLAGGED, dict(flag_counts))
    if config.reuse:
      yield beam.pvalue.TaggedOutput(REUSED, (
          taken, written - taken, damaged, len(olds)))
    yield beam.pvalue.TaggedOutput(TIMES, (start_time, time.time()))
    if len(self._references) >= FLUSH_REFERENCES:
      yield from self._flush()

  def start_bundle(self):
    self._references = []

  def _flush(self):
    """The references so far as (bucket, (file, offset, length)) ranges of
    one new file, or (bucket, bytes) when small (file_io.write_keyed)."""
    references, self._references = self._references, []
    return file_io.write_keyed(
        posixpath.join(self._tmp_dir, chunk_format.CHUNKS_DIR), 'references',
        references, inline_bytes=listed_files.INLINE_BYTES)

  def finish_bundle(self):
    for out in self._flush():
      yield file_io.in_global_window(out)


class ListFolder(beam.DoFn):
  """FolderTask -> the candidates: with run_dir, a listed_files.ListRun of
  each bundle's (or each FLUSH_ENTRIES of them), else the relpath of each;
  'ignored' for the rest; 'counts': (candidates, ignored) of the task. A
  Skipped (what the launcher ignored at the top level) passes through to
  'ignored'. Only the runs of a bundle that succeeded reach the next step,
  so a retried bundle lists no file twice."""

  def __init__(self, input_dir: str, exclude: Sequence[str], *,
               run_dir: Optional[str] = None, seed: int = 0):
    self._input_dir = input_dir
    self._exclude = tuple(exclude)
    self._run_dir = run_dir
    self._seed = seed

  def start_bundle(self):
    self._relpaths = []

  def _flush(self) -> listed_files.ListRun:
    relpaths, self._relpaths = self._relpaths, []
    return listed_files.write_run(self._run_dir, relpaths, seed=self._seed)

  def process(self, task: listing_lib.FolderTask | walk.Skipped):
    if isinstance(task, walk.Skipped):
      yield beam.pvalue.TaggedOutput(IGNORED, task)
      yield beam.pvalue.TaggedOutput(COUNTS, (0, 1))
      return
    files = ignored = 0
    for item in listing_lib.list_folder(self._input_dir, task,
                                        exclude=self._exclude):
      if isinstance(item, listing_lib.SourceFile):
        files += 1
        if self._run_dir is None:
          yield item.relpath  # All the shuffle needs (see source_file).
          continue
        self._relpaths.append(item.relpath)
        if len(self._relpaths) >= listed_files.FLUSH_ENTRIES:
          yield self._flush()
      else:
        ignored += 1
        yield beam.pvalue.TaggedOutput(IGNORED, item)
    yield beam.pvalue.TaggedOutput(COUNTS, (files, ignored))

  def finish_bundle(self):
    if self._relpaths:
      yield file_io.in_global_window(self._flush())


def resolve_duplicates(element, *, config: build_config.BuildConfig):
  """(sha256 digest, read_references' tuple of each copy) -> the dropped
  copies as (split, chunk, offset); 'rejected' and 'findings' for
  duplicates, conflicts and leaks. A unique file (nearly all) is not
  dropped: it stays where it was written. With a near-duplicate search on,
  'kept': (the near_duplicates.Ref of the copy kept, one per content,
  whether its record was taken from the earlier build)."""
  digest, refs = element
  refs = {r[0]: r for r in refs}
  sha = digest.hex()
  search = config.near_duplicate_distance > 0
  # A unique file with no search: kept where it was written, nothing to
  # say. (Beam warns of a `return` followed by anything on its line.)
  if len(refs) == 1 and not search:
    return
  sources = {p: listed_source((p, r[4]), config.layout)
             for p, r in refs.items()}
  if len(refs) == 1:  # Kept, and the search needs its reference.
    ((relpath, source),) = sources.items()
    kept, dropped, finding = [splits_lib.Kept(
        record_split(source, sha, config), relpath)], [], None
  else:
    kept, dropped, finding = splits_lib.resolve_same_bytes(
        sha, [splits_lib.FileEntry(p, s.class_name, s.given_split, sha)
              for p, s in sources.items()],
        seed=config.seed, validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction)
  for d in dropped:
    yield record_split(sources[d.relpath], sha, config), refs[d.relpath][1], (
        d.relpath)
    yield beam.pvalue.TaggedOutput(REJECTED, d)
  for k in kept if search else ():
    _, chunk, offset, phashes, _, taken = refs[k.relpath]
    if phashes is None:
      continue  # A tiny source: not searched (near_duplicates.searched).
    yield beam.pvalue.TaggedOutput(KEPT, (near_duplicates.Ref(
        phashes, k.relpath, k.split, chunk, offset), taken))
  if finding:
    yield beam.pvalue.TaggedOutput(FINDINGS, finding)


def record_path(tmp_dir: str, config: build_config.BuildConfig,
                summary: dict, file: int) -> str:
  """The file an index's piece or entry is in (IndexEntry.source): the
  chunk file its summary names, or a file of the earlier build
  (reuse.Source.shards)."""
  if file == chunk_format.LOCAL:
    return posixpath.join(tmp_dir, chunk_format.CHUNKS_DIR, summary['file'])
  return config.reuse.shard_path(file)


def _pin(pinned: dict, config: build_config.BuildConfig,
         summary: dict) -> None:
  """Adds an index summary's pinned files to pinned (path -> identity, for
  range_blocks); ESTALE when two workers saw two files at one path."""
  for i, identity in summary['pinned'].items():
    file_io.pin(pinned, config.reuse.shard_path(int(i)), identity)


def write_left_out(element, *, tmp_dir: str,
                   config: build_config.BuildConfig) -> None:
  """(split, [(chunk, relpath) of each copy left out of it]) -> its
  left_out file: those records, copied from where the chunks' indexes say
  they are, in chunk and offset order (the order of their images.jsonl
  lines). Memory: the copies left out of one split (problems, not
  images)."""
  split, drops = element
  by_chunk = collections.defaultdict(set)
  for chunk, relpath in drops:
    by_chunk[chunk].add(relpath)
  pieces, pinned = [], {}
  for chunk in sorted(by_chunk):
    summary, lines = chunk_format.read_index(tmp_dir, chunk, split)
    _pin(pinned, config, summary)
    for line in lines:
      entry = chunk_format.IndexEntry(*json.loads(line))
      if entry.relpath in by_chunk[chunk]:
        file, at = chunk_format.where(entry)
        pieces.append((record_path(tmp_dir, config, summary, file), at,
                       entry.length))
  file_io.copy_ranges(pieces, posixpath.join(
      tmp_dir, metadata_lib.LEFT_OUT_FILES[split]), pinned)


class ConcatShard(beam.DoFn):
  """((split, shard), [None, (chunk, relpath) of each copy dropped in it]) ->
  ShardResult, with 'sums' (train pixel sums) and 'warnings' of its records.

  Its records are those whose offset in the split lies in [shard *
  shard_size, (shard + 1) * shard_size) (the last shard: to the end), read
  chunk by chunk from the indexes (the chunks' meta files); kept ones are
  copied as byte ranges.
  A chunk file wholly inside the shard with no copy dropped from it is taken
  whole, from its index's summary line; only cut chunk files and those with
  a dropped copy are read record by record. Nothing is written for a shard
  whose records were all dropped.
  """

  def __init__(self, tmp_dir: str, config: build_config.BuildConfig):
    self._tmp_dir = tmp_dir
    self._config = config

  def _chunks(self, split: str, shard: int, layout: dict):
    """(chunk, whole) of each chunk file with bytes in the shard, in offset
    order; whole: all its bytes are in the shard."""
    size = self._config.shard_size_bytes
    chunks = layout['chunks'][split]
    shard_at = lambda offset: shard_math.shard_of(
        offset, layout['num_shards'][split], size)
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
      at = shard_math.shard_of(start + int(line[1:line.index(b',')]),
                               layout['num_shards'][split],
                               self._config.shard_size_bytes)
      if at > shard:
        break
      if at == shard:
        yield chunk_format.IndexEntry(*json.loads(line))

  def process(self, element, layout):
    (split, shard), values = element
    dropped = {v for v in values if v is not None}
    dropped_from = {chunk for chunk, _ in dropped}
    filename = schema.shard_filename(self._config.dataset_name, split, shard,
                                     layout['num_shards'][split])
    counts = [0] * len(self._config.class_names)
    sums, pieces, warnings, pinned = None, [], [], {}

    def add(chunk_sums, places, summary):
      nonlocal sums
      if split == 'train':
        sums = statistics.PixelSums.add(sums, (tuple(chunk_sums[0]),
                                               tuple(chunk_sums[1]),
                                               chunk_sums[2]))
      for file, offset, length in places:  # Neighbours: one byte range.
        file_io.add_range(pieces, record_path(
            self._tmp_dir, self._config, summary, file), offset, length)

    for chunk, whole in self._chunks(split, shard, layout):
      summary, lines = chunk_format.read_index(self._tmp_dir, chunk, split)
      _pin(pinned, self._config, summary)
      if whole and chunk not in dropped_from:  # The summary says it all.
        for label, n in summary['counts']:
          counts[label] += n
        warnings.extend(summary['warnings'])
        add(summary['sums'], summary['pieces'], summary)
        continue
      for entry in self._records(split, shard, layout, chunk, lines):
        if (chunk, entry.relpath) in dropped:
          continue
        counts[entry.label] += 1
        if entry.warning:
          warnings.append((entry.relpath, entry.warning))
        add((entry.pixel_sum, entry.pixel_sumsq, entry.num_pixels),
            [(*chunk_format.where(entry), entry.length)], summary)
    for relpath, warning in warnings:
      yield beam.pvalue.TaggedOutput(WARNINGS, {'path': relpath,
                                                'warning': warning})
    if not pieces:
      return
    num_bytes = file_io.copy_ranges(
        pieces, posixpath.join(self._tmp_dir, filename), pinned)
    if sums is not None:
      yield beam.pvalue.TaggedOutput(SUMS, sums)
    yield shard_math.ShardResult(split, shard, filename, num_bytes,
                                 sum(counts), tuple(counts))
