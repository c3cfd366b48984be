"""The build scales out: its graph does not grow with the files, duplicates
are resolved per content hash and shards cut from per-chunk totals without
losing or repeating a record, and it runs on Beam's portable runner (job
service + external worker pool) with shards byte-identical to the default
runner's."""

import collections
import concurrent.futures
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import reuse
from pipelines.folder_to_records import builder
from tests import helpers
import tfrecords_schema
from tfrecords_schema import schema


def _empty_files(root: pathlib.Path, num_files: int, num_classes: int = 10):
  for i in range(num_files):
    path = root / f'class_{i % num_classes:02d}' / f'{i:06d}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _graph_bytes(input_dir: pathlib.Path, tmp_path: pathlib.Path) -> int:
  return builder.graph_bytes(str(input_dir), str(tmp_path))


def test_graph_size_does_not_grow_with_the_number_of_files(tmp_path):
  _empty_files(tmp_path / 'small', 1_000)
  _empty_files(tmp_path / 'large', 10_000)
  small = _graph_bytes(tmp_path / 'small', tmp_path)
  large = _graph_bytes(tmp_path / 'large', tmp_path)
  # Pickled closures vary by a few bytes from run to run; 9,000 more file
  # paths in the graph would add ~600 KB (the old launcher-side listing).
  assert abs(large - small) < 0.01 * small, (small, large)
  _empty_files(tmp_path / 'more_classes', 1_000, num_classes=100)
  more = _graph_bytes(tmp_path / 'more_classes', tmp_path)
  assert more > small  # It grows with class folders, as it should.


@contextlib.contextmanager
def _service(*args: str):
  """A Beam service process (own session, killed with its children)."""
  env = dict(os.environ)
  # The worker pool starts workers with the `python` on its PATH.
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env['PATH']
  process = subprocess.Popen([sys.executable, '-m', *args],
                             cwd=helpers.REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             start_new_session=True)
  try:
    yield process
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _shards(out: pathlib.Path) -> dict:
  return {p.name: p.read_bytes() for p in sorted(out.glob('*.tfrecord-*'))}


def test_portable_runner_with_an_external_worker_pool_writes_the_same_shards(
    tmp_path):
  images = tmp_path / 'images'
  helpers.make_photo_folder(images, per_class=30)
  common = (f'--input_dir={images}', '--image_size=24',
            '--shard_size_mb=0.02')
  default = helpers.run_cli('pipelines.build', *common,
                            f'--output_dir={tmp_path / "default"}')
  assert default.returncode == 0, default.stderr[-3000:]
  job_port, pool_port = helpers.free_port(), helpers.free_port()
  with _service('apache_beam.runners.portability.local_job_service_main',
                f'--port={job_port}') as jobs, _service(
                    'apache_beam.runners.worker.worker_pool_main',
                    f'--service_port={pool_port}') as pool:
    helpers.wait_for_port(job_port, jobs)
    helpers.wait_for_port(pool_port, pool)
    runner = ('--runner=PortableRunner', f'--job_endpoint=localhost:{job_port}',
              '--environment_type=EXTERNAL',
              f'--environment_config=localhost:{pool_port}')
    portable = helpers.run_cli(
        'pipelines.build', *common, f'--output_dir={tmp_path / "portable"}',
        *runner, timeout=600)
    assert portable.returncode == 0, portable.stderr[-3000:]
    assert 'Traceback' not in portable.stderr
    expected = _shards(tmp_path / 'default')
    assert len(expected) > 3  # Several shards per split.
    assert _shards(tmp_path / 'portable') == expected
    # Every file, the reports included, timings aside.
    assert reuse.differences(str(tmp_path / 'portable'),
                             str(tmp_path / 'default')) == []
    # An update on this runner: the full build's bytes (here from two
    # local worker processes).
    helpers.photo_folder(images, classes={'cat': 'astronaut'}, per_class=4,
                         name='new_{i}')
    (images / 'coffee' / sorted(os.listdir(images / 'coffee'))[0]).unlink()
    update = helpers.run_cli(
        'pipelines.build', *common, f'--output_dir={tmp_path / "portable"}',
        '--update', *runner, timeout=600)
    assert update.returncode == 0, update.stderr[-3000:]
  assert 'incremental: 89 records taken' in update.stdout, update.stdout
  full = helpers.run_cli('pipelines.build', *common,
                         f'--output_dir={tmp_path / "full"}',
                         '--direct_num_workers=2',
                         '--direct_running_mode=multi_processing')
  assert full.returncode == 0, full.stderr[-3000:]
  assert reuse.differences(str(tmp_path / 'portable'),
                           str(tmp_path / 'full')) == []


