r"""CleanVision as a peer: its duplicate sets against the build's findings.

  python -m benchmarks.cleanvision_compare \
      --cleanvision_python=/tmp/cvenv/bin/python \
      --markdown=benchmarks/results/cleanvision_compare.md

CleanVision (https://github.com/cleanlab/cleanvision) is not a dependency:
it runs in its own venv (--cleanvision_python) as a subprocess that writes
JSON, so this module never imports it.

The folder (pre-split, train/validation/test, 4 classes) is made of real
photos (scikit-image, scikit-learn) and regions of them
(benchmarks.near_duplicates.originals, LFW faces left out), with planted

  * copies of train images in validation/test (resize, JPEG q50-95, crop
    2-5%, brightness x0.8/x1.2; and byte-identical copies),
  * copies within one split, copies in another class,
  * blurry, dark, near-constant and tiny images (from originals used
    nowhere else).

Both tools run on the whole folder. For every CleanVision set (exact or
near) whose members span train and validation/test, each cross-split
member pair must be reported by the build: as a near pair
(near_duplicates.jsonl) or as an exact copy (rejected.jsonl / the
report's duplicates, leaks, conflicts), directly or through byte-identical
copies of one of its members.
"""

import datetime
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageFilter

from benchmarks import near_duplicates as nd_bench

_CLEANVISION_PYTHON = flags.DEFINE_string(
    'cleanvision_python', '/tmp/cvenv/bin/python',
    'A python that imports cleanvision (its own venv).')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'cleanvision_compare'),
    'Folder, outputs and JSON go here (replaced).')
_MARKDOWN = flags.DEFINE_string(
    'markdown', None, 'Also write the markdown table here.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of splits, classes, plants.')

CLASSES = ('alpha', 'beta', 'gamma', 'delta')
SPLITS = ('train', 'validation', 'test')
# Transforms of a planted copy (names from benchmarks.near_duplicates).
COPY_TRANSFORMS = ('resize 0.5x', 'resize 0.75x', 'resize 2x', 'JPEG q50',
                   'JPEG q70', 'JPEG q95', 'crop 2% each side',
                   'crop 5% each side', 'crop 3% + brightness x1.1',
                   'brightness x0.8', 'brightness x1.2',
                   'resize 0.75x + JPEG q60')

_CLEANVISION_SCRIPT = r'''
import json, sys, time
import cleanvision
from cleanvision import Imagelab
root, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
lab = Imagelab(data_path=root)
lab.find_issues()
elapsed = time.perf_counter() - start
issues = lab.issues
flags = {}
for col in issues.columns:
  if col.startswith('is_') and col.endswith('_issue'):
    name = col[3:-6]
    flags[name] = sorted(str(p) for p in issues.index[issues[col]])
json.dump({'version': cleanvision.__version__, 'seconds': elapsed,
           'exact_sets': lab.info['exact_duplicates']['sets'],
           'near_sets': lab.info['near_duplicates']['sets'],
           'flags': flags}, open(out, 'w'))
'''


