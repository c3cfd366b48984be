"""The build scales out: its graph does not grow with the files, and it runs
on Beam's portable runner (job service + external worker pool) with shards
byte-identical to the default runner's."""

import contextlib
import os
import pathlib
import signal
import subprocess
import sys

from pipelines.folder_to_records import builder
from tests import helpers


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
    portable = helpers.run_cli(
        'pipelines.build', *common, f'--output_dir={tmp_path / "portable"}',
        '--runner=PortableRunner', f'--job_endpoint=localhost:{job_port}',
        '--environment_type=EXTERNAL',
        f'--environment_config=localhost:{pool_port}', timeout=600)
  assert portable.returncode == 0, portable.stderr[-3000:]
  assert 'Traceback' not in portable.stderr
  expected = _shards(tmp_path / 'default')
  assert len(expected) > 3  # Several shards per split.
  assert _shards(tmp_path / 'portable') == expected
  for name in ('metadata.json', 'rejected.jsonl'):
    assert ((tmp_path / 'portable' / name).read_bytes() ==
            (tmp_path / 'default' / name).read_bytes()), name
