r"""Does this Beam's FnApiRunner keep a splittable DoFn's deferred work?

  python -m benchmarks.beam_sdf_residuals

Why the build does not balance its write stage with a self-checkpointing
(splittable) WriteChunk: with more than one worker, the FnApiRunner's
ParallelBundleManager merges the workers' bundle responses into one that
keeps only monitoring infos and the error, so the residuals of a
`defer_remainder()` are dropped and that work is silently never done
(apache/beam#19842 is the open issue about SDFs on multiple workers). Each of
6 elements here claims one of its 4 positions per bundle and defers the
rest: 24 outputs are expected. Beam 2.77: 24 with 1 worker, 6 with 2 worker
processes. Re-run it after a Beam upgrade before building on deferral.
"""

import os
import sys
import tempfile

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.io.restriction_trackers import OffsetRestrictionTracker
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider

ELEMENTS, POSITIONS = 6, 4


class _Positions(RestrictionProvider):

  def initial_restriction(self, element):
    return OffsetRange(0, POSITIONS)

  def create_tracker(self, restriction):
    return OffsetRestrictionTracker(restriction)

  def restriction_size(self, element, restriction):
    return restriction.size()


class _OnePositionPerBundle(beam.DoFn):

  def process(self, element,
              tracker=beam.DoFn.RestrictionParam(_Positions())):
    position = tracker.current_restriction().start
    if tracker.try_claim(position):
      yield element, position
      tracker.defer_remainder()  # The rest in a later bundle.


def _write_count(count, path):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(str(count))


def outputs(num_workers: int) -> int:
  """How many of ELEMENTS * POSITIONS outputs the FnApiRunner produces."""
  args = ['--runner=FnApiRunner', f'--direct_num_workers={num_workers}',
          '--default_sdk_harness_log_level=ERROR']
  if num_workers > 1:
    args.append('--direct_running_mode=multi_processing')
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'count')
    with beam.Pipeline(options=PipelineOptions(args)) as p:
      _ = (p | beam.Create(list(range(ELEMENTS)))
           | beam.ParDo(_OnePositionPerBundle())
           | beam.combiners.Count.Globally()
           | beam.Map(_write_count, path))
    with open(path, encoding='utf-8') as f:
      return int(f.read())


def main() -> int:
  expected = ELEMENTS * POSITIONS
  results = {n: outputs(n) for n in (1, 2)}
  for n, got in results.items():
    print(f'{n} worker(s): {got} of {expected} outputs'
          + ('' if got == expected else ' (deferred work LOST)'))
  return 0 if all(got == expected for got in results.values()) else 1


if __name__ == '__main__':
  sys.exit(main())
