"""tf.data service: a dispatcher and 2 worker processes on 127.0.0.1 feed a
training pipeline; every training example arrives exactly once per pass,
and the trainer trains through them."""

import collections
import contextlib
import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipelines.folder_to_records import builder
from pipelines.records_to_batches import input_pipeline
from tests import helpers


@contextlib.contextmanager
def _server(*args: str):
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.data_service', *args],
      cwd=helpers.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  try:
    yield process
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


@pytest.fixture(scope='module')
def service(tmp_path_factory):
  """(dispatcher address, dataset folder): a dispatcher and 2 workers."""
  root = tmp_path_factory.mktemp('service')
  helpers.make_photo_folder(root / 'images', per_class=12)
  builder.build(input_dir=str(root / 'images'), output_dir=str(root / 'data'),
                image_size='24', validation_fraction=0.25, seed=1,
                shard_size_mb=0.004, quiet=True, samples=False)
  ports = [helpers.free_port() for _ in range(3)]
  with _server('dispatcher', f'--port={ports[0]}') as dispatcher:
    helpers.wait_for_port(ports[0], dispatcher)
    workers = [contextlib.ExitStack() for _ in range(2)]
    processes = [w.enter_context(_server(
        'worker', f'--port={port}',
        f'--dispatcher_address=localhost:{ports[0]}',
        '--worker_host=localhost')) for w, port in zip(workers, ports[1:])]
    for port, process in zip(ports[1:], processes):
      helpers.wait_for_port(port, process)
    try:
      yield f'grpc://localhost:{ports[0]}', root / 'data'
    finally:
      for w in workers:
        w.close()


def _image_hashes(ds) -> collections.Counter:
  hashes = collections.Counter()
  for images, _ in ds:
    for image in images.numpy():
      hashes[hashlib.sha256(np.round(image * 255).astype(np.uint8)
                            .tobytes()).hexdigest()] += 1
  return hashes


def test_every_training_example_arrives_exactly_once(service):
  address, data = service
  local = _image_hashes(input_pipeline.make_dataset(
      str(data), 'train', batch_size=4, training=False))
  assert sum(local.values()) > 12 and len(local) == sum(local.values())
  served = _image_hashes(input_pipeline.make_dataset(
      str(data), 'train', batch_size=4, training=True, drop_remainder=False,
      data_service=address))
  assert served == local


def test_a_port_in_use_is_one_error_line(service):
  address, _ = service
  port = address.rsplit(':', 1)[1]
  result = helpers.run_cli('pipelines.data_service', 'dispatcher',
                           f'--port={port}')
  assert result.returncode == 1
  errors = helpers.error_lines(result.stderr)
  assert len(errors) == 1 and f'--port={port} is in use' in errors[0]
  assert 'Traceback' not in result.stderr


def test_sigterm_stops_a_server_cleanly():
  port = helpers.free_port()
  with _server('dispatcher', f'--port={port}') as process:
    helpers.wait_for_port(port, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == 0, stderr[-2000:]
  assert 'stopped' in stderr and 'Traceback' not in stderr


def test_the_trainer_trains_through_the_service(service, tmp_path):
  from trainer import train_lib  # pylint: disable=g-import-not-at-top
  address, data = service
  metrics = train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=str(data), model_dir=str(tmp_path / 'run'), epochs=2,
      batch_size=4, early_stopping_patience=0, data_service=address))
  assert metrics['epochs_run'] == 2
  assert (tmp_path / 'run' / 'export' / 'saved_model.pb').exists()


def test_an_unreachable_dispatcher_is_refused_up_front(service, tmp_path):
  from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top
  from trainer import train_lib  # pylint: disable=g-import-not-at-top
  _, data = service
  for address, needle in ((f'grpc://localhost:{helpers.free_port()}', 'no dispatcher'),
                          ('localhost', 'not grpc://HOST:PORT')):
    with pytest.raises(UserError, match=needle):
      train_lib.train_and_evaluate(train_lib.TrainConfig(
          data_dir=str(data), model_dir=str(tmp_path / 'run'), epochs=1,
          batch_size=4, data_service=address))
    assert not (tmp_path / 'run').exists()
