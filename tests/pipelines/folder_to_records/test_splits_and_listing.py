"""Layout detection, user errors of the listing, split and duplicate rules."""

import hashlib

import pytest

from pipelines.folder_to_records import listing
from pipelines.folder_to_records import splits
from pipelines.common.errors import UserError
from tests import helpers


def _sha(i):
  return hashlib.sha256(str(i).encode()).hexdigest()


def test_split_is_a_stable_function_of_content():
  kwargs = dict(seed=3, validation_fraction=0.2, test_fraction=0.1)
  before = {_sha(i): splits.assign_split(_sha(i), **kwargs) for i in range(2000)}
  # "Adding files later" = more hashes; existing ones never move.
  after = {_sha(i): splits.assign_split(_sha(i), **kwargs) for i in range(3000)}
  assert all(after[k] == v for k, v in before.items())
  shares = {s: list(before.values()).count(s) / 2000
            for s in ('train', 'validation', 'test')}
  assert shares['train'] == pytest.approx(0.7, abs=0.04)
  assert shares['validation'] == pytest.approx(0.2, abs=0.03)
  assert shares['test'] == pytest.approx(0.1, abs=0.03)
  other_seed = [splits.assign_split(_sha(i), seed=4, validation_fraction=0.2,
                                    test_fraction=0.1) for i in range(2000)]
  assert other_seed != list(before.values())


def _entry(path, cls, split=None, sha='s'):
  return splits.FileEntry(path, cls, split, sha)


@pytest.mark.parametrize('n', [1, 2, 3, 7, 36, 101])
def test_stratify_gives_exact_shares_in_any_input_order(n):
  paths = [f'c/{i:03d}.jpg' for i in range(n)]
  kwargs = dict(seed=5, validation_fraction=0.2, test_fraction=0.1)
  assigned = dict(splits.stratify(paths, **kwargs))
  assert dict(splits.stratify(paths[::-1], **kwargs)) == assigned
  counts = {s: list(assigned.values()).count(s)
            for s in ('train', 'validation', 'test')}
  want_test = min(round(n * 0.1), n - 1)
  assert counts['test'] == want_test
  assert counts['validation'] == max(0, min(round(n * 0.2), n - want_test - 1))
  assert counts['train'] >= 1
  # Another seed picks other files.
  if n >= 36:
    assert dict(splits.stratify(paths, **{**kwargs, 'seed': 6})) != assigned


def test_duplicates_in_a_class_are_written_once():
  kept, dropped, finding = splits.resolve_same_bytes(
      's', [_entry('a/2.jpg', 'a'), _entry('a/1.jpg', 'a')], seed=0,
      validation_fraction=0.5, test_fraction=0.0)
  assert [k.relpath for k in kept] == ['a/1.jpg']
  assert [(d.relpath, d.outcome) for d in dropped] == [('a/2.jpg', 'duplicate')]
  assert finding['kept'] == 'a/1.jpg'


def test_same_bytes_in_two_classes_is_a_conflict_and_both_are_dropped():
  kept, dropped, finding = splits.resolve_same_bytes(
      's', [_entry('cats/x.jpg', 'cats'), _entry('dogs/x.jpg', 'dogs')],
      seed=0, validation_fraction=0.2, test_fraction=0.0)
  assert not kept
  assert {d.outcome for d in dropped} == {'label_conflict'}
  assert finding['classes'] == ['cats', 'dogs']


def test_eval_copy_of_a_train_image_is_a_leak():
  kept, dropped, _ = splits.resolve_same_bytes(
      's', [_entry('validation/a/x.jpg', 'a', 'validation'),
            _entry('train/a/y.jpg', 'a', 'train')],
      seed=0, validation_fraction=0.2, test_fraction=0.0)
  assert [(k.split, k.relpath) for k in kept] == [('train', 'train/a/y.jpg')]
  assert [(d.relpath, d.outcome) for d in dropped] == [
      ('validation/a/x.jpg', 'leak')]


