"""The build's last step: metadata.json, build_report.json, rejected.jsonl."""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from pipelines.folder_to_records import build_config
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import near_duplicates
from pipelines.folder_to_records import reuse
from pipelines.folder_to_records import splits as splits_lib
from pipelines.folder_to_records import statistics
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib


def finalize(_, listed: tuple[int, int], *,
             config: build_config.BuildConfig, tmp_dir: str, shards: list,
             stats, findings, warnings, rejected, times, near_runs=(),
             near_capped=(), flagged=(), reused=()) -> None:
  """Writes metadata.json, build_report.json and rejected.jsonl (plain JSON).

  `rejected` is an iterable side input, written to rejected.jsonl as it is
  read (never held); shards has one entry per shard file, findings and
  warnings one per problem found. The launcher adds the TFDS files (which
  need TensorFlow) after the run.
  """
  num_seen = sum(listed)  # (candidates, ignored) of the listing.
  mean, std = statistics.mean_std(stats)
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
  file_io.write_bytes(posixpath.join(tmp_dir, metadata_lib.METADATA_FILE),
                      json.dumps(spec.to_json_dict(), indent=2).encode())

  outcomes = collections.Counter()
  run_dir = posixpath.join(tmp_dir, chunk_format.CHUNKS_DIR)

  def rejected_lines():
    for d in rejected:  # Streamed; sorted in bounded runs.
      outcomes[d.outcome] += 1
      line = {'path': d.relpath, 'reason': d.reason, 'outcome': d.outcome}
      if d.near is not None:
        line.update(near=d.near, distance=d.distance)
      yield json.dumps(line)

  file_io.write_sorted_lines(
      posixpath.join(tmp_dir, metadata_lib.REJECTED_FILE), rejected_lines(),
      run_dir=run_dir)
  _join_image_lines(tmp_dir)
  near = _write_near_pairs(tmp_dir, near_runs, near_capped, config=config,
                           left_out=outcomes[near_duplicates.NEAR_LEAK])
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
  presplit = config.layout == listing_lib.SPLIT_FOLDERS_LAYOUT
  report = report_lib.BuildReport(
      dataset_name=config.dataset_name,
      input_dir=config.input_dir,
      layout=config.layout,
      class_names=tuple(config.class_names),
      image=dataclasses.asdict(config.image),
      seed=config.seed,
      # None where the folders are the splits: the fractions did nothing.
      validation_fraction=None if presplit else config.validation_fraction,
      test_fraction=None if presplit else config.test_fraction,
      stratified=config.stratified,
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
      near_duplicates=near,
      quality_flags=dict(sorted(sum(
          (collections.Counter(c) for c in flagged), collections.Counter()
      ).items())),
      quality_thresholds=dataclasses.asdict(config.quality),
      warnings=tuple(report_lib.FileWarning(**w) for w in sorted(
          warnings, key=lambda w: w['path'])),
      classes_without_examples=splits_lib.classes_without_examples(
          config.class_names, {name: s.class_counts
                               for name, s in split_specs.items()}),
      # First chunk start to last chunk end: the steady-state write time.
      write_stage_s=round(max((t[1] for t in times), default=0.0) -
                          min((t[0] for t in times), default=0.0), 3),
      software=reuse.software(),
      reuse=_reuse_counts(config, reused),
  )
  file_io.write_bytes(posixpath.join(tmp_dir, report_lib.REPORT_FILE),
                      report.to_json().encode())
  file_io.log(f'finalized: {written} written, {not_written} not written')


def _reuse_counts(config: build_config.BuildConfig, reused) -> Optional[dict]:
  """How an incremental build made its records (None for a full build):
  taken from the earlier build, built, damaged earlier records (built
  instead), and earlier records whose file is gone."""
  if not config.reuse:
    return None
  totals = [sum(c) for c in zip(*reused)] or [0] * 4
  return {'from': config.reuse.dataset_dir, 'verified': config.reuse.verify,
          **dict(zip(('reused', 'built', 'damaged', 'gone'), totals))}


def _write_near_pairs(tmp_dir: str, runs, capped, *,
                      config: build_config.BuildConfig, left_out: int
                      ) -> report_lib.NearDuplicates:
  """near_duplicates.jsonl (one pair a line, each once, in line order)
  from the search's sorted runs (near_duplicates.PairRun), and the
  report's counts (of images: near_duplicates.image_kinds)."""
  counts = collections.Counter()
  for run in runs:
    counts.update(run.counts)
  listed = file_io.merge_runs(
      posixpath.join(tmp_dir, metadata_lib.NEAR_DUPLICATES_FILE),
      sorted(run.path for run in runs if run.path is not None), unique=True)
  return report_lib.NearDuplicates(
      distance=config.near_duplicate_distance, images=counts['images'],
      listed=listed.lines, lines_crc32=listed.crc32, leaks=counts['leaks'],
      left_out=left_out,
      within_split=counts[near_duplicates.WITHIN_SPLIT],
      across_evaluation_splits=counts[near_duplicates.ACROSS_EVALUATION],
      label_conflicts=counts['label_conflicts'],
      capped_groups=tuple(report_lib.CappedGroup(**c) for c in sorted(
          capped, key=lambda c: tuple(c[k] for k in sorted(c)))))


def _join_image_lines(tmp_dir: str) -> None:
  """images.jsonl: the chunks' lines, chunk after chunk (deterministic)."""
  found = sorted(m.path for m in FileSystems.match(
      [chunk_format.meta_pattern(tmp_dir)])[0].metadata_list)
  with FileSystems.create(posixpath.join(tmp_dir, metadata_lib.IMAGES_FILE),
                          compression_type=file_io.RAW) as out:
    for path in found:  # A chunk's lines: ~40 KB.
      out.write(chunk_format.read_section(path, chunk_format.IMAGES))
