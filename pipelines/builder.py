"""The build as a library call: validate, list, run Beam, commit, summarize.

`build()` is what `python -m pipelines.build` calls with plain arguments. All
user mistakes raise `UserError` *before* anything is written or removed.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
import uuid
from typing import Optional, Sequence

from pipelines import beam_build
from pipelines import image_ops
from pipelines import listing as listing_lib
from pipelines import preview
from pipelines.errors import UserError
from tfrecords_schema import metadata as metadata_lib

DEFAULT_IMAGE_SIZE = '150'
DEFAULT_SHARD_SIZE_MB = 64.0
_MAX_SIDE = 8192
_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


def parse_image_size(text: str) -> tuple[int, int]:
  """'150' -> (150, 150); '300,200' or '300x200' -> (height=300, width=200)."""
  parts = [p.strip() for p in re.split(r'[,x]', str(text).strip())]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) == 1:
    sizes = sizes * 2
  if len(sizes) != 2 or not all(1 <= s <= _MAX_SIDE for s in sizes):
    raise UserError(
        f'--image_size={text} is not a size; pass one number (150) or '
        f'HEIGHT,WIDTH (300,200), each between 1 and {_MAX_SIDE}')
  return sizes[0], sizes[1]


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


def _absolute(path: str) -> str:
  import os  # pylint: disable=g-import-not-at-top
  return path if '://' in path else os.path.abspath(path)


def check_output_dir(output_dir: str, *, overwrite: bool) -> None:
  """Refuses to write over anything that is not an empty folder or our dataset."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  if not gfile.exists(output_dir):
    return
  if not gfile.isdir(output_dir):
    raise UserError(f'--output_dir={output_dir} is a file; pass a folder path')
  if not gfile.listdir(output_dir):
    return
  if not overwrite:
    raise UserError(f'--output_dir={output_dir} is not empty; pass '
                    '--overwrite to replace it, or choose a new folder')
  try:
    metadata_lib.read_dataset_spec(output_dir)
  except metadata_lib.DatasetError:
    raise UserError(
        f'--output_dir={output_dir} holds files that are not a dataset built '
        'by this toolkit; --overwrite only replaces such datasets: choose an '
        'empty or new folder') from None


def make_config(*, input_dir: str, listing, image_size: str,
                resize_mode: str, image_format: str, jpeg_quality: int,
                channels: int, validation_fraction: float,
                test_fraction: float, seed: int, dataset_name: Optional[str],
                shard_size_mb: float,
                max_image_pixels: int) -> beam_build.BuildConfig:
  """Validates every setting; raises UserError naming the value and the fix."""
  height, width = parse_image_size(image_size)
  if resize_mode not in image_ops.RESIZE_MODES:
    raise UserError(f'--resize_mode={resize_mode} is not one of '
                    f'{", ".join(image_ops.RESIZE_MODES)}')
  if image_format not in ('jpeg', 'png', 'raw'):
    raise UserError(f'--image_format={image_format} is not one of jpeg, png, raw')
  if channels not in (1, 3):
    raise UserError(f'--channels={channels} is not 1 (grayscale) or 3 (RGB)')
  _check_range('jpeg_quality', jpeg_quality, 1, 100, 'pass 1..100 (95 default)')
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
               f'pass a positive pixel count (default {image_ops.DEFAULT_MAX_PIXELS})')
  name = dataset_name or default_dataset_name(input_dir)
  if not _NAME_RE.match(name):
    raise UserError(f'--dataset_name={name} must be lower_snake_case '
                    '(letters, digits, _; starting with a letter)')
  return beam_build.BuildConfig(
      input_dir=input_dir, dataset_name=name,
      class_names=listing.class_names, layout=listing.layout,
      image=image_ops.ImageOptions(
          height=height, width=width, channels=channels,
          resize_mode=resize_mode, image_format=image_format,
          jpeg_quality=int(jpeg_quality), max_pixels=int(max_image_pixels)),
      validation_fraction=float(validation_fraction),
      test_fraction=float(test_fraction), seed=int(seed),
      shard_size_bytes=int(shard_size_mb * (1 << 20)))


