"""A worker process of the build's local runner.

The FnApiRunner's multi_processing mode starts each worker as `python -m
apache_beam.runners.worker.sdk_worker_main`; the build's runner
(runner_options.local_runner) runs this module's main() instead (with the
folder the launcher imported this package from at the end of sys.path),
which runs the same harness (`sdk_worker_main.main`) with two differences,
each measured on every 2-worker build (BUILD_NOTES, "The build"):

  * pandas is not imported. Beam's typehints import it (and pyarrow) when
    installed, for DataFrame transforms the build has none of: ~0.3 s of
    each worker's start, which is on the critical path of every build.
  * The process ends as soon as the harness returns (os._exit after
    flushing stdio), as runner_options.quick_worker_exit does for Beam's
    own worker processes: the runner stops its workers one after the other
    and waited ~0.25 s for each interpreter's teardown.

A harness that fails raises as before: Python prints the traceback and the
exit status is 1, which the runner reports.

warm() is the same worker started before the runner asks for it
(warm_workers): it imports what it needs, then waits on stdin for the
environment the runner would have started it with.
"""

import sys


def main() -> None:
  from pipelines.common import cli  # pylint: disable=g-import-not-at-top
  cli.skip_unused_imports(also=cli.UNUSED_BY_THE_BUILD)  # Before Beam's.
  from apache_beam.runners.worker import sdk_worker_main  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import runner_options  # pylint: disable=g-import-not-at-top
  sdk_worker_main.main(sys.argv)
  runner_options.exit_at_once()


def warm() -> None:
  """main(), started ahead: imports Beam's harness and the build's steps
  (what unpickling them would import), then reads the environment to run
  with (JSON, until the end of stdin: warm_workers sends it when the runner
  asks for a worker). Nothing read (a build that did not need it, or whose
  launcher died): ends at once. Ctrl-C is left to the launcher until then,
  which stops a worker it did not use."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  from pipelines.common import cli  # pylint: disable=g-import-not-at-top
  cli.skip_unused_imports(also=cli.UNUSED_BY_THE_BUILD)  # Before Beam's.
  cli.import_beam_quietly()
  from apache_beam.runners.worker import sdk_worker_main  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  from pipelines.folder_to_records import beam_build  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  data = sys.stdin.buffer.read()
  if not data:
    os._exit(0)  # pylint: disable=protected-access
  os.environ.clear()
  os.environ.update(json.loads(data))
  signal.signal(signal.SIGINT, signal.default_int_handler)
  main()


if __name__ == '__main__':
  main()
