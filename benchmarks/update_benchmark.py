r"""Incremental builds: an update after 1% new, 0.1% changed and 0.1% deleted
files, against a full build of the same folder.

  python -m benchmarks.update_benchmark --num_images=30000,100000

For each size, the photo-like JPEG folder of build_benchmark (300-500 px,
3 classes) is made once; a working copy of it (hard links) is built in
full (`v1`), then changed: 1% new photos, 0.1% rewritten in place (new
bytes: unlinked first, so the kept folder is untouched), 0.1% deleted.
Then, each in its own process with 2 workers (FnApiRunner,
multi_processing), 150x150 JPEG:

  update   --reuse_from=v1 into a new folder
  full     a full build of the changed folder

and the benchmark checks the two outputs are byte-identical
(reuse.differences: the timings and the reuse counts aside). elapsed_s is
the build's own Beam run (as the build report gives it); wall_s the whole
process; peak RSS the process tree's. `--extra=--near_duplicate_distance=0`
passes build flags to every build. With `--rounds=N` the update and the
full build run N times, alternating (this VM's speed drifts by 10-30%
over minutes): the table gives each one's median, and "wall share" is the
median of the rounds' update wall / full wall. The project's .pyc files
are written first (common.byte_compile), as an install writes them.
"""

import json
import os
import pathlib
import random
import shutil
import statistics
import sys
import tempfile

from absl import app
from absl import flags

from benchmarks import common

_NUM_IMAGES = flags.DEFINE_list('num_images', ['30000'], 'Folder sizes.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'build_benchmark'),
    'Where the image folders (kept, shared with build_benchmark) and the '
    'outputs (deleted) go.')
_EXTRA = flags.DEFINE_list('extra', [], 'Build flags added to every build.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Alternating update/full pairs.')
_NEW, _CHANGED, _DELETED = 0.01, 0.001, 0.001
# Figures given as the median over rounds (the rest: the first round's).
_MEDIAN = ('elapsed_s', 'wall_s', 'peak_rss_mb')


def _build(images: pathlib.Path, out: pathlib.Path, *args: str) -> dict:
  cmd = [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
         f'--output_dir={out}', '--image_size=150',
         '--direct_num_workers=2', '--direct_running_mode=multi_processing',
         *_EXTRA.value, *args]
  # The disk flushed first: the build before left ~1 GB of dirty pages
  # whose writeback slowed the next build's file creation (a 100,000 update
  # took 16.4 s right after v1, 10.7 s minutes later).
  os.sync()
  measured = common.run_measured(cmd)
  if measured['returncode'] != 0:
    raise RuntimeError(f'{cmd} failed:\n{measured["stderr"][-3000:]}')
  report = json.loads((out / 'build_report.json').read_text())
  return {'elapsed_s': report['elapsed_s'], 'wall_s': round(
      measured['wall_s'], 2), 'peak_rss_mb': round(measured['peak_rss_mb']),
          'written': report['counts']['written'], 'reuse': report.get('reuse')}


def _change(images: pathlib.Path, spare: pathlib.Path, n: int) -> dict:
  """Adds, rewrites and deletes files of `images` (a hard-linked copy):
  new photos come from `spare`, a second folder made like the first."""
  rng = random.Random(0)
  files = sorted(p for p in images.rglob('*.jpg'))
  extra = sorted(p for p in spare.rglob('*.jpg'))
  picked = rng.sample(files, int(n * (_CHANGED + _DELETED)))
  changed, deleted = picked[:int(n * _CHANGED)], picked[int(n * _CHANGED):]
  for i, path in enumerate(changed):
    data = extra[-1 - i].read_bytes()
    path.unlink()  # A hard link: the kept folder keeps its file.
    path.write_bytes(data)
  for path in deleted:
    path.unlink()
  new = extra[:int(n * _NEW)]
  for path in new:
    target = images / path.parent.name / f'new_{path.name}'
    target.write_bytes(path.read_bytes())
  return {'new': len(new), 'changed': len(changed), 'deleted': len(deleted)}


def main(argv):
  del argv
  from pipelines.folder_to_records import reuse  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(_WORK_DIR.value)
  common.byte_compile(pathlib.Path(__file__).resolve().parent.parent)
  results, rows = [], []
  for n in (int(x) for x in _NUM_IMAGES.value):
    kept = common.make_jpeg_folder(work / f'jpegs_{n}', n)
    spare = common.make_jpeg_folder(work / f'jpegs_spare_{n}',
                                    int(n * (_NEW + _CHANGED)) + 1, seed=1)
    run = work / f'update_{n}'
    shutil.rmtree(run, ignore_errors=True)
    images = run / 'images'
    shutil.copytree(kept, images, copy_function=os.link)
    print(f'# {n} images: full build v1', flush=True)
    v1 = _build(images, run / 'v1')
    changes = _change(images, spare, n)
    updates, fulls = [], []
    for round_ in range(_ROUNDS.value):
      print(f'# {changes}: update (round {round_ + 1})', flush=True)
      shutil.rmtree(run / 'v2', ignore_errors=True)
      updates.append(_build(images, run / 'v2', f'--reuse_from={run / "v1"}'))
      print('# full build of the changed folder', flush=True)
      shutil.rmtree(run / 'full', ignore_errors=True)
      fulls.append(_build(images, run / 'full'))
      differ = reuse.differences(str(run / 'v2'), str(run / 'full'))
      if differ:
        raise AssertionError(f'update and full build differ: {differ}')
    share = statistics.median(u['wall_s'] / f['wall_s']
                              for u, f in zip(updates, fulls))
    update, full = (
        {k: statistics.median(r[k] for r in runs) if k in _MEDIAN else
         runs[0][k] for k in runs[0]} for runs in (updates, fulls))
    result = {'num_images': n, **changes, 'v1': v1, 'update': update,
              'full': full, 'rounds': {'update': updates, 'full': fulls},
              'wall_share': round(share, 4), 'identical': True}
    results.append(result)
    print(json.dumps(result), flush=True)
    r = update['reuse']
    rows.append([n, _ROUNDS.value, full['elapsed_s'], update['elapsed_s'],
                 f'{update["elapsed_s"] / full["elapsed_s"]:.1%}',
                 full['wall_s'], update['wall_s'], f'**{share:.1%}**',
                 f'{r["reused"]:,} / {r["built"]:,} / {r["gone"]:,}',
                 f'{1e6 * update["elapsed_s"] / n:.0f}',
                 full['peak_rss_mb'], update['peak_rss_mb'], 'yes'])
    shutil.rmtree(run, ignore_errors=True)
  common.report(['images', 'rounds', 'full s', 'update s', 'update / full',
                 'full wall s', 'update wall s', 'wall share',
                 'reused / built / gone',
                 'update µs per file', 'full peak MB', 'update peak MB',
                 'byte-identical'], rows, results, _RESULTS.value)


if __name__ == '__main__':
  app.run(main)
