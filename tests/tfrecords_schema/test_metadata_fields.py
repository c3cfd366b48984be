"""metadata.json: every DatasetSpec field comes from one place (its _built
value in tfrecords_schema.metadata), is written by a real build and is read
back by read_dataset_spec."""

import dataclasses
import json
import subprocess
import sys

import pytest

from pipelines.folder_to_records import builder
from tests import helpers
import tfrecords_schema
from tfrecords_schema import metadata


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('metadata')
  images, out = root / 'images', root / 'out'
  helpers.photo_folder(images, classes=2, per_class=3, formats=('png',),
                       size=24)
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8,6',
                image_format='jpeg', jpeg_quality=77, channels=1,
                resize_mode='pad', validation_fraction=0.0, quiet=True,
                samples=False)
  return out


def test_every_spec_field_is_written_and_read_back(built):
  raw = json.loads((built / metadata.METADATA_FILE).read_text())
  names = [f.name for f in dataclasses.fields(metadata.DatasetSpec)]
  assert sorted(raw) == sorted(names + ['toolkit'])
  spec = tfrecords_schema.read_dataset_spec(str(built))
  for name in names:  # This build fills every field (none is left None).
    assert getattr(spec, name) is not None, name
  assert json.loads(json.dumps(spec.to_json_dict())) == raw
  assert (spec.height, spec.width, spec.channels, spec.jpeg_quality,
          spec.resize_mode) == (8, 6, 1, 77, 'pad')


def test_every_spec_field_has_its_value_from_a_build():
  """A field without _built(...) would be missing from real builds."""
  for f in dataclasses.fields(metadata.DatasetSpec):
    assert callable(f.metadata.get('from_build')), f.name


def test_a_field_without_a_build_value_is_refused_loudly():
  plus = dataclasses.make_dataclass(
      'SpecPlus', [('forgotten', int, dataclasses.field(default=0))],
      bases=(metadata.DatasetSpec,), frozen=True)
  with pytest.raises(TypeError, match=r"\['forgotten'\] have no value"):
    plus.from_build(metadata.BuiltDataset(config=None, splits={}, mean=None,
                                          std=None))


def test_the_dataset_format_stands_alone():
  """tfrecords_schema imports nothing of pipelines or trainer (nor
  TensorFlow or Beam), in a fresh process."""
  code = ('import sys, tfrecords_schema, tfrecords_schema.report; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("pipelines", "trainer", "tensorflow", "apache_beam")))')
  result = subprocess.run([sys.executable, '-c', code], check=True,
                          capture_output=True, text=True,
                          cwd=helpers.REPO_ROOT)
  assert result.stdout.strip() == '[]', result.stdout


def test_a_dataset_error_is_the_commands_user_error():
  """The CLIs turn UserError into one line; DatasetError is one."""
  from pipelines.common import errors  # pylint: disable=g-import-not-at-top
  assert issubclass(tfrecords_schema.DatasetError, errors.UserError)
  assert errors.UserError is tfrecords_schema.errors.UserError


def test_predict_walks_folders_without_the_build():
  """trainer.predict shares the build's walker (pipelines.common.walk), not
  the build's listing."""
  code = ('import sys, trainer.predict; print(sorted(m for m in sys.modules '
          'if m.startswith("pipelines.folder_to_records")))')
  result = subprocess.run([sys.executable, '-c', code], check=True,
                          capture_output=True, text=True,
                          cwd=helpers.REPO_ROOT)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout
