"""What a build does to the files around --output_dir: it replaces only what
a build wrote, refuses anything else, and ends a failed or interrupted
build with one line and the earlier dataset untouched."""

import os
import pwd

import pytest

from pipelines.common import cli
from pipelines.common import paths
from pipelines.common.errors import UserError


@pytest.mark.parametrize('given, expected', [
    ('file:///abs/data', '/abs/data'),
    ('file://localhost/abs/data', '/abs/data'),
    ('FILE://LocalHost/abs', '/abs'),
    ('file:///a%20b/c%25d', '/a b/c%d'),
    ('file:///run#1/x?y', '/run#1/x?y'),
    ('file:///', '/'),
    ('gs://bucket/data', 'gs://bucket/data'),
    ('s3://bucket/~/x', 's3://bucket/~/x'),
    ('', ''),
    ('relative/dir', 'relative/dir'),
    ('/abs/~x', '/abs/~x'),
])
def test_expand(given, expected):
  assert paths.expand(given) == expected


def test_expand_home(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert paths.expand('~') == str(tmp_path)
  assert paths.expand('~/x/y') == str(tmp_path / 'x' / 'y')
  user = pwd.getpwuid(os.getuid())
  assert paths.expand(f'~{user.pw_name}/z') == os.path.join(user.pw_dir, 'z')
  # A file URL is not a shell path: its '~' is a folder name.
  assert paths.expand('file:///~/x') == '/~/x'


@pytest.mark.parametrize('url', ['file://otherhost/abs', 'file://'])
def test_expand_refuses_a_file_url_it_cannot_read(url):
  with pytest.raises(UserError, match='file:///abs/path'):
    paths.expand(url)


# ---------------------------------------------------------------------------
# Builds: what --overwrite may replace.

import contextlib
import errno
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from pipelines import plots
from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import builder
from pipelines.folder_to_records import progress
from tests import helpers
import tfrecords_schema
from tfrecords_schema import metadata


def _images(root: pathlib.Path) -> pathlib.Path:
  helpers.photo_folder(root, classes=('cat', 'coffee'), per_class=1,
                       formats=('png',), size=24)
  return root


def _snapshot(root: pathlib.Path) -> dict:
  """relpath -> bytes, link target or 'folder': everything under root,
  links not followed."""
  out = {}
  for path in sorted(root.rglob('*')):
    rel = str(path.relative_to(root))
    if path.is_symlink():
      out[rel] = ('link', os.readlink(path))
    elif path.is_dir():
      out[rel] = 'folder'
    else:
      out[rel] = path.read_bytes()
  return out


def _beside(out: pathlib.Path) -> list[str]:
  """Hidden entries a build leaves beside out (lock, temporary folders)."""
  return sorted(p.name for p in out.parent.glob(f'.{out.name}*'))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(input folder, a dataset built from it): copied, never changed."""
  root = tmp_path_factory.mktemp('built')
  images = _images(root / 'images')
  out = root / 'dataset'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8',
                validation_fraction=0.0, quiet=True)
  return images, out


def _copy(built, tmp_path) -> pathlib.Path:
  out = tmp_path / 'ds'
  shutil.copytree(built[1], out, symlinks=True)
  return out


def test_a_build_writes_exactly_the_entries_it_owns(built):
  _, out = built
  names = sorted(p.name for p in out.iterdir())
  spec = tfrecords_schema.read_dataset_spec(str(out))
  shards = [s for split in spec.splits.values() for s in split.shards]
  # Every name the ownership rule knows is written, and nothing else: a file
  # added to the build without adding it to BUILD_FILES fails here.
  # (left_out files only where copies were left out: none here.)
  assert names == sorted(builder.BUILD_FILES - set(
      metadata.LEFT_OUT_FILES.values()) | set(shards))
  owned = builder.owned_entries(str(out))
  assert all(n in owned for n in names)
  assert 'cat-train.tfrecord-00000-of-00001' not in owned
  assert 'notes.txt' not in owned


def test_training_run_folder_names_match_the_trainer():
  from trainer import config  # pylint: disable=g-import-not-at-top
  assert builder.TRAINING_RUN_FOLDERS == (config.CHECKPOINT_DIR,
                                          config.EXPORT_DIR)


def _add_file(out, outside):
  (out / 'notes.txt').write_text('mine')


def _add_folder(out, outside):  # The case: a --model_dir inside.
  (out / 'run1' / 'checkpoint').mkdir(parents=True)
  (out / 'run1' / 'checkpoint' / 'ckpt-1.index').write_text('weights')


def _add_training_run(out, outside):
  (out / 'checkpoint').mkdir()
  (out / 'checkpoint' / 'ckpt-1.index').write_text('weights')


def _add_hidden(out, outside):
  (out / '.DS_Store').write_bytes(b'\0mac')


def _add_link_to_folder(out, outside):
  os.symlink(outside, out / 'more')


def _replace_with_link(out, outside):  # A build's name, but a link.
  (out / 'features.json').unlink()
  os.symlink(outside / 'precious.txt', out / 'features.json')


def _add_stale_shard(out, outside):  # Not in metadata.json: not ours.
  (out / 'images-train.tfrecord-00009-of-00010').write_bytes(b'old shard')


def _folder_named_like_a_build_file(out, outside):
  (out / 'samples.png').unlink()
  (out / 'samples.png').mkdir()
  (out / 'samples.png' / 'a.png').write_bytes(b'png')


@pytest.mark.parametrize('add,named', [
    (_add_file, 'notes.txt'),
    (_add_folder, 'run1/'),
    (_add_training_run, 'training run: checkpoint/'),
    (_add_hidden, '.DS_Store'),
    (_add_link_to_folder, 'more (a link)'),
    (_replace_with_link, 'features.json (a link)'),
    (_add_stale_shard, 'images-train.tfrecord-00009-of-00010'),
    (_folder_named_like_a_build_file, 'samples.png/'),
])
def test_overwrite_refuses_a_dataset_folder_with_foreign_entries(
    built, tmp_path, add, named):
  images, _ = built
  out = _copy(built, tmp_path)
  outside = tmp_path / 'outside'
  outside.mkdir()
  (outside / 'precious.txt').write_text('precious')
  add(out, outside)
  before, kept = _snapshot(out), _snapshot(outside)
  with pytest.raises(UserError) as e:
    builder.build(input_dir=str(images), output_dir=str(out),
                  image_size='8', overwrite=True, quiet=True)
  message = str(e.value)
  assert named in message and 'that a build did not write' in message
  assert f'move it out of {out}, or build into a new folder' in message
  assert _snapshot(out) == before and _snapshot(outside) == kept
  assert _beside(out) == []


def test_the_report_of_a_build_that_wrote_nothing_follows_the_same_rule(
    built, tmp_path):
  images, dataset = built
  out = tmp_path / 'report_only'
  out.mkdir()
  for name in (metadata.REPORT_FILE, metadata.REJECTED_FILE):
    shutil.copy(dataset / name, out / name)
  (out / 'thesis.tex').write_text('x')
  with pytest.raises(UserError, match='1 entry that a build did not write'):
    builder.build(input_dir=str(images), output_dir=str(out), overwrite=True,
                  quiet=True)
  assert (out / 'thesis.tex').read_text() == 'x'
  (out / 'thesis.tex').unlink()  # Then it is ours, and replaced.
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8',
                overwrite=True, quiet=True)
  assert tfrecords_schema.read_dataset_spec(str(out)).height == 8


def _add_during_run(monkeypatch, out):
  run = beam_build.run_pipeline

  def run_then_add(**kwargs):
    elapsed = run(**kwargs)
    (out / 'added.txt').write_text('mine')
    return elapsed

  monkeypatch.setattr(beam_build, 'run_pipeline', run_then_add)


def _add_just_before_the_rename(monkeypatch, out):
  rename = os.rename

  def add_then_rename(src, dst):
    if os.fspath(src) == str(out):
      (out / 'added.txt').write_text('mine')
    rename(src, dst)

  monkeypatch.setattr(os, 'rename', add_then_rename)


@pytest.mark.parametrize('race', [_add_during_run,
                                  _add_just_before_the_rename])
def test_an_entry_added_while_the_build_runs_is_never_deleted(
    built, tmp_path, monkeypatch, race):
  images, _ = built
  out = _copy(built, tmp_path)
  before = _snapshot(out)
  race(monkeypatch, out)
  with pytest.raises(UserError, match='added while this build ran'):
    builder.build(input_dir=str(images), output_dir=str(out),
                  image_size='12', overwrite=True, quiet=True)
  after = _snapshot(out)
  assert after.pop('added.txt') == b'mine'
  assert after == before  # The earlier dataset, untouched.
  assert _beside(out) == []


def test_remove_tree_unlinks_links_and_never_follows_them(tmp_path):
  victim = tmp_path / 'victim'
  victim.mkdir()
  (victim / 'precious').write_text('x')
  doomed = tmp_path / 'doomed'
  doomed.mkdir()
  os.symlink(victim, doomed / 'link')
  paths.remove_tree(str(doomed))
  assert not doomed.exists() and (victim / 'precious').read_text() == 'x'


def test_object_store_folders_go_through_the_same_check(tmp_path):
  """ram:// is TensorFlow's in-memory file system: remote as gs:// is."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  out = f'ram://bucket-{os.getpid()}/ds'
  gfile.makedirs(out)
  with gfile.GFile(f'{out}/{metadata.REPORT_FILE}', 'w') as f:
    f.write(json.dumps({'toolkit': metadata.TOOLKIT_MARKER,
                        'dataset_name': 'old',
                        'splits': {'train': {'num_shards': 1}}}))
  with gfile.GFile(f'{out}/old-train.tfrecord-00000-of-00001', 'w') as f:
    f.write('old')
  with gfile.GFile(f'{out}/notes.txt', 'w') as f:
    f.write('mine')
  with pytest.raises(UserError, match='notes.txt'):
    builder.check_output_dir(out, overwrite=True)
  tmp = tmp_path / '.ds.incomplete'
  tmp.mkdir()
  (tmp / 'metadata.json').write_text('{}')
  with pytest.raises(UserError, match='notes.txt'):
    builder._commit(str(tmp), out, replace=True)  # pylint: disable=protected-access
  assert gfile.exists(f'{out}/old-train.tfrecord-00000-of-00001')
  gfile.remove(f'{out}/notes.txt')
  assert builder.check_output_dir(out, overwrite=True)
  builder._commit(str(tmp), out, replace=True)  # pylint: disable=protected-access
  assert sorted(gfile.listdir(out)) == ['metadata.json']


# ---------------------------------------------------------------------------
# Failures of the disk and interrupts: one line, the earlier dataset kept.

def test_a_disk_failure_while_writing_is_one_line_and_keeps_the_dataset(
    built, tmp_path, monkeypatch):
  """ENOSPC simulated in-process where the last file is written into the
  temporary folder (runs without root; the tmpfs test below is the real
  thing)."""
  images, _ = built
  out = _copy(built, tmp_path)
  before = _snapshot(out)

  def disk_full(data_dir, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(plots, 'write_dataset_samples', disk_full)
  with pytest.raises(builder.BuildFailed) as e:
    builder.build(input_dir=str(images), output_dir=str(out),
                  image_size='12', overwrite=True, quiet=True)
  message = str(e.value)
  assert 'No space left on device' in message and 'free space' in message
  assert (f'nothing was changed in --output_dir={out} (the earlier dataset '
          'is kept); no temporary folder is left') in message
  assert '\n' not in message
  assert _snapshot(out) == before and _beside(out) == []


def _mount_tmpfs(path: pathlib.Path, size: str) -> None:
  path.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                           'tmpfs', str(path)], capture_output=True,
                          check=False)
  if result.returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')


