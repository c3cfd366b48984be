r"""Input images/s through tf.data service (1 and 2 workers) vs local tf.data.

  python -m benchmarks.service_benchmark --num_images=1500 --epochs=6

Uses the input benchmark's 150x150 JPEG records (made on first use). The
training pipeline is make_dataset(training=True, augment=COURSE, batch 32)
in every variant:

  local       in this process
  service_1   through `python -m pipelines.data_service`: a dispatcher and 1
              worker process on 127.0.0.1, this process only receives batches
  service_2   ... with 2 worker processes

Per variant, one iterator over the repeated pipeline (as the trainer reads
it) is timed over `--epochs` epochs of `train images // 32` batches (the
first is warm-up: the service starts its job then); images/s is the median
of the rest. The consumer process's CPU time per image is reported too: it is what
the service takes off the training host. On this 2-core machine the workers
share the cores with the consumer, so more workers cannot add throughput
here; on real machines each worker brings its own cores.
"""

import json
import os
import pathlib
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common

_NUM_IMAGES = flags.DEFINE_integer('num_images', 1500, 'Images to build.')
_EPOCHS = flags.DEFINE_integer('epochs', 6, 'Passes per variant (1st warm-up).')
_VARIANTS = flags.DEFINE_list('variants', ['local', 'service_1', 'service_2'],
                              'Variants to run.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'input_benchmark'),
    'Shared with the input benchmark.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')

_PY = sys.executable
_ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = 32


def _wait_port(port: int, timeout: float = 60) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f'nothing listens on {port}')


def _servers(workers: int, processes: list) -> str:
  """Starts a dispatcher and workers (appended to `processes` at once, so
  the caller stops them whatever happens); returns the service address."""
  port = common.free_port()
  processes.append(subprocess.Popen(
      [_PY, '-m', 'pipelines.data_service', 'dispatcher', f'--port={port}'],
      cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
  _wait_port(port)
  for _ in range(workers):
    worker_port = common.free_port()
    processes.append(subprocess.Popen(
        [_PY, '-m', 'pipelines.data_service', 'worker',
         f'--dispatcher_address=localhost:{port}', f'--port={worker_port}',
         '--worker_host=localhost'], cwd=_ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    _wait_port(worker_port)
  return f'grpc://localhost:{port}'


def measure(variant: str, data_dir: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  import tfrecords_schema  # pylint: disable=g-import-not-at-top
  processes, address = [], None
  try:
    if variant.startswith('service_'):
      address = _servers(int(variant.split('_')[1]), processes)
    ds = input_pipeline.make_dataset(
        data_dir, 'train', batch_size=BATCH, training=True,
        augment=augment_config.COURSE, data_service=address, repeat=True)
    # As the trainer reads: one iterator for the whole run, an epoch of
    # `train images // batch` batches.
    iterator = iter(ds)
    steps = tfrecords_schema.read_dataset_spec(data_dir).splits['train'].num_examples // BATCH
    rates, cpu_per_image = [], []
    for _ in range(_EPOCHS.value):
      cpu0 = time.process_time()
      start = time.perf_counter()
      images = sum(int(np.shape(next(iterator)[0])[0]) for _ in range(steps))
      seconds = time.perf_counter() - start
      rates.append(images / seconds)
      cpu_per_image.append((time.process_time() - cpu0) / images * 1e3)
  finally:
    for p in processes:
      p.send_signal(signal.SIGTERM)
    for p in processes:
      try:
        p.wait(timeout=60)
      except subprocess.TimeoutExpired:
        p.kill()
  steady = rates[1:] or rates
  return {'variant': variant, 'images_per_s': round(statistics.median(steady), 1),
          'epochs_images_per_s': [round(r, 1) for r in rates],
          'consumer_cpu_ms_per_image': round(statistics.median(
              cpu_per_image[1:] or cpu_per_image), 3),
          'peak_rss_mb': round(resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv):
  if len(argv) > 2 and argv[1] == 'run':  # One variant in its own process.
    print(json.dumps(measure(argv[2], argv[3])))
    return
  _, data = common.photo_records(_WORK_DIR.value, _NUM_IMAGES.value)
  results, rows = [], []
  for variant in _VARIANTS.value:
    out = subprocess.run(
        [_PY, '-m', 'benchmarks.service_benchmark', f'--epochs={_EPOCHS.value}',
         '--', 'run', variant, str(data)], cwd=_ROOT, capture_output=True,
        text=True, check=False)
    if out.returncode:
      raise RuntimeError(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    results.append(r)
    rows.append([variant, r['images_per_s'], r['consumer_cpu_ms_per_image'],
                 r['peak_rss_mb']])
    print(rows[-1], flush=True)
  common.report(['variant', 'images/s (median, passes 2..N)',
                 'consumer CPU ms/image', 'consumer peak RSS MB'], rows,
                results, _RESULTS.value)


if __name__ == '__main__':
  app.run(main)
