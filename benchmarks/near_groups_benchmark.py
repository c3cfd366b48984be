r"""The near-duplicate search's group step alone, in one process.

  python -m benchmarks.near_groups_benchmark --dataset=DATA [--distance=8]

Reads a built dataset's images.jsonl, makes the band step's buckets
(near_duplicates.bucket_bytes, as many as a build of that many files
makes), and times the group step over them: `bucket_slots` (entries
parsed, grouped, ranked and compared; each image's nearest partner per
slot) alone, then with those kept over the buckets (_Nearest: what the
group step adds to it). No Beam: what the group step costs a worker,
without the runner's per-element cost. DATA: e.g. a full build of
benchmarks.update_benchmark's folder.
"""

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
_VECTOR = flags.DEFINE_bool('vector', True,
                            'Let the scan use AVX-512 where the CPU has it.')


def _buckets(dataset: str, masks) -> list:
  refs = []
  with open(os.path.join(dataset, metadata.IMAGES_FILE), 'rb') as f:
    for i, raw in enumerate(f):
      line = json.loads(raw)
      if line['phash']:
        refs.append(nd.Ref((int(line['phash'], 16),
                            int(line['phash_centre'], 16)),
                           line['path'], line['split'], 0, i))
  return nd.bucket_bytes(refs, masks=masks,
                         buckets=nd.num_buckets(len(refs), masks),
                         layout=_LAYOUT.value)


def main(argv):
  del argv
  distance = _DISTANCE.value
  buckets = _buckets(_DATASET.value, nd.band_masks(distance))
  print(f'{len(buckets)} buckets, {sum(len(d) for _, d in buckets):,} bytes')

  def run(kept_too=False):
    start, filled = time.perf_counter(), 0
    nearest = nd._Nearest()  # pylint: disable=protected-access
    for _, data in buckets:
      found = nd.bucket_slots(data, distance=distance, vector=_VECTOR.value)
      filled += len(found.image)
      if kept_too:
        nearest.add(found)
    images = sum(1 for _ in nearest.records())
    return time.perf_counter() - start, filled, images

  seconds, filled, _ = run()
  print(f'bucket_slots, all buckets: {seconds:.2f} s, {filled} slots filled')
  seconds, _, images = run(kept_too=True)
  print(f'bucket_slots + slots kept, all buckets: {seconds:.2f} s, {images} '
        'images with a partner')


if __name__ == '__main__':
  app.run(main)
