"""The build as a library call: validate, list, run Beam, commit, summarize.

`build()` is what `python -m pipelines.build` calls with plain arguments. All
user mistakes raise `UserError` *before* anything is written or removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import posixpath
import re
import shutil
import signal
import sys
import threading
import uuid
from typing import Iterator, Mapping, Optional, Sequence

from pipelines import plots
from pipelines.common import cli
from pipelines.common import paths
from pipelines.common import run_files
from pipelines.common.cli import parse_image_size
from pipelines.common.errors import UserError
from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import runner_options
from pipelines.folder_to_records import splits as splits_lib
from pipelines.preprocessing import source_image
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
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
  allow_missing_eval_classes: bool = False
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


# The files a build writes into a dataset folder besides its shards: the
# toolkit's own and those TFDS's write_metadata adds (dataset_info.json,
# features.json, the class names of the label feature). A test
# (test_build_output_safety) checks that a real build writes exactly these
# and the shards of its metadata.json: a file added to the build cannot be
# missed here.
TFDS_FILES = ('dataset_info.json', 'features.json',
              f'{schema.LABEL}.labels.txt')
BUILD_FILES = frozenset((metadata_lib.METADATA_FILE, metadata_lib.REPORT_FILE,
                         metadata_lib.REJECTED_FILE, plots.SAMPLES_FILE,
                         *TFDS_FILES))
# Folders a trainer keeps in its --model_dir (trainer.config; a test checks
# the names): only to word the refusal of a training run.
TRAINING_RUN_FOLDERS = (run_files.CHECKPOINT_DIR, run_files.EXPORT_DIR)
_SHARD_RE = re.compile(r'(?P<name>[a-z][a-z0-9_]*)-(?P<split>[a-z]+)\.'
                       + re.escape(schema.RECORD_SUFFIX) +
                       r'-(?P<index>\d+)-of-(?P<count>\d+)')
_CHUNK_RE = re.compile(r'(?P<index>\d+)-(?P<split>[a-z]+)\.[a-z]+')
_SHOWN_ENTRIES = 5
_MOUNT_POINT = (
    '--output_dir={output_dir} is a mount point (or on another file system '
    'than the folder it is in): a build writes beside it and renames the '
    'finished dataset into place, which cannot replace a mount point; build '
    'into a folder inside it, e.g. --output_dir={output_dir}/dataset')


def _parse_shard(name: str) -> Optional[tuple[str, str, int]]:
  """(dataset name, split, shard count) of a name schema.shard_filename
  gives, else None."""
  m = _SHARD_RE.fullmatch(name)
  if not m or m['split'] not in metadata_lib.SPLITS:
    return None
  index, count = int(m['index']), int(m['count'])
  if index >= count or schema.shard_filename(
      m['name'], m['split'], index, count) != name:
    return None
  return m['name'], m['split'], count


def _is_chunk_file(name: str) -> bool:
  """A file of beam_build's CHUNKS_DIR (chunk records or their index)."""
  m = _CHUNK_RE.fullmatch(name)
  return bool(m) and m['split'] in metadata_lib.SPLITS and name in {
      posixpath.basename(make('', int(m['index']), m['split']))
      for make in (beam_build.chunk_path, beam_build.index_path)}


def _toolkit_json(path: str, name: str, max_bytes: int) -> Optional[dict]:
  """path/name as a dict when it is JSON this toolkit wrote, else None."""
  try:
    data = json.loads(paths.read_text(posixpath.join(path, name),
                                      max_bytes=max_bytes))
  except (OSError, ValueError):  # Absent, odd or not ours.
    return None
  if isinstance(data, dict) and data.get(
      'toolkit') == metadata_lib.TOOLKIT_MARKER:
    return data
  return None


@dataclasses.dataclass(frozen=True)
class Owned:
  """The names a build wrote in a folder, as its own files say: the shards
  metadata.json lists and those build_report.json counts (dataset name,
  split -> shard count), and BUILD_FILES. A name a build never gives a shard
  is never one, whatever a file lists."""
  listed: frozenset = frozenset()
  counts: Mapping[tuple[str, str], int] = dataclasses.field(
      default_factory=dict)
  any_shard: bool = False  # A temporary folder: shards of any name.
  chunks: bool = False  # beam_build's chunk folder: its files only.

  def __contains__(self, name: str) -> bool:
    if self.chunks:
      return _is_chunk_file(name)
    if name in BUILD_FILES:
      return True
    shard = _parse_shard(name)
    return shard is not None and (
        self.any_shard or name in self.listed or
        self.counts.get(shard[:2]) == shard[2])


_ANY_BUILD = Owned(any_shard=True)
_CHUNKS = Owned(chunks=True)


