"""The Beam pipeline: labelled image folders -> sharded, resized TFRecords.

Every input file is read once, and no step holds per-file data of the whole
dataset: the graph holds one element per class folder, and the global steps
see only per-chunk totals. Stages:

  launcher          top of --input_dir only: layout, classes, one task per
                    class folder (graph size grows with classes, not files)
  ListFolders       workers walk their class folders (local: byte-safe, with
                    the link policy; gs://, s3://: Beam's FileSystems);
                    every file is a candidate or ignored with a reason; the
                    candidates go into runs sorted by order key
                    (listed_files), not one element each
  Chunk             chunk = floor(order_key(seed, path) * num_chunks), with
                    num_chunks from a global count: ~EXAMPLES_PER_CHUNK
                    files per chunk in a seeded order that mixes classes;
                    each run cut into one piece per chunk
  WriteChunks       per chunk, files in (order_key, path) order: read,
                    sha256, split = hash(seed, sha256) (or the split
                    folder), decode/validate/resize/encode; records go to one
                    chunk file per (chunk, split) with an index (offset,
                    length, label, pixel sums, warning of each record) and
                    its byte total; bad files -> rejected
  Dedupe            the writers' (path, chunk, offset) references, through
                    files bucketed by sha256 (dofns.FLUSH_REFERENCES),
                    grouped per content hash: duplicates, label conflicts
                    and leaks resolved; only dropped copies come out
  ShardLayout       prefix sums over the (split, chunk) byte totals (a list
                    the size of the number of chunks) give each record its
                    offset in its split; shard = offset // shard_size
  ConcatShards      one element per (split, shard) from the layout, grouped
                    with the copies dropped in it; reads the indexes of
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
raw; ~4 today, tested in
tests/pipelines/folder_to_records/test_build_memory.py). The chunk writers
write each record before the next file is read; no step's elements carry
image bytes (only paths, hashes and per-chunk totals cross the shuffles);
shards are copied in file_io._COPY_BLOCK pieces. So a worker's peak is its
start-up size plus a few stored images (2 worker processes, raw: 0.37 GiB
at 4096x4096, 1.08 GiB at 8192x8192, the same for 6 or 12 images).

This module is the graph (build_pipeline, run_pipeline); the steps live one
job per module: chunk_format (chunk files and their index), shard_math
(shard layout and arithmetic), file_io (read-ahead, writes, byte-range
copies), dofns (the DoFns and maps), statistics (train mean/std),
report_writer (Finalize), build_config (BuildConfig), runner_options (the
runner defaults).

Everything is written under a hidden temporary folder next to --output_dir;
the launcher renames it into place only after the pipeline succeeded. Each
chunk and shard is a pure function of the input and flags (seeded order,
sorted within every group, deterministic record encoding), so one worker or
many, in one process or several, on any runner, write byte-identical shards.
"""

from __future__ import annotations

import posixpath
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems  # noqa: F401  # pylint: disable=unused-import

