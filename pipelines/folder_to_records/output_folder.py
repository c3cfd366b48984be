"""The output folder of a build: what a build owns in it, its lock, the
leftovers of stopped builds, and the atomic commit of a finished dataset.

Nothing a build did not write is ever deleted: a folder is replaced only
when everything in it is a build's (its metadata.json and
build_report.json say which shards), checked again just before the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import posixpath
import re
import signal
import threading
import uuid
from typing import Iterator, Mapping, Optional, Sequence

from pipelines import plots
from pipelines.common import paths
from pipelines.common import run_files
from pipelines.common import walk
from pipelines.common.errors import UserError
from pipelines.folder_to_records import chunk_format
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
from tfrecords_schema import schema


def real_path(path: str) -> str:
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
                         metadata_lib.REJECTED_FILE,
                         metadata_lib.NEAR_DUPLICATES_FILE,
                         metadata_lib.IMAGES_FILE, plots.SAMPLES_FILE,
                         metadata_lib.REPORT_PAGE_FILE, *TFDS_FILES,
                         *metadata_lib.LEFT_OUT_FILES.values()))
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
  """A file of beam_build's CHUNKS_DIR (chunk records, the chunk's meta
  file; or an earlier version's index and lines files)."""
  if re.fullmatch(chunk_format.RUN_FILE_RE, name) or re.fullmatch(
      chunk_format.CHUNK_FILE_RE, name):
    return True
  m = _CHUNK_RE.fullmatch(name)
  if not m:
    return False
  index = int(m['index'])
  return name in (posixpath.basename(chunk_format.meta_path('', index)),
                  f'{index:06d}-images.jsonl') or (  # (before 2026-12-05)
      m['split'] in metadata_lib.SPLITS and name in (
          f'{index:06d}-{m["split"]}.tfrecord',
          f'{index:06d}-{m["split"]}.index'))


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


def shown_name(name: str) -> str:
  text = walk.escaped(name)
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_KIND_SHOWN = {paths.FOLDER: '/', paths.LINK: ' (a link)',
               paths.OTHER: ' (not a regular file)', paths.FILE: ''}


def describe_entries(entries: Sequence[tuple[str, str]]) -> str:
  """'notes.txt, run1/, .hidden and 4 more': a few entries, and the count."""
  shown = ', '.join(shown_name(n) + _KIND_SHOWN[k]
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
      f'{_training_run(foreign)}: {describe_entries(foreign)}; a build '
      '(--overwrite, --update) replaces only what a build wrote and never '
      'deletes anything else: '
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
    if kind == paths.FOLDER and name == chunk_format.CHUNKS_DIR:
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
          name == chunk_format.CHUNKS_DIR):
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


def parent_and_name(output_dir: str) -> tuple[str, str]:
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
  parent, name = parent_and_name(output_dir)
  created = _make_parents(parent)
  path = os.path.join(parent, f'.{name}.lock')
  try:
    while True:
      fd = paths.lock_exclusively(path, os.O_RDWR | os.O_CREAT, busy=(
          f'another build is writing --output_dir={output_dir} (lock file '
          f'{path}); wait for it to finish, or choose another folder'))
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
TEMP_SUFFIX = '.incomplete-'
OLD_SUFFIX = '.old'


def temp_dir_for(output_dir: str) -> str:
  parent, name = parent_and_name(output_dir)
  return posixpath.join(parent,
                        f'.{name}{TEMP_SUFFIX}{uuid.uuid4().hex[:8]}')


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
  parent, name = parent_and_name(output_dir)
  pattern = re.compile(re.escape(f'.{name}{TEMP_SUFFIX}') + r'[0-9a-f]{8}' +
                       f'(?:{re.escape(OLD_SUFFIX)})?')
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
    if entry.endswith(OLD_SUFFIX) and not os.path.lexists(output_dir):
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


@dataclasses.dataclass
class Progress:
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
              f'dataset; the whole new dataset is kept in {self.tmp_dir}: '
              f'copy its files there ({metadata_lib.METADATA_FILE} last) and '
              'remove it, or remove it and rerun the build with --overwrite')
    try:
      created = paths.exists(out)
    except OSError:
      created = True
    kept = ('the earlier dataset is kept' if self.had_dataset else
            'it is as it was' if created else 'it was not created')
    tmp = (f'the temporary folder {self.tmp_dir} is left: remove it' if
           self.tmp_left else 'no temporary folder is left')
    return f'nothing was changed in --output_dir={out} ({kept}); {tmp}'


def commit(tmp_dir: str, output_dir: str, *, replace: bool,
           by_copy: Optional[bool] = None,
           progress: Optional[Progress] = None) -> list[str]:
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
  progress = progress or Progress('', output_dir, tmp_dir)
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
                      progress: Progress) -> list[str]:
  old = None
  if owned is not None and os.listdir(output_dir):
    old = f'{tmp_dir}{OLD_SUFFIX}'
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
                    progress: Progress) -> list[str]:
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


def is_dataset(path: str) -> bool:
  try:
    metadata_lib.read_dataset_spec(path)
    return True
  except metadata_lib.DatasetError:
    return False


def remove_temp(progress: Progress) -> None:
  """Removes the temporary folder (it is this build's: all of it goes),
  unless an object-store commit had begun: then the earlier dataset may be
  gone already, and the temporary folder holds the only whole copy of the
  new one (Progress.outcome says where)."""
  if progress.copying and not progress.committed:
    return
  try:
    if paths.exists(progress.tmp_dir):
      paths.remove_tree(progress.tmp_dir)
  except OSError:
    progress.tmp_left = True