def _commit(tmp_dir: str, output_dir: str, *,
            by_copy: Optional[bool] = None) -> None:
  """Moves the finished dataset into place (replacing an old one last).

  Local folders are renamed (atomic). Object stores (gs://, s3://) cannot
  rename folders, so files are copied with metadata.json last: a reader
  (`read_dataset_spec`) sees a dataset only once everything else is there.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  if by_copy is None:
    by_copy = '://' in output_dir
  if not by_copy:
    old = None
    if gfile.exists(output_dir):
      old = f'{tmp_dir}.old'
      gfile.rename(output_dir, old)
    gfile.rename(tmp_dir, output_dir)
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


def build(*, input_dir: str, output_dir: str,
          image_size: str = DEFAULT_IMAGE_SIZE, resize_mode: str = 'stretch',
          image_format: str = 'jpeg', jpeg_quality: int = 95,
          channels: int = 3, validation_fraction: float = 0.2,
          test_fraction: float = 0.0, seed: int = 0,
          dataset_name: Optional[str] = None,
          shard_size_mb: float = DEFAULT_SHARD_SIZE_MB,
          max_image_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
          overwrite: bool = False, beam_args: Sequence[str] = (),
          quiet: bool = False, samples: bool = True) -> dict:
  """Builds a dataset directory from a labelled image folder.

  `samples` also writes `samples.png`, a grid of stored train images per
  class, to check labels and resizing at a glance (not counted in the
  timing).

  Returns:
    The build report (also in `output_dir/build_report.json`), with
    `elapsed_s` and `images_per_s` of the Beam run added.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  input_dir, output_dir = _absolute(input_dir), _absolute(output_dir)
  if _is_inside(output_dir, input_dir) or _is_inside(input_dir, output_dir):
    raise UserError(f'--output_dir={output_dir} and --input_dir={input_dir} '
                    'overlap; write the dataset outside the image folder')
  parse_image_size(image_size)  # Cheap flag checks before touching the disk.
  check_output_dir(output_dir, overwrite=overwrite)
  listing = listing_lib.list_input(input_dir)
  config = make_config(
      input_dir=input_dir, listing=listing,
      image_size=image_size, resize_mode=resize_mode,
      image_format=image_format, jpeg_quality=jpeg_quality, channels=channels,
      validation_fraction=validation_fraction, test_fraction=test_fraction,
      seed=seed, dataset_name=dataset_name, shard_size_mb=shard_size_mb,
      max_image_pixels=max_image_pixels)
  say = (lambda m: None) if quiet else (
      lambda m: print(f'[build] {m}', file=sys.stderr, flush=True))
  say(f'{len(listing.files)} candidate images in {len(listing.class_names)} '
      f'classes ({listing.layout} layout), {len(listing.ignored)} other files '
      f'ignored; writing {config.image.height}x{config.image.width}x'
      f'{config.image.channels} {config.image.image_format}')

  parent = posixpath.dirname(output_dir.rstrip('/'))
  tmp_dir = posixpath.join(
      parent, f'.{posixpath.basename(output_dir.rstrip("/"))}.incomplete-'
      f'{uuid.uuid4().hex[:8]}')
  tf.io.gfile.makedirs(parent)
  try:
    elapsed = beam_build.run_pipeline(config=config, listing=listing,
                                      tmp_dir=tmp_dir, beam_args=beam_args)
    report_path = posixpath.join(tmp_dir, metadata_lib.REPORT_FILE)
    with tf.io.gfile.GFile(report_path) as f:
      report = json.load(f)
    report['elapsed_s'] = round(elapsed, 3)
    report['images_per_s'] = round(report['counts']['written'] / elapsed, 1)
    with tf.io.gfile.GFile(report_path, 'w') as f:
      json.dump(report, f, indent=2)
    if samples:
      preview.write_dataset_samples(
          tmp_dir, posixpath.join(tmp_dir, preview.SAMPLES_FILE))
    _commit(tmp_dir, output_dir)
  except BaseException:
    if tf.io.gfile.exists(tmp_dir):
      tf.io.gfile.rmtree(tmp_dir)
    raise
  report['output_dir'] = output_dir
  if not quiet:
    print(format_summary(report))
  return report


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
  lines.append(f'seen {counts["seen"]}, written {counts["written"]}, '
               f'not written {counts["seen"] - counts["written"]}:')
  for key, value in counts.items():
    if key not in ('seen', 'written'):
      lines.append(f'  {key:<36}{value:>8}')
  lines.append(f'{report["images_per_s"]} images/s over '
               f'{report["elapsed_s"]} s, {report["bytes_written"] / 1e6:.1f} '
               'MB written')
  out = report['output_dir']
  lines.append(f'dataset: {out}  (report: {out}/{metadata_lib.REPORT_FILE}, '
               f'rejected: {out}/{metadata_lib.REJECTED_FILE})')
  return '\n'.join(lines)