@pytest.fixture
def mounts():
  """Mounts tmpfs folders for a test; unmounts them afterwards."""
  mounted = []

  def mount(path, size='4m'):
    _mount_tmpfs(path, size)
    mounted.append(path)
    return path

  yield mount
  for path in reversed(mounted):
    subprocess.run(['umount', '-l', str(path)], check=False)


def _run_build(*args, env=None, timeout=300):
  return helpers.run_cli('pipelines.build', *args, env=env, timeout=timeout)


def _one_error(result) -> str:
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = helpers.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  others = [l for l in result.stderr.splitlines()
            if not l.startswith(('error:', '[build]'))]
  assert not others, result.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize('workers', [
    [], ['--direct_num_workers=2', '--direct_running_mode=multi_processing']])
def test_a_full_disk_is_one_line_and_keeps_the_dataset(built, tmp_path,
                                                       mounts, workers):
  """In Beam's worker processes too, which print their tracebacks."""
  images, _ = built
  disk = mounts(tmp_path / 'disk', size='1m')
  out = disk / 'ds'
  shutil.copytree(built[1], out)  # Fits; the raw 512x512 build does not.
  before = _snapshot(out)
  result = _run_build(f'--input_dir={images}', f'--output_dir={out}',
                      '--overwrite', '--image_size=512', '--image_format=raw',
                      *workers)
  assert result.returncode == 1
  error = _one_error(result)
  assert 'No space left on device' in error and 'free space' in error
  assert 'the earlier dataset is kept' in error
  assert _snapshot(out) == before and _beside(out) == []


