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

Hostile trees: split folders are recognised in any case ('Train/'); a file
whose name is not valid UTF-8 is listed with its name escaped
('cat/\\xff.jpg') and rejected (TFRecords and TFDS need text names); a
class folder with such a name, or one a TFDS label file cannot hold (line
breaks, control characters, surrounding spaces), or two class names that
differ only in case, stop the build with an error. Links to files are read
as their targets. A link to a folder is followed when it leads outside
--input_dir to a folder not read yet; a link into --input_dir, to one of its
parents, or to a folder already read is not followed (it would read images
twice, possibly under another label, or loop forever) and is reported.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import unicodedata
from typing import Optional, Sequence

from pipelines.preprocessing import source_image
from pipelines.common.errors import UserError

SPLIT_FOLDERS = {'train': 'train', 'validation': 'validation',
                 'val': 'validation', 'test': 'test'}
CLASS_FOLDERS_LAYOUT = 'class_folders'
SPLIT_FOLDERS_LAYOUT = 'split_folders'

IGNORED_HIDDEN = 'ignored_hidden'
IGNORED_NOT_IMAGE = 'ignored_not_image'
IGNORED_STRAY = 'ignored_outside_class_folder'
IGNORED_LINK = 'ignored_folder_link'
BAD_NAME = 'rejected_bad_file_name'
UNLISTABLE = 'rejected_unreadable_folder'


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


def escaped(name: str) -> str:
  """A name as text: bytes that are not UTF-8 become \\xNN escapes."""
  return os.fsencode(name).decode('utf-8', 'backslashreplace')