def _listed_shards(spec: Optional[dict]) -> frozenset:
  splits = (spec or {}).get('splits')
  names = set()
  for split in (splits.values() if isinstance(splits, dict) else ()):
    shards = split.get('shards') if isinstance(split, dict) else None
    names.update(s for s in (shards if isinstance(shards, list) else ())
                 if isinstance(s, str))
  return frozenset(names)


def _counted_shards(raw_report: Optional[dict]) -> dict:
  """(dataset name, split) -> shard count, from a report of this toolkit
  (empty when it does not read as a BuildReport)."""
  report = report_lib.parse_build_report(raw_report)
  if report is None or not report.dataset_name:
    return {}
  return {(report.dataset_name, split): info.num_shards
          for split, info in report.splits.items()}


def owned_entries(path: str) -> Optional[Owned]:
  """What a build wrote in `path`; None when neither its metadata.json nor
  its build_report.json is this toolkit's (it is no build's output)."""
  spec = _toolkit_json(path, metadata_lib.METADATA_FILE,
                       metadata_lib.MAX_METADATA_BYTES)
  report = _toolkit_json(path, report_lib.REPORT_FILE,
                         report_lib.MAX_REPORT_BYTES)
  if spec is None and report is None:
    return None
  return Owned(_listed_shards(spec), _counted_shards(report))


def is_toolkit_output(path: str) -> bool:
  """True for a dataset built here, or the report of a build that wrote
  nothing (foreign entries in it are refused separately)."""
  return owned_entries(path) is not None


def _foreign(entries: Sequence[tuple[str, str]],
             owned: Owned) -> list[tuple[str, str]]:
  """Entries a build did not write: other names, and anything that is not a
  regular file (a link is never taken for a build's file)."""
  return [(n, k) for n, k in entries if k != paths.FILE or n not in owned]


def _shown(name: str) -> str:
  text = name.encode('utf-8', 'surrogateescape').decode('utf-8',
                                                         'backslashreplace')
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_KIND_SHOWN = {paths.FOLDER: '/', paths.LINK: ' (a link)',
               paths.OTHER: ' (not a regular file)', paths.FILE: ''}


def describe_entries(entries: Sequence[tuple[str, str]]) -> str:
  """'notes.txt, run1/, .hidden and 4 more': a few entries, and the count."""
  shown = ', '.join(_shown(n) + _KIND_SHOWN[k]
                    for n, k in entries[:_SHOWN_ENTRIES])
  more = len(entries) - _SHOWN_ENTRIES
  return shown + (f' and {more} more' if more > 0 else '')


def _training_run(entries: Sequence[tuple[str, str]]) -> str:
  folders = [f'{n}/' for n, k in entries
             if k == paths.FOLDER and n in TRAINING_RUN_FOLDERS]
  return (f' (it holds a training run: {", ".join(folders)}; a --model_dir '
          'is never a dataset folder)' if folders else '')


def foreign_error(output_dir: str, foreign: Sequence[tuple[str, str]], *,
                  when: str = '') -> UserError:
  """The refusal of a dataset folder that holds what a build did not write."""
  count = len(foreign)
  return UserError(
      f'--output_dir={output_dir} holds {count} entr'
      f'{"y" if count == 1 else "ies"} that a build did not write{when}'
      f'{_training_run(foreign)}: {describe_entries(foreign)}; --overwrite '
      'replaces only what a build wrote and never deletes anything else: '
      f'move {"it" if count == 1 else "them"} out of {output_dir}, or build '
      'into a new folder')


def check_output_dir(output_dir: str, *, overwrite: bool) -> bool:
  """Refuses to write over anything that is not an empty folder or ours.

  A folder of an earlier build is replaced (with --overwrite) only when
  everything in it is what a build wrote: anything else in it (a user's
  sub-folder, a hidden file, a link, a stale shard that metadata.json does
  not list) is named in the error and never deleted.

  Returns:
    True when output_dir holds an earlier build that --overwrite replaces.
  """
  if not paths.exists(output_dir):
    _check_parent_is_a_folder(output_dir)
    return False
  if not paths.isdir(output_dir):
    raise UserError(f'--output_dir={output_dir} is a file; pass a folder path')
  if not paths.is_remote(output_dir) and os.path.ismount(output_dir):
    raise UserError(_MOUNT_POINT.format(output_dir=output_dir))
  entries = paths.list_entries(output_dir)
  if not entries:
    return False
  owned = owned_entries(output_dir)
  if owned is None:
    raise UserError(
        f'--output_dir={output_dir} holds files that are not a dataset built '
        f'by this toolkit{_training_run(entries)} '
        f'({describe_entries(entries)}), and a build never replaces those: '
        'choose a new or empty folder')
  foreign = _foreign(entries, owned)
  if foreign:
    raise foreign_error(output_dir, foreign)
  if not overwrite:
    raise UserError(f'--output_dir={output_dir} holds the output of an '
                    'earlier build; pass --overwrite to replace it, or choose '
                    'a new folder')
  return True


