r"""Exports real labelled images bundled with scikit-learn/scikit-image to folders.

  python -m pipelines.sample_data --dataset=digits --output_dir=/tmp/digits

digits: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), one
        folder per digit 0-9, as 8-bit PNGs.
faces:  scikit-image's LFW subset, 100 faces and 100 non-faces (25x25 grey).

Nothing is downloaded: both ship inside the packages (the `demo` extra).
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

DATASETS = ('digits', 'faces')


def _save_all(images: np.ndarray, labels, class_names, output_dir: str,
              prefix: str) -> int:
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(output_dir, class_names[label])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image, 'L').save(
        os.path.join(folder, f'{prefix}_{i:04d}.png'))
  return len(images)


def export_digits(output_dir: str) -> int:
  """Writes scikit-learn's digits as output_dir/<0-9>/digit_NNNN.png."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # 0..16 grey levels -> 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return _save_all(images, digits.target, [str(d) for d in range(10)],
                   output_dir, 'digit')


def export_faces(output_dir: str) -> int:
  """Writes scikit-image's LFW subset as output_dir/{face,non_face}/*.png."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  images = np.round(data.lfw_subset() * 255.0).astype(np.uint8)
  labels = [0] * 100 + [1] * 100  # The subset lists 100 faces, then 100 not.
  return _save_all(images, labels, ['face', 'non_face'], output_dir, 'lfw')


_DATASET = flags.DEFINE_enum('dataset', 'digits', DATASETS, 'Which images.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Folder to create.')


def main(argv):
  del argv
  if not _OUTPUT_DIR.value:
    sys.exit('error: --output_dir is required, e.g. --output_dir=/tmp/digits')
  if os.path.isdir(_OUTPUT_DIR.value) and os.listdir(_OUTPUT_DIR.value):
    sys.exit(f'error: --output_dir={_OUTPUT_DIR.value} is not empty; choose '
             'a new folder')
  export = export_digits if _DATASET.value == 'digits' else export_faces
  count = export(_OUTPUT_DIR.value)
  print(f'wrote {count} {_DATASET.value} images to {_OUTPUT_DIR.value}')


if __name__ == '__main__':
  app.run(main)