def _forwarded(*chunks: bytes, progress=None) -> bytes:
  """What cli's stderr forwarder of the build writes for these chunks."""
  read_fd, write_fd = os.pipe()
  out_read, out_write = os.pipe()
  forwarder = cli._Forwarder(out_write, None, (b'error:', b'[build]'),  # pylint: disable=protected-access
                             progress)
  for chunk in chunks:
    os.write(write_fd, chunk)
  os.close(write_fd)
  forwarder.run(read_fd)
  os.close(out_write)
  with os.fdopen(out_read, 'rb') as f:
    return f.read()


def test_tracebacks_wait_for_the_one_line_error_or_the_end():
  trace = (b'Traceback (most recent call last):\n  File "x.py"\n'
           b'OSError: [Errno 28] No space left on device\n')
  # A worker's traceback, then the build's one line: the line alone.
  assert _forwarded(b'[build] chunk 1\n', trace, b'[build] chunk 2\n',
                    b'error: disk full\n') == (
                        b'[build] chunk 1\n[build] chunk 2\nerror: disk full\n')
  # A crash: everything, the traceback at the end; noise still dropped.
  assert _forwarded(b'[build] a\n', trace[:20], trace[20:],
                    b'INFO:worker chatter\n', b'[build] b\n',
                    b'RuntimeError: bug') == (
                        b'[build] a\n[build] b\n' + trace +
                        b'RuntimeError: bug\n')