def test_listing_of_class_folders_is_sorted_and_ignores_with_reasons(tmp_path):
  helpers.make_photo_folder(tmp_path, per_class=2)
  outcomes = helpers.add_bad_files(tmp_path)
  (tmp_path / 'cat' / 'nested').mkdir()
  helpers.write(tmp_path / 'cat' / 'nested' / 'deep.JPG', b'x')
  result = listing.list_input(str(tmp_path))
  assert result.layout == listing.CLASS_FOLDERS_LAYOUT
  assert result.class_names == ('cat', 'coffee', 'rocket')
  paths = [f.relpath for f in result.files]
  assert paths == sorted(paths)
  assert 'cat/nested/deep.JPG' in paths  # Sub-folders and upper-case ext.
  ignored = {i.relpath: i.outcome for i in result.ignored}
  assert ignored == {k: v for k, v in outcomes.items()
                     if v.startswith('ignored')}
  # The build's shuffles carry only the path; the rest follows from it.
  assert [listing.source_file(f.relpath, result.layout)
          for f in result.files] == list(result.files)


def test_listing_of_split_folders(tmp_path):
  for split in ('train', 'Val'):
    for cls in ('horses', 'humans'):
      helpers.write(tmp_path / split / cls / 'a.jpg', b'x')
  helpers.write(tmp_path / 'train' / 'humans' / 'deeper' / 'b.png', b'x')
  helpers.write(tmp_path / 'train' / 'loose.jpg', b'x')
  result = listing.list_input(str(tmp_path))
  assert result.layout == listing.SPLIT_FOLDERS_LAYOUT
  assert result.class_names == ('horses', 'humans')
  assert {(f.given_split, f.class_name) for f in result.files} == {
      ('train', 'horses'), ('train', 'humans'), ('validation', 'horses'),
      ('validation', 'humans')}
  assert [i.relpath for i in result.ignored] == ['train/loose.jpg']
  assert [listing.source_file(f.relpath, result.layout)
          for f in result.files] == list(result.files)


@pytest.mark.parametrize('setup,message', [
    (lambda p: None, 'is empty'),
    (lambda p: helpers.write(p / 'a.jpg', b'x'), 'has no class folders'),
    (lambda p: helpers.write(p / 'only' / 'a.jpg', b'x'), 'one class folder'),
    (lambda p: (helpers.write(p / 'train' / 'a' / 'x.jpg', b'x'),
                helpers.write(p / 'cats' / 'x.jpg', b'x')), 'mixes split folders'),
    (lambda p: (helpers.write(p / 'a' / 'x.txt', b'x'),
                helpers.write(p / 'b' / 'x.txt', b'x')), 'no image files'),
])
def test_listing_user_errors_name_the_value_and_fix(tmp_path, setup, message):
  setup(tmp_path)
  with pytest.raises(UserError) as e:
    listing.list_input(str(tmp_path))
  assert message in str(e.value)
  assert str(tmp_path) in str(e.value)
  assert '\n' not in str(e.value)


def test_listing_missing_folder(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    listing.list_input(str(tmp_path / 'nope'))


def test_classes_without_examples_and_when_they_are_an_error():
  names = ('cats', 'dog', 'dogs')
  gaps = splits.classes_without_examples(names, {
      'train': (5, 0, 4), 'validation': (2, 1, 0), 'test': (0, 0, 0)})
  # An empty test split is a choice, not a gap.
  assert gaps == {'train': ['dog'], 'validation': ['dogs']}
  kwargs = dict(input_dir='in', allow_flag='--allow_it')
  for given, allowed in [(True, False), (True, True), (False, False)]:
    error = splits.class_gap_error(gaps, given_splits=given,
                                   allow_missing_eval_classes=allowed,
                                   **kwargs)
    assert "train: 'dog'" in error and '--allow_it' not in error
    assert ("validation: 'dogs'" in error) == (given and not allowed)
  eval_only = {'validation': ['dogs']}
  error = splits.class_gap_error(eval_only, given_splits=True,
                                 allow_missing_eval_classes=False, **kwargs)
  assert "validation: 'dogs'" in error and '--allow_it' in error
  for given, allowed in [(True, True), (False, False)]:
    assert splits.class_gap_error(eval_only, given_splits=given,
                                  allow_missing_eval_classes=allowed,
                                  **kwargs) is None