from pipelines.common import paths
from pipelines.folder_to_records import listed_files
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import near_carry
from pipelines.folder_to_records import near_duplicates
from pipelines.folder_to_records import reuse
from pipelines.folder_to_records import splits as splits_lib
from pipelines.folder_to_records import runner_options
from tfrecords_schema import metadata as metadata_lib
# The graph's steps, one job per module, by the names the graph (and the
# tests, benchmarks and builder) use. finalize is looked up here when the
# graph is built, so a test can replace it.
# pylint: disable=g-importing-member,unused-import
from pipelines.folder_to_records.build_config import BuildConfig
from pipelines.folder_to_records.chunk_format import chunk_of
from pipelines.folder_to_records.chunk_format import chunk_path
from pipelines.folder_to_records.chunk_format import CHUNKS_DIR
from pipelines.folder_to_records.chunk_format import EXAMPLES_PER_CHUNK
from pipelines.folder_to_records.chunk_format import IndexEntry
from pipelines.folder_to_records.chunk_format import meta_file
from pipelines.folder_to_records.chunk_format import meta_path
from pipelines.folder_to_records.chunk_format import read_index
from pipelines.folder_to_records.chunk_format import num_chunks
from pipelines.folder_to_records.dofns import ConcatShard
from pipelines.folder_to_records.dofns import COUNTS
from pipelines.folder_to_records.dofns import FINDINGS
from pipelines.folder_to_records.dofns import FLAGGED
from pipelines.folder_to_records.dofns import IGNORED
from pipelines.folder_to_records.dofns import KEPT
from pipelines.folder_to_records.dofns import listed_path
from pipelines.folder_to_records.dofns import ListFolder
from pipelines.folder_to_records.dofns import record_split
from pipelines.folder_to_records.dofns import REJECTED
from pipelines.folder_to_records.dofns import dedupe_bucket
from pipelines.folder_to_records.dofns import resolve_duplicates
from pipelines.folder_to_records.dofns import REUSED
from pipelines.folder_to_records.dofns import SUMS
from pipelines.folder_to_records.dofns import TIMES
from pipelines.folder_to_records.dofns import TOTALS
from pipelines.folder_to_records.dofns import WARNINGS
from pipelines.folder_to_records.dofns import WriteChunk
from pipelines.folder_to_records.dofns import write_left_out
from pipelines.folder_to_records.file_io import copy_ranges
from pipelines.folder_to_records.file_io import prefetch_local
from pipelines.folder_to_records.file_io import prefetched
from pipelines.folder_to_records.file_io import READ_AHEAD
from pipelines.folder_to_records.file_io import read_ahead
from pipelines.folder_to_records.report_writer import finalize
from pipelines.folder_to_records.shard_math import shard_keys
from pipelines.folder_to_records.shard_math import shard_layout
from pipelines.folder_to_records.shard_math import shard_of
from pipelines.folder_to_records.shard_math import shards_of_drop
from pipelines.folder_to_records.shard_math import ShardResult
from pipelines.folder_to_records.shard_math import SplitChunks
from pipelines.folder_to_records.statistics import mean_std
from pipelines.folder_to_records.statistics import PixelSums
# pylint: enable=g-importing-member,unused-import


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
  # An update carries the near-duplicate search over where it can.
  carried = near_carry.applies(config)
  ignored = list(plan.ignored)
  run_dir = posixpath.join(tmp_dir, CHUNKS_DIR)
  # The listed files travel in runs (listed_files), but to --stratified's
  # per-class grouping, which takes them one by one.
  listed = (
      # No Create reshuffle: _spread deals the folders out (one stage less).
      _spread(pipeline | 'Folders' >> beam.Create(
          list(plan.folders) + ignored, reshuffle=False),
              'Folders', lambda t: t.relpath)
      | 'ListFolders' >> beam.ParDo(ListFolder(
          config.input_dir, exclude, seed=seed,
          run_dir=None if config.stratified else run_dir)
                                    ).with_outputs(IGNORED, COUNTS,
                                                   main='files'))
  counts = beam.pvalue.AsSingleton(
      _combine(listed[COUNTS], 'Counts',
               beam.combiners.TupleCombineFn(sum, sum)), default_value=(0, 0))
  files = listed.files
  if config.stratified:  # (relpath, split): each class's files ranked.
    files = (files
             | 'ByClass' >> beam.Map(lambda p: (listing_lib.source_file(
                 p, config.layout).class_name, p))
             | 'GroupClasses' >> beam.GroupByKey()
             | 'Stratify' >> beam.FlatMap(
                 lambda kv: splits_lib.stratify(
                     kv[1], seed=seed,
                     validation_fraction=config.validation_fraction,
                     test_fraction=config.test_fraction)))
    chunked = files | 'Chunk' >> beam.Map(
        lambda p, c: (chunk_of(listed_path(p), num_chunks(c[0]), seed=seed),
                      p), counts)
  else:
    chunked = files | 'Chunk' >> beam.FlatMap(
        lambda run, c: listed_files.chunk_pieces(run, c[0]), counts)
  if config.reuse:  # The earlier records go to the chunks of their paths.
    chunked = (chunked, pipeline | 'Earlier' >> beam.Create([None])
               | 'EarlierRecords' >> beam.FlatMap(
                   reuse.earlier_ranges, counts, source=config.reuse,
                   seed=seed, run_dir=run_dir)
               ) | 'WithEarlier' >> beam.Flatten()
  written = (
      chunked
      | 'GroupChunks' >> beam.GroupByKey()
      | 'WriteChunks' >> beam.ParDo(WriteChunk(config, tmp_dir),
                                    counts).with_outputs(
          REJECTED, TOTALS, TIMES, FLAGGED, REUSED, main='records'))
  layouts = (_combine(written[TOTALS], 'AllTotals',
                      beam.combiners.ToListCombineFn())
             | 'ShardLayout' >> beam.Map(shard_layout, shard_size_bytes=size))
  layout = beam.pvalue.AsSingleton(
      layouts, default_value=shard_layout([], shard_size_bytes=size))
  deduped = (
      written.records
      | 'GroupBySha' >> beam.GroupByKey()
      | 'Dedupe' >> beam.FlatMap(dedupe_bucket, config=config
                                 ).with_outputs(REJECTED, FINDINGS, KEPT,
                                                main='dropped'))
  drops, rejected = [deduped.dropped], [listed[IGNORED], written[REJECTED],
                                        deduped[REJECTED]]
  if config.near_duplicate_distance:
    if carried:
      near = near_carry.find(
          deduped[KEPT], distance=config.near_duplicate_distance,
          layout=config.layout, run_dir=run_dir, source=config.reuse)
    else:
      near = near_duplicates.find(
          deduped[KEPT], counts, distance=config.near_duplicate_distance,
          layout=config.layout, run_dir=run_dir)
    near_drops, near_rejected, near_lines, near_capped = near
    drops.append(near_drops)
    rejected.append(near_rejected)
  else:
    near_lines = near_capped = pipeline | 'NoNearSearch' >> beam.Create([])
  all_drops = tuple(drops) | 'AllDrops' >> beam.Flatten()
  _ = (all_drops
       | 'LeftOutBySplit' >> beam.Map(lambda d: (d[0], (d[1], d[2])))
       | 'GroupLeftOut' >> beam.GroupByKey()
       | 'WriteLeftOut' >> beam.Map(write_left_out, tmp_dir=tmp_dir,
                                    config=config))
  shards = (
      (layouts | 'ShardKeys' >> beam.FlatMap(shard_keys),
       all_drops | 'ShardOfDrop' >> beam.FlatMap(
           shards_of_drop, layout, shard_size_bytes=size))
      | 'AllShardKeys' >> beam.Flatten()
      | 'GroupShards' >> beam.GroupByKey()
      | 'ConcatShards' >> beam.ParDo(ConcatShard(tmp_dir, config), layout
                                     ).with_outputs(SUMS, WARNINGS,
                                                    main='shards'))
  stats = _combine(shards[SUMS], 'PixelSums', PixelSums())
  rejected = tuple(rejected) | 'AllRejected' >> beam.Flatten()
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
          near_runs=beam.pvalue.AsList(near_lines),
          near_capped=beam.pvalue.AsIter(near_capped),
          times=beam.pvalue.AsIter(written[TIMES]),
          reused=beam.pvalue.AsIter(written[REUSED]),
          flagged=beam.pvalue.AsIter(written[FLAGGED])))


