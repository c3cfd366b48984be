"""Incremental builds: records of unchanged files taken from an earlier build.

  python -m pipelines.build --input_dir=photos --output_dir=data/v2 \
      --reuse_from=data/v1            # or --update: --output_dir is the source

A build's output is a pure function of the folder and the flags, so a file
whose bytes did not change has the same stored image, hashes and measures as
in the earlier build; only its label (class indices move when a class
folder is added or removed), its split (the fractions) and its place in the
shards may differ, and those are re-derived here exactly as a full build
derives them. The result is byte-identical to a full build of the folder.

"Unchanged" (README, "Incremental builds"): same path, same size and same
modification time (nanoseconds) as the earlier build listed in its
images.jsonl, and that time older than the earlier build's start minus
RACY_S (a file written in the same instant as the earlier build read it
might have changed after). Such a file is not even read. Any other file
that had a record is read and hashed: same sha256, its record is reused
(a touched file); otherwise it is built. --verify_reuse hashes every file.

Where the records are: images.jsonl lists every decoded file in shard
order (chunk order, and in a chunk the order records were written), with
its record's length; a split's shards hold its lines minus the copies the
build left out (rejected.jsonl names them), shard_lengths (metadata.json)
cut them into shards, and the copies left out are in the same order in
the split's left_out file. `old_records` walks it once, in one worker, and
sends each record's place to the new build's chunk that will write it
(keyed like the listed files: chunk_of(path)), so no step holds the old
dataset's file list; `earlier_ranges` writes those places into files
sorted by chunk, so the chunk shuffle carries one range per chunk, not one
element per earlier record. A record is checked before it is reused (frame
checksums, its path and sha256); a damaged one is built from its file
instead and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import re
import struct
from typing import Iterable, Iterator, NamedTuple, Optional

from pipelines.common import paths
from pipelines.common.errors import UserError
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import file_io
from pipelines.preprocessing import image_quality
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
from tfrecords_schema import schema

# Bumped when images.jsonl or the record stops meaning what reuse expects,
# and whenever chunk_format.image_line would write other text for the same
# values: an update keeps an earlier line's text as it is (WriteChunk).
# 2: the centre hash leaves out 4% a side (perceptual_hash.CENTRE_CROP).
FORMAT = 2
# A file modified within this many seconds before the earlier build began
# is hashed even when its size and time match (the "racy" window: file
# systems with coarse timestamps, a write during the listing).
RACY_S = 2.0

# What a line must hold for its record to be taken (chunk_format.image_line).
_LINE_KEYS = frozenset((
    'path', 'split', 'sha256', 'phash', 'phash_centre', 'flags', 'quality',
    'file_bytes', 'mtime_ns', 'record_bytes', 'original_size', 'pixel_sum',
    'pixel_sumsq', 'num_pixels', 'warning'))
# images.jsonl lines closer than this are read in one piece.
_GAP = 64 << 10

# ImageOptions field -> the flag that sets it, for the refusal line.
_FLAGS = {'height': '--image_size', 'width': '--image_size',
          'channels': '--channels', 'resize_mode': '--resize_mode',
          'image_format': '--image_format', 'jpeg_quality': '--jpeg_quality',
          'max_pixels': '--max_image_pixels',
          'max_file_bytes': '--max_file_bytes',
          'background': 'the background colour',
          'measure': '--near_duplicate_distance/--quality_thresholds'}


def software() -> dict:
  """The libraries whose versions decide a stored image's bytes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top
  from PIL import features  # pylint: disable=g-import-not-at-top
  return {'pillow': PIL.__version__, 'numpy': np.__version__,
          'libjpeg': str(features.version('jpg')),
          'zlib': str(features.version('zlib')), 'format': str(FORMAT)}


@dataclasses.dataclass(frozen=True)
class Source:
  """An earlier build whose records may be reused (checked by `open_source`).

  shards: every shard file name, train then validation then test, then its
  left_out files (an Old's `shard` indexes it); started_at: when that build
  began (unix seconds); report: its build report, as open_source checked it
  (an update's carried search reads it: near_carry).
  """
  dataset_dir: str
  shards: tuple[str, ...]
  started_at: float
  verify: bool = False
  report: Optional[report_lib.BuildReport] = dataclasses.field(
      default=None, compare=False)

  def shard_path(self, index: int) -> str:
    return posixpath.join(self.dataset_dir, self.shards[index])