def _save(image: Image.Image, path: pathlib.Path, *, quality=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if quality is not None:
    image.convert('RGB' if image.mode not in ('L', 'RGB') else image.mode
                  ).save(path, format='JPEG', quality=quality)
  else:
    image.save(path, format='PNG')


def make_folder(root: pathlib.Path, seed: int) -> dict:
  """Writes the folder; returns {'planted_pairs': [...], 'defects': {...}}."""
  shutil.rmtree(root, ignore_errors=True)
  rng = np.random.default_rng(seed)
  images = [(n, im) for n, im in nd_bench.originals()
            if not n.startswith('lfw_')]
  order = rng.permutation(len(images))
  images = [images[i] for i in order]
  defects_from, images = images[:8], images[8:]
  # Class by photo (a photo and its regions share a class).
  photo_names = sorted({n.split('[')[0] for n, _ in images})
  class_of = {p: CLASSES[i % len(CLASSES)]
              for i, p in enumerate(rng.permutation(photo_names))}
  placed = {}  # original name -> (relpath, split, class)
  for name, image in images:
    split = SPLITS[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
    cls = class_of[name.split('[')[0]]
    stem = name.replace('[', '_').replace(']', '')
    rel = f'{split}/{cls}/{stem}.png'
    _save(image, root / rel)
    placed[name] = (rel, split, cls, image)
  train = [n for n, v in placed.items() if v[1] == 'train']
  chosen = list(rng.permutation(train))
  planted = []

  def plant(kind, name, split, cls, transform):
    rel0, _, _, image = placed[name]
    stem = pathlib.Path(rel0).stem
    tname = transform.replace(' ', '_').replace('%', 'pc').replace('+', '')
    if transform == 'exact':
      rel = f'{split}/{cls}/{stem}__exact_{kind}.png'
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(root / rel0, root / rel)
    elif transform.startswith('JPEG q') and '+' not in transform:
      rel = f'{split}/{cls}/{stem}__{tname}_{kind}.jpg'
      _save(image, root / rel, quality=int(transform.split('q')[1]))
    else:
      rel = f'{split}/{cls}/{stem}__{tname}_{kind}.png'
      _save(nd_bench.TRANSFORMS[transform](image), root / rel)
    planted.append({'kind': kind, 'transform': transform,
                    'original': rel0, 'copy': rel})

  i = 0
  # Cross-split: a transformed copy of a train image in validation or test.
  for t in COPY_TRANSFORMS * 2:
    name = chosen[i]
    i += 1
    plant('cross_split', name, SPLITS[1 + i % 2], placed[name][2], t)
  for _ in range(4):  # byte-identical cross-split copies (exact leaks)
    name = chosen[i]
    i += 1
    plant('cross_split', name, SPLITS[1 + i % 2], placed[name][2], 'exact')
  # Within train, same class.
  for t in COPY_TRANSFORMS[:8]:
    name = chosen[i]
    i += 1
    plant('within_split', name, 'train', placed[name][2], t)
  # Another class: in train (label conflict) and in validation (leak too).
  for k, t in enumerate(('resize 0.75x', 'JPEG q70', 'crop 2% each side',
                         'brightness x1.2', 'JPEG q95', 'exact')):
    name = chosen[i]
    i += 1
    other = CLASSES[(CLASSES.index(placed[name][2]) + 1) % len(CLASSES)]
    plant('across_class' if k < 3 else 'across_class_cross_split', name,
          'train' if k < 3 else 'validation', other, t)
  # Defects (from originals used nowhere else), in train.
  defects = {}

  def defect(flag, image, stem):
    rel = f'train/{CLASSES[len(defects) % len(CLASSES)]}/defect_{flag}_{stem}.png'
    _save(image, root / rel)
    defects[rel] = flag

  for k, (name, image) in enumerate(defects_from):
    stem = name.replace('[', '_').replace(']', '')
    rgb = image.convert('RGB')
    if k < 2:
      radius = max(3, round(3 * max(rgb.size) / 512))
      defect('blurry', rgb.filter(ImageFilter.GaussianBlur(radius)), stem)
    elif k < 4:
      dark = np.round(np.asarray(rgb, np.float32) * 0.15).astype(np.uint8)
      defect('dark', Image.fromarray(dark), stem)
    elif k < 6:
      defect('tiny', rgb.resize((24, 24), Image.Resampling.BILINEAR), stem)
    else:
      level = 60 if k == 6 else 190
      flat = rng.integers(level - 2, level + 3, size=(128, 128, 3))
      defect('low_information', Image.fromarray(flat.astype(np.uint8)), stem)
  return {'planted_pairs': planted, 'defects': defects,
          'files': sum(1 for p in root.rglob('*') if p.is_file())}


def run_cleanvision(root: pathlib.Path, out: pathlib.Path) -> dict:
  start = time.perf_counter()
  proc = subprocess.run(
      [_CLEANVISION_PYTHON.value, '-c', _CLEANVISION_SCRIPT, str(root),
       str(out)], capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.exit(f'cleanvision failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  result = json.loads(out.read_text())
  result['wall_s'] = time.perf_counter() - start
  rel = lambda p: os.path.relpath(p, root)
  for key in ('exact_sets', 'near_sets'):
    result[key] = [sorted(rel(p) for p in s) for s in result[key]]
  result['flags'] = {k: [rel(p) for p in v] for k, v in result['flags'].items()}
  return result


def run_build(root: pathlib.Path, out: pathlib.Path) -> dict:
  from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  report = builder.build(input_dir=str(root), output_dir=str(out),
                         image_size='64', quiet=True)
  wall = time.perf_counter() - start
  read = lambda name: [json.loads(line) for line in
                       (out / name).read_text().splitlines() if line.strip()]
  near = read('near_duplicates.jsonl')
  rejected = read('rejected.jsonl')
  images = read('images.jsonl') if (out / 'images.jsonl').exists() else []
  exact_groups = []
  for key in ('duplicates', 'leaks', 'conflicts'):
    for f in report.get(key, []):
      members = list(f.get('paths') or []) + (
          [f['kept']] if f.get('kept') else []) + list(f.get('dropped') or [])
      exact_groups.append(sorted(set(members)))
  return {'wall_s': wall, 'elapsed_s': report.get('elapsed_s'),
          'near': near, 'rejected': rejected, 'images': images,
          'exact_groups': exact_groups, 'counts': report['counts'],
          'near_counts': report['near_duplicates'],
          'quality_flags': report.get('quality_flags', {})}


class _Reported:
  """Pairs the build reports; exact copies close them (same bytes)."""

  def __init__(self, build: dict):
    self.parent = {}
    for group in build['exact_groups']:
      for p in group[1:]:
        self._union(group[0], p)
    self.direct = {}
    for pair in build['near']:
      self.direct[frozenset(pair['paths'])] = ('near', pair['distance'])
    for line in build['rejected']:
      if line.get('near'):
        self.direct.setdefault(frozenset((line['path'], line['near'])),
                               ('near', line.get('distance')))
    for group in build['exact_groups']:
      for a, b in itertools.combinations(group, 2):
        self.direct[frozenset((a, b))] = ('exact', 0)
    self.closed = {}
    for pair, how in self.direct.items():
      a, b = tuple(pair) if len(pair) == 2 else (next(iter(pair)),) * 2
      self.closed.setdefault(frozenset((self._find(a), self._find(b))), how)

  def _find(self, p):
    while self.parent.get(p, p) != p:
      p = self.parent[p]
    return p

  def _union(self, a, b):
    self.parent[self._find(b)] = self._find(a)

  def get(self, a: str, b: str):
    """(how, distance, 'direct' | 'via exact copy') or None."""
    if frozenset((a, b)) in self.direct:
      return (*self.direct[frozenset((a, b))], 'direct')
    key = frozenset((self._find(a), self._find(b)))
    if len(key) == 1:
      return ('exact', 0, 'via exact copy')
    if key in self.closed:
      return (*self.closed[key], 'via exact copy')
    return None


def _split(rel: str) -> str:
  return rel.split('/', 1)[0]


def compare(folder: dict, cv: dict, build: dict) -> dict:
  reported = _Reported(build)
  cv_sets = [('exact', s) for s in cv['exact_sets']] + [
      ('near', s) for s in cv['near_sets']]
  cross = []
  for kind, s in cv_sets:
    pairs = [(a, b) for a, b in itertools.combinations(s, 2)
             if (_split(a) == 'train') != (_split(b) == 'train')]
    if pairs:
      missing = [p for p in pairs if reported.get(*p) is None]
      cross.append({'kind': kind, 'set': s, 'pairs': len(pairs),
                    'missing': missing})
  cv_pairs = {frozenset(p) for _, s in cv_sets
              for p in itertools.combinations(s, 2)}
  ours_only = [(sorted(k), v) for k, v in reported.direct.items()
               if k not in cv_pairs and len(k) == 2]
  in_cv = lambda a, b: frozenset((a, b)) in cv_pairs
  planted = []
  for p in folder['planted_pairs']:
    planted.append({**p, 'cleanvision': in_cv(p['original'], p['copy']),
                    'ours': reported.get(p['original'], p['copy'])})
  # Our flags per file (images.jsonl), to set against CleanVision's.
  our_flags = {}
  for line in build['images']:
    for flag in line.get('flags') or []:
      our_flags.setdefault(flag, []).append(line.get('path'))
  return {'cross': cross, 'ours_only': ours_only, 'planted': planted,
          'our_flags': our_flags}


def _machine() -> str:
  return nd_bench._machine()  # pylint: disable=protected-access


def markdown(folder, cv, build, result, command) -> str:
  cross = result['cross']
  ours_sets = len(build['near']) + len(build['exact_groups'])
  complete = sum(1 for c in cross if not c['missing'])
  lines = [
      '# CleanVision vs the build: duplicates and quality flags', '',
      f'Date: {datetime.date.today().isoformat()}. Machine: {_machine()}.',
      f'Command: `{command}`. CleanVision {cv["version"]} (own venv, '
      'default `Imagelab(data_path=...).find_issues()`: exact = md5, near = '
      'equal 64-bit pHash); the build: `builder.build(image_size=\'64\')`, '
      f'default `--near_duplicate_distance={build["near_counts"]["distance"]}`.',
      f'Folder: {folder["files"]} files, pre-split train/validation/test, '
      f'{len(CLASSES)} classes, real photos and regions of them; '
      f'{len(folder["planted_pairs"])} planted copies, '
      f'{len(folder["defects"])} planted defects.', '',
      '| | CleanVision | the build |', '|---|---|---|',
      f'| duplicate sets found (exact / near) | {len(cv["exact_sets"])} / '
      f'{len(cv["near_sets"])} | {len(build["exact_groups"])} exact groups / '
      f'{len(build["near"])} near pairs (sets: {ours_sets}) |',
      f'| cross-split sets (train vs validation/test) | {len(cross)} | '
      f'{complete} of CleanVision\'s {len(cross)} with every cross-split '
      'member pair reported |',
      f'| pairs reported that CleanVision does not | — | '
      f'{len(result["ours_only"])} |',
  ]
  by_kind = {}
  for p in result['planted']:
    k = by_kind.setdefault(p['kind'], [0, 0, 0])
    k[0] += 1
    k[1] += p['cleanvision']
    k[2] += p['ours'] is not None
  for kind, (n, c, o) in by_kind.items():
    lines.append(f'| planted {kind} pairs found (of {n}) | {c} | {o} |')
  total = len(result['planted'])
  lines.append(
      f'| planted pairs found, all (of {total}) | '
      f'{sum(p["cleanvision"] for p in result["planted"])} | '
      f'{sum(p["ours"] is not None for p in result["planted"])} |')
  lines.append(f'| run time, s (whole call, incl. imports) | '
               f'{cv["seconds"]:.1f} ({cv["wall_s"]:.1f}) | '
               f'{build["elapsed_s"] or 0:.1f} Beam run ({build["wall_s"]:.1f}) |')
  lines += ['', '## Cross-split sets CleanVision found that the build misses',
            '']
  missed = [c for c in cross if c['missing']]
  lines += [f'- {c["kind"]}: {c["set"]}: missing {c["missing"]}'
            for c in missed] or ['None.']
  lines += ['', '## Pairs the build reports that CleanVision does not', '',
            '| pair | how | distance |', '|---|---|---|']
  lines += [f'| {" / ".join(k)} | {v[0]} | {v[1]} |'
            for k, v in sorted(result['ours_only'])]
  lines += ['', '## Planted pairs', '',
            '| kind | transform | copy | CleanVision | the build |',
            '|---|---|---|---|---|']
  for p in result['planted']:
    ours = (f'{p["ours"][0]} d={p["ours"][1]} ({p["ours"][2]})'
            if p['ours'] else 'no')
    lines.append(f'| {p["kind"]} | {p["transform"]} | {p["copy"]} | '
                 f'{"yes" if p["cleanvision"] else "no"} | {ours} |')
  lines += ['', '## Quality findings (reference)', '',
            '| planted defect | file | CleanVision flags | build flags |',
            '|---|---|---|---|']
  cv_by_file, ours_by_file = {}, {}
  for flag, files in cv['flags'].items():
    if flag in ('exact_duplicates', 'near_duplicates'):
      continue
    for f in files:
      cv_by_file.setdefault(f, []).append(flag)
  for flag, files in result['our_flags'].items():
    for f in files:
      ours_by_file.setdefault(f, []).append(flag)
  for rel, flag in sorted(folder['defects'].items()):
    lines.append(f'| {flag} | {rel} | {", ".join(sorted(cv_by_file.get(rel, []))) or "-"}'
                 f' | {", ".join(sorted(ours_by_file.get(rel, []))) or "-"} |')
  lines += ['', 'Flag counts over the whole folder:', '',
            '| flag | CleanVision | the build |', '|---|---|---|']
  names = sorted({*cv['flags'], *result['our_flags']} -
                 {'exact_duplicates', 'near_duplicates'})
  for n in names:
    lines.append(f'| {n} | {len(cv["flags"].get(n, [])) if n in cv["flags"] else "—"} | '
                 f'{len(result["our_flags"].get(n, [])) if n in result["our_flags"] else "—"} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  work = pathlib.Path(_WORK_DIR.value)
  root = work / 'photos'
  folder = make_folder(root, _SEED.value)
  cv = run_cleanvision(root, work / 'cleanvision.json')
  build = run_build(root, work / 'built')
  result = compare(folder, cv, build)
  command = 'python -m benchmarks.cleanvision_compare ' + ' '.join(
      a for a in sys.argv[1:] if not a.startswith('--markdown'))
  text = markdown(folder, cv, build, result, command.strip())
  (work / 'result.json').write_text(json.dumps(
      {'folder': folder, 'cleanvision': cv, 'compare': result,
       'build_counts': build['counts'], 'near_counts': build['near_counts']},
      default=str, indent=1))
  print(text)
  if _MARKDOWN.value:
    pathlib.Path(_MARKDOWN.value).write_text(text)


if __name__ == '__main__':
  app.run(main)
