"""Class folders a person would read as one class, or as the same classes in
every split: refused before anything is written, naming the folders."""

import pathlib

import pytest

from pipelines.common.errors import UserError
from pipelines.folder_to_records import listing
from tests import helpers

_FULL_WIDTH_TRAIN = '\uff54\uff52\uff41\uff49\uff4e'  # 'train', full width.


def _folders(root: pathlib.Path, *relpaths: str) -> pathlib.Path:
  for relpath in relpaths:
    helpers.write(root / relpath / 'a.jpg', b'x')
  return root


def _refusal(root: pathlib.Path, **kwargs) -> str:
  with pytest.raises(UserError) as e:
    listing.plan_input(str(root), **kwargs)
  message = str(e.value)
  assert '\n' not in message
  return message


def test_a_misspelled_class_folder_in_one_split_is_refused_with_the_typo(
    tmp_path):
  images = _folders(tmp_path / 'images', 'train/cats', 'train/dogs',
                    'validation/cats', 'validation/dog')
  out = tmp_path / 'out'
  result = helpers.run_cli('pipelines.build', f'--input_dir={images}',
                           f'--output_dir={out}')
  assert result.returncode != 0
  [error] = helpers.error_lines(result.stderr)
  assert "train/ lacks 'dog' (in validation/dog; a typo of train/dogs?)" in error
  assert ("validation/ lacks 'dogs' (in train/dogs; a typo of "
          'validation/dog?)') in error
  assert listing.ALLOW_MISSING_EVAL_CLASSES_FLAG not in error  # Not for train.
  assert 'Traceback' not in result.stderr
  assert not out.exists()


def test_a_class_missing_from_an_eval_split_is_refused_unless_allowed(
    tmp_path):
  images = _folders(tmp_path / 'images', 'train/a', 'train/b', 'train/c',
                    'validation/a', 'validation/b', 'test/a', 'test/b',
                    'test/c')
  message = _refusal(images)
  assert "validation/ lacks 'c' (in train/c, test/c)" in message
  assert 'test/ lacks' not in message
  assert listing.ALLOW_MISSING_EVAL_CLASSES_FLAG in message
  plan = listing.plan_input(str(images), allow_missing_eval_classes=True)
  assert plan.class_names == ('a', 'b', 'c')
  # A class with no train/ folder cannot be learned: never allowed.
  _folders(images, 'test/d')
  message = _refusal(images, allow_missing_eval_classes=True)
  assert "train/ lacks 'd' (in test/d)" in message
  assert listing.ALLOW_MISSING_EVAL_CLASSES_FLAG not in message


@pytest.mark.parametrize('first,second,difference', [
    ('cats', 'Cats', 'differ only in case'),
    ('caf\u00e9', 'cafe\u0301', 'how accents are encoded'),  # NFC, NFD.
    ('cats', '\uff43\uff41\uff54\uff53', 'compatibility forms'),  # Full width.
    ('fish', '\ufb01sh', 'compatibility forms'),  # The 'fi' ligature.
    ('Caf\u00e9', 'cafe\u0301', 'case and Unicode form'),
])
@pytest.mark.parametrize('split_layout', [False, True])
def test_class_folders_that_look_the_same_are_refused(
    tmp_path, first, second, difference, split_layout):
  if split_layout:  # Twins across splits are caught before the class check.
    images = _folders(tmp_path, f'train/{first}', 'train/x',
                      f'validation/{second}', 'validation/x')
  else:
    images = _folders(tmp_path, first, second, 'x')
  message = _refusal(images)
  assert difference in message
  for name in (first, second):  # Both, with escapes that tell them apart.
    escapes = name.encode('ascii', 'backslashreplace').decode()
    assert (f"'{name}'" if escapes == name else
            f"'{name}' ({escapes})") in message
  assert 'rename one' in message


@pytest.mark.parametrize('char', ['\u200b', '\u200d', '\ufeff', '\u202e',
                                  '\u2066', '\u00ad', '\u3164'])
def test_class_names_with_invisible_characters_are_refused(tmp_path, char):
  images = _folders(tmp_path, f'ca{char}ts', 'dogs')
  message = _refusal(images)
  escape = char.encode('unicode_escape').decode()
  assert f"class folder 'ca{escape}ts'" in message
  assert f'U+{ord(char):04X}' in message and 'invisible' in message
  # A variation selector (emoji) is allowed, but ignored in comparisons.
  assert listing.plan_input(str(_folders(
      tmp_path / 'emoji', '\u2764\ufe0f', 'dogs'))).class_names
  assert 'compatibility forms' in _refusal(
      _folders(tmp_path / 'emoji', '\u2764'))


def test_split_folders_in_any_unicode_form_are_one_split(tmp_path):
  images = _folders(tmp_path / 'one', f'{_FULL_WIDTH_TRAIN}/a',
                    f'{_FULL_WIDTH_TRAIN}/b', 'VAL/a', 'VAL/b')
  result = listing.list_input(str(images))
  assert result.layout == listing.SPLIT_FOLDERS_LAYOUT
  assert {f.given_split for f in result.files} == {'train', 'validation'}
  assert [listing.source_file(f.relpath, result.layout)
          for f in result.files] == list(result.files)
  images = _folders(tmp_path / 'two', 'train/a', 'train/b',
                    f'{_FULL_WIDTH_TRAIN}/a')
  message = _refusal(images)
  assert 'several train folders' in message
  assert '\\uff54\\uff52\\uff41\\uff49\\uff4e' in message


def test_a_training_run_in_the_photos_is_refused(tmp_path):
  """A --model_dir inside --input_dir would make checkpoint/, export/ and
  tensorboard/ classes; as --input_dir it is no folder of images."""
  from pipelines.common import run_files  # pylint: disable=g-import-not-at-top
  photos = tmp_path / 'photos'
  helpers.photo_folder(photos, per_class=1, formats=('png',), size=16)
  listing.plan_input(str(photos))  # Fine before the run lands there.
  run = photos / 'run1'
  helpers.write(run / run_files.CHECKPOINT_DIR / run_files.STATE_FILE, b'{}')
  (run / run_files.EXPORT_DIR).mkdir()
  with pytest.raises(UserError, match=r'run1 in --input_dir=.* is a training '
                     r'run .*move the run out of the photos'):
    listing.plan_input(str(photos))
  with pytest.raises(UserError, match=r'--input_dir=.*run1 is a training run'):
    listing.plan_input(str(run))
  finished = tmp_path / 'finished'  # A finished run, layout (b) position.
  helpers.photo_folder(finished, layout='splits', per_class=1,
                       formats=('png',), size=16)
  helpers.write(finished / 'train' / 'cat' / run_files.MODEL_CONFIG_FILE,
                b'{}')
  with pytest.raises(UserError, match='is a training run'):
    listing.plan_input(str(finished))
