"""What a finished build tells its user: the end-of-build table, the classes
a model cannot learn (build_report.json's empty_classes) and the error of a
build that wrote nothing.
"""

from __future__ import annotations

import json
import posixpath
from typing import Mapping

from pipelines import plots
from pipelines.common import paths
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import output_folder
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib


def nothing_written(report: report_lib.BuildReport, output_dir: str) -> str:
  """The error for a build in which every file was rejected or ignored."""
  reasons = ', '.join(f'{n} {k}' for k, n in report.not_written.items()
                      if n)
  rejected = posixpath.join(output_dir, metadata_lib.REJECTED_FILE)
  where = ('the earlier dataset in --output_dir was kept (build into a new '
           "folder to get each file's reason)"
           if output_folder.is_dataset(output_dir) else
           f'the reason for each file is in {rejected}')
  return (f'no image of --input_dir={report.input_dir} could be written '
          f'({report.seen} files: {reasons}); {where}; fix or replace '
          'those files and rerun')

def _rejected_per_class(tmp_dir: str, layout: str) -> dict:
  """Class name -> lines of rejected.jsonl under its folder (streamed)."""
  depth = 1 if layout == listing_lib.SPLIT_FOLDERS_LAYOUT else 0
  counts = {}
  with paths.open_binary(
      posixpath.join(tmp_dir, metadata_lib.REJECTED_FILE)) as f:
    for line in f:
      parts = json.loads(line)['path'].split('/')
      if len(parts) > depth + 1:
        counts[parts[depth]] = counts.get(parts[depth], 0) + 1
  return counts


def _written_per_class(report: report_lib.BuildReport) -> dict[str, int]:
  """Class -> images written, over all splits."""
  return {c: sum(s.per_class.get(c, 0) for s in report.splits.values())
          for c in report.class_names}


def empty_classes(report: report_lib.BuildReport,
                  tmp_dir: str) -> list[report_lib.EmptyClass]:
  """The classes a model cannot learn: none of their images was written
  (all rejected, or an empty folder), or none is in train. One entry each
  for build_report.json's `empty_classes`: class, images written, in train,
  files rejected, and the warning the summary shows."""
  splits = report.splits
  written = _written_per_class(report)
  train = splits['train'].per_class
  if all(train[c] for c in report.class_names):
    return []
  rejected = _rejected_per_class(tmp_dir, report.layout)
  split_folders = report.layout == listing_lib.SPLIT_FOLDERS_LAYOUT
  out = []
  for name in report.class_names:
    if train[name]:
      continue
    n = rejected.get(name, 0)
    if not written[name]:
      why = ('its only file was rejected' if n == 1 else
             f'all {n} of its files were rejected' if n else
             f'its folder{"s hold" if split_folders else " holds"} no file')
      warning = (f'no image written: {why}' + (
          f' (reasons in {metadata_lib.REJECTED_FILE})' if n else '') +
                 '; a model cannot learn it')
    else:
      fix = (f'add images to train/{name}/' if split_folders else
             'add images, or lower --validation_fraction/--test_fraction')
      warning = (f'no image in train ({written[name]} in validation/test): '
                 f'a model cannot learn it; {fix}')
    out.append(report_lib.EmptyClass(
        class_name=name, written=written[name], train=0, rejected=n,
        warning=warning))
  return out


def thin_evaluation_classes(report: report_lib.BuildReport
                            ) -> list[tuple[str, str, int, float]]:
  """(class, split, images, expected) for each class with no image, or at
  most half its share, in an evaluation split of the hash split.

  Each file's split comes from its own hash, so a small class's share of
  validation or test varies (36 files a class at 0.2 gave 5 to 11): at
  half its share or less, that split's accuracy for the class rests on too
  few images. Not for split folders (the user chose those splits), nor for
  classes with no train image (empty_classes names them), nor where the
  share is under one image.
  """
  if report.layout == listing_lib.SPLIT_FOLDERS_LAYOUT:
    return []
  written = _written_per_class(report)
  out = []
  for split, fraction in (('validation', report.validation_fraction),
                          ('test', report.test_fraction)):
    if not fraction or split not in report.splits:
      continue
    per_class = report.splits[split].per_class
    for name in report.class_names:
      expected = fraction * written[name]
      got = per_class.get(name, 0)
      if (expected >= 1 and got <= expected / 2 and
          report.splits['train'].per_class.get(name, 0)):
        out.append((name, split, got, expected))
  return out


# The summary shows every class up to this many; beyond, the smallest and
# largest few of each split (build_report.json has them all).
SUMMARY_MAX_CLASSES = 20
_SUMMARY_EDGE = 3


def _class_rows(split: str, per_class: Mapping[str, int], width: int,
                report_path: str) -> list[str]:
  row = lambda name, n: f'{split:<12}{name:<{width}}  {n:>8}'
  if len(per_class) <= SUMMARY_MAX_CLASSES:
    return [row(name, n) for name, n in per_class.items()]
  ranked = sorted(per_class.items(), key=lambda item: (item[1], item[0]))
  hidden = len(ranked) - 2 * _SUMMARY_EDGE
  return ([row(name, n) for name, n in ranked[:_SUMMARY_EDGE]] +
          [f'{split:<12}{f"({hidden} more)":<{width}}  {"":>8}   '
           f'smallest above, largest below; every class: {report_path}'] +
          [row(name, n) for name, n in ranked[-_SUMMARY_EDGE:]])