class Old(NamedTuple):
  """A record of the earlier build: its path, where its images.jsonl line
  is (line_at, line_bytes) and where its framed record is."""
  relpath: str
  line_at: int
  line_bytes: int
  shard: int
  offset: int


# An Old in a file of `earlier_ranges`: line_at, line_bytes, shard, offset,
# the path's length, then the path (UTF-8; surrogatepass keeps the lone
# surrogates a path undecodable as UTF-8 was listed with).
_OLD = struct.Struct('<QIIQI')
# Olds one worker of `earlier_ranges` holds before it writes them out (~150
# bytes each in memory); the pieces are then merged into one file.
_FLUSH_OLDS = 200_000


class Earlier(NamedTuple):
  """What the chunk shuffle carries of the earlier build for one chunk:
  a byte range of a file of `earlier_ranges` holding its Olds."""
  path: str
  offset: int
  length: int


def _pack_old(old: Old) -> bytes:
  name = old.relpath.encode('utf-8', 'surrogatepass')
  return _OLD.pack(old.line_at, old.line_bytes, old.shard, old.offset,
                   len(name)) + name


def read_olds(earlier: Earlier) -> list[Old]:
  """The Olds of one Earlier range, in the order they were written."""
  return [Old(name.decode('utf-8', 'surrogatepass'), line_at, line_bytes,
              shard, offset)
          for (line_at, line_bytes, shard, offset, _), name in
          file_io.unpack_entries(file_io.read_keyed([earlier]), _OLD,
                                 'an earlier record')]


def earlier_ranges(_, counts: tuple[int, int], *, source: Source, seed: int,
                   run_dir: str):
  """old_records through files: (new chunk, Earlier) for each chunk that
  has earlier records, written in pieces of at most _FLUSH_OLDS into
  run_dir and merged into one file (one range a chunk). The chunk shuffle
  then carries about one element per chunk instead of one per earlier
  record (the local runner holds a shuffle in memory and pays per
  element); a retried attempt writes new files."""
  runs, entries = [], []
  for chunk, old in old_records(_, counts, source=source, seed=seed):
    entries.append((chunk, _pack_old(old)))
    if len(entries) >= _FLUSH_OLDS:
      runs.append(list(file_io.write_keyed(run_dir, 'earlier', entries)))
      entries = []
  runs.append(list(file_io.write_keyed(run_dir, 'earlier', entries)))
  # One range a chunk, whatever the number of flushes.
  for key, place in file_io.merge_keyed(runs, run_dir, 'earlier'):
    yield key, Earlier(*place)


def _refuse(flag_value: str, why: str, fix: str) -> UserError:
  return UserError(f'{flag_value} {why}; {fix}')


