"""Suite-wide fixtures."""

import os
import shutil
import signal
import tempfile

import pytest


def pytest_configure(config):
  """Lets the processes the tests start hear Ctrl-C (SIGINT).

  A shell starts a command run in the background (`pytest ... &` in a
  script) with SIGINT ignored, and an ignored signal stays ignored in every
  process it starts: the tests that send SIGINT to a build or a trainer
  then wait for a process that never hears it. A handler here is reset to
  the default in each child, which Python then turns into
  KeyboardInterrupt as usual.
  """
  del config
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope='session', autouse=True)
def _session_tmpdir(tmp_path_factory):
  """Points TMPDIR, here and in every subprocess, at a folder of this session.

  Processes the tests kill on purpose (SIGKILL of a build, a trainer, a
  tf.data service or a Beam job service) cannot clean up after themselves:
  Beam's pipeline temp and job staging folders and TensorFlow's autograph
  files would otherwise pile up in the machine's /tmp, run after run. The
  folder is removed when the session ends.
  """
  tmp = tmp_path_factory.mktemp('TMPDIR')
  old = os.environ.get('TMPDIR')
  os.environ['TMPDIR'] = str(tmp)
  tempfile.tempdir = None  # gettempdir() reads TMPDIR again.
  yield tmp
  if old is None:
    os.environ.pop('TMPDIR', None)
  else:
    os.environ['TMPDIR'] = old
  tempfile.tempdir = None
  shutil.rmtree(tmp, ignore_errors=True)
