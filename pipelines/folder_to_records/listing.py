"""Lists a labelled image folder: layout and classes in the launcher, files in workers.

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

In layout (b) every split folder must hold the classes of train/: a class
with no train/<class>/ folder is refused (the model could not learn it), and
one missing from validation/ or test/ too, unless the caller allows it
(`allow_missing_eval_classes`); the error names each split's missing
classes, where they are, and the likely typo ('validation/dog' for
'train/dogs').

Hostile trees: split folders are recognised in any case ('Train/'); a file
whose name is not valid UTF-8 is listed with its name escaped
('cat/\\xff.jpg') and rejected (TFRecords and TFDS need text names). These
stop the build with an error: a class folder with such a name, one a TFDS
label file cannot hold (line breaks, control characters, surrounding
spaces) or that holds an invisible character (U+200B, bidi controls: they
make two labels print alike), and two class or split folders whose names a
person cannot tell apart (`look_alike_key`: case, NFC/NFD accents,
full-width letters, ligatures). Links to files are read
as their targets. A link to a folder is followed when it leads outside
--input_dir to a folder not read yet; a link into --input_dir, to one of its
parents, or to a folder already read is not followed (it would read images
twice, possibly under another label, or loop forever) and is reported.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import posixpath
import re
import unicodedata
from typing import Iterator, Optional, Sequence, Union

from pipelines.preprocessing import source_image
from pipelines.common import paths
from pipelines.common import run_files
from pipelines.common import walk
from pipelines.common.errors import UserError
from tfrecords_schema import metadata as metadata_lib

SPLIT_FOLDERS = {'train': 'train', 'validation': 'validation',
                 'val': 'validation', 'test': 'test'}
CLASS_FOLDERS_LAYOUT = 'class_folders'
SPLIT_FOLDERS_LAYOUT = 'split_folders'

# The build flag that lets a class be absent from validation/ or test/.
ALLOW_MISSING_EVAL_CLASSES_FLAG = '--allow_missing_eval_classes'

# Line boundaries of str.splitlines: a label file would cut the name.
_LINE_BREAKS = frozenset('\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029')
# Default_Ignorable_Code_Point characters outside category C (Unicode's
# DerivedCoreProperties.txt): a joiner and fillers that render as nothing.
# Those in category C (Cf: U+200B, U+200D, U+FEFF, bidi controls, ...) are
# refused with the rest of that category.
_INVISIBLE = frozenset('\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0')
# Variation selectors choose a glyph variant (emoji, CJK, Mongolian): allowed
# in a name, but ignored when two names are compared.
_VARIATION_SELECTORS = re.compile(
    '[\u180b-\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]')
# Missing classes named per split in an error line; the rest are counted.
_MAX_NAMED = 5

IGNORED_HIDDEN = 'ignored_hidden'
IGNORED_LINK = walk.IGNORED_LINK  # Folder links the walk does not follow.
IGNORED_NOT_IMAGE = 'ignored_not_image'
IGNORED_STRAY = 'ignored_outside_class_folder'
BAD_NAME = 'rejected_bad_file_name'
UNLISTABLE = walk.UNLISTABLE  # Folders the walk cannot list.


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One candidate image: path relative to input_dir ('/'-separated)."""
  relpath: str
  class_name: str
  given_split: Optional[str]  # Layout (b) only.


@dataclasses.dataclass(frozen=True)
class Listing:
  layout: str
  class_names: tuple[str, ...]
  files: tuple[SourceFile, ...]
  ignored: tuple[walk.Skipped, ...]