def open_source(dataset_dir: str, *, image: dict, flag: str,
                verify: bool) -> Source:
  """The earlier build at dataset_dir, or UserError (one line) when it
  cannot give this build's bytes: not a dataset, another format version,
  other stored-image settings (named), other library versions.

  image: this build's ImageOptions as a dict.
  """
  shown = f'{flag}={dataset_dir}'
  full = 'build without it (a full build)'
  if not paths.isdir(dataset_dir):
    raise _refuse(shown, 'is not a folder', f'pass a dataset folder, or {full}')
  special = paths.special_entry(dataset_dir)
  if special:  # Its files are read by workers that do not look first.
    raise _refuse(shown, f'holds {special[0]}, which is not a regular file '
                  f'but {special[1]}', f'remove it, or {full}')
  try:
    spec = metadata_lib.read_dataset_spec(dataset_dir)
  except UserError:
    spec = None
  report = report_lib.read_build_report(dataset_dir)
  if spec is None or report is None or not paths.exists(
      posixpath.join(dataset_dir, metadata_lib.IMAGES_FILE)):
    raise _refuse(shown, 'is not a dataset written by pipelines.build '
                  f'(its {metadata_lib.METADATA_FILE}, '
                  f'{report_lib.REPORT_FILE} or {metadata_lib.IMAGES_FILE} '
                  'is missing or unreadable)',
                  f'pass the --output_dir of an earlier build, or {full}')
  stored = {'height': spec.height, 'width': spec.width,
            'channels': spec.channels, 'image_format': spec.image_format,
            'resize_mode': spec.resize_mode}
  if any(report.image.get(k) != v for k, v in stored.items()) or (
      spec.image_format == 'jpeg' and
      report.image.get('jpeg_quality') != spec.jpeg_quality):
    raise _refuse(shown, f'is damaged: its {metadata_lib.METADATA_FILE} and '
                  f'{report_lib.REPORT_FILE} disagree on the stored images',
                  full)
  if report.software.get('format') != str(FORMAT):
    was = report.software.get('format')
    raise _refuse(shown, 'was written by an older version of pipelines.build '
                  f'(reuse format {was or "none"}, this version {FORMAT}: '
                  'what its images.jsonl stores, e.g. its hashes, is not '
                  'what this version would store)', full + ' once')
  differ = sorted({_FLAGS.get(k, k) for k in set(image) | set(report.image)
                   if _normal(image.get(k)) != _normal(report.image.get(k))})
  if differ:
    was = ', '.join(_as_flag(f, report.image) for f in differ)
    raise _refuse(shown, f'was built with other {", ".join(differ)}: {was} '
                  '(its stored images differ from what these flags give)',
                  f'pass the same flags as that build, or {full}')
  mine = software()
  libs = sorted(k for k in mine if mine[k] != report.software.get(k))
  if libs:
    was = ', '.join(f'{k} {report.software.get(k)} -> {mine[k]}' for k in libs)
    raise _refuse(shown, f'was built with other library versions ({was}); '
                  'their stored images may differ by a few bits', full)
  shards = tuple(name for split in metadata_lib.SPLITS
                 if split in spec.splits for name in spec.splits[split].shards)
  left_out = tuple(metadata_lib.LEFT_OUT_FILES[split]
                   for split in metadata_lib.SPLITS if paths.exists(
                       posixpath.join(dataset_dir,
                                      metadata_lib.LEFT_OUT_FILES[split])))
  return Source(dataset_dir=dataset_dir, shards=shards + left_out,
                started_at=float(report.started_at or 0.0), verify=verify,
                report=report)


def _as_flag(flag: str, image: dict) -> str:
  """A flag of _FLAGS as the earlier build had it ('--image_size=32')."""
  if flag == '--image_size':
    h, w = image.get('height'), image.get('width')
    return f'--image_size={h}' if h == w else f'--image_size={h},{w}'
  field = next(k for k, v in _FLAGS.items() if v == flag)
  if field == 'measure':
    return f'hashes and measures {"on" if image.get(field) else "off"}'
  if field == 'background':
    return f'background {image.get(field)}'
  return f'{flag}={image.get(field)}'


def _normal(value):
  """JSON and dataclass forms of a value compare equal ([1, 2] = (1, 2))."""
  return list(value) if isinstance(value, (list, tuple)) else value


def _until_unreadable(lines: Iterable[bytes]) -> Iterator[bytes]:
  """The lines of an earlier build's file up to the first that cannot be
  read (a remote store's client raises its own errors, not OSError; see
  Records.read): where later records are is then unknown, so they are
  built."""
  try:
    yield from lines
  except Exception:  # pylint: disable=broad-except
    return


