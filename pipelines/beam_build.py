"""The Beam pipeline: labelled image folders -> sharded, resized TFRecords.

Stages (every arrow between workers carries file *metadata* only, never image
bytes, so memory stays flat however many images there are):

  listing (launcher)        sorted file list, layout, class names, ignored files
  HashFiles                 read bytes, sha256; empty/unreadable -> rejected
  GroupByKey(sha256)        same bytes together: duplicates, conflicts, leaks,
                            split = hash(seed, sha256)
  GroupByKey(split)         seeded order inside the split, cut into chunks of
                            EXAMPLES_PER_CHUNK
  WriteChunks (parallel)    decode/validate/resize/encode, one small TFRecord
                            file per chunk; bad images -> rejected
  GroupByKey(split)         chunks packed in order into shards of ~shard_size
  ConcatShards (parallel)   TFRecord files concatenate byte-wise into shards
  Finalize (one element)    TFDS metadata, metadata.json, build_report.json,
                            rejected.jsonl

Everything is written under a hidden temporary folder next to --output_dir;
the launcher renames it into place only after the pipeline succeeded, so an
interrupted run never leaves something that looks like a dataset. Each chunk
and shard is a pure function of the input and flags (sorted listing, hashed
order, deterministic proto serialization), so one worker or many, in one
process or several, write byte-identical shards.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import posixpath
import sys
import time
from typing import Iterable, Sequence

import apache_beam as beam
import numpy as np

from pipelines import image_ops
from pipelines import listing as listing_lib
from pipelines import splits as splits_lib
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import schema

EXAMPLES_PER_CHUNK = 64  # Unit of parallel work; small enough to balance 2+ workers.
CHUNKS_DIR = '_chunks'
_COPY_BLOCK = 16 << 20


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """Validated build settings (see `pipelines.build` for the flags)."""
  input_dir: str
  output_dir: str
  dataset_name: str
  class_names: tuple[str, ...]
  layout: str
  image: image_ops.ImageOptions
  validation_fraction: float
  test_fraction: float
  seed: int
  shard_size_bytes: int


@dataclasses.dataclass(frozen=True)
class ChunkTask:
  split: str
  index: int
  num_chunks: int
  entries: tuple[splits_lib.Kept, ...]


@dataclasses.dataclass(frozen=True)
class ChunkResult:
  """One written chunk file; pixel sums feed the train mean/std."""
  split: str
  index: int
  path: str
  num_examples: int
  num_bytes: int
  class_counts: tuple[int, ...]
  pixel_sum: tuple[float, ...]
  pixel_sumsq: tuple[float, ...]
  num_pixels: int


@dataclasses.dataclass(frozen=True)
class ShardResult:
  split: str
  index: int
  filename: str
  num_examples: int
  num_bytes: int
  class_counts: tuple[int, ...]


def _read_bytes(path: str) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def _sha256(data: bytes) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(data).hexdigest()


def _log(message: str) -> None:
  print(f'[build] {message}', file=sys.stderr, flush=True)


class HashFile(beam.DoFn):
  """SourceFile -> (sha256, FileEntry); empty/unreadable -> 'rejected'."""

  def __init__(self, input_dir: str):
    self._input_dir = input_dir

  def process(self, source: listing_lib.SourceFile):
    try:
      data = _read_bytes(posixpath.join(self._input_dir, source.relpath))
    except Exception as e:  # pylint: disable=broad-except
      yield beam.pvalue.TaggedOutput('rejected', splits_lib.Dropped(
          source.relpath, image_ops.UNREADABLE,
          f'cannot read file ({type(e).__name__}: {e})'))
      return
    if not data:
      yield beam.pvalue.TaggedOutput('rejected', splits_lib.Dropped(
          source.relpath, image_ops.EMPTY, 'empty file (0 bytes)'))
      return
    sha = _sha256(data)
    yield sha, splits_lib.FileEntry(source.relpath, source.class_name,
                                    source.given_split, sha)


class ResolveSameBytes(beam.DoFn):
  """(sha256, [FileEntry]) -> Kept; Dropped -> 'rejected'; -> 'findings'."""

  def __init__(self, config: BuildConfig):
    self._config = config

  def process(self, element):
    sha, entries = element
    kept, dropped, finding = splits_lib.resolve_same_bytes(
        sha, entries, seed=self._config.seed,
        validation_fraction=self._config.validation_fraction,
        test_fraction=self._config.test_fraction)
    yield from kept
    for d in dropped:
      yield beam.pvalue.TaggedOutput('rejected', d)
    if finding:
      yield beam.pvalue.TaggedOutput('findings', finding)


def plan_chunks(element, *, seed: int,
                chunk_size: int = EXAMPLES_PER_CHUNK) -> Iterable[ChunkTask]:
  """(split, [Kept]) -> ChunkTasks in a seeded, content-stable order."""
  split, entries = element
  ordered = sorted(entries, key=lambda k: (
      splits_lib.order_key(k.relpath, seed=seed), k.relpath))
  num_chunks = math.ceil(len(ordered) / chunk_size)
  for i in range(num_chunks):
    yield ChunkTask(split, i, num_chunks,
                    tuple(ordered[i * chunk_size:(i + 1) * chunk_size]))


def chunk_path(tmp_dir: str, split: str, index: int) -> str:
  return posixpath.join(tmp_dir, CHUNKS_DIR, f'{split}-{index:05d}.tfrecord')


class WriteChunk(beam.DoFn):
  """ChunkTask -> ChunkResult, writing its examples to one chunk file.

  Bad images go to 'rejected' with a reason, format warnings to 'warnings'.
  """

  def __init__(self, config: BuildConfig, tmp_dir: str):
    self._config = config
    self._tmp_dir = tmp_dir

  def process(self, task: ChunkTask):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    config = self._config
    channels = config.image.channels
    label_of = {name: i for i, name in enumerate(config.class_names)}
    class_counts = [0] * len(config.class_names)
    pixel_sum = np.zeros(channels)
    pixel_sumsq = np.zeros(channels)
    num_pixels = num_examples = 0
    path = chunk_path(self._tmp_dir, task.split, task.index)
    with tf.io.TFRecordWriter(path) as writer:
      for entry in task.entries:
        try:
          data = _read_bytes(posixpath.join(config.input_dir, entry.relpath))
          if _sha256(data) != entry.sha256:
            raise image_ops.ImageRejected(
                image_ops.CHANGED, 'file changed while the build ran; '
                'run the build again')
          processed = image_ops.process(
              data, extension=posixpath.splitext(entry.relpath)[1],
              options=config.image)
        except image_ops.ImageRejected as e:
          yield beam.pvalue.TaggedOutput('rejected', splits_lib.Dropped(
              entry.relpath, e.outcome, e.reason))
          continue
        except Exception as e:  # pylint: disable=broad-except
          yield beam.pvalue.TaggedOutput('rejected', splits_lib.Dropped(
              entry.relpath, image_ops.UNREADABLE,
              f'cannot read or decode ({type(e).__name__}: {e})'))
          continue
        if processed.warning:
          yield beam.pvalue.TaggedOutput(
              'warnings', {'path': entry.relpath, 'warning': processed.warning})
        label = label_of[entry.class_name]
        writer.write(schema.encode_example(
            image=processed.encoded, label=label, filename=entry.relpath,
            sha256=entry.sha256, original_height=processed.original_height,
            original_width=processed.original_width))
        class_counts[label] += 1
        num_examples += 1
        pixel_sum += processed.pixel_sum
        pixel_sumsq += processed.pixel_sumsq
        num_pixels += processed.num_pixels
    num_bytes = tf.io.gfile.stat(path).length
    _log(f'{task.split} chunk {task.index + 1}/{task.num_chunks}: '
         f'{num_examples} written, {len(task.entries) - num_examples} '
         'rejected')
    yield ChunkResult(task.split, task.index, path, num_examples, num_bytes,
                      tuple(class_counts), tuple(pixel_sum), tuple(pixel_sumsq),
                      num_pixels)


def plan_shards(element, *, shard_size_bytes: int):
  """(split, [ChunkResult]) -> (split, index, num_shards, [chunk paths]).

  Chunks are packed in order; a shard closes before it would pass the target.
  """
  split, chunks = element
  chunks = sorted((c for c in chunks if c.num_examples), key=lambda c: c.index)
  groups, current, size = [], [], 0
  for chunk in chunks:
    if current and size + chunk.num_bytes > shard_size_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(chunk)
    size += chunk.num_bytes
  if current:
    groups.append(current)
  for i, group in enumerate(groups):
    yield split, i, len(groups), tuple(group)


class ConcatShard(beam.DoFn):
  """Concatenates chunk files (valid TFRecords) into one shard file."""

  def __init__(self, tmp_dir: str, dataset_name: str):
    self._tmp_dir = tmp_dir
    self._dataset_name = dataset_name

  def process(self, element):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    split, index, num_shards, chunks = element
    filename = schema.shard_filename(self._dataset_name, split, index,
                                     num_shards)
    with tf.io.gfile.GFile(posixpath.join(self._tmp_dir, filename), 'wb') as out:
      for chunk in chunks:
        with tf.io.gfile.GFile(chunk.path, 'rb') as f:
          while block := f.read(_COPY_BLOCK):
            out.write(block)
    counts = np.sum([c.class_counts for c in chunks], axis=0)
    yield ShardResult(split, index, filename,
                      sum(c.num_examples for c in chunks),
                      sum(c.num_bytes for c in chunks),
                      tuple(int(n) for n in counts))


def _mean_std(chunks: Sequence[ChunkResult], channels: int):
  """Per-channel mean/std (0..255 scale) over the train chunks, or None."""
  train = [c for c in chunks if c.split == 'train' and c.num_pixels]
  if not train:
    return None, None
  n = sum(c.num_pixels for c in train)
  total = np.sum([c.pixel_sum for c in train], axis=0)
  total_sq = np.sum([c.pixel_sumsq for c in train], axis=0)
  mean = total / n
  std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
  assert mean.shape == (channels,)
  return tuple(round(float(m), 4) for m in mean), tuple(
      round(float(s), 4) for s in std)


def finalize(_, *, config: BuildConfig, tmp_dir: str, num_seen: int,
             shards: list, chunks: list, rejected: list, findings: list,
             warnings: list) -> None:
  """Writes TFDS metadata, metadata.json, build_report.json, rejected.jsonl."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  num_classes = len(config.class_names)
  split_specs = {}
  for split in metadata_lib.SPLITS:
    mine = sorted((s for s in shards if s.split == split), key=lambda s: s.index)
    counts = np.sum([s.class_counts for s in mine], axis=0) if mine else (
        [0] * num_classes)
    split_specs[split] = metadata_lib.SplitSpec(
        name=split, shards=tuple(s.filename for s in mine),
        shard_lengths=tuple(s.num_examples for s in mine),
        num_bytes=sum(s.num_bytes for s in mine),
        class_counts=tuple(int(n) for n in counts))
  mean, std = _mean_std(chunks, config.image.channels)
  spec = metadata_lib.DatasetSpec(
      name=config.dataset_name, class_names=config.class_names,
      height=config.image.height, width=config.image.width,
      channels=config.image.channels, image_format=config.image.image_format,
      resize_mode=config.image.resize_mode, splits=split_specs, mean=mean,
      std=std,
      jpeg_quality=(config.image.jpeg_quality
                    if config.image.image_format == 'jpeg' else None))
  metadata_lib.write_dataset_metadata(
      tmp_dir, spec, description=(
          f'Images from {config.input_dir}, built by pipelines.build.'))

  rejected = sorted(rejected, key=lambda d: (d.relpath, d.outcome))
  written = sum(s.num_examples for s in shards)
  outcome_counts = collections.Counter(d.outcome for d in rejected)
  counts = {'seen': num_seen, 'written': written, **dict(sorted(
      outcome_counts.items()))}
  if written + len(rejected) != num_seen:
    raise AssertionError(
        f'bookkeeping bug: {written} written + {len(rejected)} not written '
        f'!= {num_seen} seen')
  by_kind = collections.defaultdict(list)
  for f in sorted(findings, key=lambda f: f['sha256']):
    by_kind[f['kind']].append(f)
  report = {
      'schema_version': schema.SCHEMA_VERSION,
      'dataset_name': config.dataset_name,
      'input_dir': config.input_dir,
      'layout': config.layout,
      'class_names': list(config.class_names),
      'image': dataclasses.asdict(config.image),
      'seed': config.seed,
      'validation_fraction': config.validation_fraction,
      'test_fraction': config.test_fraction,
      'counts': counts,
      'splits': {
          name: {'total': s.num_examples, 'num_shards': len(s.shards),
                 'num_bytes': s.num_bytes,
                 'per_class': dict(zip(config.class_names, s.class_counts))}
          for name, s in split_specs.items()},
      'train_mean': mean,
      'train_std': std,
      'bytes_written': sum(s.num_bytes for s in shards),
      'duplicates': by_kind[splits_lib.DUPLICATE],
      'conflicts': by_kind[splits_lib.LABEL_CONFLICT],
      'leaks': by_kind[splits_lib.LEAK],
      'warnings': sorted(warnings, key=lambda w: w['path']),
  }
  with tf.io.gfile.GFile(posixpath.join(tmp_dir, metadata_lib.REPORT_FILE),
                         'w') as f:
    json.dump(report, f, indent=2)
  with tf.io.gfile.GFile(posixpath.join(tmp_dir, metadata_lib.REJECTED_FILE),
                         'w') as f:
    for d in rejected:
      f.write(json.dumps({'path': d.relpath, 'reason': d.reason,
                          'outcome': d.outcome}) + '\n')
  _log(f'finalized: {written} written, {len(rejected)} not written')