def _stored(out: pathlib.Path, split: str) -> list[tuple[str, int, np.ndarray]]:
  """(filename, label, pixels) of every record of a split, in shard order."""
  spec = tfrecords_schema.read_dataset_spec(str(out))
  records = []
  for serialized in tf.data.TFRecordDataset(spec.shard_paths(str(out), split)):
    parsed = schema.parse_examples(serialized)
    pixels = np.asarray(Image.open(io.BytesIO(parsed[schema.IMAGE].numpy())))
    records.append((parsed[schema.FILENAME].numpy().decode(),
                    int(parsed[schema.LABEL].numpy()), pixels))
  return records


def test_copies_across_many_chunks_and_shards_are_resolved_exactly(tmp_path):
  """Several chunks (of 64 files) and dozens of shards, with duplicates and
  label conflicts whose copies land in other chunks and shards: every file
  is written once or reported, counts and train statistics are exact."""
  images = tmp_path / 'images'
  rng = np.random.default_rng(0)
  classes = ('a', 'b', 'c')
  for i in range(240):
    pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    helpers.save(images / classes[i % 3] / f'{i:03d}.png',
                 Image.fromarray(pixels))
  for name in ('a/line\u2028sep\x85.png', 'b/new\nline.png'):  # Odd names.
    helpers.save(images / name, Image.fromarray(
        rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)))
  for i in range(0, 90, 3):  # 30 exact duplicates in the same class.
    source = images / classes[i % 3] / f'{i:03d}.png'
    shutil.copy(source, source.with_name(f'copy_{i:03d}.png'))
  for i in range(1, 40, 3):  # 13 label conflicts: 26 files dropped.
    shutil.copy(images / classes[i % 3] / f'{i:03d}.png',
                images / classes[(i + 1) % 3] / f'conflict_{i:03d}.png')
  out = tmp_path / 'out'
  run = helpers.run_cli('pipelines.build', f'--input_dir={images}',
                        f'--output_dir={out}', '--image_size=12',
                        '--image_format=png', '--shard_size_mb=0.004')
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((out / 'build_report.json').read_text())
  assert report['counts'] == {'seen': 285, 'written': 229, 'duplicate': 30,
                              'label_conflict': 26}
  assert report['classes_without_examples'] == {}  # Every class, each split.
  spec = tfrecords_schema.read_dataset_spec(str(out))
  assert sum(len(s.shards) for s in spec.splits.values()) > 20
  rejected = {json.loads(l)['path']
              for l in (out / 'rejected.jsonl').read_text().splitlines()}
  written = []
  for split in ('train', 'validation', 'test'):
    records = _stored(out, split)
    written += [name for name, _, _ in records]
    counts = np.bincount([label for _, label, _ in records], minlength=3)
    assert tuple(counts) == spec.splits[split].class_counts
    assert [sum(1 for _ in tf.data.TFRecordDataset(str(out / name)))
            for name in spec.splits[split].shards] == list(
                spec.splits[split].shard_lengths)
    if split == 'train':
      pixels = np.concatenate([p.reshape(-1, 3) for _, _, p in records])
      assert report['train_mean'] == [
          round(float(m), 4) for m in pixels.astype(np.float64).mean(0)]
      np.testing.assert_allclose(report['train_std'],
                                 pixels.astype(np.float64).std(0), atol=1e-4)
  everything = {p.relative_to(images).as_posix()
                for p in images.rglob('*.png')}
  assert len(written) == len(set(written)) == 229  # Each record once.
  assert not set(written) & rejected
  assert set(written) | rejected == everything