def old_records(_, counts: tuple[int, int], *, source: Source, seed: int):
  """One pass over the earlier build's images.jsonl: (new chunk, Old) for
  each record in its shards, and for each copy it left out (in its split's
  left_out file). counts: the new listing's (candidates, ignored)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  spec = metadata_lib.read_dataset_spec(source.dataset_dir)
  num_chunks = chunk_format.num_chunks(counts[0])
  dropped = _left_out_paths(source)
  first, place = 0, {}  # split -> [shard index in source.shards, left, offset]
  for split in metadata_lib.SPLITS:
    if split in spec.splits:
      lengths = list(spec.splits[split].shard_lengths)
      place[split] = [first, lengths, 0]
      first += len(lengths)
  split_of = {name: split for split, name in
              metadata_lib.LEFT_OUT_FILES.items()}
  left_out = {}  # split -> [its left_out file's index in source.shards, offset]
  for index, name in enumerate(source.shards[first:], first):
    left_out[split_of[name]] = [index, 0]
  try:
    # Which records were left out unknown (dropped None): all are built.
    images = contextlib.nullcontext(()) if dropped is None else (
        FileSystems.open(posixpath.join(
            source.dataset_dir, metadata_lib.IMAGES_FILE),
                         compression_type=file_io.RAW))
  except Exception:  # pylint: disable=broad-except  # As in Records.read.
    images = contextlib.nullcontext(())  # None taken: all built.
  with images as f:
    line_at = 0
    for raw in _until_unreadable(f):
      at_line, line_at = line_at, line_at + len(raw)
      fields = _place_fields(raw)
      if fields is None:
        break  # A damaged line: where later records are is unknown; built.
      relpath, split, length = fields
      if relpath in dropped:  # In its split's left_out file.
        at = left_out.get(split)
        if at is None:
          continue
        yield (chunk_format.chunk_of(relpath, num_chunks, seed=seed),
               Old(relpath, at_line, len(raw), at[0], at[1]))
        at[1] += length
        continue
      at = place.get(split)
      if at is None:
        continue
      while at[1] and at[1][0] == 0:  # The shard is full: the next one.
        at[0], at[2] = at[0] + 1, 0
        at[1].pop(0)
      if not at[1]:
        continue  # More lines than records: a damaged manifest; built.
      yield (chunk_format.chunk_of(relpath, num_chunks, seed=seed),
             Old(relpath, at_line, len(raw), at[0], at[2]))
      at[1][0] -= 1
      at[2] += length


_LINE_START = b'{"path": "'


def _place_fields(raw: bytes) -> Optional[tuple[str, str, int]]:
  """(path, split, record_bytes) of an images.jsonl line (bytes) whose
  checksum holds, read without parsing the rest (old_records reads every
  earlier line on one worker: ~3 µs a line instead of ~10); None for a
  damaged line. WriteChunk parses the whole line (checked_line) before a
  record is taken."""
  text = chunk_format.checked_text(raw)
  if text is None or not text.startswith(_LINE_START):
    return None
  try:
    line = text.decode('ascii')  # json.dumps escapes the rest.
    path, end = json.decoder.scanstring(line, len(_LINE_START))
    if not line.startswith(', "split": "', end):
      return None
    split, end = json.decoder.scanstring(line, end + 12)
    at = line.index(', "record_bytes": ', end) + 18
    length = int(line[at:line.index(',', at)])
  except ValueError:  # UnicodeDecodeError and JSONDecodeError too.
    return None
  return path, split, length


def raw_text(raw: bytes) -> str:
  """An images.jsonl line (bytes; JSON, so ASCII) as text, without its line
  end: what chunk_format.image_line returned when it was written."""
  return raw.rstrip(b'\n').decode('ascii')


def checked_line(raw: bytes) -> Optional[dict]:
  """An images.jsonl line (bytes) as a dict when its checksum
  (chunk_format.image_line's 'check') holds and it has what a record needs;
  None for a damaged or edited line (its file is then built)."""
  text = chunk_format.checked_text(raw)
  if text is None:
    return None
  try:
    line = json.loads(text)
  except ValueError:
    return None
  if not (isinstance(line, dict) and _LINE_KEYS <= line.keys()
          and _as_written(line)):
    return None
  return line


_HEX16, _HEX64 = re.compile('[0-9a-f]{16}'), re.compile('[0-9a-f]{64}')
# The type of each Measures value as image_line writes it, in field order
# (colour is None in 1-channel datasets); a test holds it to Measures.
MEASURE_TYPES = frozenset({(float,) * 5 + (int, float),
                           (float,) * 5 + (int, type(None))})
_INT, _STR = frozenset({int}), frozenset({str})


def _ints(values, length: Optional[int] = None) -> bool:
  return (type(values) is list and (length is None or len(values) == length)
          and set(map(type, values)) <= _INT)


def _hash_text(value) -> bool:
  return value is None or (type(value) is str and bool(_HEX16.fullmatch(value)))


def _as_written(line: dict) -> bool:
  """Whether each value a taken record uses has the type and form
  chunk_format.image_line writes (ints as ints, hashes as lowercase hex):
  an edited line whose checksum was made again must not be taken with
  48.0 for 48 or 'AB' for 'ab' (the same numbers, other text: the line is
  kept as it is, so the update would differ from a full build)."""
  quality = line['quality']
  if quality is not None:
    if not (type(quality) is dict
            and tuple(quality) == image_quality.MEASURE_FIELDS
            and tuple(map(type, quality.values())) in MEASURE_TYPES):
      return False
  return (type(line['path']) is str and type(line['split']) is str
          and type(line['sha256']) is str and bool(_HEX64.fullmatch(
              line['sha256']))
          and _hash_text(line['phash']) and _hash_text(line['phash_centre'])
          and (line['phash'] is None) == (line['phash_centre'] is None)
          and type(line['flags']) is list
          and set(map(type, line['flags'])) <= _STR
          and type(line['file_bytes']) is int
          and (line['mtime_ns'] is None or type(line['mtime_ns']) is int)
          and type(line['record_bytes']) is int
          and _ints(line['original_size'], 2)
          and _ints(line['pixel_sum'])
          and _ints(line['pixel_sumsq'], len(line['pixel_sum']))
          and type(line['num_pixels']) is int
          and (line['warning'] is None or type(line['warning']) is str))


def _left_out_paths(source: Source) -> Optional[set]:
  """The paths the earlier build left out (rejected.jsonl); None when that
  file is missing or damaged."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  dropped = set()
  try:
    with FileSystems.open(posixpath.join(
        source.dataset_dir, metadata_lib.REJECTED_FILE),
                          compression_type=file_io.RAW) as f:
      for raw in f:
        dropped.add(json.loads(raw)['path'])
  except Exception:  # pylint: disable=broad-except  # As in Records.read.
    return None
  return dropped


def stat(path: str) -> Optional[tuple[int, Optional[int]]]:
  """(size in bytes, modification time in ns) of a local source file (a
  link: its target's); None for one this process may not read, and for
  gs://, s3://, ...: a round trip per file would slow every build, so
  remote files are always read and hashed."""
  if paths.is_remote(path) or not os.access(path, os.R_OK):
    return None  # Unreadable: read, so it is rejected as a full build does.
  info = os.stat(path)
  return info.st_size, info.st_mtime_ns


def unchanged(line: dict, size_mtime: tuple[int, int], source: Source) -> bool:
  """Whether a file may be taken as its earlier record without reading it
  (module docstring: same size and time, not in the racy window)."""
  return (not source.verify and size_mtime[1] is not None
          and line.get('file_bytes') == size_mtime[0]
          and line.get('mtime_ns') == size_mtime[1]
          and size_mtime[1] < (source.started_at - RACY_S) * 1e9)


class Taken(NamedTuple):
  """An earlier record's file as WriteChunk reads a ProcessedImage of it
  (the same attribute names), from its images.jsonl line: no stored bytes
  (the record is taken whole) and no Measures made (quality: the line's
  dict, which image_quality.flags and measures_dict take as they are).
  Made for every taken file: a ProcessedImage and its Measures (frozen
  dataclasses) took ~4 µs a file, this ~1."""
  original_height: int
  original_width: int
  pixel_sum: list
  pixel_sumsq: list
  num_pixels: int
  warning: Optional[str]
  phashes: Optional[tuple[int, int]]
  quality: Optional[dict]


def processed(line: dict) -> Taken:
  """An earlier record's file as building it would describe it, from its
  images.jsonl line as checked_line returned it (every value of the type
  and form a build writes: _as_written)."""
  height, width = line['original_size']
  return Taken(height, width, line['pixel_sum'], line['pixel_sumsq'],
               line['num_pixels'], line['warning'],
               (int(line['phash'], 16), int(line['phash_centre'], 16))
               if line['phash'] else None, line['quality'])


class Records:
  """Reads earlier records from the source's shards (one worker's open
  files, closed by close())."""

  def __init__(self, source: Source):
    self._source = source
    self._open = {}
    # Shards whose records may be copied by later steps from the place
    # they were checked: local shard index -> file_io.identity when read.
    self.pinned = {}

  def lines(self, olds) -> dict:
    """relpath -> (its parsed images.jsonl line, that line's text without
    its line end), for the Olds of one chunk.
    A chunk's paths are neighbours in the earlier build's order too (when
    its --seed was the same), so lines less than _GAP apart are read in one
    piece. A line that is not its Old's (a damaged or replaced file) is
    left out: its file is built."""
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
    found = {}
    olds = sorted(olds, key=lambda o: o.line_at)
    try:
      with FileSystems.open(posixpath.join(self._source.dataset_dir,
                                           metadata_lib.IMAGES_FILE),
                            compression_type=file_io.RAW) as f:
        i = 0
        while i < len(olds):
          j = i + 1
          while j < len(olds) and olds[j].line_at - (
              olds[j - 1].line_at + olds[j - 1].line_bytes) < _GAP:
            j += 1
          start = olds[i].line_at
          f.seek(start)
          block = f.read(olds[j - 1].line_at + olds[j - 1].line_bytes - start)
          for o in olds[i:j]:
            raw = block[o.line_at - start:o.line_at - start + o.line_bytes]
            line = checked_line(raw)
            if line is not None and line['path'] == o.relpath:
              found[o.relpath] = (line, raw_text(raw))
          i = j
    except Exception:  # pylint: disable=broad-except
      pass  # All built (see read: any failure of the earlier dataset).
    return found

  def read(self, old: Old, line: dict, label: int
           ) -> Optional[tuple[bytes, bool]]:
    """(the framed record a full build writes for line's file with `label`,
    whether it is the earlier one as it is at old's place in a shard that
    later steps may copy it from: a local file, its identity in `pinned`);
    re-labelled when its class index moved; None when the record at old's
    place is damaged or is not that file's."""
    try:
      if old.shard not in self._open:
        f = self._open[old.shard] = file_io.FileSystems.open(
            self._source.shard_path(old.shard),
            compression_type=file_io.RAW)
        identity = file_io.identity(f)
        if identity is not None:
          self.pinned[old.shard] = identity
      f = self._open[old.shard]
      f.seek(old.offset)
      framed = f.read(line['record_bytes'])
      data = schema.unframe_record(framed)
      height, width = line['original_size']
      values = dict(filename=line['path'], sha256=line['sha256'],
                    original_height=height, original_width=width)
      if schema.holds(data, label=label, **values):
        return framed, old.shard in self.pinned
      example = schema.decode_example(data)  # Another label: re-labelled.
      if not schema.holds(data, label=example[schema.LABEL], **values):
        return None
    except Exception:  # pylint: disable=broad-except
      # Damaged, or unreadable: an object store's client raises its own
      # errors (not OSError; tf.io.gfile's OutOfRangeError, a 503 after its
      # retries). Whatever fails in the earlier dataset, the file is built
      # from its source as a full build would; it must never be the
      # source that is reported unreadable.
      return None
    return schema.frame_record(schema.encode_example(
        image=example[schema.IMAGE], label=label, filename=line['path'],
        sha256=line['sha256'],
        original_height=example[schema.ORIGINAL_HEIGHT],
        original_width=example[schema.ORIGINAL_WIDTH])), False

  def close(self) -> None:
    for f in self._open.values():
      f.close()
    self._open.clear()


# What differs between two builds of one folder: how long they took and
# how they were made (build_report.json keys; report.html's elapsed row).
MAKING_KEYS = ('elapsed_s', 'images_per_s', 'write_stage_s', 'started_at',
               'reuse')
_ELAPSED_ROW = re.compile(rb'<dt>elapsed</dt><dd>.*?</dd>')


def differences(a: str, b: str) -> list[str]:
  """The files of two local dataset folders whose bytes differ, the
  timings and the reuse counts aside (MAKING_KEYS); [] when an update and a
  full build of one folder agree, as they must."""
  names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
  differ = []
  for name in names:
    pa, pb = os.path.join(a, name), os.path.join(b, name)
    if not (os.path.isfile(pa) and os.path.isfile(pb)):
      differ.append(name)
      continue
    with open(pa, 'rb') as fa, open(pb, 'rb') as fb:
      da, db = fa.read(), fb.read()
    if name == report_lib.REPORT_FILE:
      da, db = (json.dumps({k: v for k, v in json.loads(d).items()
                            if k not in MAKING_KEYS}) for d in (da, db))
    elif name == metadata_lib.REPORT_PAGE_FILE:
      da, db = (_ELAPSED_ROW.sub(b'', d) for d in (da, db))
    if da != db:
      differ.append(name)
  return differ
