r"""Build at scale: graph size, launcher and worker memory, images/s vs files.

  python -m benchmarks.scale_benchmark --num_images=10000,100000

For each size, a folder of small generated PNGs (32x32, 100 classes, every
file distinct) is made once (kept under --work_dir); then

  graph bytes     the serialized Beam pipeline the build submits
                  (pipeline.to_runner_api().SerializeToString())
  build           python -m pipelines.build --image_size=32 with the default
                  runner and 2 worker processes; peak RSS of the launcher and
                  of each Beam worker process (VmHWM, sampled every 0.2 s);
                  images/s end to end (the build's Beam run) and steady (its
                  write stage)

`--code_dirs` runs other checkouts' `pipelines.build` too (e.g. the commit
before a change), interleaved run by run with `--repeats`, so slow spells of
the machine hit all of them; the table gives medians (images/s: with the
range). Graph bytes are always this checkout's.
"""

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from benchmarks import common

_NUM_IMAGES = flags.DEFINE_list('num_images', ['10000'], 'Folder sizes.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'scale_benchmark'),
    'Where image folders (kept) and outputs (deleted) go.')
_CODE_DIRS = flags.DEFINE_list(
    'code_dirs', ['.'], "Checkouts whose builds to run ('.': this one).")
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Runs of each build, interleaved.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')
_DISTINCT = flags.DEFINE_boolean(
    'distinct_hashes', False,
    'Every image its own random pixels (no class base image): perceptual '
    'hashes spread out, so the near-duplicate search finds ~no pair. The '
    'default folder (class base + small noise) makes every image of a class '
    'a near pair of every other (~46 per image at 10k, 460 at 100k).')
_BUILD_ARGS = flags.DEFINE_list(
    'build_args', [],
    'Flags appended to every build command, e.g. '
    '--build_args=--near_duplicate_distance=0,--quality_thresholds=off; '
    'graph bytes are measured with them too.')

NUM_CLASSES = 100
SIDE = 32


def make_png_folder(root: pathlib.Path, num_images: int, *,
                    distinct_hashes: bool = False) -> pathlib.Path:
  """num_images distinct 32x32 RGB PNGs in 100 class folders (kept).

  distinct_hashes: each image uniform random pixels instead of its class's
  base image plus noise (whose images are all near-duplicates).
  """
  marker = root / f'.complete-{num_images}'
  if marker.exists():
    return root
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, size=(NUM_CLASSES, SIDE, SIDE, 3))
  for i in range(num_images):
    c = i % NUM_CLASSES
    if distinct_hashes:
      pixels = rng.integers(0, 256, size=(SIDE, SIDE, 3)).astype(np.uint8)
    else:
      noise = rng.integers(-24, 25, size=(SIDE, SIDE, 3))
      pixels = np.clip(base[c] + noise, 0, 255).astype(np.uint8)
    path = root / f'class_{c:03d}' / f'{i:07d}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format='PNG', compress_level=1)
  marker.write_text('ok')
  return root


def _run_build(folder: pathlib.Path, out: pathlib.Path, code_dir: str) -> dict:
  """One build with the default runner and 2 worker processes, measured."""
  shutil.rmtree(out, ignore_errors=True)
  run = common.run_measured(
      [sys.executable, '-m', 'pipelines.build', f'--input_dir={folder}',
       f'--output_dir={out}', f'--image_size={SIDE}', '--image_format=png',
       '--direct_num_workers=2', '--direct_running_mode=multi_processing',
       *_BUILD_ARGS.value],
      cwd=code_dir)
  if run['returncode']:
    sys.exit(run['stderr'][-3000:])
  report = json.loads((out / 'build_report.json').read_text())
  shutil.rmtree(out)
  peaks = dict(run['peak_by_pid'])
  launcher = peaks.pop(run['root_pid'], 0.0)
  return {'launcher': launcher,
          'workers': sorted((mb for mb in peaks.values() if mb > 50),
                            reverse=True),
          'images_per_s': report['images_per_s'],
          'steady': report['counts']['written'] / max(
              report['write_stage_s'], 1e-9),
          'wall_s': run['wall_s'],
          'near_duplicates': report.get('near_duplicates'),
          'counts': report.get('counts'),
          'quality_flags': report.get('quality_flags')}


def _settings_fields() -> dict:
  """--build_args as BuildSettings fields (ints where they parse)."""
  fields = {}
  for arg in _BUILD_ARGS.value:
    key, _, value = arg.lstrip('-').partition('=')
    fields[key] = int(value) if value.lstrip('-').isdigit() else value
  return fields


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Beam's type-hint chatter.
  work = pathlib.Path(_WORK_DIR.value)
  here = str(pathlib.Path(__file__).parents[1])
  code_dirs = [here if d == '.' else d for d in _CODE_DIRS.value]
  headers = ['images', 'build', 'graph bytes', 'launcher peak MB',
             'worker peak MB', 'images/s', 'steady images/s', 'wall s']
  rows, results = [], []
  for n in (int(x) for x in _NUM_IMAGES.value):
    folder = make_png_folder(
        work / (f'png_distinct_{n}' if _DISTINCT.value else f'png_{n}'), n,
        distinct_hashes=_DISTINCT.value)
    from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top
    graph = builder.graph_bytes(str(folder), str(work), **_settings_fields())
    runs = {d: [] for d in code_dirs}
    for _ in range(_REPEATS.value):
      for code_dir in code_dirs:
        runs[code_dir].append(_run_build(folder, work / f'out_{n}', code_dir))
        print(n, code_dir, runs[code_dir][-1], flush=True)
    for code_dir, measured in runs.items():
      median = lambda key: statistics.median(m[key] for m in measured)  # pylint: disable=cell-var-from-loop
      rates = sorted(m['images_per_s'] for m in measured)
      workers = [statistics.median(m['workers'][i] for m in measured)
                 for i in range(min(len(m['workers']) for m in measured))]
      row = [n, 'this' if code_dir == here else code_dir, graph,
             round(median('launcher')),
             '/'.join(str(round(w)) for w in workers),
             f"{median('images_per_s'):.0f}" + (
                 f' ({rates[0]:.0f}-{rates[-1]:.0f})' if len(rates) > 1
                 else ''),
             round(median('steady')), round(median('wall_s'), 1)]
      rows.append(row)
      results.append({**dict(zip(headers, row)), 'runs': measured})
  common.report(headers, rows, results, _RESULTS.value)


if __name__ == '__main__':
  app.run(main)
