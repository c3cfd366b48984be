"""The build as a library call: validate, list, run Beam, commit, summarize.

`build()` is what `python -m pipelines.build` calls with plain arguments. All
user mistakes raise `UserError` *before* anything is written or removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import re
import shutil
import sys
import uuid
from typing import Iterator, Optional, Sequence

from pipelines import plots
from pipelines.common import paths
from pipelines.common.cli import parse_image_size
from pipelines.common.errors import UserError
from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import listing as listing_lib
from pipelines.preprocessing import source_image
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import schema

DEFAULT_IMAGE_SIZE = '150'
DEFAULT_SHARD_SIZE_MB = 64.0


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Every setting of a build: the flags of pipelines.build, same names and
  defaults (the flags are defined from these fields; a test checks it)."""
  input_dir: str
  output_dir: str
  image_size: str = DEFAULT_IMAGE_SIZE
  resize_mode: str = source_image.RESIZE_MODES[0]
  image_format: str = schema.IMAGE_FORMATS[0]
  jpeg_quality: int = source_image.DEFAULT_JPEG_QUALITY
  channels: int = 3
  validation_fraction: float = 0.2
  test_fraction: float = 0.0
  seed: int = 0
  dataset_name: Optional[str] = None
  shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
  max_image_pixels: int = source_image.DEFAULT_MAX_PIXELS
  max_file_bytes: int = source_image.DEFAULT_MAX_FILE_BYTES
  overwrite: bool = False
_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


def default_dataset_name(input_dir: str) -> str:
  """A TFDS-friendly name from the input folder: 'Horse-or-Human' -> 'horse_or_human'."""
  base = posixpath.basename(input_dir.replace('\\', '/').rstrip('/'))
  name = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')
  if not name or not name[0].isalpha():
    name = f'images_{name}' if name else 'images'
  return name


def _check_range(flag: str, value: float, low: float, high: float,
                 fix: str) -> None:
  if not low <= value <= high:
    raise UserError(f'--{flag}={value} is out of range; {fix}')


def _is_inside(path: str, parent: str) -> bool:
  path, parent = (posixpath.normpath(p.replace('\\', '/')) for p in (path, parent))
  return path == parent or path.startswith(parent.rstrip('/') + '/')


def _real(path: str) -> str:
  """The absolute path with every link resolved (local paths).

  Overlap checks and the commit work on real paths: an --output_dir reached
  through a link into --input_dir is caught, and an --output_dir that is a
  link keeps pointing at the new dataset.
  """
  return path if paths.is_remote(path) else os.path.realpath(path)


# Only a build that wrote nothing leaves a report without metadata.json, and
# it lists no duplicates or warnings: small. The cap bounds a fake one.
_MAX_REPORT_BYTES = 1 << 28


def _is_dataset(path: str) -> bool:
  try:
    metadata_lib.read_dataset_spec(path)
    return True
  except metadata_lib.DatasetError:
    return False


def is_toolkit_output(path: str) -> bool:
  """True for a dataset built here, or the report of a build that wrote nothing."""
  if _is_dataset(path):
    return True
  report = posixpath.join(path, metadata_lib.REPORT_FILE)
  try:
    return json.loads(paths.read_text(
        report, max_bytes=_MAX_REPORT_BYTES)).get(
            'toolkit') == metadata_lib.TOOLKIT_MARKER
  except (OSError, ValueError, AttributeError):  # Absent, odd or not ours.
    return False


def check_output_dir(output_dir: str, *, overwrite: bool) -> bool:
  """Refuses to write over anything that is not an empty folder or ours.

  Returns:
    True when output_dir holds an earlier build that --overwrite replaces.
  """
  if not paths.exists(output_dir):
    return False
  if not paths.isdir(output_dir):
    raise UserError(f'--output_dir={output_dir} is a file; pass a folder path')
  if not paths.listdir(output_dir):
    return False
  if not is_toolkit_output(output_dir):
    raise UserError(
        f'--output_dir={output_dir} holds files that are not a dataset built '
        'by this toolkit, and a build never replaces those: choose a new or '
        'empty folder')
  if not overwrite:
    raise UserError(f'--output_dir={output_dir} holds the output of an '
                    'earlier build; pass --overwrite to replace it, or choose '
                    'a new folder')
  return True


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
  """Holds an exclusive lock on output_dir for one build (local folders).

  A second build to the same --output_dir stops at once with an error
  instead of racing the first and replacing its result. The lock is a
  hidden file beside output_dir, removed at the end.
  """
  if paths.is_remote(output_dir):
    yield  # Object stores have no locks; see README.
    return
  import fcntl  # pylint: disable=g-import-not-at-top
  parent, name = os.path.split(output_dir.rstrip(os.sep))
  os.makedirs(parent, exist_ok=True)
  path = os.path.join(parent, f'.{name}.lock')
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(
          f'another build is writing --output_dir={output_dir} (lock file '
          f'{path}); wait for it to finish, or choose another folder') from None
    try:  # The lock file may have been removed by a finishing build.
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    yield
  finally:
    os.unlink(path)
    os.close(fd)