def _temp_entries_not_ours(path: str) -> list[tuple[str, str]]:
  """What a temporary folder of a build holds that no build writes there:
  its shards (of any dataset name), BUILD_FILES and beam_build's chunk
  folder of chunk files are a build's; anything else (links included) is
  not."""
  foreign = []
  for name, kind in paths.list_entries(path):
    if kind == paths.FILE and name in _ANY_BUILD:
      continue
    if kind == paths.FOLDER and name == beam_build.CHUNKS_DIR:
      foreign.extend((f'{name}/{n}', k) for n, k in paths.list_entries(
          posixpath.join(path, name))
                     if k != paths.FILE or not _is_chunk_file(n))
      continue
    foreign.append((name, kind))
  return foreign


def _check_parent_is_a_folder(output_dir: str) -> None:
  """The nearest existing folder above a new local output_dir must be one."""
  if paths.is_remote(output_dir):
    return
  parent = os.path.dirname(output_dir)
  while not os.path.exists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f'--output_dir={output_dir}: {parent} is a file, not a '
                    'folder; pass a folder path')


def _remove_entries(path: str, owned: Owned) -> list[tuple[str, str]]:
  """Removes what a build wrote in `path` (regular files it names; in a
  temporary folder also the chunk folder), then `path` when that leaves it
  empty. Returns the entries left. Links are unlinked at most, never
  followed (tf.io.gfile.rmtree would empty the folder a link points to)."""
  left = []
  for name, kind in paths.list_entries(path):
    entry = posixpath.join(path, name)
    if kind == paths.FILE and name in owned:
      _remove_file(entry)
    elif (owned.any_shard and kind == paths.FOLDER and
          name == beam_build.CHUNKS_DIR):
      left.extend((f'{name}/{n}', k)
                  for n, k in _remove_entries(entry, _CHUNKS))
    else:
      left.append((name, kind))
  if not left:
    _remove_folder(path)
  return left


def _remove_file(path: str) -> None:
  if paths.is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.io.gfile.remove(path)
  else:
    os.unlink(path)


def _remove_folder(path: str) -> None:
  if paths.is_remote(path):
    paths.remove_tree(path)  # An object store's empty "folder" marker.
  else:
    os.rmdir(path)


def _parent_and_name(output_dir: str) -> tuple[str, str]:
  output_dir = output_dir.rstrip('/') or '/'
  return posixpath.dirname(output_dir), posixpath.basename(output_dir)