def _chunk(tmp_dir: str, index: int, payloads: list[bytes]) -> list[int]:
  """A train chunk file of framed records and its index; their paths."""
  offsets, data, entries = [], b'', []
  for i, payload in enumerate(payloads):
    record = schema.frame_record(payload)
    offsets.append(len(data))
    entries.append(beam_build.IndexEntry(
        len(data), len(record), i % 2, [i, 0, 0], [i * i, 0, 0], 1,
        'small' if i == 2 else None, f'c{index}/{i}.png'))
    data += record
  path = beam_build.chunk_path(tmp_dir, index, 'train', '0123456789abcdef')
  pathlib.Path(path).write_bytes(data)
  pathlib.Path(beam_build.meta_path(tmp_dir, index)).write_bytes(
      beam_build.meta_file({'train': entries}, [],
                           files={'train': os.path.basename(path)}))
  return [e.relpath for e in entries]


def test_concat_shard_copies_only_its_kept_records(tmp_path):
  (tmp_path / beam_build.CHUNKS_DIR).mkdir()
  first = _chunk(str(tmp_path), 0, [b'a' * 10, b'b' * 10, b'c' * 10])
  second = _chunk(str(tmp_path), 1, [b'd' * 10, b'e' * 10])
  size = 26 * 2  # A framed 10-byte record is 26 bytes: two per shard.
  layout = beam_build.shard_layout([('train', 0, 78), ('train', 1, 52)],
                                   shard_size_bytes=size)
  assert layout['num_shards'] == {'train': 3}
  config = beam_build.BuildConfig('in', 'ds', ('x', 'y'), 'class_folders',
                                  None, 0.1, 0.1, 0, size)
  concat = beam_build.ConcatShard(str(tmp_path), config)

  def shard(index, dropped):
    results = list(concat.process((('train', index), [None, *dropped]),
                                  layout))
    files = [r for r in results if isinstance(r, beam_build.ShardResult)]
    sums = [r.value for r in results if getattr(r, 'tag', None) == 'sums']
    return files, sums

  # Shard 1 spans both chunks (c, then d); d is a dropped copy.
  files, sums = shard(1, [(1, second[0])])
  assert [(f.filename, f.num_examples, f.class_counts) for f in files] == [
      ('ds-train.tfrecord-00001-of-00003', 1, (1, 0))]
  assert list(tf.data.TFRecordDataset(str(tmp_path / files[0].filename)
                                      ).as_numpy_iterator()) == [b'c' * 10]
  assert sums == [((2, 0, 0), (4, 0, 0), 1)]
  # The last shard runs to the end; every record of shard 0 dropped: no file.
  files, _ = shard(2, [])
  assert files[0].num_examples == 1
  files, sums = shard(0, [(0, first[0]), (0, first[1])])
  assert files == [] and sums == []
  assert not (tmp_path / 'ds-train.tfrecord-00000-of-00003').exists()


def test_concat_shard_takes_whole_chunks_from_their_summary(tmp_path):
  """One shard holds both chunk files: their summary lines give the counts,
  sums and warnings; a chunk with a dropped copy is read record by record."""
  (tmp_path / beam_build.CHUNKS_DIR).mkdir()
  _chunk(str(tmp_path), 0, [b'a' * 10, b'b' * 10, b'c' * 10])
  second = _chunk(str(tmp_path), 1, [b'd' * 10, b'e' * 10])
  layout = beam_build.shard_layout([('train', 0, 78), ('train', 1, 52)],
                                   shard_size_bytes=1000)
  config = beam_build.BuildConfig('in', 'ds', ('x', 'y'), 'class_folders',
                                  None, 0.1, 0.1, 0, 1000)
  concat = beam_build.ConcatShard(str(tmp_path), config)
  summary, _ = beam_build.read_index(str(tmp_path), 0, 'train')
  assert summary['counts'] == [[0, 2], [1, 1]]  # [label, count], sparse.
  everything = ([b'a', b'b', b'c', b'd', b'e'], (3, 2),
                ((4, 0, 0), (6, 0, 0), 5))
  for dropped, records, counts, sums in [
      ([], *everything),
      # A drop that matches no record sends both chunks down the record by
      # record path: it must give exactly what the summaries gave.
      ([(0, 'c0/nope.png'), (1, 'c1/nope.png')], *everything),
      ([(1, second[1])], [b'a', b'b', b'c', b'd'], (3, 1),
       ((3, 0, 0), (5, 0, 0), 4))]:
    results = list(concat.process((('train', 0), [None, *dropped]), layout))
    tags = collections.defaultdict(list)
    for r in results:
      tags[getattr(r, 'tag', 'main')].append(getattr(r, 'value', r))
    [shard] = tags['main']
    assert (shard.num_examples, shard.class_counts) == (len(records), counts)
    assert tags['sums'] == [sums]
    assert tags['warnings'] == [{'path': 'c0/2.png', 'warning': 'small'}]
    assert list(tf.data.TFRecordDataset(str(tmp_path / shard.filename))
                .as_numpy_iterator()) == [r * 10 for r in records]


