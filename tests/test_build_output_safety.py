"""What a build does to the files around --output_dir: it replaces only what
a build wrote, refuses anything else, and ends a failed or interrupted
build with one line and the earlier dataset untouched."""

import os
import pwd

import pytest

from pipelines.common import paths
from pipelines.common.errors import UserError


@pytest.mark.parametrize('given, expected', [
    ('file:///abs/data', '/abs/data'),
    ('file://localhost/abs/data', '/abs/data'),
    ('FILE://LocalHost/abs', '/abs'),
    ('file:///a%20b/c%25d', '/a b/c%d'),
    ('file:///run#1/x?y', '/run#1/x?y'),
    ('file:///', '/'),
    ('gs://bucket/data', 'gs://bucket/data'),
    ('s3://bucket/~/x', 's3://bucket/~/x'),
    ('', ''),
    ('relative/dir', 'relative/dir'),
    ('/abs/~x', '/abs/~x'),
])
def test_expand(given, expected):
  assert paths.expand(given) == expected


def test_expand_home(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert paths.expand('~') == str(tmp_path)
  assert paths.expand('~/x/y') == str(tmp_path / 'x' / 'y')
  user = pwd.getpwuid(os.getuid())
  assert paths.expand(f'~{user.pw_name}/z') == os.path.join(user.pw_dir, 'z')
  # A file URL is not a shell path: its '~' is a folder name.
  assert paths.expand('file:///~/x') == '/~/x'


@pytest.mark.parametrize('url', ['file://otherhost/abs', 'file://'])
def test_expand_refuses_a_file_url_it_cannot_read(url):
  with pytest.raises(UserError, match='file:///abs/path'):
    paths.expand(url)
