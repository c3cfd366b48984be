r"""tf.data service servers: move decoding and augmentation off the GPU host.

  python -m pipelines.data_service dispatcher --port=5050
  python -m pipelines.data_service worker --dispatcher_address=HOST:5050 \
      --port=5051                                   # one per CPU machine
  python -m trainer.main ... --data_service=grpc://HOST:5050

Each server runs until Ctrl-C or SIGTERM, then stops cleanly. The trainer
(or `make_dataset(..., data_service=...)`) sends its training pipeline to
the dispatcher; the workers read the shards, decode, augment and batch, and
the training host only receives batches. Workers must reach the dataset's
path (a shared file system or a bucket) and have this package installed.
"""

import signal
import socket
import sys
import threading

from pipelines.common import cli

if __name__ == '__main__':
  cli.filter_noise()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_PORT = flags.DEFINE_integer('port', 5050, 'Port this server listens on.')
_DISPATCHER = flags.DEFINE_string(
    'dispatcher_address', None, 'worker: HOST:PORT of the dispatcher.')
_WORKER_HOST = flags.DEFINE_string(
    'worker_host', None, 'worker: the host name clients reach this worker '
    'by (default: this machine\'s name; localhost for a one-machine test).')

ROLES = ('dispatcher', 'worker')


def check_port_free(port: int) -> None:
  """UserError naming the port when something already listens on it."""
  if not 0 < port < 65536:
    raise UserError(f'--port={port} is not a port; pass 1..65535')
  reason = cli.port_in_use(port)
  if reason:
    raise UserError(f'--port={port} is in use ({reason}); stop what '
                    'listens there or pass another --port')


def start(role: str, *, port: int, dispatcher_address=None, worker_host=None):
  """Starts a dispatcher or worker server in this process; returns it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  check_port_free(port)
  if role == 'dispatcher':
    return service.DispatchServer(service.DispatcherConfig(port=port))
  if not dispatcher_address:
    raise UserError('worker needs --dispatcher_address=HOST:PORT of the '
                    'dispatcher')
  address = dispatcher_address.split('://', 1)[-1]
  host = worker_host or socket.gethostname()
  return service.WorkerServer(service.WorkerConfig(
      dispatcher_address=address, worker_address=f'{host}:{port}',
      port=port))


def main(argv):
  if len(argv) != 2 or argv[1] not in ROLES:
    sys.exit('error: usage: python -m pipelines.data_service '
             'dispatcher|worker [--port=P] [--dispatcher_address=HOST:P]')
  cli.quiet_logs()
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  try:
    server = start(argv[1], port=_PORT.value,
                   dispatcher_address=_DISPATCHER.value,
                   worker_host=_WORKER_HOST.value)
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f'[data_service] {argv[1]} listening on port {_PORT.value}; '
        'Ctrl-C or SIGTERM stops it', file=sys.stderr, flush=True)
  stop.wait()
  del server  # The server stops when it is destroyed.
  print(f'[data_service] {argv[1]} stopped', file=sys.stderr, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
