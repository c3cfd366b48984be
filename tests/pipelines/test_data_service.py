"""tf.data service: a dispatcher and 2 worker processes on 127.0.0.1 feed a
training pipeline; every training example arrives exactly once per pass,
and the trainer trains through them."""

import collections
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

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


@pytest.fixture
def distribute_calls(monkeypatch):
  """The services tf.data.experimental.service.distribute was applied with
  (the real one still runs): a pipeline that ignored its data_service would
  give the same images, locally."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  real = tf.data.experimental.service.distribute
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs.get('service'))
    return real(*args, **kwargs)

  monkeypatch.setattr(tf.data.experimental.service, 'distribute', spy)
  return calls


def test_every_training_example_arrives_exactly_once(service,
                                                     distribute_calls):
  address, data = service
  local = _image_hashes(input_pipeline.make_dataset(
      str(data), 'train', batch_size=4, training=False))
  assert sum(local.values()) > 12 and len(local) == sum(local.values())
  assert not distribute_calls
  served = _image_hashes(input_pipeline.make_dataset(
      str(data), 'train', batch_size=4, training=True, drop_remainder=False,
      data_service=address))
  assert distribute_calls == [address]
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


def test_the_trainer_trains_through_the_service(service, tmp_path,
                                               distribute_calls):
  from trainer import train_lib  # pylint: disable=g-import-not-at-top
  address, data = service
  metrics = train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=str(data), model_dir=str(tmp_path / 'run'), epochs=2,
      batch_size=4, early_stopping_patience=0, data_service=address))
  assert metrics['epochs_run'] == 2
  # Training pipelines (not evaluation ones: they are built without it)
  # went through the service.
  assert distribute_calls and set(distribute_calls) == {address}
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


# Hangs: a peer that is gone or never came must end every process with one
# line naming it, and SIGTERM/SIGINT must stop a process that TensorFlow
# holds (pipelines.common.watchdog). Bounds are generous: they catch hangs.


def _wait_for(path, needle: str, process, timeout: float = 120) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, path.read_text()[-3000:]
    if needle in path.read_text():
      return
    time.sleep(0.2)
  raise TimeoutError(f'{needle!r} not seen in {path}')


def _finish(process, timeout: float) -> float:
  """Seconds until process ended (fails after timeout)."""
  start = time.monotonic()
  process.wait(timeout=timeout)
  return time.monotonic() - start


@contextlib.contextmanager
def _trainer(tmp_path, data, address, *flags):
  out, err = tmp_path / 'train.out', tmp_path / 'train.err'
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, '-m', 'trainer.main', f'--data_dir={data}',
         f'--model_dir={tmp_path / "run"}', f'--data_service={address}',
         '--batch_size=4', '--epochs=100000', '--early_stopping_patience=0',
         *flags], cwd=helpers.REPO_ROOT, stdout=stdout, stderr=stderr,
        start_new_session=True)
  try:
    yield process, out, err
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return helpers.write_tiny_dataset(tmp_path_factory.mktemp('tiny') / 'data',
                                    per_class={'train': 8, 'validation': 2})


def test_a_worker_waits_a_bounded_time_for_its_dispatcher():
  nobody = helpers.free_port()
  with _server('worker', f'--port={helpers.free_port()}',
               f'--dispatcher_address=localhost:{nobody}',
               '--dispatcher_timeout=3') as process:
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == 1, stderr[-2000:]
  errors = helpers.error_lines(stderr)
  assert len(errors) == 1 and f'localhost:{nobody}' in errors[0]
  assert 'dispatcher --port=' in errors[0]  # The fix.
  # SIGTERM while it waits stops it at once.
  with _server('worker', f'--port={helpers.free_port()}',
               f'--dispatcher_address=localhost:{nobody}') as process:
    deadline = time.monotonic() + 60
    while 'waiting for the dispatcher' not in (
        process.stderr.readline() if time.monotonic() < deadline else 'x'):
      pass
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
  assert process.returncode == 0 and 'stopped' in stderr


def test_no_worker_ends_the_trainer_with_one_line(tiny, tmp_path):
  port = helpers.free_port()
  with _server('dispatcher', f'--port={port}') as dispatcher:
    helpers.wait_for_port(port, dispatcher)
    with _trainer(tmp_path, tiny, f'grpc://localhost:{port}',
                  '--data_service_timeout=8') as (trainer, _, err):
      _finish(trainer, timeout=120)
    errors = helpers.error_lines(err.read_text())
    assert trainer.returncode != 0 and len(errors) == 1, err.read_text()[-3000:]
    assert f'localhost:{port}' in errors[0] and 'no worker' in errors[0]
    assert 'pipelines.data_service worker' in errors[0]
    # Ctrl-C while it waits (inside TensorFlow, where Python cannot raise
    # KeyboardInterrupt) stops it within the SIGINT grace. The note comes
    # after min(30 s, half the timeout).
    with _trainer(tmp_path, tiny, f'grpc://localhost:{port}',
                  '--data_service_timeout=24') as (trainer, _, err):
      _wait_for(err, 'is a worker running?', trainer)
      trainer.send_signal(signal.SIGINT)
      seconds = _finish(trainer, timeout=60)
    assert trainer.returncode != 0
    assert 'SIGINT: training did not stop' in err.read_text()
    assert seconds < 20, err.read_text()[-3000:]


def test_a_killed_dispatcher_stops_trainer_and_worker(tiny, tmp_path):
  ports = [helpers.free_port() for _ in range(2)]
  with _server('dispatcher', f'--port={ports[0]}') as dispatcher, _server(
      'worker', f'--port={ports[1]}',
      f'--dispatcher_address=localhost:{ports[0]}',
      '--worker_host=localhost') as worker:
    helpers.wait_for_port(ports[1], worker)
    with _trainer(tmp_path, tiny, f'grpc://localhost:{ports[0]}',
                  '--data_service_timeout=8') as (trainer, out, err):
      _wait_for(out, 'Epoch 3/', trainer)
      dispatcher.kill()
      _finish(trainer, timeout=90)
    worker.send_signal(signal.SIGTERM)  # Its dispatcher is gone too.
    _finish(worker, timeout=30)
    assert worker.returncode == 0
  errors = helpers.error_lines(err.read_text())
  assert trainer.returncode != 0 and len(errors) == 1, err.read_text()[-3000:]
  assert f'dispatcher at localhost:{ports[0]}' in errors[0]
  assert 'rerun the same command' in errors[0]
  state = json.loads((tmp_path / 'run' / 'checkpoint' /
                      'state.json').read_text())
  assert state['epochs_done'] >= 2  # Finished epochs survive.


def test_sigterm_preempts_through_the_service_and_twice_kills(tiny, tmp_path):
  ports = [helpers.free_port() for _ in range(2)]
  with _server('dispatcher', f'--port={ports[0]}') as dispatcher, _server(
      'worker', f'--port={ports[1]}',
      f'--dispatcher_address=localhost:{ports[0]}',
      '--worker_host=localhost') as worker:
    helpers.wait_for_port(ports[1], worker)
    # Healthy: a preemption stops after the step and saves (exit 143).
    with _trainer(tmp_path, tiny, f'grpc://localhost:{ports[0]}') as (
        trainer, out, err):
      _wait_for(out, 'Epoch 3/', trainer)
      trainer.send_signal(signal.SIGTERM)
      _finish(trainer, timeout=60)
    assert trainer.returncode == 143, err.read_text()[-3000:]
    assert 'preempted (SIGTERM)' in err.read_text()
    # Input stops coming: TensorFlow holds the trainer; a second SIGTERM
    # ends it at once instead of after the grace.
    with _trainer(tmp_path, tiny, f'grpc://localhost:{ports[0]}') as (
        trainer, out, err):
      _wait_for(out, 'Epoch 5/', trainer)
      os.killpg(worker.pid, signal.SIGKILL)
      time.sleep(3)
      trainer.send_signal(signal.SIGTERM)
      time.sleep(0.5)
      trainer.send_signal(signal.SIGTERM)
      seconds = _finish(trainer, timeout=60)
    assert dispatcher.poll() is None
  stderr = err.read_text()
  assert trainer.returncode != 0, stderr[-3000:]
  assert 'resuming after epoch' in stderr
  assert 'SIGTERM: training did not stop' in stderr, stderr[-3000:]
  assert seconds < 10, stderr[-3000:]