def is_text(name: str) -> bool:
  """False for names with bytes that are not UTF-8 (surrogate escapes)."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return False
  return True


def _listdir(path: str) -> list[str]:
  """Entry names of a folder (local: byte-safe, never a UnicodeDecodeError)."""
  if '://' in path:
    return [e.rstrip('/') for e in _gfile().listdir(path)]
  return os.listdir(path)


def _isdir(path: str) -> bool:
  return _gfile().isdir(path) if '://' in path else os.path.isdir(path)


def _is_within(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _walk_local(root: str, exclude: Sequence[str] = (),
                ) -> tuple[list[str], list[IgnoredFile]]:
  """Files below a local root ('/'-separated relative paths) + unread links.

  os.scandir with str paths never fails on undecodable names (they come back
  with surrogate escapes). Folders are tracked by (device, inode), so no
  folder is read twice and no link can loop.
  """
  root_real = os.path.realpath(root)
  files, ignored = [], []
  seen_dirs = set()
  stack = [(root, '')]
  while stack:
    path, rel = stack.pop()
    try:
      info = os.stat(path)
      seen_dirs.add((info.st_dev, info.st_ino))
      with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      ignored.append(IgnoredFile(escaped(rel or '.'), UNLISTABLE,
                                 f'cannot list this folder ({e.strerror})'))
      continue
    subdirs = []
    for entry in entries:
      relpath = posixpath.join(rel, entry.name) if rel else entry.name
      try:
        is_dir = entry.is_dir()  # Follows links.
      except OSError:
        is_dir = False
      if not is_dir:
        files.append(relpath)  # Broken links too: rejected when read.
        continue
      if entry.is_symlink():
        try:
          target = os.stat(entry.path)
        except OSError:
          files.append(relpath)
          continue
        real = os.path.realpath(entry.path)
        if any(_is_within(real, os.path.realpath(e)) for e in exclude):
          ignored.append(IgnoredFile(
              escaped(relpath), IGNORED_LINK,
              f'link to {escaped(real)}, the --output_dir of this build: '
              'not followed'))
          continue
        if ((target.st_dev, target.st_ino) in seen_dirs or
            _is_within(real, root_real) or _is_within(root_real, real)):
          ignored.append(IgnoredFile(
              escaped(relpath), IGNORED_LINK,
              f'link to the folder {escaped(real)}, which is inside '
              '--input_dir, one of its parents or already read: not '
              'followed (its images would be read twice or loop)'))
          continue
        seen_dirs.add((target.st_dev, target.st_ino))
      subdirs.append((entry.path, relpath))
    stack.extend(reversed(subdirs))
  return files, ignored


def _walk(root: str, exclude: Sequence[str] = (),
          ) -> tuple[list[str], list[IgnoredFile]]:
  """All file paths below root, relative to root, '/'-separated, sorted."""
  if '://' not in root:
    files, ignored = _walk_local(root, exclude)
    return sorted(files), ignored
  gfile = _gfile()
  out = []
  for dirpath, _, filenames in gfile.walk(root):
    rel_dir = posixpath.relpath(dirpath.replace('\\', '/'),
                                root.replace('\\', '/').rstrip('/') or '/')
    for name in filenames:
      out.append(name if rel_dir == '.' else posixpath.join(rel_dir, name))
  return sorted(out), []


def check_class_name(name: str, where: str) -> None:
  """Refuses a class folder name that cannot be a TFDS label."""
  problem = None
  if not is_text(name):
    problem = 'is not valid UTF-8'
  elif any(unicodedata.category(c).startswith('C') for c in name):
    problem = 'holds a line break or another control character'
  elif name != name.strip():
    problem = 'starts or ends with white space'
  if problem:
    shown = repr(name) if is_text(name) else f"'{escaped(name)}'"
    raise UserError(
        f'class folder {shown} in {where} {problem}, which a label file '
        'cannot hold; rename the folder (class names become labels)')


def _classify(relpath: str, input_dir_flag: str, layout: str,
              ) -> tuple[Optional[SourceFile], Optional[IgnoredFile]]:
  """Decides what one file is: a candidate image, or ignored with a reason."""
  parts = relpath.split('/')
  if not is_text(relpath):
    return None, IgnoredFile(
        escaped(relpath), BAD_NAME,
        'file name is not valid UTF-8 (shown with \\x escapes); rename it')
  if any(is_hidden(p) for p in parts):
    return None, IgnoredFile(relpath, IGNORED_HIDDEN, 'hidden file or folder')
  depth = 2 if layout == SPLIT_FOLDERS_LAYOUT else 1
  if len(parts) <= depth:
    where = 'split folder' if depth == 2 and len(parts) == 2 else input_dir_flag
    return None, IgnoredFile(
        relpath, IGNORED_STRAY,
        f'not inside a class folder (stray file in {where})')
  extension = posixpath.splitext(parts[-1])[1]
  if extension.lower() not in source_image.EXTENSION_FORMATS:
    return None, IgnoredFile(
        relpath, IGNORED_NOT_IMAGE,
        f'not an image file (extension {extension or "none"!r})')
  if layout == SPLIT_FOLDERS_LAYOUT:
    return SourceFile(relpath, parts[1], SPLIT_FOLDERS[parts[0].lower()]), None
  return SourceFile(relpath, parts[0], None), None


def detect_layout(top_dirs: list[str], input_dir: str) -> str:
  """Class folders or split folders, from the visible top-level folders.

  Split folders are recognised in any case ('Train', 'VAL'), so they can
  never become classes named 'Test' and 'Train'.
  """
  split_like = [d for d in top_dirs if d.lower() in SPLIT_FOLDERS]
  if not split_like:
    return CLASS_FOLDERS_LAYOUT
  if len(split_like) != len(top_dirs):
    other = sorted(set(top_dirs) - set(split_like))
    raise UserError(
        f'--input_dir={input_dir} mixes split folders {sorted(split_like)} '
        f'with other folders {other}; use either <class>/ folders or '
        'train/<class>/ (+ validation/, test/) folders, not both')
  by_split = {}
  for folder in split_like:
    by_split.setdefault(SPLIT_FOLDERS[folder.lower()], []).append(folder)
  for split, folders in by_split.items():
    if len(folders) > 1:
      raise UserError(
          f'--input_dir={input_dir} has several {split} folders '
          f'{sorted(folders)}; merge them into one')
  if 'train' not in by_split:
    raise UserError(
        f'--input_dir={input_dir} has split folders {sorted(split_like)} but '
        'no train/; add train/<class>/ folders or pass the class folders')
  return SPLIT_FOLDERS_LAYOUT


def _check_class_names(class_names, input_dir: str) -> None:
  folded = {}
  for name in class_names:
    check_class_name(name, input_dir)
    folded.setdefault(name.casefold(), []).append(name)
  for names in folded.values():
    if len(names) > 1:
      raise UserError(
          f'--input_dir={input_dir} has class folders {sorted(names)} that '
          'differ only in case: one class or two? rename or merge them')


def list_input(input_dir: str, *, exclude: Sequence[str] = ()) -> Listing:
  """Lists input_dir; raises UserError for a folder that cannot be a dataset.

  Linked folders inside `exclude` (the build's own output) are not read.
  """
  gfile = _gfile()
  if not gfile.exists(input_dir):
    raise UserError(f'--input_dir={input_dir} does not exist; pass a folder '
                    'with one sub-folder of images per class')
  if not gfile.isdir(input_dir):
    raise UserError(f'--input_dir={input_dir} is a file, not a folder; pass '
                    'a folder with one sub-folder of images per class')
  entries = _listdir(input_dir)
  if not entries:
    raise UserError(f'--input_dir={input_dir} is empty; put one sub-folder '
                    'of images per class in it')
  top_dirs = sorted(e for e in entries if not is_hidden(e) and
                    _isdir(posixpath.join(input_dir, e)))
  if not top_dirs:
    raise UserError(f'--input_dir={input_dir} has no class folders; expected '
                    f'{input_dir}/<class_name>/<image files>')
  layout = detect_layout(top_dirs, input_dir)
  if layout == CLASS_FOLDERS_LAYOUT:
    _check_class_names(top_dirs, input_dir)
  files = []
  walked, ignored = _walk(input_dir, exclude)
  for relpath in walked:
    source, ignore = _classify(relpath, f'--input_dir={input_dir}', layout)
    if source:
      files.append(source)
    else:
      ignored.append(ignore)
  if layout == SPLIT_FOLDERS_LAYOUT:
    train_dir = next(d for d in top_dirs if d.lower() == 'train')
    class_names = tuple(sorted(
        {f.class_name for f in files} |
        {c for c in _class_dirs(input_dir, train_dir)}))
    _check_class_names(class_names, input_dir)
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
  root = posixpath.join(input_dir, split_dir)
  return [e for e in _listdir(root)
          if not is_hidden(e) and _isdir(posixpath.join(root, e))]
