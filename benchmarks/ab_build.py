r"""The build at an earlier commit against this working tree, interleaved.

  python -m benchmarks.ab_build --before=6dca508 --num_images=3000 --rounds=6

Issue 19's end-to-end check: the photo-like folder of build_benchmark
(`common.make_jpeg_folder`), built in rounds (before, this tree, before,
...) with `--image_size=150 --validation_fraction=0.2
--direct_num_workers=2 --direct_running_mode=multi_processing`. The earlier
commit is unpacked with `git archive` into a temporary folder, its C
helpers built in place, and run from there (its own code, this venv). For each build: the Beam run (the build
report's elapsed_s), its write stage, the whole command's wall time and
its CPU (the process and its children). The table gives each arm's medians
and the median of each round's ratio (this tree / before), so a slow spell
of the machine weighs on both arms of a round alike.
"""

import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common

_BEFORE = flags.DEFINE_string('before', '6dca508',
                              'The commit to compare with (before issue 19).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 3000, 'Folder size.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Interleaved rounds.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'build_benchmark'),
    'Where the image folder (kept) and the outputs (deleted) go.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')

_REPO = pathlib.Path(__file__).resolve().parent.parent


def _build(code_dir: pathlib.Path, images: pathlib.Path,
           out: pathlib.Path) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run(
      [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
       f'--output_dir={out}', '--image_size=150', '--validation_fraction=0.2',
       '--direct_num_workers=2', '--direct_running_mode=multi_processing'],
      cwd=code_dir, check=True, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  report = json.loads((out / 'build_report.json').read_text())
  shutil.rmtree(out, ignore_errors=True)
  return {'elapsed_s': report['elapsed_s'],
          'write_stage_s': report['write_stage_s'], 'wall_s': round(wall, 2),
          'cpu_s': round(after.ru_utime + after.ru_stime - before.ru_utime -
                         before.ru_stime, 2)}


def main(argv):
  del argv
  work = pathlib.Path(_WORK_DIR.value)
  images = common.make_jpeg_folder(work / f'jpegs_{_NUM_IMAGES.value}',
                                   _NUM_IMAGES.value)
  with tempfile.TemporaryDirectory() as tmp:
    old = pathlib.Path(tmp) / 'before'
    old.mkdir()
    archive = subprocess.run(['git', 'archive', _BEFORE.value], cwd=_REPO,
                             check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(old)], input=archive, check=True)
    # Its compiled helpers built as an install builds them (an archive has
    # only their sources; without them it would run numpy's fallbacks).
    subprocess.run([sys.executable, 'setup.py', '-q', 'build_ext',
                    '--inplace'], cwd=old, check=False, capture_output=True)
    arms = {'before': old, 'this tree': _REPO}
    for code in arms.values():
      common.byte_compile(code)
    rounds = []
    for r in range(_ROUNDS.value):
      rounds.append({name: _build(code, images, work / 'ab_out')
                     for name, code in arms.items()})
      print(f'# round {r + 1}: {json.dumps(rounds[-1])}', flush=True)
  keys = ('elapsed_s', 'write_stage_s', 'wall_s', 'cpu_s')
  rows = [[name] + [round(statistics.median(x[name][k] for x in rounds), 2)
                    for k in keys] for name in arms]
  rows.append(['this tree / before (median of rounds)'] + [
      f'{statistics.median(x["this tree"][k] / x["before"][k] for x in rounds):.2f}x'
      for k in keys])
  common.report(['arm', 'Beam run s', 'write stage s', 'command wall s',
                 'CPU s'], rows, rounds, _RESULTS.value)


if __name__ == '__main__':
  app.run(main)