def build_pipeline(pipeline: beam.Pipeline, *, config: BuildConfig,
                   listing: listing_lib.Listing, tmp_dir: str) -> None:
  """Adds the whole build to `pipeline` (see the module docstring)."""
  ignored = [splits_lib.Dropped(i.relpath, i.outcome, i.reason)
             for i in listing.ignored]
  hashed = (
      pipeline
      | 'ListFiles' >> beam.Create(listing.files)
      | 'SpreadFiles' >> beam.Reshuffle()
      | 'HashFiles' >> beam.ParDo(HashFile(config.input_dir)).with_outputs(
          'rejected', main='entries'))
  resolved = (
      hashed.entries
      | 'GroupSameBytes' >> beam.GroupByKey()
      | 'ResolveSameBytes' >> beam.ParDo(ResolveSameBytes(config)).with_outputs(
          'rejected', 'findings', main='kept'))
  chunks = (
      resolved.kept
      | 'KeyBySplit' >> beam.Map(lambda k: (k.split, k))
      | 'GroupBySplit' >> beam.GroupByKey()
      | 'PlanChunks' >> beam.FlatMap(plan_chunks, seed=config.seed)
      # Keyed by (split, index): the runner deals chunks out evenly.
      | 'KeyChunks' >> beam.Map(lambda t: ((t.split, t.index), t))
      | 'SpreadChunks' >> beam.GroupByKey()
      | 'UnkeyChunks' >> beam.FlatMap(lambda kv: kv[1])
      | 'WriteChunks' >> beam.ParDo(WriteChunk(config, tmp_dir)).with_outputs(
          'rejected', 'warnings', main='chunks'))
  shards = (
      chunks.chunks
      | 'ChunksBySplit' >> beam.Map(lambda c: (c.split, c))
      | 'GroupChunks' >> beam.GroupByKey()
      | 'PlanShards' >> beam.FlatMap(
          plan_shards, shard_size_bytes=config.shard_size_bytes)
      | 'KeyShards' >> beam.Map(lambda s: ((s[0], s[1]), s))
      | 'SpreadShards' >> beam.GroupByKey()
      | 'UnkeyShards' >> beam.FlatMap(lambda kv: kv[1])
      | 'ConcatShards' >> beam.ParDo(ConcatShard(tmp_dir, config.dataset_name)))
  rejected = (
      (pipeline | 'Ignored' >> beam.Create(ignored),
       hashed.rejected, resolved.rejected, chunks.rejected)
      | 'AllRejected' >> beam.Flatten())
  as_list = beam.pvalue.AsList
  _ = (
      pipeline
      | 'Once' >> beam.Create([None])
      | 'Finalize' >> beam.Map(
          finalize, config=config, tmp_dir=tmp_dir,
          num_seen=len(listing.files) + len(listing.ignored),
          shards=as_list(shards), chunks=as_list(chunks.chunks),
          rejected=as_list(rejected), findings=as_list(resolved.findings),
          warnings=as_list(chunks.warnings)))


def run_pipeline(*, config: BuildConfig, listing: listing_lib.Listing,
                 tmp_dir: str, beam_args: Sequence[str]) -> float:
  """Runs the build into tmp_dir; returns wall seconds."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(posixpath.join(tmp_dir, CHUNKS_DIR))
  start = time.perf_counter()
  beam_args = list(beam_args)
  if not any(a.split('=')[0] == '--runner' for a in beam_args):
    # Beam's DirectRunner first tries Prism, which downloads a binary at run
    # time (hangs or fails offline); the FnApiRunner is what it falls back to.
    beam_args.insert(0, '--runner=FnApiRunner')
  options = PipelineOptions(beam_args)
  with beam.Pipeline(options=options) as pipeline:
    build_pipeline(pipeline, config=config, listing=listing, tmp_dir=tmp_dir)
  elapsed = time.perf_counter() - start
  tf.io.gfile.rmtree(posixpath.join(tmp_dir, CHUNKS_DIR))
  return elapsed

