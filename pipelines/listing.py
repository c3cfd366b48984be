"""Lists a labelled image folder and decides its layout (runs in the launcher).

Two layouts are accepted (class index = position in sorted class names, the
same as `keras.utils.image_dataset_from_directory`):

  (a) class folders, split by the build's fractions:

      input_dir/
        cats/cat001.jpg, cat002.png, more/cat003.jpg   (sub-folders are read)
        dogs/dog001.jpg, ...

  (b) split folders kept as given (the course's cats_and_dogs_filtered):

      input_dir/
        train/cats/..., train/dogs/...
        validation/cats/..., validation/dogs/...      ('val' is accepted)
        test/cats/..., test/dogs/...                  (optional)

Hidden files and folders ('.DS_Store', '.git', '__MACOSX'), files whose
extension is not an image's, and files outside any class folder are not read,
but each is listed in `ignored` with a reason so the report accounts for it.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Optional

from pipelines import image_ops
from pipelines.errors import UserError

SPLIT_FOLDERS = {'train': 'train', 'validation': 'validation',
                 'val': 'validation', 'test': 'test'}
CLASS_FOLDERS_LAYOUT = 'class_folders'
SPLIT_FOLDERS_LAYOUT = 'split_folders'

IGNORED_HIDDEN = 'ignored_hidden'
IGNORED_NOT_IMAGE = 'ignored_not_image'
IGNORED_STRAY = 'ignored_outside_class_folder'


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One candidate image: path relative to input_dir ('/'-separated)."""
  relpath: str
  class_name: str
  given_split: Optional[str]  # Layout (b) only.


@dataclasses.dataclass(frozen=True)
class IgnoredFile:
  relpath: str
  outcome: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Listing:
  layout: str
  class_names: tuple[str, ...]
  files: tuple[SourceFile, ...]
  ignored: tuple[IgnoredFile, ...]


def is_hidden(name: str) -> bool:
  return name.startswith('.') or name == '__MACOSX'


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _walk(root: str) -> list[str]:
  """All file paths below root, relative to root, '/'-separated, sorted."""
  gfile = _gfile()
  out = []
  for dirpath, _, filenames in gfile.walk(root):
    rel_dir = posixpath.relpath(dirpath.replace('\\', '/'),
                                root.replace('\\', '/').rstrip('/') or '/')
    for name in filenames:
      out.append(name if rel_dir == '.' else posixpath.join(rel_dir, name))
  return sorted(out)


def _classify(relpath: str, input_dir_flag: str, layout: str,
              ) -> tuple[Optional[SourceFile], Optional[IgnoredFile]]:
  """Decides what one file is: a candidate image, or ignored with a reason."""
  parts = relpath.split('/')
  if any(is_hidden(p) for p in parts):
    return None, IgnoredFile(relpath, IGNORED_HIDDEN, 'hidden file or folder')
  depth = 2 if layout == SPLIT_FOLDERS_LAYOUT else 1
  if len(parts) <= depth:
    where = 'split folder' if depth == 2 and len(parts) == 2 else input_dir_flag
    return None, IgnoredFile(
        relpath, IGNORED_STRAY,
        f'not inside a class folder (stray file in {where})')
  extension = posixpath.splitext(parts[-1])[1]
  if extension.lower() not in image_ops.EXTENSION_FORMATS:
    return None, IgnoredFile(
        relpath, IGNORED_NOT_IMAGE,
        f'not an image file (extension {extension or "none"!r})')
  if layout == SPLIT_FOLDERS_LAYOUT:
    return SourceFile(relpath, parts[1], SPLIT_FOLDERS[parts[0]]), None
  return SourceFile(relpath, parts[0], None), None


def detect_layout(top_dirs: list[str], input_dir: str) -> str:
  """Class folders or split folders, from the visible top-level folders."""
  split_like = [d for d in top_dirs if d in SPLIT_FOLDERS]
  if not split_like:
    return CLASS_FOLDERS_LAYOUT
  if len(split_like) != len(top_dirs):
    other = sorted(set(top_dirs) - set(split_like))
    raise UserError(
        f'--input_dir={input_dir} mixes split folders {sorted(split_like)} '
        f'with other folders {other}; use either <class>/ folders or '
        'train/<class>/ (+ validation/, test/) folders, not both')
  if 'train' not in split_like:
    raise UserError(
        f'--input_dir={input_dir} has split folders {sorted(split_like)} but '
        'no train/; add train/<class>/ folders or pass the class folders')
  return SPLIT_FOLDERS_LAYOUT


def list_input(input_dir: str) -> Listing:
  """Lists input_dir; raises UserError for a folder that cannot be a dataset."""
  gfile = _gfile()
  if not gfile.exists(input_dir):
    raise UserError(f'--input_dir={input_dir} does not exist; pass a folder '
                    'with one sub-folder of images per class')
  if not gfile.isdir(input_dir):
    raise UserError(f'--input_dir={input_dir} is a file, not a folder; pass '
                    'a folder with one sub-folder of images per class')
  entries = gfile.listdir(input_dir)
  if not entries:
    raise UserError(f'--input_dir={input_dir} is empty; put one sub-folder '
                    'of images per class in it')
  top_dirs = sorted(e.rstrip('/') for e in entries
                    if not is_hidden(e) and
                    gfile.isdir(posixpath.join(input_dir, e.rstrip('/'))))
  if not top_dirs:
    raise UserError(f'--input_dir={input_dir} has no class folders; expected '
                    f'{input_dir}/<class_name>/<image files>')
  layout = detect_layout(top_dirs, input_dir)
  files, ignored = [], []
  for relpath in _walk(input_dir):
    source, ignore = _classify(relpath, f'--input_dir={input_dir}', layout)
    if source:
      files.append(source)
    else:
      ignored.append(ignore)
  if layout == SPLIT_FOLDERS_LAYOUT:
    class_names = tuple(sorted(
        {f.class_name for f in files} |
        {c for c in _class_dirs(input_dir, 'train')}))
  else:
    class_names = tuple(top_dirs)
  if len(class_names) < 2:
    found = f'one class folder ({class_names[0]!r})' if class_names else (
        'no class folders')
    raise UserError(
        f'--input_dir={input_dir} has {found}; a classifier needs at least '
        'two: add one sub-folder of images per class')
  if not files:
    raise UserError(f'--input_dir={input_dir} has class folders but no image '
                    'files (.jpg .jpeg .png .bmp .gif .webp) in them')
  return Listing(layout, class_names, tuple(files), tuple(ignored))


def _class_dirs(input_dir: str, split_dir: str) -> list[str]:
  gfile = _gfile()
  root = posixpath.join(input_dir, split_dir)
  return [e.rstrip('/') for e in gfile.listdir(root)
          if not is_hidden(e) and gfile.isdir(posixpath.join(root, e))]
