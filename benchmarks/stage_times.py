r"""A build's Beam stages, each with its wall time.

  python -m benchmarks.stage_times --input_dir=... --output_dir=... [build
      and Beam flags, as pipelines.build takes them]

Runs pipelines.build in this process with the local runner's bundle
execution timed (FnApiRunner._execute_bundle), and prints the 18 slowest
stages, named by the transforms fused into them, then the total. With
`--direct_running_mode=multi_processing` a stage's time is its wall time
across the worker processes.
"""

import atexit
import sys
import time

from absl import app
from apache_beam.runners.portability.fn_api_runner import fn_runner

from pipelines import build
from pipelines.common import cli

_times = []
_execute_bundle = fn_runner.FnApiRunner._execute_bundle  # pylint: disable=protected-access


def _timed(self, context, bundle, bundle_input):
  start = time.perf_counter()
  try:
    return _execute_bundle(self, context, bundle, bundle_input)
  finally:
    names = sorted({t.unique_name.split('/')[0]
                    for t in bundle.stage.transforms if t.unique_name})
    _times.append((time.perf_counter() - start, names))


@atexit.register
def _show():
  for seconds, names in sorted(_times, reverse=True)[:18]:
    print(f'{seconds:7.2f} s  {",".join(names)[:110]}', file=sys.stderr)
  print(f'{sum(t for t, _ in _times):7.2f} s  in all', file=sys.stderr)


if __name__ == '__main__':
  fn_runner.FnApiRunner._execute_bundle = _timed  # pylint: disable=protected-access
  sys.argv[0] = 'pipelines.build'
  app.run(build.main, flags_parser=cli.flags_parser(known_only=True))
