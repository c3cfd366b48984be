r"""Multi-worker training vs one process on real data (scikit-learn digits).

  python -m benchmarks.multi_worker_benchmark --seeds=0,1,2

The 1,797 digits are exported and built once (32x32 grey PNG, 20%
validation, 10% test, train split in 4 shard files so each of 2 workers
reads its own files). Then, for each seed, the same trainer command runs
(one after the other, never at the same time):

  single   python -m trainer.main ...                       (one process)
  2_workers the same command twice with --distribution=multi_worker and a
           TF_CONFIG each (2 processes on 127.0.0.1)

and the test accuracy, best epoch and wall time of each are reported. Both
use the same global --batch_size and epochs / early stopping.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Trainer seeds.')
_EPOCHS = flags.DEFINE_integer('epochs', 30, 'Maximum epochs.')
_PATIENCE = flags.DEFINE_integer('patience', 5, 'Early-stopping patience.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'multi_worker_benchmark'),
    'Where the digits, dataset and runs go.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')

_PY = sys.executable
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build(work: pathlib.Path) -> pathlib.Path:
  data = work / 'digits_dataset'
  if (data / 'metadata.json').exists():
    return data
  subprocess.run([_PY, '-m', 'pipelines.sample_data', '--dataset=digits',
                  f'--output_dir={work / "digits_images"}'], check=True,
                 cwd=_ROOT)
  # ~60 KB of train records: 0.015 MB shards give 4 train files.
  subprocess.run([_PY, '-m', 'pipelines.build',
                  f'--input_dir={work / "digits_images"}',
                  f'--output_dir={data}', '--overwrite', '--image_size=32',
                  '--channels=1', '--image_format=png',
                  '--validation_fraction=0.2', '--test_fraction=0.1',
                  '--shard_size_mb=0.015'],
                 check=True, cwd=_ROOT)
  return data


def _train(data, model_dir, seed, workers: int) -> dict:
  args = [_PY, '-m', 'trainer.main', f'--data_dir={data}',
          f'--model_dir={model_dir}', '--model=small_cnn',
          f'--epochs={_EPOCHS.value}',
          f'--early_stopping_patience={_PATIENCE.value}', f'--seed={seed}',
          f'--batch_size={_BATCH.value}']
  start = time.perf_counter()
  if workers == 1:
    subprocess.run(args, check=True, cwd=_ROOT, capture_output=True)
  else:
    ports = [common.free_port() for _ in range(workers)]
    processes = []
    for index in range(workers):
      tf_config = json.dumps({
          'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
          'task': {'type': 'worker', 'index': index}})
      processes.append(subprocess.Popen(
          args + ['--distribution=multi_worker'], cwd=_ROOT,
          env=dict(os.environ, TF_CONFIG=tf_config),
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in processes:
      _, err = p.communicate()
      if p.returncode:
        raise RuntimeError(err[-3000:])
  seconds = time.perf_counter() - start
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  return {'test_accuracy': metrics['test_accuracy'],
          'best_epoch': metrics['best_epoch'],
          'epochs_run': metrics['epochs_run'], 'seconds': round(seconds, 1)}


def main(argv):
  del argv
  work = pathlib.Path(_WORK_DIR.value)
  work.mkdir(parents=True, exist_ok=True)
  data = _build(work)
  spec = json.loads((data / 'metadata.json').read_text())
  print(f'train shards: {len(spec["splits"]["train"]["shards"])}',
        flush=True)
  rows, results = [], []
  for seed in _SEEDS.value:
    for name, workers in (('single', 1), ('2_workers', 2)):
      model_dir = work / f'run_{name}_{seed}'
      subprocess.run(['rm', '-rf', str(model_dir)], check=True)
      r = _train(data, model_dir, int(seed), workers)
      r.update(seed=int(seed), variant=name)
      results.append(r)
      rows.append([seed, name, f'{r["test_accuracy"]:.4f}',
                   f'{r["best_epoch"]}/{r["epochs_run"]}', r['seconds']])
      print(rows[-1], flush=True)
  for name in ('single', '2_workers'):
    accuracies = [r['test_accuracy'] for r in results if r['variant'] == name]
    rows.append(['mean', name, f'{sum(accuracies) / len(accuracies):.4f}',
                 '', ''])
  common.report(['seed', 'variant', 'test accuracy', 'best/run epochs',
                 'wall s'], rows, results, _RESULTS.value)


if __name__ == '__main__':
  app.run(main)
