r"""tf.data service servers: move decoding and augmentation off the GPU host.

  python -m pipelines.data_service dispatcher --port=5050
  python -m pipelines.data_service worker --dispatcher_address=HOST:5050 \
      --port=5051                                   # one per CPU machine
  python -m trainer.main ... --data_service=grpc://HOST:5050

Each server runs until Ctrl-C or SIGTERM, then stops within seconds (a
watchdog process kills one that TensorFlow holds, see common.watchdog). A
worker waits at most --dispatcher_timeout seconds for its dispatcher, at
start and whenever it stops answering, then stops with one error line. The trainer
(or `make_dataset(..., data_service=...)`) sends its training pipeline to
the dispatcher; the workers read the shards, decode, augment and batch, and
the training host only receives batches. Workers must reach the dataset's
path (a shared file system or a bucket) and have this package installed.
"""

import os
import signal
import socket
import sys
import threading
import time

from pipelines.common import cli

if __name__ == '__main__':
  cli.filter_noise()
  cli.skip_unused_imports()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.common import net  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common import watchdog  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_PORT = flags.DEFINE_integer('port', 5050, 'Port this server listens on.')
_DISPATCHER = flags.DEFINE_string(
    'dispatcher_address', None, 'worker: HOST:PORT of the dispatcher.')
_WORKER_HOST = flags.DEFINE_string(
    'worker_host', None, 'worker: the host name clients reach this worker '
    'by (default: this machine\'s name; localhost for a one-machine test).')

_DISPATCHER_TIMEOUT = flags.DEFINE_float(
    'dispatcher_timeout', 60, 'worker: seconds to wait for the dispatcher to '
    'answer, at start and whenever it stops answering; then the worker stops '
    'with an error.')

ROLES = ('dispatcher', 'worker')
# Seconds a server has to stop after SIGTERM/SIGINT before it is killed.
STOP_GRACE_S = 5


def check_port_free(port: int) -> None:
  """UserError naming the port when something already listens on it."""
  if not 0 < port < 65536:
    raise UserError(f'--port={port} is not a port; pass 1..65535')
  reason = cli.port_in_use(port)
  if reason:
    raise UserError(f'--port={port} is in use ({reason}); stop what '
                    'listens there or pass another --port')


def wait_for_dispatcher(host: str, port: int, *, timeout_s: float,
                        stop: threading.Event) -> None:
  """Returns once the dispatcher accepts connections; UserError after
  `timeout_s` seconds (or at once when `stop` is set)."""
  deadline = time.monotonic() + timeout_s
  reason = net.unreachable(host, port)
  if reason is None:
    return
  _say(f'worker: waiting for the dispatcher at {host}:{port} ({reason}), up '
       f'to --dispatcher_timeout={timeout_s:g} s')
  while not stop.wait(1):
    reason = net.unreachable(host, port)
    if reason is None:
      return
    if time.monotonic() >= deadline:
      raise UserError(
          f'no tf.data service dispatcher answers at {host}:{port} '
          f'(--dispatcher_address; {reason}) after --dispatcher_timeout='
          f'{timeout_s:g} s; start it first (python -m pipelines.data_service '
          f'dispatcher --port={port}) or fix --dispatcher_address')
  raise _Stopped()


class _Stopped(Exception):
  """SIGTERM or SIGINT arrived before the server started."""


def start(role: str, *, port: int, dispatcher_address=None, worker_host=None):
  """Starts a dispatcher or worker server in this process; returns it.

  TensorFlow's worker blocks until the dispatcher registers it: call
  wait_for_dispatcher first (and bound the call with a watchdog).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  check_port_free(port)
  if role == 'dispatcher':
    return service.DispatchServer(service.DispatcherConfig(port=port))
  host, dispatcher_port = net.host_port(dispatcher_address,
                                       'dispatcher_address')
  return service.WorkerServer(service.WorkerConfig(
      dispatcher_address=f'{host}:{dispatcher_port}',
      worker_address=f'{worker_host or socket.gethostname()}:{port}',
      port=port))


def _say(message: str) -> None:
  print(f'[data_service] {message}', file=sys.stderr, flush=True)


def _stop_lines(role: str) -> dict:
  """The watchdog's lines for a server that does not stop on its own."""
  return {sig: (STOP_GRACE_S, f'[data_service] {role}: {sig.name} did not '
                f'stop it within {STOP_GRACE_S} s (blocked inside '
                'TensorFlow); killed')
          for sig in (signal.SIGTERM, signal.SIGINT)}


def main(argv):
  if len(argv) != 2 or argv[1] not in ROLES:
    sys.exit('error: usage: python -m pipelines.data_service '
             'dispatcher|worker [--port=P] [--dispatcher_address=HOST:P]')
  role = argv[1]
  cli.quiet_logs()
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  dog = watchdog.Watchdog(_stop_lines(role), stderr=cli.unfiltered_stderr())
  try:
    if _DISPATCHER_TIMEOUT.value <= 0:
      raise UserError(f'--dispatcher_timeout={_DISPATCHER_TIMEOUT.value} '
                      'must be > 0 (seconds)')
    check_port_free(_PORT.value)
    if role == 'worker':
      if not _DISPATCHER.value:
        raise UserError('worker needs --dispatcher_address=HOST:PORT of the '
                        'dispatcher')
      host, port = net.host_port(_DISPATCHER.value, 'dispatcher_address')
      wait_for_dispatcher(host, port, timeout_s=_DISPATCHER_TIMEOUT.value,
                          stop=stop)
      lost = (f'error: the tf.data service dispatcher at {host}:{port} '
              f'(--dispatcher_address) has not answered for '
              f'--dispatcher_timeout={_DISPATCHER_TIMEOUT.value:g} s; this '
              'worker stops: restart the dispatcher, then its workers')
      # Registering blocks inside TensorFlow while the dispatcher is away.
      dog.arm(_DISPATCHER_TIMEOUT.value, lost)
    _server = start(role, port=_PORT.value,  # Alive until the process ends.
                    dispatcher_address=_DISPATCHER.value,
                    worker_host=_WORKER_HOST.value)
    if role == 'worker':
      dog.clear()
      dog.watch_peer(host, port, seconds=_DISPATCHER_TIMEOUT.value,
                     message=lost)
  except UserError as e:
    dog.close()
    sys.exit(f'error: {e}')
  except _Stopped:
    dog.close()
    _say(f'{role} stopped before it started')
    return
  _say(f'{role} listening on port {_PORT.value}; Ctrl-C or SIGTERM stops it')
  stop.wait()
  # Destroying a worker whose dispatcher is gone blocks inside TensorFlow:
  # the process ends instead (a server keeps nothing to save).
  os.write(cli.unfiltered_stderr(),
           f'[data_service] {role} stopped\n'.encode())
  dog.close()
  os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