def test_copy_ranges_joins_byte_ranges_and_refuses_a_short_file(tmp_path):
  a = tmp_path / 'a'
  b = tmp_path / 'b'
  a.write_bytes(bytes(range(256)) * 300)  # 76,800 bytes.
  b.write_bytes(b'xyz' * 10)
  pieces = [(str(a), 5, 70_000), (str(b), 3, 6), (str(a), 0, 2)]
  out = tmp_path / 'out'
  assert beam_build.copy_ranges(pieces, str(out)) == 70_008
  data = a.read_bytes()
  assert out.read_bytes() == data[5:70_005] + b'xyzxyz' + data[:2]
  with pytest.raises(IOError, match=f'{b} ended before byte 31'):
    beam_build.copy_ranges([(str(b), 1, 30)], str(tmp_path / 'short'))


def test_pinned_files_are_copied_only_while_they_are_what_was_checked(
    tmp_path):
  """A pinned file (its identity when an earlier step checked it) is
  copied while it is that file; rewritten (same bytes, another inode) or
  changed in place, the copy stops with ESTALE, and two steps that saw two
  files at one path cannot both be pinned."""
  import errno  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  a = tmp_path / 'a'
  a.write_bytes(b'0123456789')
  with open(a, 'rb') as f:
    seen = file_io.identity(f)
  pinned = {}
  file_io.pin(pinned, str(a), seen)
  out = tmp_path / 'out'
  assert file_io.copy_ranges([(str(a), 2, 3)], str(out), pinned) == 3
  assert out.read_bytes() == b'234'
  data = a.read_bytes()
  a.unlink()
  a.write_bytes(data)  # Another file with the same bytes, written later.
  os.utime(a, ns=(seen[1] + 10**9, seen[1] + 10**9))  # (coarse clocks)
  with open(a, 'rb') as f:
    again = file_io.identity(f)
  assert again != seen
  with pytest.raises(OSError) as failed:
    file_io.copy_ranges([(str(a), 2, 3)], str(out), {str(a): seen})
  assert failed.value.errno == errno.ESTALE
  with pytest.raises(OSError) as failed:
    file_io.pin(pinned, str(a), again)
  assert failed.value.errno == errno.ESTALE
  os.utime(a, ns=(1, 1))  # Changed in place (its time).
  with pytest.raises(OSError):
    file_io.copy_ranges([(str(a), 2, 3)], str(out), {str(a): again})
  a.unlink()  # Gone: the same one line, not a traceback.
  with pytest.raises(OSError) as failed:
    file_io.copy_ranges([(str(a), 2, 3)], str(out), {str(a): again})
  assert failed.value.errno == errno.ESTALE
  assert file_io.identity(io.BytesIO(b'')) is None  # No descriptor.


def test_read_ahead_keeps_order_bounds_depth_and_reports_each_failure():
  started, release = [], threading.Event()

  def read(i):
    started.append(i)
    if i == 0:
      release.wait(10)  # The first read is slow: the others must not run away.
    if i == 3:
      raise OSError('unreadable 3')
    return i * 10

  with concurrent.futures.ThreadPoolExecutor(4) as executor:
    reads = beam_build.read_ahead(executor, read, range(8), depth=2)
    first = next(reads)
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)  # Time for a read beyond the depth to start, if any did.
    assert sorted(started) == [0, 1, 2]  # The waited-on one + 2 ahead.
    release.set()
    results = [first.result()]
    for future in reads:
      try:
        results.append(future.result())
      except OSError as e:
        results.append(str(e))
  assert results == [0, 10, 20, 'unreadable 3', 40, 50, 60, 70]