def _make_parents(folder: str) -> list[str]:
  """os.makedirs(folder), returning the folders it created, deepest first."""
  created = []
  while not os.path.lexists(folder) and folder != os.path.dirname(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  for path in reversed(created):
    os.mkdir(path)  # Raises for a file in the way, as makedirs would.
  return created


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
  """Holds an exclusive lock on output_dir for one build (local folders).

  A second build to the same --output_dir stops at once with an error
  instead of racing the first and replacing its result. The lock is a
  hidden file beside output_dir (the first thing a build writes, before
  TensorFlow loads: a parent folder it cannot write in is found at once),
  removed at the end, with the parent folders made for it when the build
  left nothing in them.
  """
  if paths.is_remote(output_dir):
    yield  # Object stores have no locks; see README.
    return
  import fcntl  # pylint: disable=g-import-not-at-top
  parent, name = _parent_and_name(output_dir)
  created = _make_parents(parent)
  path = os.path.join(parent, f'.{name}.lock')
  try:
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise UserError(
            f'another build is writing --output_dir={output_dir} (lock file '
            f'{path}); wait for it to finish, or choose another folder'
        ) from None
      try:  # The lock file may have been removed by a finishing build.
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
  except BaseException:
    _remove_empty(created)
    raise
  try:
    yield
  finally:
    with signals_deferred():
      os.unlink(path)
      os.close(fd)
      _remove_empty(created)


def _remove_empty(folders: Sequence[str]) -> None:
  for folder in folders:  # Deepest first; one still in use stays.
    try:
      os.rmdir(folder)
    except OSError:
      break


# Beside --output_dir: .NAME.incomplete-1a2b3c4d, and .NAME.incomplete-
# 1a2b3c4d.old for the earlier dataset while it is being replaced.
_TEMP_SUFFIX = '.incomplete-'
_OLD_SUFFIX = '.old'


def temp_dir_for(output_dir: str) -> str:
  parent, name = _parent_and_name(output_dir)
  return posixpath.join(parent,
                        f'.{name}{_TEMP_SUFFIX}{uuid.uuid4().hex[:8]}')


def clear_leftovers(output_dir: str) -> list[str]:
  """Removes the temporary folders that stopped builds (killed, or a
  power cut) left beside output_dir; returns lines to show.

  Call it holding output_lock: then no other build of output_dir runs, and
  every such folder is a leftover. A folder is removed only when all it
  holds is what a build writes there; anything else in it is named with the
  fix and left alone. So is the earlier dataset that a build stopped in the
  middle of replacing it had moved aside, while --output_dir is missing.
  """
  if paths.is_remote(output_dir):
    return []  # No listing of a bucket's parent "folder"; see README.
  parent, name = _parent_and_name(output_dir)
  pattern = re.compile(re.escape(f'.{name}{_TEMP_SUFFIX}') + r'[0-9a-f]{8}' +
                       f'(?:{re.escape(_OLD_SUFFIX)})?')
  try:
    found = sorted(n for n in os.listdir(parent) if pattern.fullmatch(n))
  except OSError:
    return []
  removed, lines = [], []
  for entry in found:
    path = os.path.join(parent, entry)
    if not os.path.isdir(path) or os.path.islink(path):
      lines.append(f'warning: {path} is not a temporary folder of a build '
                   'and was left alone; remove it if it is not yours')
      continue
    if entry.endswith(_OLD_SUFFIX) and not os.path.lexists(output_dir):
      lines.append(
          f'warning: {path} holds the dataset of --output_dir={output_dir} '
          'that a build stopped while replacing it (kept): `mv '
          f'{path} {output_dir}` brings it back')
      continue
    try:
      foreign = _temp_entries_not_ours(path)
      if foreign:
        lines.append(
            f'warning: {path} looks like the temporary folder of a stopped '
            'build but holds what no build writes '
            f'({describe_entries(foreign)}); it was left alone: remove it '
            'yourself once you have checked it')
      elif not _remove_entries(path, _ANY_BUILD):
        removed.append(entry)
    except OSError as e:  # Another user's, say: not this build's problem.
      lines.append(f'warning: {path}, the temporary folder of a stopped '
                   f'build, could not be removed ({e.strerror}); remove it '
                   'yourself')
  if removed:
    lines.insert(0, f'removed {len(removed)} temporary folder(s) that '
                 f'stopped builds left beside --output_dir: '
                 f'{describe_entries([(n, paths.FILE) for n in removed])}')
  return lines


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
  """Holds Ctrl-C (SIGINT) and SIGTERM until the block ends, then delivers
  them: a commit's renames and a clean-up are never cut in half. Signal
  handlers belong to the main thread: elsewhere this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught, saved = [], {}
  for signum in (signal.SIGINT, signal.SIGTERM):
    handler = signal.getsignal(signum)
    if handler not in (signal.SIG_IGN, None):
      saved[signum] = handler
      signal.signal(signum, lambda s, _: caught.append(s))
  try:
    yield
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)
    if caught:
      signal.raise_signal(caught[0])


class BuildFailed(UserError):
  """The disk failed the build (full, read-only, denied...), or the user
  stopped it: one line, with what was kept. exit_code: the exit status."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


# Failures of the disk, not of the build: errno -> the fix ({parent}: the
# folder --output_dir is in).
_BESIDE = ('the build writes its lock file and temporary folder beside '
           '--output_dir, in {parent}, and renames the finished dataset into '
           'place at the end')
_DISK_FIXES = {
    errno.ENOSPC: 'the disk is full (until the end a build needs room for '
                  'the new dataset beside the earlier one): free space '
                  'there, or choose an --output_dir on another disk',
    errno.EDQUOT: 'your disk quota there is used up: free space, or choose '
                  'an --output_dir on another disk',
    errno.EROFS: 'it is on a read-only file system; ' + _BESIDE + ': choose '
                 'an --output_dir on a writable disk',
    errno.EACCES: _BESIDE + ', so {parent} must be writable: make it '
                  'writable, or choose another --output_dir',
    errno.ENAMETOOLONG: 'a name is too long for that file system (the '
                        'temporary folder beside --output_dir adds up to '
                        f'{len(f".{_TEMP_SUFFIX}01234567{_OLD_SUFFIX}")} '
                        'characters to its name): choose a shorter '
                        '--output_dir or --dataset_name',
    errno.EFBIG: 'a file is larger than that file system allows: pass a '
                 'smaller --shard_size_mb',
    errno.EIO: 'the disk reported an I/O error: check it, or build to '
               'another disk',
    errno.EMFILE: 'too many open files: raise the limit (ulimit -n 4096) '
                  'and rerun',
    errno.EXDEV: 'the finished dataset cannot be renamed into place: '
                 '--output_dir is on another file system than {parent} (a '
                 'mount point?); build into a folder inside it',
}
_DISK_FIXES[errno.EPERM] = _DISK_FIXES[errno.EACCES]
_DISK_FIXES[errno.ENFILE] = _DISK_FIXES[errno.EMFILE]
_DISK_FIXES[errno.EBUSY] = _DISK_FIXES[errno.EXDEV]
# Beam quotes an error of a worker process as text only.
_QUOTED_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:\]'\n]+)(?:: '([^'\n]+)')?")


def _chain(exc: Optional[BaseException]) -> list[BaseException]:
  """exc and the exceptions it was raised from or while handling."""
  chain = []
  while exc is not None and all(exc is not e for e in chain):
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  return chain


def disk_failure(
    exc: Optional[BaseException]) -> Optional[tuple[int, Optional[str], str]]:
  """(errno, path or None, what happened) when exc, or an exception in its
  chain, is a failure of the disk: an OSError, a TensorFlow file error (its
  text), or Beam's error that quotes a worker's OSError. None otherwise."""
  chain = _chain(exc)
  for e in chain:
    if isinstance(e, OSError) and e.errno in _DISK_FIXES:
      return e.errno, e.filename, e.strerror or os.strerror(e.errno)
  for e in chain:
    text = str(e)
    quoted = _QUOTED_ERRNO.search(text)
    if quoted and int(quoted[1]) in _DISK_FIXES:
      return int(quoted[1]), quoted[3], os.strerror(int(quoted[1]))
    if type(e).__module__.startswith('tensorflow'):
      for code in _DISK_FIXES:  # TensorFlow's errors carry strerror's text.
        if os.strerror(code) in text:
          return code, None, os.strerror(code)
  return None


@dataclasses.dataclass
class _Progress:
  """How far a build got: what its failure line says was kept."""
  input_dir: str
  output_dir: str
  tmp_dir: str
  had_dataset: bool = False  # --output_dir held an earlier build.
  tmp_left: bool = False  # The temporary folder could not be removed.
  copying: bool = False  # An object-store commit has started.
  committed: bool = False  # The new dataset is in place.

  def outcome(self) -> str:
    out = self.output_dir
    if self.committed:
      return f'the new dataset in --output_dir={out} is complete'
    if self.copying:
      earlier = ', no longer the earlier one,' if self.had_dataset else ''
      return (f'--output_dir={out} was being filled (an object store has no '
              f'rename) and may hold part of the new dataset{earlier} but no '
              f'{metadata_lib.METADATA_FILE}: no reader takes it for a '
              'dataset; rerun the build')
    try:
      created = paths.exists(out)
    except OSError:
      created = True
    kept = ('the earlier dataset is kept' if self.had_dataset else
            'it is as it was' if created else 'it was not created')
    tmp = (f'the temporary folder {self.tmp_dir} is left: remove it' if
           self.tmp_left else 'no temporary folder is left')
    return f'nothing was changed in --output_dir={out} ({kept}); {tmp}'

  def disk_error(self, code: int, path: Optional[str], what: str) -> str:
    parent = _parent_and_name(self.output_dir)[0]
    if path and _is_inside(path, self.input_dir):
      fix = 'the build only reads --input_dir: make it readable'
    else:
      fix = _DISK_FIXES[code].format(parent=parent)
    where = path or (self.tmp_dir if paths.exists(self.tmp_dir) or
                     self.tmp_left else parent)
    return f'{where}: {what}; {fix}; {self.outcome()}'


@contextlib.contextmanager
def _one_line_failures(progress: _Progress) -> Iterator[None]:
  """Turns a failure of the disk and Ctrl-C/SIGTERM into a BuildFailed line
  that says what was kept; other errors (bugs) go on with their traceback."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Beam re-raises a KeyboardInterrupt that hit a step as a RuntimeError.
    interrupt = next((c for c in _chain(e)
                      if isinstance(c, KeyboardInterrupt)), None)
    if interrupt is not None:
      raise _interrupted(interrupt, progress) from None
    failure = disk_failure(e)
    if failure is None:
      raise
    raise BuildFailed(progress.disk_error(*failure)) from None
  except KeyboardInterrupt as e:
    raise _interrupted(e, progress) from None


def _interrupted(interrupt: KeyboardInterrupt,
                 progress: _Progress) -> BuildFailed:
  return BuildFailed(
      f'interrupted ({cli.signal_name(interrupt)}); {progress.outcome()}',
      exit_code=128 + cli.signal_number(interrupt))


class _DropDiskFailureLogs:
  """A logging filter: Beam logs a failing step with its traceback before
  it raises; when the failure is the disk's (or Ctrl-C), the one-line error
  says it all."""

  def filter(self, record) -> bool:
    if not record.name.startswith('apache_beam'):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, KeyboardInterrupt):
      return False
    return disk_failure(exc or RuntimeError(record.getMessage())) is None


# The same for Beam's worker processes, which no filter here reaches:
# runner_options.run_args.


@contextlib.contextmanager
def _quiet_disk_failure_logs(beam_args: Sequence[str]) -> Iterator[None]:
  """Beam's failure logs off while the pipeline runs, here and in the
  worker processes of the FnApiRunner."""
  import logging  # pylint: disable=g-import-not-at-top
  handlers = list(logging.getLogger().handlers)
  drop = _DropDiskFailureLogs()
  for handler in handlers:
    handler.addFilter(drop)
  try:
    with _worker_log_levels(beam_args):
      yield
  finally:
    for handler in handlers:
      handler.removeFilter(drop)


@contextlib.contextmanager
def _worker_log_levels(beam_args: Sequence[str]) -> Iterator[None]:
  """The FnApiRunner starts its worker processes
  (--direct_running_mode=multi_processing) with empty pipeline options, so
  no log level given as a flag reaches them; a worker reads the file named
  by PIPELINE_OPTIONS_FILE in its environment instead (Beam's
  sdk_worker_main). Only the log levels go there."""
  if 'PIPELINE_OPTIONS_FILE' in os.environ:
    yield  # The user's own.
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  given = PipelineOptions(runner_options.pipeline_args(
      beam_args)).get_all_options(drop_default=True)
  fd, path = tempfile.mkstemp(prefix='build-worker-options-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump({'options': {k: given[k]
                           for k in runner_options.WORKER_LOG_OPTIONS
                           if k in given}}, f)
  os.environ['PIPELINE_OPTIONS_FILE'] = path
  try:
    yield
  finally:
    del os.environ['PIPELINE_OPTIONS_FILE']
    os.unlink(path)


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
            by_copy: Optional[bool] = None,
            progress: Optional[_Progress] = None) -> list[str]:
  """Moves the finished dataset into place (replacing an old one last).

  Local folders are renamed (atomic). Without `replace`, the rename only
  takes the place of nothing or of an empty folder (the OS refuses a
  non-empty one), so whatever appeared at output_dir while the build ran is
  never destroyed; with `replace`, the old folder must still hold only what
  a build wrote: checked just before it is moved aside, and again once it
  is (an entry added in between puts it back and stops the build). Only the
  old build's files are then deleted, one by one. Object stores (gs://,
  s3://) cannot rename folders: the same check, then files are copied with
  metadata.json last, so a reader (`read_dataset_spec`) sees a dataset only
  once everything else is there. Ctrl-C and SIGTERM wait for the end.

  Returns:
    Lines to show: what of the old folder could not be removed.
  """
  progress = progress or _Progress('', output_dir, tmp_dir)
  if by_copy is None:
    by_copy = paths.is_remote(output_dir)
  with signals_deferred():
    owned = _still_replaceable(output_dir, replace=replace)
    if by_copy:
      return _commit_by_copy(tmp_dir, output_dir, owned, progress)
    return _commit_by_rename(tmp_dir, output_dir, owned, progress)


def _filled_while_running(output_dir: str, detail: str = '') -> UserError:
  return UserError(
      f'--output_dir={output_dir} was filled by something else while this '
      f'build ran{detail}; it was left untouched: rerun the build with a new '
      'folder')


def _still_replaceable(output_dir: str, *, replace: bool) -> Optional[Owned]:
  """What of output_dir the commit may delete (None: nothing is there)."""
  if not (paths.exists(output_dir) or os.path.lexists(output_dir)):
    return None
  entries = paths.list_entries(output_dir)
  if not entries:
    return Owned()
  owned = owned_entries(output_dir) if replace else None
  if owned is None:
    raise _filled_while_running(output_dir)
  foreign = _foreign(entries, owned)
  if foreign:
    raise foreign_error(output_dir, foreign,
                        when=' (added while this build ran; nothing was '
                        'replaced)')
  return owned


def _commit_by_rename(tmp_dir: str, output_dir: str, owned: Optional[Owned],
                      progress: _Progress) -> list[str]:
  old = None
  if owned is not None and os.listdir(output_dir):
    old = f'{tmp_dir}{_OLD_SUFFIX}'
    os.rename(output_dir, old)
    foreign = _foreign(paths.list_entries(old), owned)
    if foreign:  # Added between the check and the rename.
      os.rename(old, output_dir)
      raise foreign_error(output_dir, foreign,
                          when=' (added while this build ran; nothing was '
                          'replaced)')
  try:
    os.rename(tmp_dir, output_dir)
  except OSError as e:
    if old:
      os.rename(old, output_dir)
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR,
                   errno.EISDIR):
      raise _filled_while_running(output_dir, f' ({e.strerror})') from None
    raise
  progress.committed = True
  if not old:
    return []
  try:
    left = _remove_entries(old, owned)
  except OSError as e:
    return [f'warning: the replaced dataset in {old} could not be removed '
            f'({e.strerror}); remove it yourself']
  if left:
    return [f'warning: {old} (the replaced dataset) was left: it holds what '
            f'a build did not write ({describe_entries(left)}); check and '
            'remove it yourself']
  return []


def _commit_by_copy(tmp_dir: str, output_dir: str, owned: Optional[Owned],
                    progress: _Progress) -> list[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  progress.copying = True
  if owned is not None:
    marker = posixpath.join(output_dir, metadata_lib.METADATA_FILE)
    if gfile.exists(marker):
      gfile.remove(marker)  # First: the old dataset stops being one.
    for name, kind in paths.list_entries(output_dir):
      if kind == paths.FILE and name in owned:
        gfile.remove(posixpath.join(output_dir, name))
  gfile.makedirs(output_dir)
  names = sorted(gfile.listdir(tmp_dir), key=lambda n: (
      n == metadata_lib.METADATA_FILE, n))
  for name in names:
    gfile.copy(posixpath.join(tmp_dir, name), posixpath.join(output_dir, name),
               overwrite=True)
  progress.committed = True
  paths.remove_tree(tmp_dir)
  return []


def build(settings: Optional[BuildSettings] = None, *,
          beam_args: Sequence[str] = (), quiet: bool = False,
          samples: bool = True, **kwargs) -> dict:
  """Builds a dataset directory from a labelled image folder.

  `samples` also writes `samples.png`, a grid of stored train images per
  class, to check labels and resizing at a glance (not counted in the
  timing).

  Refusals (UserError) come before anything is written. A failure of the
  disk (full, read-only, denied) and Ctrl-C/SIGTERM raise BuildFailed, one
  line that says what was kept: the earlier dataset stays untouched and the
  temporary folder is removed.

  Args:
    settings: a BuildSettings, or its fields as keywords (kwargs).
    beam_args: Beam pipeline options (--runner=..., ...).
    quiet: no progress lines.
    samples: also write samples.png.

  Returns:
    The build report as its JSON object (report_lib.BuildReport: what
    `output_dir/build_report.json` holds, elapsed_s and images_per_s of the
    Beam run included), with `output_dir` added.
  """
  # TensorFlow loads only in _run_and_commit, after the cheap checks, so
  # typos fail fast.
  if settings is None:
    settings = BuildSettings(**kwargs)
  elif kwargs:
    settings = dataclasses.replace(settings, **kwargs)
  overwrite = settings.overwrite
  given = {'input_dir': settings.input_dir, 'output_dir': settings.output_dir}
  input_dir, output_dir = (_real(paths.expand(p)) for p in given.values())
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
  say = (lambda m: None) if quiet else (
      lambda m: print(f'[build] {m}', file=sys.stderr, flush=True))
  progress = _Progress(input_dir, output_dir, temp_dir_for(output_dir))
  with _one_line_failures(progress):
    with output_lock(output_dir):
      progress.had_dataset = check_output_dir(  # Again, locked.
          output_dir, overwrite=overwrite)
      for line in clear_leftovers(output_dir):
        say(line)
      plan = listing_lib.plan_input(
          input_dir, exclude=(output_dir,),
          allow_missing_eval_classes=settings.allow_missing_eval_classes)
      config = make_config(settings, input_dir=input_dir, listing=plan)
      say(f'{len(plan.class_names)} classes ({plan.layout} layout), '
          f'{len(plan.folders)} folders to list; writing '
          f'{config.image.height}x{config.image.width}x'
          f'{config.image.channels} {config.image.image_format}')
      report, lines = _run_and_commit(
          config, plan, progress=progress, replace=progress.had_dataset,
          beam_args=beam_args, samples=samples,
          allow_missing_eval_classes=settings.allow_missing_eval_classes)
    report = dataclasses.replace(report, output_dir=output_dir)
    for line in lines:
      say(line)
    if not quiet:
      print(format_summary(report))
  if not report.written:
    raise UserError(_nothing_written(report, output_dir))
  if report.class_gap_error:
    raise UserError(report.class_gap_error + (
        ' (the earlier dataset in --output_dir was kept)'
        if report.kept_earlier else ''))
  return report.to_json_dict(in_file=False)


def _run_and_commit(config, plan, *, progress: _Progress, replace: bool,
                    beam_args, samples: bool,
                    allow_missing_eval_classes: bool = False
                    ) -> tuple[report_lib.BuildReport, list[str]]:
  """Runs Beam into the temporary folder and commits it; the folder never
  outlives a failure. Returns the report and lines to show.

  A build that wrote no image, or left a class with no train image (or, in
  layout (b), a split folder's class with none: splits.class_gap_error),
  commits only its report and rejected.jsonl (no metadata.json: it is not
  a dataset, and a model cannot learn such a class), and only where no
  earlier build would be replaced, so the reasons survive and nothing is
  lost for them. The report then holds `class_gap_error`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tmp_dir, output_dir = progress.tmp_dir, progress.output_dir
  try:
    beam_args = runner_options.run_args(beam_args)
    with _quiet_disk_failure_logs(beam_args):
      elapsed = beam_build.run_pipeline(
          config=config, plan=plan, tmp_dir=tmp_dir, beam_args=beam_args,
          exclude=(output_dir,))
    report_path = posixpath.join(tmp_dir, report_lib.REPORT_FILE)
    with tf.io.gfile.GFile(report_path) as f:
      report = report_lib.BuildReport.from_json(f.read())
    report = dataclasses.replace(
        report, elapsed_s=round(elapsed, 3),
        images_per_s=round(report.written / elapsed, 1))
    report = dataclasses.replace(
        report, empty_classes=tuple(empty_classes(report, tmp_dir)))
    gap = splits_lib.class_gap_error(
        report.classes_without_examples, input_dir=config.input_dir,
        given_splits=config.layout == listing_lib.SPLIT_FOLDERS_LAYOUT,
        allow_missing_eval_classes=allow_missing_eval_classes,
        allow_flag=listing_lib.ALLOW_MISSING_EVAL_CLASSES_FLAG)
    if gap and report.written:
      report = dataclasses.replace(report, class_gap_error=gap)
    with tf.io.gfile.GFile(report_path, 'w') as f:
      f.write(report.to_json())
    if not report.written or gap:
      tf.io.gfile.remove(posixpath.join(tmp_dir, metadata_lib.METADATA_FILE))
      if replace and _is_dataset(output_dir):
        _remove_temp(progress)  # Keep the earlier, usable dataset.
        return dataclasses.replace(report, kept_earlier=True), []
    elif samples:
      plots.write_dataset_samples(
          tmp_dir, posixpath.join(tmp_dir, plots.SAMPLES_FILE))
    lines = _commit(tmp_dir, output_dir, replace=replace, progress=progress)
  except BaseException:
    with signals_deferred():
      _remove_temp(progress)
    raise
  return report, lines


def _is_dataset(path: str) -> bool:
  try:
    metadata_lib.read_dataset_spec(path)
    return True
  except metadata_lib.DatasetError:
    return False


def _remove_temp(progress: _Progress) -> None:
  """Removes the temporary folder (it is this build's: all of it goes)."""
  try:
    if paths.exists(progress.tmp_dir):
      paths.remove_tree(progress.tmp_dir)
  except OSError:
    progress.tmp_left = True


def _nothing_written(report: report_lib.BuildReport, output_dir: str) -> str:
  """The error for a build in which every file was rejected or ignored."""
  reasons = ', '.join(f'{n} {k}' for k, n in report.not_written.items()
                      if n)
  rejected = posixpath.join(output_dir, metadata_lib.REJECTED_FILE)
  where = ('the earlier dataset in --output_dir was kept (build into a new '
           "folder to get each file's reason)" if _is_dataset(output_dir) else
           f'the reason for each file is in {rejected}')
  return (f'no image of --input_dir={report.input_dir} could be written '
          f'({report.seen} files: {reasons}); {where}; fix or replace '
          'those files and rerun')

def _rejected_per_class(tmp_dir: str, layout: str) -> dict:
  """Class name -> lines of rejected.jsonl under its folder (streamed)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  depth = 1 if layout == listing_lib.SPLIT_FOLDERS_LAYOUT else 0
  counts = {}
  with tf.io.gfile.GFile(
      posixpath.join(tmp_dir, metadata_lib.REJECTED_FILE)) as f:
    for line in f:
      parts = json.loads(line)['path'].split('/')
      if len(parts) > depth + 1:
        counts[parts[depth]] = counts.get(parts[depth], 0) + 1
  return counts


def empty_classes(report: report_lib.BuildReport,
                  tmp_dir: str) -> list[report_lib.EmptyClass]:
  """The classes a model cannot learn: none of their images was written
  (all rejected, or an empty folder), or none is in train. One entry each
  for build_report.json's `empty_classes`: class, images written, in train,
  files rejected, and the warning the summary shows."""
  splits = report.splits
  written = {c: sum(s.per_class[c] for s in splits.values())
             for c in report.class_names}
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
    lines.append(f'warning: class {_shown(entry.class_name)!r}: '
                 f'{entry.warning}')
  if len(empty) > _SUMMARY_EDGE * 2:
    lines.append(f'warning: {len(empty) - _SUMMARY_EDGE * 2} more classes '
                 f'with no image in train: empty_classes in {report_path}')
  lines.append('')
  not_written = report.seen - report.written
  lines.append(f'seen {report.seen}, written {report.written}, '
               f'not written {not_written}' + (':' if not_written else ''))
  for key, value in report.not_written.items():
    lines.append(f'  {key:<36}{value:>8}')
  lines.append(f'{report.images_per_s} images/s over '
               f'{report.elapsed_s} s, {report.bytes_written / 1e6:.1f} '
               'MB written')
  if report.written:
    lines.append(f'dataset: {out}  (report: {report_path}, '
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
      runner_options.pipeline_args([])))
  try:
    beam_build.build_pipeline(pipeline, config=config, plan=plan,
                              tmp_dir=posixpath.join(tmp_dir, 'tmp'))
    return len(pipeline.to_runner_api().SerializeToString())
  finally:  # Beam removes its temp folder only when a pipeline runs.
    shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
