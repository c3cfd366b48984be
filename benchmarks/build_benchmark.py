r"""Build throughput and memory: Beam (1 and 2 workers) vs a plain Pillow loop.

  python -m benchmarks.build_benchmark --num_images=2000,10000

For each size, a folder of photo-like JPEGs (300-500 px) in 3 classes is made
once, then each variant runs in its own process, writing 150x150 JPEG shards:

  plain      one process: read, decode, resize, encode, write, in a loop
             (the same `source_image.process` + `schema.encode_example` calls)
  plain_2    two such loops at once, each on every other file, started
             together: what two processes get from this machine with no
             framework at all (the ceiling for beam_2)
  beam_1     python -m pipelines.build (FnApiRunner, 1 worker)
  beam_2     ... --direct_num_workers=2 --direct_running_mode=multi_processing

images/s counts written images over the processing time each variant
reports (the plain loop's loop, the build's Beam run: both exclude Python and
TensorFlow start-up); wall_s is the whole process. "steady" divides by the
build's write stage only (first chunk start to last chunk end, from the
workers' clocks): Beam's throughput once its workers run, without the fixed
cost of starting them, planning shards and writing metadata. Peak RSS sums the process
and its children (Beam's workers), sampled every 0.2 s.

With --repeats=N the variants run in N interleaved rounds (plain, beam_2,
plain, beam_2, ...); the table gives medians, and "vs plain" is the median
of each round's ratio to that round's plain loop, so a slow spell of the
machine cannot favour one variant. "vs plain_2" is the same against the two
loops: the share of what two processes can get here that Beam gets.
"""

import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common

_NUM_IMAGES = flags.DEFINE_list('num_images', ['2000'], 'Folder sizes to run.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'build_benchmark'),
    'Where image folders (kept) and outputs (deleted) go.')
_VARIANTS = flags.DEFINE_list('variants', ['plain', 'beam_1', 'beam_2'],
                              'Variants to run.')
_PLAIN_LOOP = flags.DEFINE_string('plain_loop', None,
                                  'Internal: run the plain loop on this folder.')
_OUT = flags.DEFINE_string('out', None, 'Internal: output folder of the loop.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Interleaved rounds of variants.')
_PARTS = flags.DEFINE_integer(
    'parts', 1, 'Internal: run the plain loop as this many processes.')
_PART = flags.DEFINE_integer(
    'part', None, 'Internal: this process loops over every parts-th file, '
    'from this one.')
_BARRIER = flags.DEFINE_string(
    'barrier', None, 'Internal: folder where the parts meet before looping.')

IMAGE_SIZE = 150


def _meet(barrier: str, part: int, parts: int) -> None:
  """Returns once all `parts` processes have called it (after their imports)."""
  pathlib.Path(barrier, f'{part}.ready').touch()
  while len(list(pathlib.Path(barrier).glob('*.ready'))) < parts:
    time.sleep(0.005)


