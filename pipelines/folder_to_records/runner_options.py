"""The Beam runner options a build adds unless the user gives them.

Every runner default lives here (a new one is one entry of _DEFAULTS);
pipelines.build passes the user's Beam flags through, builder.build and the
graph code (beam_build) complete them with `pipeline_args`. They are not
defined in the absl entry point itself: `builder.build()` called as a
library (tests, notebooks) needs the same defaults, and importing
pipelines.build defines its absl flags (which clash with trainer.predict's
--max_file_bytes in one process).
"""

import json
from typing import NamedTuple, Sequence


class _Default(NamedTuple):
  given_by: tuple[str, ...]  # Any of these flags: the user chose.
  arg: str  # Else this is added,
  first: bool = False  # at the front (else at the end).


_DEFAULTS = (
    _Default(('--default_sdk_harness_log_level',),
             '--default_sdk_harness_log_level=WARNING'),
    # Construction-time type inference over every transform is half the
    # launcher's graph-building time (0.45 -> 0.21 s); this pipeline is
    # fixed and tested, so the check finds nothing a user could fix.
    _Default(('--pipeline_type_check', '--no_pipeline_type_check'),
             '--no_pipeline_type_check'),
    # Beam's DirectRunner first tries Prism, which downloads a binary at run
    # time (hangs or fails offline); the FnApiRunner is what it falls back to.
    _Default(('--runner',), '--runner=FnApiRunner', first=True),
)

# The loggers of Beam's worker processes that log a failing step before the
# runner re-raises it: quiet while a build runs (the error raised quotes the
# worker's traceback, so nothing is lost). Given first, so that the user's
# own overrides win.
QUIET_WORKER_FAILURES = '--sdk_harness_log_level_overrides=' + json.dumps({
    'apache_beam.runners.common': 'CRITICAL',
    'apache_beam.runners.worker.sdk_worker': 'CRITICAL'})

# The options a worker process of the FnApiRunner gets through
# PIPELINE_OPTIONS_FILE (see builder._worker_log_levels).
WORKER_LOG_OPTIONS = ('default_sdk_harness_log_level',
                      'sdk_harness_log_level_overrides')


def pipeline_args(beam_args: Sequence[str]) -> list[str]:
  """The user's Beam flags plus our defaults (quiet workers, FnApiRunner)."""
  beam_args = list(beam_args)
  given = lambda names: any(a.split('=')[0] in names for a in beam_args)
  for default in _DEFAULTS:
    if not given(default.given_by):
      if default.first:
        beam_args.insert(0, default.arg)
      else:
        beam_args.append(default.arg)
  return beam_args


def run_args(beam_args: Sequence[str]) -> list[str]:
  """The user's Beam flags as a build runs them, before pipeline_args:
  worker failure logs quiet unless the user overrides them."""
  return [QUIET_WORKER_FAILURES, *beam_args]


_WORKER_MAIN = 'apache_beam.runners.worker.sdk_worker_main'
_quick_exit_registered = []


def quick_worker_exit() -> None:
  """In a process running Beam's own worker harness (sdk_worker_main: an
  external worker pool's workers, or --runner=DirectRunner's), ends the
  process as soon as the harness has returned instead of tearing the
  interpreter down, as beam_worker (the default local runner's workers)
  does: a runner stops its workers one after the other and waits for each
  to exit, and freeing a worker's modules (numpy, Pillow, Beam, grpc) took
  ~0.25 s a worker, ~0.5 s of every 2-worker build (BUILD_NOTES, "The
  build"). By then every bundle has finished and been reported and every
  non-daemon thread has been joined (Python joins them before the atexit
  handlers); what is left is memory the kernel frees. Not taken after an
  uncaught exception (sys.last_value: the exit status and traceback stay
  Python's). Anywhere else (the launcher, an in-process runner, tests,
  beam_worker) this does nothing. Called from DoFn.setup, once per
  process."""
  import sys  # pylint: disable=g-import-not-at-top
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  if _quick_exit_registered or spec is None or spec.name != _WORKER_MAIN:
    return
  _quick_exit_registered.append(True)
  import atexit  # pylint: disable=g-import-not-at-top
  atexit.register(_exit_unless_failed)


def _exit_unless_failed() -> None:
  import sys  # pylint: disable=g-import-not-at-top
  if getattr(sys, 'last_value', None) is None:  # Else Python's own exit.
    exit_at_once()


def exit_at_once() -> None:
  """Ends a worker process whose harness has returned: logging and stdio
  flushed, status 0, no interpreter teardown (cli.exit_at_once)."""
  from pipelines.common import cli  # pylint: disable=g-import-not-at-top
  cli.exit_at_once(0)


WORKER_MODULE = 'pipelines.folder_to_records.beam_worker'
# The worker command of the FnApiRunner's multi_processing mode (fn_runner).
_BEAM_WORKER = '{} -m ' + _WORKER_MAIN


def worker_argv(function: str = 'main') -> list[str]:
  """The command (argv) that runs WORKER_MODULE's `function` (main: a build
  worker; warm: one started ahead, warm_workers) with the folder this
  package was imported from at the end of sys.path (a launcher that found
  it through its own sys.path, a notebook's or a script's, starts workers
  that find it too: one that cannot import it would end before it
  connects, and the runner waits for such a worker forever)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import pipelines  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(pipelines.__file__)))
  return [sys.executable, '-c', f'import sys; sys.path.append({root!r}); '
          f'from {WORKER_MODULE} import {function}; {function}()']


def worker_command() -> str:
  """worker_argv() as the shell command the runner starts a worker with."""
  import shlex  # pylint: disable=g-import-not-at-top
  return shlex.join(worker_argv())


def use_build_workers(pipeline_proto) -> int:
  """Points the pipeline's environments that start Beam's worker processes
  (the FnApiRunner's multi_processing ones) at the build's workers: the
  same harness started sooner (warm_workers.URN: taken from those started
  ahead, else started by worker_command()) and stopped sooner. Returns how
  many it changed."""
  import sys  # pylint: disable=g-import-not-at-top
  from apache_beam.portability import python_urns  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import warm_workers  # pylint: disable=g-import-not-at-top
  beams = _BEAM_WORKER.format(sys.executable).encode('utf-8')
  ours = worker_command().encode('utf-8')
  changed = 0
  for environment in pipeline_proto.components.environments.values():
    if (environment.urn == python_urns.SUBPROCESS_SDK
        and environment.payload == beams):
      environment.urn, environment.payload = warm_workers.URN, ours
      changed += 1
  if changed:
    warm_workers.register()
  return changed


def local_runner(options):
  """The runner object for a build's options: for the FnApiRunner (the
  default), one whose worker processes run WORKER_MODULE
  (use_build_workers); None for any other runner (Beam makes it from
  --runner)."""
  from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top
  if options.view_as(StandardOptions).runner != 'FnApiRunner':
    return None
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top

  class BuildRunner(fn_runner.FnApiRunner):
    """The FnApiRunner, its multi_processing workers running WORKER_MODULE."""

    def run_via_runner_api(self, pipeline_proto, options):
      use_build_workers(pipeline_proto)
      return super().run_via_runner_api(pipeline_proto, options)

  return BuildRunner()