def test_local_prefetch_runs_ahead_in_order_and_reports_each_failure():
  events = []

  def read(i):
    events.append(('read', i))
    if i == 3:
      raise OSError('unreadable 3')
    return i * 10

  results = []
  for later in beam_build.prefetched(read, lambda i: events.append(
      ('prefetch', i)), range(6), depth=2):
    try:
      results.append(later.result())
    except OSError as e:
      results.append(str(e))
  assert results == [0, 10, 20, 'unreadable 3', 40, 50]
  # Each file is prefetched exactly once, two files before it is read.
  assert [i for kind, i in events if kind == 'prefetch'] == list(range(6))
  for i in range(6):
    assert events.index(('prefetch', min(i + 2, 5))) < events.index(('read', i))


def test_prefetch_local_leaves_special_huge_and_missing_files_alone(
    tmp_path, monkeypatch):
  advised = []
  real_fadvise = os.posix_fadvise

  def fadvise(fd, offset, length, advice):
    advised.append((os.readlink(f'/proc/self/fd/{fd}'), offset, length))
    return real_fadvise(fd, offset, length, advice)

  monkeypatch.setattr(os, 'posix_fadvise', fadvise)
  image = tmp_path / 'a.jpg'
  image.write_bytes(b'\xff\xd8\xff' + bytes(1000))
  huge = tmp_path / 'huge.jpg'
  with open(huge, 'wb') as f:
    f.truncate(1 << 40)  # A sparse 1 TiB file: read_source refuses its size.
  fifo = tmp_path / 'pipe.jpg'
  os.mkfifo(fifo)
  done = threading.Event()

  def run():
    for path in (image, huge, fifo, tmp_path / 'missing.jpg', '/dev/zero'):
      beam_build.prefetch_local(str(path), max_bytes=1 << 20)  # No blocking.
    done.set()

  threading.Thread(target=run, daemon=True).start()
  assert done.wait(10), 'prefetch_local blocked'
  assert advised == [(str(image), 0, 1003)]  # Only the regular small file.


_WORKER = '''
import atexit, pathlib, sys, types
if sys.argv[2] != 'launcher':  # As Beam starts its worker processes.
  sys.modules['__main__'].__spec__ = types.SimpleNamespace(
      name='apache_beam.runners.worker.sdk_worker_main')
from pipelines.folder_to_records import runner_options
# A teardown step registered before: skipped by the quick exit.
atexit.register(pathlib.Path(sys.argv[1]).write_text, 'torn down')
runner_options.quick_worker_exit()
runner_options.quick_worker_exit()  # Once a process, however many setups.
sys.stdout.write('written before the exit')  # No line end.
if sys.argv[2] == 'fails':
  raise RuntimeError('the harness failed')
'''


@pytest.mark.parametrize('kind', ['worker', 'fails', 'launcher'])
def test_a_worker_process_ends_once_its_harness_returns(tmp_path, kind):
  """runner_options.quick_worker_exit: a Beam worker process skips the
  interpreter's teardown (its output flushed, exit status 0); a failed one
  and any other process (the launcher, an in-process runner) exit as
  Python does."""
  marker = tmp_path / 'teardown'
  (tmp_path / 'worker_main.py').write_text(_WORKER)
  # Run with -m, as Beam runs a worker.
  done = subprocess.run(
      [sys.executable, '-m', 'worker_main', str(marker), kind],
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=60,
      check=False, env={**os.environ, 'PYTHONPATH': os.pathsep.join(
          [str(tmp_path), str(helpers.REPO_ROOT)])})
  assert done.stdout == 'written before the exit'
  if kind == 'worker':
    assert (done.returncode, done.stderr) == (0, '')
    assert not marker.exists()
  else:
    assert done.returncode == (1 if kind == 'fails' else 0), done.stderr
    assert ('RuntimeError: the harness failed' in done.stderr) == (
        kind == 'fails')
    assert marker.read_text() == 'torn down'


_LAUNCHER = '''
import atexit, pathlib, sys, threading, time
from pipelines.common import cli
marker = pathlib.Path(sys.argv[1])


class Torn:
  # Runs only when the interpreter tears itself down (its builtins may be
  # gone by then: bound here).
  def __del__(self, path=str(marker.with_suffix('.torn')), open_=open):
    with open_(path, 'w') as f:
      f.write('torn down')


kept = Torn()


def main(argv):
  atexit.register(marker.write_text, 'atexit ran')
  sys.stdout.write('written before the exit')  # No line end.
  kind = argv[2]
  if kind == 'status':
    sys.exit(3)
  if kind == 'message':
    sys.exit('error: a message')
  if kind == 'thread':  # A non-daemon thread still running: Python's exit.
    threading.Thread(target=time.sleep, args=(0.5,)).start()
  if kind == 'fails':
    raise RuntimeError('the build failed')


cli.run_and_exit(main, known_only=True, module=__spec__.name)
'''