def test_the_workers_chunk_lines_become_one_progress_display():
  lines = [b'[build] 2 classes\n', b'[build] chunk 3: 50 written, 2 rejected\n',
           b'[build] chunk 1: 40 written, 0 rejected\n', b'INFO:chatter\n',
           b'[build] chunk 2: 8 written, 0 rejected\n',
           b'[build] finalized: 98 written, 2 not written\n']
  times = iter([2.0, 5.0, 12.0])  # At each chunk line.
  clock = lambda: next(times)
  # A log or a pipe: the totals at most every EVERY_S seconds.
  assert progress.EVERY_S == 10
  assert _forwarded(*lines, progress=progress.ChunkProgress(
      terminal=False, clock=clock)) == (
          b'[build] 2 classes\n'
          b'[build] 52 files read: 50 written, 2 rejected\n'
          b'[build] 100 files read: 98 written, 2 rejected (5 files/s)\n'
          b'[build] finalized: 98 written, 2 not written\n')
  # A terminal: one line rewritten in place, ended before any other line.
  times = iter([2.0, 5.0, 12.0])
  shown = _forwarded(*lines, progress=progress.ChunkProgress(
      terminal=True, clock=clock))
  assert shown == (
      b'[build] 2 classes\n'
      b'\r[build] 52 files read: 50 written, 2 rejected\x1b[K'
      b'\r[build] 92 files read: 90 written, 2 rejected (13 files/s)\x1b[K'
      b'\r[build] 100 files read: 98 written, 2 rejected (5 files/s)\x1b[K\n'
      b'[build] finalized: 98 written, 2 not written\n')
  # Ended at the end too, with nothing after it.
  times = iter([1.0])
  assert _forwarded(lines[1], progress=progress.ChunkProgress(
      terminal=True, clock=clock)).endswith(b'\x1b[K\n')


def test_a_read_only_parent_is_named_before_anything_is_written(
    built, tmp_path, mounts):
  """The issue's case: --output_dir exists, empty, but the folder it is in
  cannot be written (root: a read-only disk; others: a folder without write
  permission, --output_dir itself writable)."""
  images, _ = built
  parent = tmp_path / 'parent'
  if os.geteuid() == 0:  # Root writes through permissions.
    mounts(parent)
  else:
    parent.mkdir()
  out = parent / 'out'
  out.mkdir(mode=0o777)
  if os.geteuid() == 0:
    subprocess.run(['mount', '-o', 'remount,ro', str(parent)], check=True)
  else:
    parent.chmod(0o555)
  try:
    result = _run_build(f'--input_dir={images}', f'--output_dir={out}',
                        '--image_size=8')
  finally:
    if os.geteuid() != 0:
      parent.chmod(0o755)  # For pytest to remove it.
  assert result.returncode == 1
  error = _one_error(result)
  assert f'{parent}/.out.lock: ' in error
  assert ('Read-only file system' if os.geteuid() == 0 else
          'Permission denied') in error
  assert f'beside --output_dir, in {parent}' in error, error
  assert 'renames the finished dataset into place' in error
  assert '[build]' not in result.stderr  # Before the listing and TensorFlow.
  assert list(out.iterdir()) == []