def make_config(settings: BuildSettings, *, input_dir: str,
                listing: listing_lib.InputPlan) -> beam_build.BuildConfig:
  """Validates every setting; raises UserError naming the value and the fix.

  input_dir: the resolved --input_dir.
  """
  s = settings
  image_size, resize_mode, image_format = (s.image_size, s.resize_mode,
                                           s.image_format)
  jpeg_quality, channels, seed = s.jpeg_quality, s.channels, s.seed
  validation_fraction, test_fraction = s.validation_fraction, s.test_fraction
  shard_size_mb, dataset_name = s.shard_size_mb, s.dataset_name
  max_image_pixels, max_file_bytes = s.max_image_pixels, s.max_file_bytes
  height, width = parse_image_size(image_size)
  if resize_mode not in source_image.RESIZE_MODES:
    raise UserError(f'--resize_mode={resize_mode} is not one of '
                    f'{", ".join(source_image.RESIZE_MODES)}')
  if image_format not in schema.IMAGE_FORMATS:
    raise UserError(f'--image_format={image_format} is not one of '
                    f'{", ".join(schema.IMAGE_FORMATS)}')
  if channels not in (1, 3):
    raise UserError(f'--channels={channels} is not 1 (grayscale) or 3 (RGB)')
  _check_range('jpeg_quality', jpeg_quality, 1, 100, f'pass 1..100 ({source_image.DEFAULT_JPEG_QUALITY} default)')
  _check_range('validation_fraction', validation_fraction, 0.0, 0.99,
               'pass a fraction in [0, 1), e.g. 0.2')
  _check_range('test_fraction', test_fraction, 0.0, 0.99,
               'pass a fraction in [0, 1), e.g. 0.1')
  if validation_fraction + test_fraction >= 1.0:
    raise UserError(
        f'--validation_fraction={validation_fraction} + --test_fraction='
        f'{test_fraction} leaves no training images; keep their sum below 1')
  _check_range('shard_size_mb', shard_size_mb, 0.001, 1 << 20,
               'pass a positive size in MB, e.g. 64')
  _check_range('max_image_pixels', max_image_pixels, 1, 1 << 40,
               f'pass a positive pixel count (default {source_image.DEFAULT_MAX_PIXELS})')
  name = dataset_name or default_dataset_name(input_dir)
  if not _NAME_RE.match(name):
    raise UserError(f'--dataset_name={name} must be lower_snake_case '
                    '(letters, digits, _; starting with a letter)')
  return beam_build.BuildConfig(
      input_dir=input_dir, dataset_name=name,
      class_names=listing.class_names, layout=listing.layout,
      image=source_image.ImageOptions(
          height=height, width=width, channels=channels,
          resize_mode=resize_mode, image_format=image_format,
          jpeg_quality=int(jpeg_quality), max_pixels=int(max_image_pixels),
          max_file_bytes=int(max_file_bytes)),
      validation_fraction=float(validation_fraction),
      test_fraction=float(test_fraction), seed=int(seed),
      shard_size_bytes=int(shard_size_mb * (1 << 20)))


