r"""The near-duplicate search's group step alone, in one process.

  python -m benchmarks.near_groups_benchmark --dataset=DATA [--distance=8]

Reads a built dataset's images.jsonl, makes the band groups the build's
shuffle would make (near_duplicates.band_keys), and times, over groups from
the largest down: `_group` (members unpacked and ranked, each image's
nearest partner per slot over the candidates) for the 40 largest and the
next 200, then over every group, alone and with those kept over the groups
(_Nearest: what the group step adds to `_group`). No
Beam: what the group step costs a worker, without the runner's per-element
cost. DATA: e.g. a full build of benchmarks.update_benchmark's folder.
"""

import collections
import json
import os
import time

from absl import app
from absl import flags

from pipelines.folder_to_records import near_duplicates as nd
from tfrecords_schema import metadata

_DATASET = flags.DEFINE_string('dataset', None, 'A built dataset folder.',
                               required=True)
_DISTANCE = flags.DEFINE_integer('distance', nd.DEFAULT_DISTANCE,
                                 'The --near_duplicate_distance to time.')
_LAYOUT = flags.DEFINE_string('layout', 'class_folders',
                              'The input folder layout (for class names).')


def _groups(dataset: str, masks) -> dict:
  groups = collections.defaultdict(list)
  with open(os.path.join(dataset, metadata.IMAGES_FILE), 'rb') as f:
    for i, raw in enumerate(f):
      line = json.loads(raw)
      if not line['phash']:
        continue
      ref = nd.Ref((int(line['phash'], 16), int(line['phash_centre'], 16)),
                   line['path'], line['split'], 0, i)
      for key, value in nd.band_keys(ref, masks=masks):
        groups[key].append(value)
  return groups


def main(argv):
  del argv
  distance = _DISTANCE.value
  masks = nd.band_masks(distance)
  groups = _groups(_DATASET.value, masks)
  keys = sorted(groups, key=lambda k: (-len(groups[k]), k))
  print(f'{len(keys)} band groups, {sum(map(len, groups.values()))} entries; '
        f'largest {[len(groups[k]) for k in keys[:3]]}')

  def run(chosen, slots_too=False):
    start, filled = time.perf_counter(), 0
    nearest = nd._Nearest()  # pylint: disable=protected-access
    class_of = nd._Classes(_LAYOUT.value)  # pylint: disable=protected-access
    for key in chosen:
      members, found, _ = nd._group(  # pylint: disable=protected-access
          (key, groups[key]), distance=distance, cap=nd.MAX_GROUP,
          class_of=class_of)
      filled += len(found[0])
      if slots_too:
        nearest.add(members, *found)
    images = sum(1 for _ in nearest.items())
    return time.perf_counter() - start, filled, images

  for name, chosen in (('40 largest groups', keys[:40]),
                       ('next 200 groups', keys[40:240])):
    seconds, filled, _ = run(chosen)
    print(f'_group, {name}: {seconds:.2f} s, {filled} slots filled')
  seconds, filled, images = run(keys)
  print(f'_group, all groups: {seconds:.2f} s, {filled} slots filled')
  seconds, filled, images = run(keys, slots_too=True)
  print(f'_group + slots kept, all groups: {seconds:.2f} s, {images} images '
        'with a partner')


if __name__ == '__main__':
  app.run(main)