def test_names_the_file_system_cannot_hold_and_files_on_the_way_are_one_line(
    built, tmp_path):
  images, _ = built
  (tmp_path / 'file').write_text('x')
  with pytest.raises(UserError, match=f'{tmp_path}/file is a file, not a '
                     'folder'):
    builder.build(input_dir=str(images),
                  output_dir=str(tmp_path / 'file' / 'a' / 'ds'), quiet=True)
  # The name fits; the lock and temporary folder beside it do not.
  with pytest.raises(builder.BuildFailed, match='File name too long.*adds up '
                     'to 25 characters.*nothing was changed'):
    builder.build(input_dir=str(images), output_dir=str(tmp_path / ('a' * 250)),
                  quiet=True)
  assert [p.name for p in tmp_path.iterdir()] == ['file']


def test_a_mount_point_is_refused_before_anything_is_written(built, tmp_path,
                                                            mounts):
  images, _ = built
  out = mounts(tmp_path / 'volume')
  with pytest.raises(UserError, match=f'build into a folder inside it, e.g. '
                     f'--output_dir={out}/dataset'):
    builder.build(input_dir=str(images), output_dir=str(out), quiet=True)
  assert list(out.iterdir()) == [] and _beside(out) == []


def test_a_refusal_under_the_lock_leaves_no_folder_or_lock(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = tmp_path / 'new' / 'deeper' / 'ds'
  with pytest.raises(UserError):  # No class folders: refused by the listing.
    builder.build(input_dir=str(empty), output_dir=str(out), quiet=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['empty']


_STALL_HOOK = '''
"""Stalls the build in its Beam run (finalize), in whichever process runs
it, once BUILD_TEST_STALL names a file, which it writes first."""
import importlib.abc, importlib.machinery, os, sys, time


class _Stall(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path, target=None):
    if name != 'pipelines.folder_to_records.beam_build':
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    exec_module = spec.loader.exec_module

    def patched(module):
      exec_module(module)
      finalize = module.finalize

      def stall(*args, **kwargs):
        with open(os.environ['BUILD_TEST_STALL'], 'w') as f:
          f.write(str(os.getpid()))
        time.sleep(300)
        return finalize(*args, **kwargs)

      module.finalize = stall

    spec.loader.exec_module = patched
    return spec


if os.environ.get('BUILD_TEST_STALL'):
  sys.meta_path.insert(0, _Stall())
'''


def _descendants(pid: int) -> set:
  children = {}
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    with contextlib.suppress(OSError, ValueError, IndexError):
      fields = stat.read_text().rsplit(')', 1)[1].split()
      children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


@pytest.mark.parametrize('signum,to_group,workers', [
    (signal.SIGINT, True, ['--direct_num_workers=2',
                           '--direct_running_mode=multi_processing']),
    (signal.SIGTERM, False, []),
])
def test_an_interrupted_build_is_one_line_and_keeps_the_dataset(
    built, tmp_path, signum, to_group, workers):
  """Ctrl-C reaches the whole process group (Beam's worker processes too);
  SIGTERM (kill, a scheduler) the build alone."""
  images, _ = built
  out = _copy(built, tmp_path)
  before = _snapshot(out)
  hook = tmp_path / 'hook'
  hook.mkdir()
  (hook / 'sitecustomize.py').write_text(_STALL_HOOK)
  stalled = tmp_path / 'stalled'
  env = dict(os.environ, PYTHONPATH=str(hook), BUILD_TEST_STALL=str(stalled))
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
       f'--output_dir={out}', '--overwrite', '--image_size=12', *workers],
      cwd=helpers.REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    deadline = time.monotonic() + 180
    while not stalled.exists() and process.poll() is None:
      assert time.monotonic() < deadline, 'the build never reached finalize'
      time.sleep(0.2)
    time.sleep(0.5)
    family = _descendants(process.pid)
    assert len(family) >= (2 if workers else 0)
    if to_group:
      os.killpg(process.pid, signum)
    else:
      process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == 128 + signum
  error = _one_error(subprocess.CompletedProcess([], 0, '', stderr))
  assert error == (
      f'error: interrupted ({signal.Signals(signum).name}); nothing was '
      f'changed in --output_dir={out} (the earlier dataset is kept); no '
      'temporary folder is left')
  assert _snapshot(out) == before and _beside(out) == []
  deadline = time.monotonic() + 20
  while any(os.path.exists(f'/proc/{p}') for p in family):
    assert time.monotonic() < deadline, 'Beam worker processes still run'
    time.sleep(0.2)


# ---------------------------------------------------------------------------
# Leftovers of stopped builds, ~ and file:// paths, empty classes, summary.

def _leftover(parent: pathlib.Path, name: str) -> pathlib.Path:
  """What a killed build leaves: chunks, a shard, a report."""
  folder = parent / name
  (folder / beam_build.CHUNKS_DIR).mkdir(parents=True)
  (folder / beam_build.CHUNKS_DIR / '000000-train.tfrecord').write_bytes(b'r')
  (folder / beam_build.CHUNKS_DIR / '000000-meta.jsonl').write_bytes(b'i')
  (folder / beam_build.CHUNKS_DIR /
   '000000-validation-0123456789abcdef.tfrecord').write_bytes(b'r')
  (folder / beam_build.CHUNKS_DIR /
   f'earlier-{"0" * 32}.bin').write_bytes(b'e')
  # Earlier versions' index and lines files.
  (folder / beam_build.CHUNKS_DIR / '000001-train.index').write_bytes(b'i')
  (folder / beam_build.CHUNKS_DIR / '000001-images.jsonl').write_bytes(b'i')
  (folder / 'images-train.tfrecord-00000-of-00002').write_bytes(b's')
  (folder / metadata.REPORT_FILE).write_text('{')
  return folder


def test_leftovers_of_stopped_builds_are_removed_only_when_provably_ours(
    built, tmp_path, monkeypatch, capsys):
  images, _ = built
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  ours = _leftover(home, '.ds.incomplete-0123abcd')
  theirs = _leftover(home, '.ds.incomplete-89abcdef')
  (theirs / beam_build.CHUNKS_DIR / 'notes.txt').write_text('mine')
  linked = _leftover(home, '.ds.incomplete-00000000')
  os.symlink(images, linked / 'photos')
  other = home / '.ds.incomplete-notours'  # Not a name a build gives.
  other.mkdir()
  builder.build(input_dir=f'file://{images}', output_dir='~/ds',
                image_size='8', validation_fraction=0.0)
  err = capsys.readouterr().err
  assert not (tmp_path / '~').exists() and not pathlib.Path('~').exists()
  assert tfrecords_schema.read_dataset_spec(str(home / 'ds'))
  assert ('[build] removed 1 temporary folder(s) that stopped builds left '
          'beside --output_dir: .ds.incomplete-0123abcd\n') in err
  assert not ours.exists()
  assert f'[build] warning: {theirs} looks like' in err
  assert '_chunks/notes.txt' in err and 'photos (a link)' in err
  assert (theirs / beam_build.CHUNKS_DIR / 'notes.txt').read_text() == 'mine'
  assert (linked / 'photos').is_symlink() and (images / 'cat').is_dir()
  assert other.is_dir()
  assert sorted(p.name for p in home.iterdir()) == [
      '.ds.incomplete-00000000', '.ds.incomplete-89abcdef',
      '.ds.incomplete-notours', 'ds']


def test_a_dataset_moved_aside_by_a_stopped_commit_is_kept(built, tmp_path,
                                                          capsys):
  images, _ = built
  out = tmp_path / 'ds'
  aside = tmp_path / '.ds.incomplete-0123abcd.old'
  shutil.copytree(built[1], aside)
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8',
                validation_fraction=0.0)
  assert f'`mv {aside} {out}` brings it back' in capsys.readouterr().err
  assert tfrecords_schema.read_dataset_spec(str(aside))


