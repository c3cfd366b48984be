"""build_report.json is one typed definition (tfrecords_schema.report),
shared by the build that writes it and every reader."""

import dataclasses
import json
import os
import pathlib
import re

import pytest

from pipelines.folder_to_records import builder
from tests import helpers
from tfrecords_schema import report as report_lib
from trainer import places

_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('report')
  images, out = root / 'images', root / 'out'
  helpers.photo_folder(images, classes=2, per_class=3, formats=('png',),
                       size=24)
  (images / 'class0' / 'notes.txt').write_text('not an image')
  result = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='8', validation_fraction=0.0,
                         quiet=True, samples=False)
  return images, out, result


def test_a_real_report_reads_back_to_the_same_bytes(built):
  """Every key of a real build's report is a BuildReport field: reading it
  and writing it again gives the file's bytes."""
  _, out, _ = built
  text = (out / report_lib.REPORT_FILE).read_text()
  report = report_lib.BuildReport.from_json(text)
  assert report.to_json() == text
  assert report.seen == report.written + sum(report.not_written.values())


def test_build_returns_the_report_with_its_output_dir(built):
  _, out, result = built
  report = report_lib.read_build_report(str(out))
  assert result == {**report.to_json_dict(), 'output_dir': str(out)}
  assert 'output_dir' not in report.to_json()  # Never in the file.


def test_a_field_added_to_the_report_is_written_and_read_back():
  split = dataclasses.make_dataclass(
      'SplitPlus', [('median_bytes', int, dataclasses.field(default=0))],
      bases=(report_lib.SplitSummary,), frozen=True)
  plus = dataclasses.make_dataclass(
      'ReportPlus',
      [('new_note', str, dataclasses.field(default='')),
       ('splits_plus', dict[str, split],
        dataclasses.field(default_factory=dict))],
      bases=(report_lib.BuildReport,), frozen=True)
  report = dataclasses.replace(
      plus.from_json_dict({'dataset_name': 'ds'}), new_note='hello',
      splits_plus={'train': split(total=1, median_bytes=7)})
  raw = json.loads(report.to_json())
  assert raw['new_note'] == 'hello'
  assert raw['splits_plus'] == {'train': {'total': 1, 'num_shards': 0,
                                          'num_bytes': 0, 'per_class': {},
                                          'median_bytes': 7}}
  assert plus.from_json(report.to_json()) == report


def test_a_value_the_build_must_give_cannot_be_left_out():
  with pytest.raises(TypeError, match='dataset_name'):
    report_lib.BuildReport(input_dir='x')  # pylint: disable=missing-kwoa


def test_a_value_of_the_wrong_type_is_refused_naming_its_key():
  with pytest.raises(ValueError, match=r'splits\.train\.num_shards'):
    report_lib.BuildReport.from_json_dict(
        {'splits': {'train': {'num_shards': 'two'}}})
  assert report_lib.parse_build_report(
      {'toolkit': report_lib.metadata_lib.TOOLKIT_MARKER,
       'splits': {'train': {'num_shards': 'two'}}}) is None


def test_the_readers_read_through_the_type(built, monkeypatch):
  """The builder's output-folder check and summary and the trainer's
  placement check get their values from a BuildReport."""
  images, out, result = built
  calls = []
  original = report_lib.BuildReport.from_json_dict.__func__

  def counted(cls, raw):
    calls.append(cls)
    return original(cls, raw)

  monkeypatch.setattr(report_lib.BuildReport, 'from_json_dict',
                      classmethod(counted))
  owned = builder.owned_entries(str(out))
  assert calls and owned.counts == {
      (result['dataset_name'], split): info['num_shards']
      for split, info in result['splits'].items()}
  calls.clear()
  assert places._photo_folder(str(out)) == os.path.realpath(images)  # pylint: disable=protected-access
  assert calls
  calls.clear()
  assert f'seen {result["counts"]["seen"]}' in builder.format_summary(result)
  assert calls


# Report keys no other JSON of the toolkit uses: a reader that indexes one
# as a string reads the report around its type.
_REPORT_ONLY_KEYS = ('input_dir', 'per_class', 'train_mean',
                     'train_std', 'bytes_written', 'classes_without_examples',
                     'write_stage_s', 'elapsed_s', 'images_per_s',
                     'empty_classes', 'class_gap_error', 'kept_earlier')


def test_no_reader_indexes_the_report_by_string_keys():
  pattern = re.compile(r"""(\[|\.get\()\s*['"](%s)['"]""" %
                       '|'.join(_REPORT_ONLY_KEYS))
  found = []
  for package in ('pipelines', 'trainer', 'tfrecords_schema'):
    for path in sorted((_ROOT / package).rglob('*.py')):
      for i, line in enumerate(path.read_text().splitlines(), 1):
        if pattern.search(line):
          found.append(f'{path.relative_to(_ROOT)}:{i}: {line.strip()}')
  assert not found, '\n'.join(found)