def _commit(tmp_dir: str, output_dir: str, *, replace: bool,
            by_copy: Optional[bool] = None) -> None:
  """Moves the finished dataset into place (replacing an old one last).

  Local folders are renamed (atomic). Without `replace`, the rename only
  takes the place of nothing or of an empty folder (the OS refuses a
  non-empty one), so whatever appeared at output_dir while the build ran is
  never destroyed; with `replace`, the old content is checked to still be
  ours just before it is moved away. Object stores (gs://, s3://) cannot
  rename folders, so files are copied with metadata.json last: a reader
  (`read_dataset_spec`) sees a dataset only once everything else is there.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  if by_copy is None:
    by_copy = paths.is_remote(output_dir)
  if gfile.exists(output_dir) and gfile.listdir(output_dir) and not (
      replace and is_toolkit_output(output_dir)):
    raise UserError(
        f'--output_dir={output_dir} was filled by something else while this '
        'build ran; it was left untouched: rerun the build with a new folder')
  if not by_copy:
    old = None
    if replace and os.path.lexists(output_dir):
      old = f'{tmp_dir}.old'
      os.rename(output_dir, old)
    try:
      os.rename(tmp_dir, output_dir)
    except OSError as e:
      if old:
        os.rename(old, output_dir)
      raise UserError(
          f'--output_dir={output_dir} was created by something else while '
          f'this build ran ({e.strerror}); it was left untouched: rerun the '
          'build with a new folder') from None
    if old:
      gfile.rmtree(old)
    return
  marker = posixpath.join(output_dir, metadata_lib.METADATA_FILE)
  if gfile.exists(output_dir):
    if gfile.exists(marker):
      gfile.remove(marker)  # First: the old dataset stops being one.
    gfile.rmtree(output_dir)
  gfile.makedirs(output_dir)
  names = sorted(gfile.listdir(tmp_dir), key=lambda n: (
      n == metadata_lib.METADATA_FILE, n))
  for name in names:
    gfile.copy(posixpath.join(tmp_dir, name), posixpath.join(output_dir, name))
  gfile.rmtree(tmp_dir)


def build(settings: Optional[BuildSettings] = None, *,
          beam_args: Sequence[str] = (), quiet: bool = False,
          samples: bool = True, **kwargs) -> dict:
  """Builds a dataset directory from a labelled image folder.

  `samples` also writes `samples.png`, a grid of stored train images per
  class, to check labels and resizing at a glance (not counted in the
  timing).

  Args:
    settings: a BuildSettings, or its fields as keywords (kwargs).
    beam_args: Beam pipeline options (--runner=..., ...).
    quiet: no progress lines.
    samples: also write samples.png.

  Returns:
    The build report (also in `output_dir/build_report.json`), with
    `elapsed_s` and `images_per_s` of the Beam run added.
  """
  # TensorFlow loads only in _run_and_commit, after the cheap checks, so
  # typos fail fast.
  if settings is None:
    settings = BuildSettings(**kwargs)
  elif kwargs:
    settings = dataclasses.replace(settings, **kwargs)
  input_dir, output_dir = settings.input_dir, settings.output_dir
  overwrite = settings.overwrite
  given = {'input_dir': input_dir, 'output_dir': output_dir}
  input_dir, output_dir = _real(input_dir), _real(output_dir)
  if _is_inside(output_dir, input_dir) or _is_inside(input_dir, output_dir):
    shown = ' and '.join(
        f'--{flag}={path}' + (f' (really {real})' if real != path else '')
        for (flag, path), real in zip(given.items(), (input_dir, output_dir)))
    raise UserError(f'{shown} overlap; write the dataset outside the image '
                    'folder')
  parse_image_size(settings.image_size)  # Cheap checks before the disk.
  _check_range('max_file_bytes', settings.max_file_bytes, 1, 1 << 50,
               'pass a positive size in bytes, e.g. 268435456 (256 MiB)')
  check_output_dir(output_dir, overwrite=overwrite)
  plan = listing_lib.plan_input(input_dir, exclude=(output_dir,))
  config = make_config(settings, input_dir=input_dir, listing=plan)
  say = (lambda m: None) if quiet else (
      lambda m: print(f'[build] {m}', file=sys.stderr, flush=True))
  say(f'{len(plan.class_names)} classes ({plan.layout} layout), '
      f'{len(plan.folders)} folders to list; writing '
      f'{config.image.height}x{config.image.width}x'
      f'{config.image.channels} {config.image.image_format}')

  parent = posixpath.dirname(output_dir.rstrip('/'))
  tmp_dir = posixpath.join(
      parent, f'.{posixpath.basename(output_dir.rstrip("/"))}.incomplete-'
      f'{uuid.uuid4().hex[:8]}')
  with output_lock(output_dir):
    replace = check_output_dir(output_dir, overwrite=overwrite)  # Again, locked.
    report = _run_and_commit(config, plan, tmp_dir=tmp_dir,
                             output_dir=output_dir, replace=replace,
                             beam_args=beam_args, samples=samples)
  report['output_dir'] = output_dir
  if not quiet:
    print(format_summary(report))
  if not report['counts']['written']:
    raise UserError(_nothing_written(report, output_dir))
  return report


def _run_and_commit(config, plan, *, tmp_dir: str, output_dir: str,
                    replace: bool, beam_args, samples: bool) -> dict:
  """Runs Beam into tmp_dir and commits it; tmp_dir never outlives a failure.

  A build that wrote no image commits only its report and rejected.jsonl
  (no metadata.json: it is not a dataset), and only where no earlier build
  would be replaced, so the reasons survive and nothing is lost for them.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(posixpath.dirname(tmp_dir))
  try:
    elapsed = beam_build.run_pipeline(config=config, plan=plan,
                                      tmp_dir=tmp_dir, beam_args=beam_args,
                                      exclude=(output_dir,))
    report_path = posixpath.join(tmp_dir, metadata_lib.REPORT_FILE)
    with tf.io.gfile.GFile(report_path) as f:
      report = json.load(f)
    report['elapsed_s'] = round(elapsed, 3)
    report['images_per_s'] = round(report['counts']['written'] / elapsed, 1)
    with tf.io.gfile.GFile(report_path, 'w') as f:
      json.dump(report, f, indent=2)
    if not report['counts']['written']:
      tf.io.gfile.remove(posixpath.join(tmp_dir, metadata_lib.METADATA_FILE))
      if replace and _is_dataset(output_dir):
        tf.io.gfile.rmtree(tmp_dir)  # Keep the earlier, usable dataset.
        return report
    elif samples:
      plots.write_dataset_samples(
          tmp_dir, posixpath.join(tmp_dir, plots.SAMPLES_FILE))
    _commit(tmp_dir, output_dir, replace=replace)
  except BaseException:
    if tf.io.gfile.exists(tmp_dir):
      tf.io.gfile.rmtree(tmp_dir)
    raise
  return report