def test_file_urls_reach_the_overlap_check(built, tmp_path):
  images, _ = built
  with pytest.raises(UserError, match='overlap'):
    builder.build(input_dir=str(images),
                  output_dir=f'file://localhost{images}/cat/ds')
  assert sorted(p.name for p in (images / 'cat').iterdir()) == [
      'chelsea_0.png']


def test_classes_without_train_images_are_warned_then_refused(
    tmp_path, capsys):
  images = tmp_path / 'images'
  helpers.photo_folder(images, layout='splits',
                       classes={'a': 'chelsea', 'd': 'rocket'},
                       per_class={'train': 1, 'validation': 1},
                       formats=('png',), size=24)
  for path in (images / 'train' / 'd').iterdir():
    path.write_bytes(b'not an image')  # d: only in validation.
  helpers.write(images / 'train' / 'b' / 'bad.png', b'not an image')
  (images / 'validation' / 'b').mkdir()
  (images / 'train' / 'c').mkdir()
  (images / 'validation' / 'c').mkdir()
  with pytest.raises(UserError) as raised:
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  image_size='8')
  error = str(raised.value)
  assert "train: 'b', 'c', 'd'" in error and 'rejected.jsonl' in error
  summary = capsys.readouterr().out
  on_disk = json.loads((tmp_path / 'out' / metadata.REPORT_FILE).read_text())
  assert [(e['class'], e['written'], e['train'], e['rejected'])
          for e in on_disk['empty_classes']] == [
              ('b', 0, 0, 1), ('c', 0, 0, 0), ('d', 1, 0, 1)]
  assert on_disk['class_gap_error'] == error
  assert not (tmp_path / 'out' / metadata.METADATA_FILE).exists()  # No dataset.
  assert (tmp_path / 'out' / metadata.REJECTED_FILE).exists()
  for split in on_disk['splits'].values():  # The totals still reconcile.
    assert sum(split['per_class'].values()) == split['total']
  assert ("warning: class 'b': no image written: its only file was rejected "
          '(reasons in rejected.jsonl)') in summary
  assert "warning: class 'c': no image written: its folders hold no file" in (
      summary)
  assert ("warning: class 'd': no image in train (1 in validation/test): a "
          'model cannot learn it; add images to train/d/') in summary