@pytest.mark.parametrize('kind,status', [
    ('done', 0), ('status', 3), ('message', 1), ('thread', 0), ('fails', 1),
    ('runpy', 0)])
def test_the_launcher_ends_once_its_work_is_done(tmp_path, kind, status):
  """cli.run_and_exit (pipelines.build's entry): after main, the atexit
  handlers run, output is flushed and the status is main's, with no
  interpreter teardown; with a thread still running, after an uncaught
  exception, or where the module is run by another program (runpy, as
  tests run the build), the process ends as Python ends it."""
  marker = tmp_path / 'marker'
  (tmp_path / 'launcher_main.py').write_text(_LAUNCHER)
  command = ['-m', 'launcher_main', str(marker), kind]
  if kind == 'runpy':
    command = ['-c', 'import runpy, sys; sys.argv[1:] = sys.argv[1:3]; '
               'runpy.run_module("launcher_main", run_name="__main__", '
               'alter_sys=True)', str(marker), kind]
  done = subprocess.run(
      [sys.executable, *command],
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=60,
      check=False, env={**os.environ, 'PYTHONPATH': os.pathsep.join(
          [str(tmp_path), str(helpers.REPO_ROOT)])})
  assert done.returncode == status, done.stderr
  assert done.stdout == 'written before the exit'
  assert marker.read_text() == 'atexit ran'
  assert ('error: a message' in done.stderr) == (kind == 'message')
  assert ('RuntimeError: the build failed' in done.stderr) == (
      kind == 'fails')
  torn = marker.with_suffix('.torn').exists()
  assert torn == (kind in ('thread', 'fails', 'runpy')), done.stderr


def _worker_facts(element: int, out: str) -> int:
  """Runs in a Beam worker: writes what that process imported and runs."""
  pathlib.Path(out, f'{os.getpid()}.json').write_text(json.dumps({
      'worker': 'pipelines.folder_to_records.beam_worker' in sys.modules,
      'pandas': 'pandas' in sys.modules and sys.modules['pandas'] is not None,
      'mark': os.environ.get('BUILD_TEST_MARK'),
  }))
  return element


def _run_two_workers(out: pathlib.Path) -> dict[int, dict]:
  """A small pipeline on the build's local runner with 2 worker processes:
  {worker pid: _worker_facts}."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import runner_options  # pylint: disable=g-import-not-at-top
  options = PipelineOptions(runner_options.pipeline_args(_TWO_WORKERS))
  out.mkdir(exist_ok=True)
  with beam.Pipeline(runner=runner_options.local_runner(options),
                     options=options) as pipeline:
    _ = (pipeline | beam.Create(list(range(40)))
         | beam.Reshuffle() | beam.Map(_worker_facts, out=str(out)))
  return {int(p.stem): json.loads(p.read_text()) for p in out.glob('*.json')}


_TWO_WORKERS = ['--direct_num_workers=2', '--direct_running_mode=multi_processing']


def test_the_runner_takes_the_workers_started_ahead(tmp_path, monkeypatch):
  """warm_workers: the worker processes a build starts when it begins are
  the runner's workers, run with the environment of when the runner asked
  for them; one that ended before is started as before; those not taken
  are stopped when the build ends."""
  from pipelines.folder_to_records import warm_workers  # pylint: disable=g-import-not-at-top
  with warm_workers.started(_TWO_WORKERS):
    ended, started = warm_workers._ready  # pylint: disable=protected-access
    ended.kill()  # Before the runner asks: one is started as before.
    ended.wait()
    monkeypatch.setenv('BUILD_TEST_MARK', 'set after they started')
    facts = _run_two_workers(tmp_path / 'warm')
  assert len(facts) == 2 and started.pid in facts and ended.pid not in facts
  assert all(f == {'worker': True, 'pandas': False,
                   'mark': 'set after they started'}
             for f in facts.values()), facts
  # Not taken: stopped.
  with warm_workers.started(_TWO_WORKERS):
    left = list(warm_workers._ready)  # pylint: disable=protected-access
  assert all(p.returncode is not None for p in left)
  assert not warm_workers._ready  # pylint: disable=protected-access
  for other in ([], ['--direct_running_mode=in_memory'],
                ['--runner=DirectRunner', *_TWO_WORKERS],
                ['--runner=PortableRunner', *_TWO_WORKERS]):
    assert warm_workers.wanted(other) == 0, other
  assert warm_workers.wanted(['--direct_running_mode=multi_processing']) == 1


def test_a_worker_started_ahead_ends_quietly_when_not_needed():
  """A warm worker whose stdin ends without an environment (a build that
  did not take it, a launcher that died) exits 0 and says nothing."""
  from pipelines.folder_to_records import runner_options  # pylint: disable=g-import-not-at-top
  done = subprocess.run(runner_options.worker_argv('warm'), input=b'',
                        capture_output=True, timeout=120, check=False)
  assert (done.returncode, done.stdout, done.stderr) == (0, b'', b'')


def test_the_local_runners_workers_are_the_builds(tmp_path):
  """runner_options.local_runner: with --direct_running_mode=
  multi_processing the FnApiRunner's worker processes run beam_worker (no
  pandas); other runners are Beam's own."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import runner_options  # pylint: disable=g-import-not-at-top
  facts = _run_two_workers(tmp_path)  # None started ahead: all cold.
  assert len(facts) == 2 and all(
      f == {'worker': True, 'pandas': False, 'mark': None}
      for f in facts.values()), facts
  assert os.getpid() not in facts
  for other in (['--runner=PortableRunner'], ['--runner=DirectRunner']):
    assert runner_options.local_runner(PipelineOptions(
        runner_options.pipeline_args(other))) is None