def is_text(name: str) -> bool:
  """False for names with bytes that are not UTF-8 (surrogate escapes)."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return False
  return True


def look_alike_key(name: str) -> str:
  """The same for two names a person cannot tell apart on screen.

  Unicode's compatibility caseless match (NFKC, casefold, NFKC): case
  ('cats', 'Cats'), composed or decomposed accents ('caf\\xe9',
  'cafe\\u0301'), full-width letters, ligatures and other compatibility
  forms; variation selectors are ignored.
  """
  name = _VARIATION_SELECTORS.sub('', name)
  return unicodedata.normalize(
      'NFKC', unicodedata.normalize('NFKC', name).casefold())


def split_of(split_dir: str) -> Optional[str]:
  """'train', 'validation' or 'test' for a split folder name in any case
  or Unicode form ('Train', 'VAL', full-width letters); None otherwise."""
  return SPLIT_FOLDERS.get(look_alike_key(split_dir))


def shown(name: str) -> str:
  """A name for an error line, quoted: characters that print as nothing or
  not at all as \\u/\\x escapes, bytes that are not UTF-8 as \\xNN."""
  def show(c):
    if (c.isprintable() and c not in _INVISIBLE
        and not _VARIATION_SELECTORS.match(c)):
      return c
    return c.encode('unicode_escape').decode('ascii')
  return "'" + ''.join(show(c) for c in walk.escaped(name)) + "'"


def _code_points(name: str) -> str:
  """A name as ASCII escapes ('cafe\\u0301'): tells look-alikes apart."""
  return walk.escaped(name).encode('ascii', 'backslashreplace').decode('ascii')


def _char(c: str) -> str:
  return f'U+{ord(c):04X} {unicodedata.name(c, "")}'.rstrip()


def name_problem(name: str) -> Optional[str]:
  """Why a folder name cannot be a class name (a label), or None."""
  if not is_text(name):
    return 'is not valid UTF-8, which a label file cannot hold'
  for c in name:
    category = unicodedata.category(c)
    if c in _LINE_BREAKS:
      return f'holds a line break ({_char(c)}), which a label file cannot hold'
    if category == 'Cc':
      return (f'holds the control character {_char(c)}, which a label file '
              'cannot hold')
    if category == 'Cf' or c in _INVISIBLE:
      return (f'holds {_char(c)}, an invisible character (the label would '
              'print like another name)')
    if category.startswith('C'):
      return (f'holds {_char(c)}, a private-use or unassigned code point '
              'with no agreed glyph')
  if name != name.strip():
    return 'starts or ends with white space, which a label file cannot hold'
  return None


def _walk_remote(root: str, rel_root: str) -> Iterator[str]:
  """Files below gs://, s3://, ... folders, through Beam's FileSystems."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  prefix = root.rstrip('/') + '/'
  for match in FileSystems.match([prefix + '**']):
    for metadata in match.metadata_list:
      rel = metadata.path[len(prefix):]
      if rel:
        yield posixpath.join(rel_root, rel)


@dataclasses.dataclass(frozen=True)
class FolderTask:
  """One folder a worker lists: a class folder, or a hidden one.

  relpath: the folder relative to --input_dir ('cats', 'train/cats').
  class_name: its class; None for a hidden folder, whose files are all
    reported as hidden.
  """
  relpath: str
  class_name: Optional[str]
  given_split: Optional[str]


@dataclasses.dataclass(frozen=True)
class InputPlan:
  """What the launcher learns from the top of --input_dir (never per file)."""
  layout: str
  class_names: tuple[str, ...]
  folders: tuple[FolderTask, ...]
  ignored: tuple[walk.Skipped, ...]  # Stray or hidden files at the top.


def _name_problem(relpath: str, *, hidden: bool = False
                  ) -> Optional[walk.Skipped]:
  """A file not read for its name: not UTF-8, or hidden (or in a hidden
  folder: `hidden`); None otherwise."""
  if not is_text(relpath):
    return walk.Skipped(
        walk.escaped(relpath), BAD_NAME,
        'file name is not valid UTF-8 (shown with \\x escapes); rename it')
  if hidden or any(walk.is_hidden(p) for p in relpath.split('/')):
    return walk.Skipped(relpath, IGNORED_HIDDEN, 'hidden file or folder')
  return None


def _classify(relpath: str, task: FolderTask
              ) -> Union[SourceFile, walk.Skipped]:
  """One file of a folder task: a candidate image, or ignored with a reason."""
  problem = _name_problem(relpath, hidden=task.class_name is None)
  if problem:
    return problem
  extension = posixpath.splitext(relpath)[1]
  if extension.lower() not in source_image.EXTENSION_FORMATS:
    return walk.Skipped(
        relpath, IGNORED_NOT_IMAGE,
        f'not an image file (extension {extension or "none"!r})')
  return SourceFile(relpath, task.class_name, task.given_split)


def source_file(relpath: str, layout: str) -> SourceFile:
  """The SourceFile of a listed candidate, from its path and the layout.

  A class folder is the first path component ('cats/x.jpg'), or the second
  below a split folder ('Train/cats/x.jpg'), exactly as plan_input makes its
  FolderTasks; so the shuffles carry only the path.
  """
  if layout == CLASS_FOLDERS_LAYOUT:
    return SourceFile(relpath, relpath.split('/', 1)[0], None)
  split_dir, class_name = relpath.split('/', 2)[:2]
  return SourceFile(relpath, class_name, split_of(split_dir))