def run_pipeline(*, config: BuildConfig, plan: listing_lib.InputPlan,
                 tmp_dir: str, beam_args: Sequence[str],
                 exclude: Sequence[str] = ()) -> float:
  """Runs the build into tmp_dir, adds the TFDS metadata; returns seconds."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  # TFDS writes the metadata below; it loads no TensorFlow for that, nor
  # does anything else here: a build's launcher never starts TensorFlow
  # for local folders (3-6 s of every build's wall time).
  import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  paths.makedirs(posixpath.join(tmp_dir, CHUNKS_DIR))
  start = time.perf_counter()  # After imports, as the benchmark's plain loop.
  options = PipelineOptions(runner_options.pipeline_args(beam_args))
  with beam.Pipeline(runner=runner_options.local_runner(options),
                     options=options) as pipeline:
    build_pipeline(pipeline, config=config, plan=plan, tmp_dir=tmp_dir,
                   exclude=exclude)
  # Links unlinked.
  paths.remove_tree(posixpath.join(tmp_dir, CHUNKS_DIR))
  spec = metadata_lib.read_dataset_spec(tmp_dir)
  if any(s.shards for s in spec.splits.values()):  # TFDS needs a shard.
    metadata_lib.write_dataset_metadata(
        tmp_dir, spec,
        description=f'Images from {config.input_dir}, built by pipelines.build.')
  return time.perf_counter() - start