def test_a_class_missing_only_from_validation_needs_the_flag(tmp_path):
  images = tmp_path / 'images'
  helpers.photo_folder(images, layout='splits',
                       classes={'a': 'chelsea', 'b': 'rocket'},
                       per_class={'train': 1, 'validation': 1},
                       formats=('png',), size=24)
  for path in (images / 'validation' / 'b').iterdir():
    path.write_bytes(b'not an image')
  with pytest.raises(UserError, match='--allow_missing_eval_classes'):
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  image_size='8', quiet=True, samples=False)
  report = builder.build(input_dir=str(images),
                         output_dir=str(tmp_path / 'out2'), image_size='8',
                         quiet=True, samples=False,
                         allow_missing_eval_classes=True)
  assert report['classes_without_examples'] == {'validation': ['b']}


def _report(num_classes: int) -> dict:
  names = [f'class_{i:04d}' for i in range(num_classes)]
  per_class = {n: 5 + i % 7 for i, n in enumerate(names)}
  per_class[names[17]] = 1
  per_class[names[42 % num_classes]] = 99
  total = sum(per_class.values())
  empty = [{'class': n, 'warning': 'no image in train'} for n in names[:9]]
  return {
      'class_names': names, 'output_dir': '/data/ds',
      'splits': {'train': {'total': total, 'num_shards': 2, 'num_bytes': 9,
                           'per_class': per_class},
                 'test': {'total': 0, 'num_shards': 0, 'num_bytes': 0,
                          'per_class': dict.fromkeys(names, 0)}},
      'counts': {'seen': total, 'written': total}, 'images_per_s': 1.0,
      'elapsed_s': 1.0, 'bytes_written': 9, 'empty_classes': empty}


def test_the_summary_stays_short_with_many_classes():
  lines = builder.format_summary(_report(2000)).splitlines()
  assert len(lines) < 25, '\n'.join(lines)
  text = '\n'.join(lines)
  rows = [l.split() for l in lines[1:8]]
  assert rows[0] == ['train', 'class_0017', '1']  # The smallest first,
  assert rows[6] == ['train', 'class_0042', '99']  # the largest last.
  assert rows[3][:3] == ['train', '(1994', 'more)']
  assert 'every class: /data/ds/build_report.json' in lines[4]
  assert 'warning: 3 more classes with no image in train' in text
  few = builder.format_summary(_report(builder.SUMMARY_MAX_CLASSES))
  assert all(f'class_{i:04d}' in few
             for i in range(builder.SUMMARY_MAX_CLASSES))