def list_folder(input_dir: str, task: FolderTask, *,
                exclude: Sequence[str] = ()
                ) -> Iterator[Union[SourceFile, walk.Skipped]]:
  """Every file below one folder task, each a SourceFile or an walk.Skipped.

  Runs in a Beam worker (no TensorFlow): local folders with the byte-safe
  walker and its link policy, remote ones through Beam's FileSystems.
  """
  root = posixpath.join(input_dir, task.relpath)
  if paths.is_remote(input_dir):
    walked = _walk_remote(root, task.relpath)
  else:
    walked = walk.walk_below(root, task.relpath,
                         input_real=os.path.realpath(input_dir),
                         exclude=exclude)
  for item in walked:
    yield item if isinstance(item, walk.Skipped) else _classify(item, task)


def _top_entries(folder: str, rel: str, *, input_real: str,
                 exclude: Sequence[str]):
  """(visible folders, hidden folders, files, ignored links) of one folder,
  relative to --input_dir."""
  visible, hidden, files, ignored = [], [], [], []
  for name in sorted(paths.listdir(folder)):
    relpath = posixpath.join(rel, name) if rel else name
    path = posixpath.join(folder, name)
    if not paths.isdir(path):
      files.append(relpath)
      continue
    if not paths.is_remote(folder) and os.path.islink(path):
      problem = walk.link_problem(path, relpath, input_real=input_real,
                              exclude=exclude, seen=set())
      if problem:
        ignored.append(problem)
        continue
    (hidden if walk.is_hidden(name) else visible).append(relpath)
  return visible, hidden, files, ignored


def _refuse_training_runs(input_dir: str, relpaths: Sequence[str]) -> None:
  """UserError when --input_dir, or one of its class or split folders
  (relpaths; '' is --input_dir), is a training run: its checkpoint/,
  export/ and tensorboard/ would become classes of images."""
  if paths.is_remote(input_dir):
    return
  for relpath in relpaths:
    folder = os.path.join(input_dir, relpath) if relpath else input_dir
    if not run_files.is_training_run(folder):
      continue
    what = (f'--input_dir={input_dir} is' if not relpath else
            f'{walk.escaped(folder)} in --input_dir={input_dir} is')
    raise UserError(
        f'{what} a training run (a trainer.main --model_dir: '
        f'{run_files.CHECKPOINT_DIR}/, {run_files.EXPORT_DIR}/), not a folder '
        'of images; move the run out of the photos (a run belongs apart, '
        'e.g. runs/NAME) and rerun')


def plan_input(input_dir: str, *, exclude: Sequence[str] = (),
               allow_missing_eval_classes: bool = False) -> InputPlan:
  """The layout, classes and folder tasks of input_dir, from its top only.

  Reads the top level (and the split folders' top level): cheap whatever
  the number of images. Raises UserError for a folder that cannot be a
  dataset. Linked folders inside `exclude` (the build's own output) are not
  read. allow_missing_eval_classes: layout (b) accepts a class of train/
  that validation/ or test/ lacks (never one that train/ lacks).
  """
  if not paths.exists(input_dir):
    raise UserError(f'--input_dir={input_dir} does not exist; pass a folder '
                    'with one sub-folder of images per class')
  if not paths.isdir(input_dir):
    raise UserError(f'--input_dir={input_dir} is a file, not a folder; pass '
                    'a folder with one sub-folder of images per class')
  if not paths.listdir(input_dir):
    raise UserError(f'--input_dir={input_dir} is empty; put one sub-folder '
                    'of images per class in it')
  input_real = (input_dir if paths.is_remote(input_dir) else
                os.path.realpath(input_dir))
  top = dict(input_real=input_real, exclude=exclude)
  visible, hidden, files, ignored = _top_entries(input_dir, '', **top)
  _refuse_training_runs(input_dir, [''] + visible)
  if not visible:
    raise UserError(f'--input_dir={input_dir} has no class folders; expected '
                    f'{input_dir}/<class_name>/<image files>')
  layout = detect_layout(visible, input_dir)
  folders = [FolderTask(h, None, None) for h in hidden]
  strays = [(f, f'--input_dir={input_dir}') for f in files]
  if layout == CLASS_FOLDERS_LAYOUT:
    _check_class_names({name: [] for name in visible}, input_dir)
    class_names = tuple(visible)
    folders += [FolderTask(c, c, None) for c in visible]
  else:
    by_split = {}  # split -> (split folder, {class name: relpath}).
    for split_dir in visible:
      split = split_of(split_dir)
      classes, hidden, files, links = _top_entries(
          posixpath.join(input_dir, split_dir), split_dir, **top)
      ignored += links
      folders += [FolderTask(h, None, None) for h in hidden]
      strays += [(f, 'split folder') for f in files]
      by_split[split] = (split_dir, {})
      _refuse_training_runs(input_dir, classes)
      for relpath in classes:
        name = relpath.split('/', 1)[1]
        check_class_name(name, posixpath.join(input_dir, split_dir))
        by_split[split][1][name] = relpath
        folders.append(FolderTask(relpath, name, split))
    split_dirs = collections.defaultdict(list)  # Class name -> 'train/', ...
    for split_dir, classes in by_split.values():
      for name in classes:
        split_dirs[name].append(f'{split_dir}/')
    class_names = tuple(sorted(split_dirs))
    _check_class_names(split_dirs, input_dir)
    _check_split_classes(by_split, input_dir,
                         allow_missing=allow_missing_eval_classes)
  if len(class_names) < 2:
    found = f'one class folder ({class_names[0]!r})' if class_names else (
        'no class folders')
    raise UserError(
        f'--input_dir={input_dir} has {found}; a classifier needs at least '
        'two: add one sub-folder of images per class')
  for relpath, where in strays:
    ignored.append(_name_problem(relpath) or walk.Skipped(
        relpath, IGNORED_STRAY,
        f'not inside a class folder (stray file in {where})'))
  return InputPlan(layout, class_names, tuple(folders), tuple(ignored))


