r"""Build throughput and memory: Beam (1 and 2 workers) vs a plain Pillow loop.

  python -m benchmarks.build_benchmark --num_images=2000,10000

For each size, a folder of photo-like JPEGs (300-500 px) in 3 classes is made
once, then each variant runs in its own process, writing 150x150 JPEG shards:

  plain      one process: read, decode, resize, encode, write, in a loop
             (the same `source_image.process` + `schema.encode_example` calls)
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
machine cannot favour one variant.
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

IMAGE_SIZE = 150


def plain_loop(input_dir: str, output_dir: str) -> dict:
  """The baseline: one process, the same per-image work, no Beam."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipelines.preprocessing import source_image  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  options = source_image.ImageOptions(height=IMAGE_SIZE, width=IMAGE_SIZE)
  root = pathlib.Path(input_dir)
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  files = sorted(root.rglob('*.jpg'))
  os.makedirs(output_dir, exist_ok=True)
  start = time.perf_counter()
  with tf.io.TFRecordWriter(os.path.join(output_dir, 'plain.tfrecord')) as w:
    for path in files:
      data = path.read_bytes()
      out = source_image.process(data, extension='.jpg', options=options)
      w.write(schema.encode_example(
          image=out.encoded, label=classes.index(path.parent.name),
          filename=str(path.relative_to(root)), sha256='',
          original_height=out.original_height,
          original_width=out.original_width))
  elapsed = time.perf_counter() - start
  return {'written': len(files), 'elapsed_s': elapsed}


def _run_variant(variant: str, images: pathlib.Path, out: pathlib.Path) -> dict:
  env = dict(os.environ)
  if variant == 'plain':
    cmd = [sys.executable, '-m', 'benchmarks.build_benchmark',
           f'--plain_loop={images}', f'--out={out}']
  else:
    cmd = [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
           f'--output_dir={out}', f'--image_size={IMAGE_SIZE}',
           '--validation_fraction=0.2']
    if variant == 'beam_2':
      cmd += ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
  measured = common.run_measured(cmd, env=env)
  if measured['returncode'] != 0:
    raise RuntimeError(f'{variant} failed:\n{measured["stderr"][-3000:]}')
  if variant == 'plain':
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
    print(json.dumps(plain_loop(_PLAIN_LOOP.value, _OUT.value)))
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

      def ratio(key):
        if 'plain' not in _VARIANTS.value:
          return '-'
        return f"{statistics.median(r[variant][key] / r['plain'][key] for r in rounds):.2f}x"  # pylint: disable=cell-var-from-loop
      rows.append([n, variant, round(median('images_per_s'), 1),
                   ratio('images_per_s'),
                   round(median('steady_images_per_s'), 1),
                   ratio('steady_images_per_s'), median('elapsed_s'),
                   median('wall_s'), round(median('peak_rss_mb'))])
  common.report(['images', 'variant', 'images/s', 'vs plain',
                 'steady images/s', 'vs plain', 'processing s', 'wall s',
                 'peak RSS MB'], rows, results, _RESULTS.value)

if __name__ == '__main__':
  app.run(main)
