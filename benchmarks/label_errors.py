r"""Suspect labels on planted label errors: recall and precision.

    python -m benchmarks.label_errors --planted=40,90 --seeds=0,1 \
        --output=benchmarks/results/label_errors.md

scikit-learn's 1,797 handwritten digits are exported one folder per class;
`planted` of them (chosen with the seed) are moved into a wrong class
folder; the folder is built (32x32 grey, 20% validation, 10% test) and
small_cnn trained for --epochs. The run's suspect_labels.json (confident
learning on the validation and test images) is then compared with the
planted files that landed in those splits: recall = planted files listed /
planted files evaluated; precision = planted files listed / files listed.
The planted files that were left out of evaluation (near-duplicates of
training images: 8x8 digits are alike) are not counted.
"""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_PLANTED = flags.DEFINE_list('planted', ['40', '90'], 'Label errors to plant.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of the planting.')
_EPOCHS = flags.DEFINE_integer('epochs', 6, 'Training epochs.')
_OUTPUT = flags.DEFINE_string('output', None, 'Markdown file to write.')


def run_once(root: pathlib.Path, planted_count: int, seed: int,
             epochs: int) -> dict:
  from pipelines import sample_data  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top
  from trainer import train_lib  # pylint: disable=g-import-not-at-top
  sample_data.export_digits(str(root / 'digits'))
  rng = np.random.default_rng(seed)
  files = sorted((root / 'digits').rglob('*.png'))
  planted = set()
  for i in rng.choice(len(files), size=planted_count, replace=False):
    wrong = str((int(files[i].parent.name) + rng.integers(1, 10)) % 10)
    files[i].rename(root / 'digits' / wrong / files[i].name)
    planted.add(f'{wrong}/{files[i].name}')
  builder.build(input_dir=str(root / 'digits'), output_dir=str(root / 'data'),
                image_size='32', channels=1, image_format='png',
                validation_fraction=0.2, test_fraction=0.1, quiet=True,
                samples=False)
  start = time.perf_counter()
  metrics = train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=str(root / 'data'), model_dir=str(root / 'run'),
      epochs=epochs, early_stopping_patience=0, seed=seed))
  seconds = time.perf_counter() - start
  with open(root / 'run' / 'predictions.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  evaluated = {r['file'] for r in rows}
  suspects = {e['file'] for e in json.loads(
      (root / 'run' / 'suspect_labels.json').read_text())['files']}
  held_out = planted & evaluated
  found = suspects & held_out
  wrong = {r['file'] for r in rows if r['correct'] == 'false'}
  return {
      'planted': planted_count, 'seed': seed, 'evaluated': len(rows),
      'planted_evaluated': len(held_out), 'suspects': len(suspects),
      'found': len(found), 'wrong': len(wrong),
      'recall': len(found) / len(held_out) if held_out else float('nan'),
      'precision': len(found) / len(suspects) if suspects else float('nan'),
      'clean_accuracy': float(np.mean([r['correct'] == 'true' for r in rows
                                       if r['file'] not in planted])),
      'train_s': seconds, 'test_accuracy': metrics.get('test_accuracy'),
  }


def main(argv):
  del argv
  results = []
  for planted in (int(p) for p in _PLANTED.value):
    for seed in (int(s) for s in _SEEDS.value):
      root = pathlib.Path(tempfile.mkdtemp(prefix='label_errors_'))
      try:
        results.append(run_once(root, planted, seed, _EPOCHS.value))
      finally:
        shutil.rmtree(root, ignore_errors=True)
      print(results[-1], file=sys.stderr, flush=True)
  lines = [
      '| planted (of 1,797) | seed | evaluated images | planted among them '
      '| listed as suspect | planted found | recall | precision | wrong '
      'predictions | accuracy on clean images |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f'| {r["planted"]} | {r["seed"]} | {r["evaluated"]} | '
        f'{r["planted_evaluated"]} | {r["suspects"]} | {r["found"]} | '
        f'{r["recall"]:.2f} | {r["precision"]:.2f} | {r["wrong"]} | '
        f'{r["clean_accuracy"]:.3f} |')
  total_found = sum(r['found'] for r in results)
  total_planted = sum(r['planted_evaluated'] for r in results)
  total_listed = sum(r['suspects'] for r in results)
  lines.append('')
  lines.append(f'All runs: recall {total_found}/{total_planted} = '
               f'{total_found / max(1, total_planted):.2f}, precision '
               f'{total_found}/{total_listed} = '
               f'{total_found / max(1, total_listed):.2f} (small_cnn, '
               f'{_EPOCHS.value} epochs).')
  text = '\n'.join(lines) + '\n'
  print(text)
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).write_text(text)


if __name__ == '__main__':
  app.run(main)