def test_a_failing_build_worker_exits_with_its_error():
  """beam_worker without a runner to talk to: Beam's harness raises, and the
  process ends with status 1 and the traceback, as Beam's own worker."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('CONTROL_API_SERVICE_DESCRIPTOR', 'PIPELINE_OPTIONS')}
  done = subprocess.run(
      [sys.executable, '-m', 'pipelines.folder_to_records.beam_worker'],
      cwd=helpers.REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=120, check=False)
  assert done.returncode == 1, done.stderr[-2000:]
  assert 'Traceback' in done.stderr


def test_workers_find_the_package_where_the_launcher_found_it(tmp_path):
  """A launcher that imports the toolkit through its own sys.path (a
  script or notebook beside a checkout that is not installed) starts
  workers that import it too (runner_options.worker_command): a worker
  that cannot would end before it connects, and the runner would wait
  for it forever."""
  no_install = tmp_path / 'no_install'
  no_install.mkdir()
  # Hides the editable install from every process (the workers too).
  (no_install / 'sitecustomize.py').write_text(
      'import sys\n'
      "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in "
      "getattr(f, '__name__', type(f).__name__)]\n"
      "sys.path_hooks[:] = [h for h in sys.path_hooks "
      "if 'Editable' not in repr(h)]\n")
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=4)
  script = tmp_path / 'script.py'
  script.write_text(
      'import sys\n'
      f'sys.path.insert(0, {str(helpers.REPO_ROOT)!r})\n'
      'from pipelines.folder_to_records import builder\n'
      f'builder.build(input_dir={str(images)!r}, '
      f'output_dir={str(tmp_path / "out")!r}, image_size="24", quiet=True, '
      "beam_args=['--direct_num_workers=2', "
      "'--direct_running_mode=multi_processing'])\n"
      "print('built')\n")
  check = subprocess.run(
      [sys.executable, '-c', 'import pipelines'], cwd=tmp_path,
      env={**os.environ, 'PYTHONPATH': str(no_install)}, capture_output=True,
      text=True, timeout=60, check=False)
  assert check.returncode == 1 and 'ModuleNotFoundError' in check.stderr
  done = subprocess.run(
      [sys.executable, str(script)], cwd=tmp_path,
      env={**os.environ, 'PYTHONPATH': str(no_install)}, capture_output=True,
      text=True, timeout=240, check=False)
  assert done.returncode == 0 and done.stdout.strip() == 'built', (
      done.stderr[-3000:])
  assert (tmp_path / 'out' / 'metadata.json').exists()
