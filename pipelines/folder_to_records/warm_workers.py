"""The local runner's worker processes, started before the runner asks.

The FnApiRunner (--direct_running_mode=multi_processing) starts its worker
processes when it runs the graph's first stage, and each then spends
~0.7 s importing Beam, numpy, Pillow and the build's modules while the
launcher waits; before that, the launcher checked the input and built the
graph alone, one core of two idle. `started()` starts them when a build
begins instead: each imports what a worker needs (beam_worker.warm), then
waits for the environment Beam would have started it with (the runner's
control and logging addresses, its options), which the runner's handler
for URN sends when it asks for a worker. BUILD_NOTES, "The build", has the
figures.

Nothing else changes: the process runs the same harness as
runner_options.worker_command's, and its end is reported as Beam reports
its own (`Worker subprocess exited with return code N`, N < 0 for a
signal). A worker that is not there (not started, ended early, more asked
for than started) is started by the command as before. A build's workers
that were never taken are stopped when it ends; one whose launcher died
reads the end of its stdin and exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from typing import Iterator, Optional, Sequence

from pipelines.folder_to_records import runner_options

# The environment the build's runner gives its multi_processing workers
# (runner_options.use_build_workers); its payload is the command that
# starts one cold.
URN = 'beam:env:pipelines_build_worker:v1'

_lock = threading.Lock()
_ready: list[subprocess.Popen] = []  # Started and not taken (every build's).


def wanted(beam_args: Sequence[str]) -> int:
  """How many worker processes the local runner will start for beam_args
  (a build's, before runner_options.pipeline_args): 0 unless it is the
  FnApiRunner in multi_processing mode."""
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  options = po.PipelineOptions(runner_options.pipeline_args(beam_args))
  direct = options.view_as(po.DirectOptions)
  if (options.view_as(po.StandardOptions).runner != 'FnApiRunner' or
      direct.direct_running_mode != 'multi_processing'):
    return 0
  return max(1, direct.direct_num_workers or 1)


@contextlib.contextmanager
def started(beam_args: Sequence[str]) -> Iterator[None]:
  """Starts the local runner's worker processes now (wanted(beam_args) of
  them), for the runner to take while this is open; stops those it did not
  take when it closes."""
  # Their own session (process group): a Ctrl-C in the terminal would
  # reach them while Python starts (a "Fatal Python error" line); the
  # launcher stops those it did not give out, and the others end with its
  # channels. (Popen's process_group needs Python 3.11.)
  mine = []
  try:
    for _ in range(wanted(beam_args)):
      process = subprocess.Popen(  # pylint: disable=consider-using-with
          runner_options.worker_argv('warm'), stdin=subprocess.PIPE,
          start_new_session=True)
      mine.append(process)
      with _lock:
        _ready.append(process)
    yield
  finally:
    with _lock:
      left = [p for p in mine if p in _ready]
      _ready[:] = [p for p in _ready if p not in left]
    for p in left:
      p.kill()
      p.wait()
      p.stdin.close()


def _take() -> Optional[subprocess.Popen]:
  """A started worker process still waiting, or None."""
  with _lock:
    while _ready:
      process = _ready.pop(0)
      if process.poll() is None:
        return process
      process.stdin.close()  # Ended (and reaped by poll).
  return None


def _handed(env: dict) -> Optional[subprocess.Popen]:
  """A started worker given env (what Beam starts a worker with), or None
  when none is left (or the one taken ended meanwhile)."""
  process = _take()
  if process is None:
    return None
  try:
    process.stdin.write(json.dumps(env).encode('utf-8'))
    process.stdin.close()
  except OSError:  # It ended before it read it: started cold instead.
    process.kill()
    process.wait()
    return None
  return process


def register() -> None:
  """Makes the FnApiRunner start URN's workers with _Handler (once per
  process; needs Beam)."""
  from apache_beam.runners.portability.fn_api_runner import worker_handlers  # pylint: disable=g-import-not-at-top
  registered = worker_handlers.WorkerHandler._registered_environments  # pylint: disable=protected-access
  if URN not in registered:
    worker_handlers.WorkerHandler.register_environment(URN, bytes)(
        _handler_class())


def _handler_class():
  """Beam's SubprocessSdkWorkerHandler, its worker taken warm (made when
  Beam is imported)."""
  # Imported here, in the thread that registers: the worker threads below
  # import nothing (two threads importing protobuf modules at once failed
  # a build: BUILD_NOTES, "Tried and dropped").
  # pylint: disable=g-import-not-at-top
  import grpc
  from google.protobuf import json_format
  from google.protobuf import text_format
  from apache_beam.portability.api import beam_fn_api_pb2_grpc
  from apache_beam.portability.api import endpoints_pb2
  from apache_beam.runners.portability import local_job_service
  from apache_beam.runners.portability.fn_api_runner import worker_handlers
  from apache_beam.utils import thread_pool_executor
  # pylint: enable=g-import-not-at-top

  class Worker(local_job_service.SubprocessSdkWorker):
    """Beam 2.77's SubprocessSdkWorker.run, the process taken warm."""

    def run(self):
      options = [('grpc.http2.max_pings_without_data', 0),
                 ('grpc.http2.max_ping_strikes', 0)]
      logging_server = grpc.server(
          thread_pool_executor.shared_unbounded_instance(), options=options)
      logging_port = logging_server.add_insecure_port('[::]:0')
      logging_server.start()
      beam_fn_api_pb2_grpc.add_BeamFnLoggingServicer_to_server(
          local_job_service.BeamFnLoggingServicer(), logging_server)
      env = {
          **os.environ,
          'CONTROL_API_SERVICE_DESCRIPTOR': text_format.MessageToString(
              endpoints_pb2.ApiServiceDescriptor(url=self._control_address)),
          'LOGGING_API_SERVICE_DESCRIPTOR': text_format.MessageToString(
              endpoints_pb2.ApiServiceDescriptor(
                  url=f'localhost:{logging_port}')),
          'PIPELINE_OPTIONS': json_format.MessageToJson(
              self._provision_info.provision_info.pipeline_options)}
      if self._worker_id:
        env['WORKER_ID'] = self._worker_id
      with worker_handlers.SUBPROCESS_LOCK:
        p = _handed(env) or subprocess.Popen(  # pylint: disable=consider-using-with
            self._worker_command_line, shell=True, env=env)
      try:
        p.wait()
        if p.returncode:
          raise RuntimeError(
              f'Worker subprocess exited with return code {p.returncode}')
      finally:
        if p.poll() is None:
          p.kill()
        logging_server.stop(0)

  class Handler(worker_handlers.SubprocessSdkWorkerHandler):
    """Starts Worker instead of Beam's."""

    def start_worker(self):
      self.worker = Worker(self._worker_command_line, self.control_address,
                           self.provision_info, self.worker_id)
      self.worker_thread = threading.Thread(name='run_worker',
                                            target=self.worker.run)
      self.worker_thread.start()

  return Handler