def test_an_unreachable_job_service_or_worker_pool_is_one_line(tmp_path):
  """Beam's portable runner waits minutes for them, then prints a gRPC
  traceback; the build refuses them before anything else."""
  nobody = helpers.free_port()
  listener = socket.socket()  # Answers like a job service, as far as TCP goes.
  listener.bind(('localhost', 0))
  listener.listen()
  job = f'localhost:{listener.getsockname()[1]}'
  with listener:
    for flags, needle in (
        ([f'--job_endpoint=localhost:{nobody}'], '--job_endpoint='),
        ([f'--job_endpoint={job}', '--environment_type=EXTERNAL',
          f'--environment_config=localhost:{nobody}'],
         '--environment_config=')):
      result = helpers.run_cli(
          'pipelines.build', f'--input_dir={tmp_path}',
          '--runner=PortableRunner', f'--output_dir={tmp_path / "out"}',
          *flags, timeout=120)
      assert result.returncode == 1, result.stderr[-2000:]
      (error,) = helpers.error_lines(result.stderr)
      assert needle in error and 'nothing answers there' in error, error
      assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'out').exists()


def _in_a_thread(error: BaseException) -> None:
  """Raises error in a thread, as Beam's runner threads do."""
  def run():
    raise error
  thread = threading.Thread(target=run, name='run_worker')
  thread.start()
  thread.join()


@pytest.mark.parametrize('status, how', [
    (137, 'killed by SIGKILL, which the kernel sends when memory runs out'),
    (-9, 'killed by SIGKILL, which the kernel sends when memory runs out'),
    (-11, 'killed by SIGSEGV'), (1, 'exit status 1'),
    (None, 'its connection broke')])
def test_a_worker_process_that_ends_is_one_line(tmp_path, capfd, caplog,
                                                monkeypatch, status, how):
  """failures.one_line_failures: when a worker process ends mid-build
  (killed, out of memory) the runner's threads raise and log one traceback
  each (~350 lines) and the pipeline raises 'Channel closed prematurely';
  the build says one line. Another thread's error still prints, and a
  failure of another kind keeps its traceback. (By hand: kill -9 of a
  beam_worker process during a 30,000-image build gave this line and
  nothing else; BUILD_NOTES, "Trust".)"""
  import logging  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import failures  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import output_folder  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'out')
  progress = output_folder.Progress(str(tmp_path), out,
                                    output_folder.temp_dir_for(out))
  printed = []  # What the thread hook before the build's would print.
  hook = lambda args: printed.append(args.exc_value)  # pylint: disable=unnecessary-lambda-assignment
  monkeypatch.setattr(threading, 'excepthook', hook)
  with pytest.raises(failures.BuildFailed) as raised:
    with failures.one_line_failures(progress):
      with failures.quiet_disk_failure_logs([]):
        if status is not None:
          _in_a_thread(RuntimeError(
              f'Worker subprocess exited with return code {status}'))
        _in_a_thread(RuntimeError('Channel closed prematurely.'))
        try:
          raise RuntimeError('Channel closed prematurely.')
        except RuntimeError:
          logging.getLogger('apache_beam.runners.worker.data_plane').exception(
              'Failed to read inputs in the data plane.')
        raise RuntimeError('Channel closed prematurely.')
  assert str(raised.value) == (
      f'a worker process of the build ended before the build did ({how}); '
      'if memory ran out, rerun with fewer worker processes '
      f'(--direct_num_workers) or with more memory, else rerun; '
      f'nothing was changed in --output_dir={out} (it was not created); no '
      'temporary folder is left')
  assert capfd.readouterr().err == '' and not printed
  assert 'data plane' not in caplog.text  # Beam's log of it held back.
  # Anything else is left alone, even when the runner's threads then lose
  # their channels.
  with pytest.raises(ValueError, match='a bug'):
    with failures.one_line_failures(progress):
      _in_a_thread(ValueError('a thread bug'))
      _in_a_thread(RuntimeError('Channel closed prematurely.'))
      raise ValueError('a bug')
  assert [str(e) for e in printed] == ['a thread bug']
  assert threading.excepthook is hook  # Given back.