def list_input(input_dir: str, *, exclude: Sequence[str] = ()) -> Listing:
  """plan_input plus every folder listed here, in this process.

  For small folders, tests and tools; the build lists folders in its Beam
  workers instead (see beam_build).
  """
  plan = plan_input(input_dir, exclude=exclude)
  files, ignored = [], list(plan.ignored)
  for task in plan.folders:
    for item in list_folder(input_dir, task, exclude=exclude):
      (files if isinstance(item, SourceFile) else ignored).append(item)
  if not files:
    raise UserError(f'--input_dir={input_dir} has class folders but no image '
                    'files (.jpg .jpeg .png .bmp .gif .webp) in them')
  return Listing(plan.layout, plan.class_names,
                 tuple(sorted(files, key=lambda f: f.relpath)),
                 tuple(sorted(ignored, key=lambda f: f.relpath)))


def check_class_name(name: str, where: str) -> None:
  """Refuses a class folder name that cannot be a TFDS label, or that
  holds a character that prints as nothing (see name_problem)."""
  problem = name_problem(name)
  if problem:
    raise UserError(
        f'class folder {shown(name)} in {where} {problem}; rename the folder '
        '(class names become labels)')


def detect_layout(top_dirs: list[str], input_dir: str) -> str:
  """Class folders or split folders, from the visible top-level folders.

  Split folders are recognised in any case or Unicode form ('Train', 'VAL',
  full-width 'ｔｒａｉｎ'), so they can never become classes named 'Test' and
  'Train'; two folders of one split are refused.
  """
  split_like = [d for d in top_dirs if split_of(d)]
  if not split_like:
    return CLASS_FOLDERS_LAYOUT
  listed = lambda names: ', '.join(_named(n) for n in sorted(names))
  if len(split_like) != len(top_dirs):
    other = set(top_dirs) - set(split_like)
    raise UserError(
        f'--input_dir={input_dir} mixes split folders {listed(split_like)} '
        f'with other folders {listed(other)}; use either <class>/ folders or '
        'train/<class>/ (+ validation/, test/) folders, not both')
  by_split = collections.defaultdict(list)
  for folder in split_like:
    by_split[split_of(folder)].append(folder)
  for split, folders in by_split.items():
    if len(folders) > 1:
      raise UserError(
          f'--input_dir={input_dir} has several {split} folders '
          f'{listed(folders)}; merge them into one')
  if 'train' not in by_split:
    raise UserError(
        f'--input_dir={input_dir} has split folders {listed(split_like)} but '
        'no train/; add train/<class>/ folders or pass the class folders')
  return SPLIT_FOLDERS_LAYOUT


def _look_alikes(names) -> list[list[str]]:
  """Groups (each sorted, two names or more) of names that look the same."""
  groups = collections.defaultdict(list)
  for name in sorted(names):
    groups[look_alike_key(name)].append(name)
  return [g for g in groups.values() if len(g) > 1]