def _nothing_written(report: dict, output_dir: str) -> str:
  """The error for a build in which every file was rejected or ignored."""
  counts = report['counts']
  reasons = ', '.join(f'{n} {k}' for k, n in counts.items()
                      if k not in ('seen', 'written') and n)
  rejected = posixpath.join(output_dir, metadata_lib.REJECTED_FILE)
  where = ('the earlier dataset in --output_dir was kept (build into a new '
           "folder to get each file's reason)" if _is_dataset(output_dir) else
           f'the reason for each file is in {rejected}')
  return (f'no image of --input_dir={report["input_dir"]} could be written '
          f'({counts["seen"]} files: {reasons}); {where}; fix or replace '
          'those files and rerun')


def format_summary(report: dict) -> str:
  """The end-of-build table: per split/class counts, rejects, speed, bytes."""
  classes = report['class_names']
  width = max(12, *(len(c) for c in classes))
  lines = [f'{"split":<12}{"class":<{width}}  {"images":>8}']
  for split, info in report['splits'].items():
    if not info['total']:
      continue
    for name in classes:
      lines.append(f'{split:<12}{name:<{width}}  {info["per_class"][name]:>8}')
    lines.append(f'{split:<12}{"(all)":<{width}}  {info["total"]:>8}'
                 f'   {info["num_shards"]} shard(s), '
                 f'{info["num_bytes"] / 1e6:.1f} MB')
  counts = report['counts']
  lines.append('')
  not_written = counts['seen'] - counts['written']
  lines.append(f'seen {counts["seen"]}, written {counts["written"]}, '
               f'not written {not_written}' + (':' if not_written else ''))
  for key, value in counts.items():
    if key not in ('seen', 'written'):
      lines.append(f'  {key:<36}{value:>8}')
  lines.append(f'{report["images_per_s"]} images/s over '
               f'{report["elapsed_s"]} s, {report["bytes_written"] / 1e6:.1f} '
               'MB written')
  out = report['output_dir']
  if counts['written']:
    lines.append(f'dataset: {out}  (report: {out}/{metadata_lib.REPORT_FILE}, '
                 f'rejected: {out}/{metadata_lib.REJECTED_FILE})')
    lines.append(f'pictures: {out}/{plots.SAMPLES_FILE} (stored images '
                 'per class)')
  return '\n'.join(lines)


def graph_bytes(input_dir: str, tmp_dir: str) -> int:
  """Bytes of the serialized pipeline a build of input_dir submits (not run).

  For the graph-size test and the scale benchmark: it must not grow with
  the number of files.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  plan = listing_lib.plan_input(input_dir)
  config = make_config(
      BuildSettings(input_dir=input_dir,
                    output_dir=posixpath.join(tmp_dir, 'out')),
      input_dir=input_dir, listing=plan)
  pipeline = beam.Pipeline(options=PipelineOptions(
      beam_build.pipeline_args([])))
  try:
    beam_build.build_pipeline(pipeline, config=config, plan=plan,
                              tmp_dir=posixpath.join(tmp_dir, 'tmp'))
    return len(pipeline.to_runner_api().SerializeToString())
  finally:  # Beam removes its temp folder only when a pipeline runs.
    shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