def plain_loop(input_dir: str, output_dir: str, *, part: int = 0,
               parts: int = 1, barrier: str | None = None) -> dict:
  """The baseline: one process, the same per-image work, no Beam (or part
  `part` of `parts` such loops, meeting at `barrier` to start together)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipelines.preprocessing import source_image  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  # The build's per-image work with its defaults (hashes and measures on).
  options = source_image.ImageOptions(height=IMAGE_SIZE, width=IMAGE_SIZE,
                                      measure=True)
  root = pathlib.Path(input_dir)
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  files = sorted(root.rglob('*.jpg'))[part::parts]
  os.makedirs(output_dir, exist_ok=True)
  if barrier:
    _meet(barrier, part, parts)
  start_time = time.time()
  start = time.perf_counter()
  with tf.io.TFRecordWriter(
      os.path.join(output_dir, f'plain-{part}.tfrecord')) as w:
    for path in files:
      data = path.read_bytes()
      out = source_image.process(data, extension='.jpg', options=options)
      w.write(schema.encode_example(
          image=out.encoded, label=classes.index(path.parent.name),
          filename=str(path.relative_to(root)), sha256='',
          original_height=out.original_height,
          original_width=out.original_width))
  elapsed = time.perf_counter() - start
  return {'written': len(files), 'elapsed_s': elapsed,
          'start_time': start_time, 'end_time': time.time()}


def plain_loops(input_dir: str, output_dir: str, parts: int) -> dict:
  """`parts` plain loops at once; elapsed from the first start to the last end."""
  import subprocess  # pylint: disable=g-import-not-at-top
  barrier = tempfile.mkdtemp(prefix='barrier-')
  children = [subprocess.Popen(
      [sys.executable, '-m', 'benchmarks.build_benchmark',
       f'--plain_loop={input_dir}', f'--out={output_dir}', f'--parts={parts}',
       f'--part={i}', f'--barrier={barrier}'], stdout=subprocess.PIPE,
      text=True) for i in range(parts)]
  results = []
  for child in children:
    stdout, _ = child.communicate()
    if child.returncode:
      raise RuntimeError(f'plain loop part failed ({child.returncode})')
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  for p in pathlib.Path(barrier).iterdir():
    p.unlink()
  os.rmdir(barrier)
  return {'written': sum(r['written'] for r in results),
          'elapsed_s': (max(r['end_time'] for r in results) -
                        min(r['start_time'] for r in results)),
          'part_s': [round(r['elapsed_s'], 2) for r in results]}


def _run_variant(variant: str, images: pathlib.Path, out: pathlib.Path) -> dict:
  env = dict(os.environ)
  if variant in ('plain', 'plain_2'):
    cmd = [sys.executable, '-m', 'benchmarks.build_benchmark',
           f'--plain_loop={images}', f'--out={out}',
           f'--parts={2 if variant == "plain_2" else 1}']
  else:
    cmd = [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
           f'--output_dir={out}', f'--image_size={IMAGE_SIZE}',
           '--validation_fraction=0.2']
    if variant == 'beam_2':
      cmd += ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
  measured = common.run_measured(cmd, env=env)
  if measured['returncode'] != 0:
    raise RuntimeError(f'{variant} failed:\n{measured["stderr"][-3000:]}')
  if variant in ('plain', 'plain_2'):
    inner = json.loads(measured['stdout'].strip().splitlines()[-1])
    written, elapsed = inner['written'], inner['elapsed_s']
    steady = elapsed
  else:
    report = json.loads((out / 'build_report.json').read_text())
    written, elapsed = report['counts']['written'], report['elapsed_s']
    steady = report['write_stage_s']
  return {'variant': variant, 'written': written,
          'elapsed_s': round(elapsed, 2),
          'images_per_s': round(written / elapsed, 1),
          'steady_images_per_s': round(written / steady, 1),
          'wall_s': round(measured['wall_s'], 2),
          'peak_rss_mb': round(measured['peak_rss_mb'])}


def main(argv):
  del argv
  if _PLAIN_LOOP.value:
    if _PART.value is None and _PARTS.value > 1:
      print(json.dumps(plain_loops(_PLAIN_LOOP.value, _OUT.value,
                                   _PARTS.value)))
    else:
      print(json.dumps(plain_loop(_PLAIN_LOOP.value, _OUT.value,
                                  part=_PART.value or 0, parts=_PARTS.value,
                                  barrier=_BARRIER.value)))
    return
  import shutil  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(_WORK_DIR.value)
  results, rows = [], []
  for n in (int(x) for x in _NUM_IMAGES.value):
    images = common.make_jpeg_folder(work / f'jpegs_{n}', n)
    print(f'# {n} images in {images}', flush=True)
    rounds = []
    for r in range(_REPEATS.value):
      rounds.append({})
      for variant in _VARIANTS.value:
        out = work / f'out_{variant}_{n}'
        shutil.rmtree(out, ignore_errors=True)
        row = {'num_images': n, 'round': r, **_run_variant(variant, images, out)}
        shutil.rmtree(out, ignore_errors=True)
        rounds[-1][variant] = row
        results.append(row)
        print(json.dumps(row), flush=True)
    for variant in _VARIANTS.value:
      runs = [r[variant] for r in rounds]
      median = lambda key: statistics.median(x[key] for x in runs)  # pylint: disable=cell-var-from-loop

      def ratio(key, base='plain'):
        if base not in _VARIANTS.value:
          return '-'
        return f"{statistics.median(r[variant][key] / r[base][key] for r in rounds):.2f}x"  # pylint: disable=cell-var-from-loop
      rows.append([n, variant, round(median('images_per_s'), 1),
                   ratio('images_per_s'),
                   round(median('steady_images_per_s'), 1),
                   ratio('steady_images_per_s'),
                   ratio('steady_images_per_s', 'plain_2'), median('elapsed_s'),
                   median('wall_s'), round(median('peak_rss_mb'))])
  common.report(['images', 'variant', 'images/s', 'vs plain',
                 'steady images/s', 'vs plain', 'vs plain_2', 'processing s',
                 'wall s', 'peak RSS MB'], rows, results, _RESULTS.value)

if __name__ == '__main__':
  app.run(main)