def _difference(names: Sequence[str]) -> str:
  """What tells look-alike names apart, in words."""
  same = lambda form: len({form(n) for n in names}) == 1
  if same(lambda n: unicodedata.normalize('NFC', n)):
    return 'differ only in how accents are encoded (composed or decomposed)'
  if same(lambda n: unicodedata.normalize(
      'NFKC', _VARIATION_SELECTORS.sub('', n))):
    return ('differ only in Unicode compatibility forms (full-width letters, '
            'ligatures, variation selectors)')
  if same(str.lower):
    return 'differ only in case'
  return 'differ only in case and Unicode form'


def _named(name: str) -> str:
  """shown(name), plus its ASCII escapes where they differ."""
  plain, code = shown(name), _code_points(name)
  return plain if plain == f"'{code}'" else f'{plain} ({code})'


def _check_class_names(where: dict, input_dir: str) -> None:
  """Refuses bad class names, and classes whose names look the same.

  where: class name -> the split folders holding it ('train/'; empty in
  layout (a)).
  """
  for name in where:
    check_class_name(name, input_dir)
  for names in _look_alikes(where):
    fix = 'one' if len(names) == 2 else 'all but one'
    folders = ' and '.join(
        _named(n) + (f' in {", ".join(where[n])}' if where[n] else '')
        for n in names)
    raise UserError(
        f'--input_dir={input_dir} has class folders {folders} whose names '
        f'{_difference(names)}: they look the same but would be '
        f'{len(names)} classes; rename {fix} (or merge them)')


def _missing_in(split_dir: str, missing: Sequence[str], found: dict,
                unmatched: Sequence[str]) -> str:
  """'validation/ lacks 'dogs' (in train/dogs; a typo of validation/dog?)'.

  found: class name -> relpaths that hold it. unmatched: this split's class
  folders that the other splits lack, where a typo would be.
  """
  def one(name):
    folded = {u.casefold(): u for u in unmatched}
    typo = difflib.get_close_matches(name.casefold(), list(folded), n=1,
                                     cutoff=0.6)
    hint = f'; a typo of {split_dir}/{folded[typo[0]]}?' if typo else ''
    return f'{shown(name)} (in {", ".join(found[name])}{hint})'
  named = ', '.join(one(n) for n in missing[:_MAX_NAMED])
  more = len(missing) - _MAX_NAMED
  return f'{split_dir}/ lacks {named}' + (f' and {more} more' if more > 0
                                          else '')


def _check_split_classes(by_split: dict, input_dir: str, *,
                         allow_missing: bool) -> None:
  """Layout (b): every class has a train/ folder, and validation/ and test/
  hold the classes of train/ (unless allow_missing).

  A class without train images cannot be learned, yet would get an output
  (its evaluation images always wrong); one missing from an evaluation split
  gets no metric there. Both are usually a typo or a forgotten copy.

  by_split: split -> (split folder name, {class name: relpath}).
  """
  found = collections.defaultdict(list)  # Class name -> relpaths.
  for split in metadata_lib.SPLITS:  # train/ first.
    for name, relpath in by_split.get(split, (None, {}))[1].items():
      found[name].append(relpath)
  if not found:
    return  # No class at all: plan_input says so.
  train = set(by_split['train'][1])
  problems, eval_only = [], True
  for split in metadata_lib.SPLITS:
    if split not in by_split:
      continue
    split_dir, classes = by_split[split]
    if split == 'train':
      missing = sorted(set(found) - train)
      eval_only = not missing
    elif allow_missing:
      continue
    else:
      missing = sorted(train - set(classes))
    if not classes:
      problems.append(f'{split_dir}/ holds no class folder' + (
          '' if split == 'train' else ' (remove it, or add them)'))
    elif missing:
      unmatched = sorted(c for c in classes if len(found[c]) < len(by_split))
      problems.append(_missing_in(split_dir, missing, found, unmatched))
  if not problems:
    return
  allow = (f', or pass {ALLOW_MISSING_EVAL_CLASSES_FLAG} to build with '
           'classes missing from validation/ or test/' if eval_only else '')
  raise UserError(
      f'--input_dir={input_dir} has split folders with different classes: '
      f'{"; ".join(problems)}. Every class needs a train/<class>/ folder, '
      'and validation/ and test/ the classes of train/: rename the '
      f'misspelled folder, add the missing one or remove the class{allow}')