def _found_lines(report: report_lib.BuildReport) -> list[str]:
  """What the build found and reported without removing: near-duplicates
  and image-quality flags (a line each, only when there are some)."""
  out = report.output_dir
  lines = []
  near = report.near_duplicates
  if near.images or near.capped_groups:
    parts = [f'{n} {what if n == 1 else plural}' for n, what, plural in (
        (near.left_out, 'left out of validation/test (a copy of a train '
         'image)', 'left out of validation/test (copies of train images)'),
        (near.within_split, 'image with a copy in its split',
         'images with a copy in their split'),
        (near.across_evaluation_splits, 'validation/test image with a copy '
         'in the other', 'validation/test images with a copy in the other'),
        (near.label_conflicts, 'image with a copy of another class (check '
         'the labels)', 'images with a copy of another class (check their '
         'labels)'),
        (len(near.capped_groups), 'group too large to compare whole',
         'groups too large to compare whole'))
             if n]
    lines.append(f'near-duplicates (perceptual hash within {near.distance} '
                 f'bits): {", ".join(parts)}; nearest copies of each image: '
                 f'{out}/{metadata_lib.NEAR_DUPLICATES_FILE}')
  if report.quality_flags:
    counts = ', '.join(f'{flag} {n}' for flag, n in report.quality_flags.items())
    lines.append(f'quality flags (reported, not removed; tune with '
                 f'--quality_thresholds): {counts}; per file: '
                 f'{out}/{metadata_lib.IMAGES_FILE}')
  return lines


def format_summary(report: report_lib.BuildReport | Mapping) -> str:
  """The end-of-build table: per split/class counts, rejects, speed, bytes.

  Up to SUMMARY_MAX_CLASSES classes every class has a row; beyond, each
  split shows its smallest and largest classes, so 2,000 classes still fit
  a screen. Classes a model cannot learn are warned about (a few shown).
  report: a BuildReport with output_dir, or its JSON object (build()'s
  result).
  """
  if not isinstance(report, report_lib.BuildReport):
    report = report_lib.BuildReport.from_json_dict(report)
  classes = report.class_names
  out = report.output_dir
  report_path = posixpath.join(out, report_lib.REPORT_FILE)
  width = max(12, *(len(c) for c in classes))
  lines = [f'{"split":<12}{"class":<{width}}  {"images":>8}']
  for split, info in report.splits.items():
    if not info.total:
      continue
    lines.extend(_class_rows(split, info.per_class, width, report_path))
    lines.append(f'{split:<12}{"(all)":<{width}}  {info.total:>8}'
                 f'   {info.num_shards} shard(s), '
                 f'{info.num_bytes / 1e6:.1f} MB')
  empty = report.empty_classes or ()
  for entry in empty[:_SUMMARY_EDGE * 2]:
    name = output_folder.shown_name(entry.class_name)
    lines.append(f'warning: class {name!r}: '
                 f'{entry.warning}')
  if len(empty) > _SUMMARY_EDGE * 2:
    lines.append(f'warning: {len(empty) - _SUMMARY_EDGE * 2} more classes '
                 f'with no image in train: empty_classes in {report_path}')
  thin = thin_evaluation_classes(report)
  for name, split, got, expected in thin[:_SUMMARY_EDGE * 2]:
    fraction = getattr(report, f'{split}_fraction')
    lines.append(
        f'warning: class {output_folder.shown_name(name)!r}: {got} '
        f'image{"" if got == 1 else "s"} in {split}, {expected:.1f} expected '
        f'(--{split}_fraction={fraction:g}); its {split} accuracy rests on '
        f'too few images: add images to the class, or rebuild with '
        '--stratified for exact per-class shares (each file\'s split comes '
        'from its own hash, so a small class\'s share varies)')
  if len(thin) > _SUMMARY_EDGE * 2:
    lines.append(f'warning: {len(thin) - _SUMMARY_EDGE * 2} more classes '
                 'with too few validation/test images (per-class counts in '
                 f'{report_path})')
  lines.append('')
  not_written = report.seen - report.written
  lines.append(f'seen {report.seen}, written {report.written}, '
               f'not written {not_written}' + (':' if not_written else ''))
  for key, value in report.not_written.items():
    lines.append(f'  {key:<36}{value:>8}')
  lines.extend(_found_lines(report))
  lines.append(f'{report.images_per_s} images/s over '
               f'{report.elapsed_s} s, {report.bytes_written / 1e6:.1f} '
               'MB written')
  if report.reuse:
    r = report.reuse
    lines.append(
        f'incremental: {r["reused"]:,} records taken from {r["from"]}, '
        f'{r["built"]:,} built (new or changed files'
        + (f', {r["damaged"]:,} whose earlier record was damaged'
           if r['damaged'] else '') + f'), {r["gone"]:,} earlier files gone'
        + (' (every file hashed: --verify_reuse)' if r['verified'] else ''))
  if report.written:
    lines.append(f'dataset: {out}  (report: {report_path}, '
                 f'rejected: {out}/{metadata_lib.REJECTED_FILE})')
    lines.append(f'pictures: {out}/{plots.SAMPLES_FILE} (stored images '
                 'per class)')
    lines.append(f'report: {out}/{metadata_lib.REPORT_PAGE_FILE} (open in a '
                 'browser: classes, rejected files, duplicates, '
                 'near-duplicates)')
  return '\n'.join(lines)
