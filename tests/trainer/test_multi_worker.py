"""--distribution=multi_worker: two real worker processes on 127.0.0.1.

Both train the same model (identical weights at the end), only the chief
writes --model_dir, SIGTERM on one worker stops both after the same step
(exit 143), kill -9 of one makes the other stop with one line, and rerunning
both commands resumes after the last finished epoch without repeating one.
"""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers


def _tf_config(ports, index):
  return json.dumps({
      'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
      'task': {'type': 'worker', 'index': index}})


def _start(args, ports):
  """Both workers' processes, same command, only TF_CONFIG differs."""
  processes = []
  for index in range(len(ports)):
    env = dict(os.environ, TF_CONFIG=_tf_config(ports, index))
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'trainer.main', *args], cwd=helpers.REPO_ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return processes


def _finish(processes, timeout=300):
  out = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=timeout)
    out.append((process.returncode, stdout, stderr))
  return out


def _epochs_done(model_dir):
  state = model_dir / 'checkpoint' / 'state.json'
  try:
    return json.loads(state.read_text())['epochs_done']
  except (OSError, ValueError, KeyError):
    return 0


def _wait_for_epoch(model_dir, epoch, processes, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if _epochs_done(model_dir) >= epoch:
      return
    assert all(p.poll() is None for p in processes), _finish(processes)
    time.sleep(0.02)
  raise AssertionError(f'epoch {epoch} not reached')


def _history_epochs(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [int(row['epoch']) for row in csv.DictReader(f)]


def _digests(stderr):
  return re.findall(r'weights after epoch (\d+): sha256 (\w+)', stderr)


# Room for a SIGTERM after epoch 2, a kill 2 epochs after the resume, and a
# rerun to the end.
_EPOCHS = 9


def test_two_workers_train_in_step_stop_together_and_resume(tmp_path):
  helpers.write_tiny_dataset(
      tmp_path / 'data', per_class={'train': 8, 'validation': 2},
      shards={'train': 3, 'validation': 1})
  model_dir = tmp_path / 'run'
  args = [f'--data_dir={tmp_path / "data"}', f'--model_dir={model_dir}',
          '--distribution=multi_worker', f'--epochs={_EPOCHS}', '--batch_size=4',
          '--early_stopping_patience=0', '--seed=3', '--augment=course']

  # 1. SIGTERM on the worker that is not the chief: both stop after the
  # same step, the last finished epoch is kept, both exit 143.
  chiefs = set()  # The chief's pid in each of the three runs.
  processes = _start(args, [helpers.free_port(), helpers.free_port()])
  chiefs.add(str(processes[0].pid))
  _wait_for_epoch(model_dir, 2, processes)
  processes[1].send_signal(signal.SIGTERM)
  (rc0, _, err0), (rc1, _, err1) = _finish(processes)
  assert (rc0, rc1) == (143, 143), (err0[-2000:], err1[-2000:])
  done = _epochs_done(model_dir)
  assert 2 <= done < _EPOCHS - 4
  for err in (err0, err1):
    assert 'Traceback' not in err
    assert f'preempted (SIGTERM on a worker) after epoch {done} of {_EPOCHS}' in err
  assert _history_epochs(model_dir) == list(range(1, done + 1))
  assert not (model_dir / 'metrics.json').exists()

  # 2. The same commands resume; kill -9 of one worker mid-run: the other
  # stops with one line naming the way out.
  processes = _start(args, [helpers.free_port(), helpers.free_port()])
  chiefs.add(str(processes[0].pid))
  _wait_for_epoch(model_dir, done + 2, processes)
  processes[1].kill()
  (rc0, _, err0), _ = _finish(processes)
  assert rc0 == 1, err0[-2000:]
  assert f'resuming after epoch {done}' in err0
  lines = helpers.error_lines(err0)
  assert len(lines) == 1 and 'another worker stopped' in lines[0], err0[-3000:]
  assert 'rerun the same command on every machine' in lines[0]
  reason = lines[0].split('cannot be reached (', 1)[1]
  assert not reason.startswith(('File ', ')', 'Graph execution')), lines[0]
  done = _epochs_done(model_dir)

  # 3. Rerun both: resumes after the last finished epoch, runs to the end.
  processes = _start(args, [helpers.free_port(), helpers.free_port()])
  chiefs.add(str(processes[0].pid))
  (rc0, out0, err0), (rc1, out1, err1) = _finish(processes)
  assert (rc0, rc1) == (0, 0), (err0[-3000:], err1[-3000:])
  assert f'resuming after epoch {done}' in err0
  assert _history_epochs(model_dir) == list(range(1, _EPOCHS + 1))
  # Identical weights on both workers at the end.
  assert _digests(err0) == _digests(err1) and _digests(err0)[0][0] == str(_EPOCHS)
  # Only the chief writes: outputs once, TensorBoard from one process.
  assert 'best epoch' in out0 and out1 == ''
  assert 'writes nothing' in err1
  for name in ('metrics.json', 'best.keras', 'export', 'history.csv',
               'training_curves.png', 'train_samples.png'):
    assert (model_dir / name).exists(), name
  for split in ('train', 'validation'):
    pids = {f.split('.')[-3] for f in os.listdir(
        model_dir / 'tensorboard' / split)}
    assert pids <= chiefs, (pids, chiefs)  # Written by chiefs only.


@pytest.mark.parametrize('shards', [1, 2, 5])
def test_worker_parts_are_disjoint_and_cover_the_split(tmp_path, shards):
  """make_dataset(shard=): by file (>= as many files as workers) or by record."""
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  tiny = helpers.write_tiny_dataset(
      tmp_path / 'data', per_class={'train': 5, 'validation': 1},
      shards={'train': shards, 'validation': 1})

  def part(count, index):
    ds = input_pipeline.make_dataset(
        tiny.path, 'train', batch_size=1, training=True, seed=1,
        shard=(count, index), drop_remainder=False)
    return sorted(hashlib.sha256(x.numpy().tobytes()).hexdigest()
                  for x, _ in ds)

  everything = part(1, 0)
  assert len(everything) == 15
  for count in (2, 3):
    parts = [part(count, i) for i in range(count)]
    assert sorted(sum(parts, [])) == everything  # Each image exactly once.
    assert all(parts), parts  # No worker without data.
  with pytest.raises(ValueError, match='index'):
    input_pipeline.make_dataset(tiny.path, 'train', batch_size=1,
                                training=True, shard=(2, 2))


_BAD_TF_CONFIGS = [
    (None, 'needs TF_CONFIG set on every machine'),
    ('{"cluster": ', 'TF_CONFIG is not JSON'),
    ('{"cluster": {"worker": ["a:1"]}}', 'needs "cluster" and "task"'),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}',
     'must be a list of "HOST:PORT"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", '
     '"index": 2}}', 'is not in its cluster'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["c:3"]}, "task": {"type": '
     '"worker", "index": 0}}', 'parameter servers'),
]


@pytest.mark.parametrize('tf_config, message', _BAD_TF_CONFIGS)
def test_a_bad_tf_config_is_a_user_error_naming_the_problem(tf_config,
                                                            message):
  from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top
  from trainer import config  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=re.escape(message)):
    config.distribution_task('multi_worker', tf_config)


def test_a_bad_tf_config_is_one_line_before_tensorflow_loads(tmp_path):
  """The command line: one error line per bad TF_CONFIG, in well under the
  seconds TensorFlow takes to load, nothing written."""
  tiny = helpers.write_tiny_dataset(tmp_path / 'data')
  for tf_config, message in _BAD_TF_CONFIGS[:2]:
    env = {k: v for k, v in os.environ.items() if k != 'TF_CONFIG'}
    if tf_config is not None:
      env['TF_CONFIG'] = tf_config
    error, loaded = helpers.refusal(
        'trainer.main', f'--data_dir={tiny.path}',
        f'--model_dir={tmp_path / "run"}', '--distribution=multi_worker',
        '--batch_size=4', env=env)
    assert message in error and loaded == []
  assert not (tmp_path / 'run').exists()


def test_chief_is_the_chief_task_or_worker_0():
  from trainer import config  # pylint: disable=g-import-not-at-top
  workers = {'worker': ['a:1', 'b:2']}
  first = config.cluster_task(json.dumps(
      {'cluster': workers, 'task': {'type': 'worker', 'index': 0}}))
  assert first.is_chief and first.id_in_cluster == 0
  with_chief = dict(workers, chief=['c:3'])
  chief = config.cluster_task(json.dumps(
      {'cluster': with_chief, 'task': {'type': 'chief', 'index': 0}}))
  worker0 = config.cluster_task(json.dumps(
      {'cluster': with_chief, 'task': {'type': 'worker', 'index': 0}}))
  assert chief.is_chief and chief.num_workers == 3
  assert not worker0.is_chief and worker0.id_in_cluster == 1


def test_a_worker_that_never_comes_ends_the_wait_with_one_line(tmp_path):
  tiny = helpers.write_tiny_dataset(tmp_path / 'data')
  ports = [helpers.free_port(), helpers.free_port()]
  env = dict(os.environ, TF_CONFIG=_tf_config(ports, 0))
  start = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.main', f'--data_dir={tiny.path}',
       f'--model_dir={tmp_path / "run"}', '--distribution=multi_worker',
       '--batch_size=4', '--multi_worker_timeout=5'], cwd=helpers.REPO_ROOT,
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert time.time() - start < 60
  assert result.returncode != 0
  lines = helpers.error_lines(result.stderr)
  assert len(lines) == 1, result.stderr[-2000:]
  assert 'not every worker of TF_CONFIG joined within' in lines[0]
  assert not (tmp_path / 'run').exists()


def test_workers_started_with_other_flags_all_refuse_before_training(
    tmp_path):
  tiny = helpers.write_tiny_dataset(tmp_path / 'data')
  ports = [helpers.free_port(), helpers.free_port()]
  processes = []
  for index, epochs in enumerate((3, 4)):
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'trainer.main', f'--data_dir={tiny.path}',
         f'--model_dir={tmp_path / "run"}', '--distribution=multi_worker',
         '--batch_size=4', f'--epochs={epochs}'], cwd=helpers.REPO_ROOT,
        env=dict(os.environ, TF_CONFIG=_tf_config(ports, index)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  (rc0, _, err0), (rc1, _, err1) = _finish(processes, timeout=240)
  assert (rc0, rc1) == (1, 1), (err0[-2000:], err1[-2000:])
  assert helpers.error_lines(err1) == [
      "error: the workers were started with other flags: --epochs differ "
      "from the chief's; run the same command on every machine (only "
      "TF_CONFIG differs)"]
  assert len(helpers.error_lines(err0)) == 1
  assert not (tmp_path / 'run').exists()


def test_tf_config_without_multi_worker_is_refused(tmp_path):
  tiny = helpers.write_tiny_dataset(tmp_path / 'data')
  error, loaded = helpers.refusal(
      'trainer.main', f'--data_dir={tiny.path}',
      f'--model_dir={tmp_path / "run"}', '--batch_size=4',
      env=dict(os.environ, TF_CONFIG=_tf_config([1, 2], 0)))
  assert error == (
      'error: TF_CONFIG is set but --distribution=default: pass '
      '--distribution=multi_worker to train on its cluster, or unset '
      'TF_CONFIG to train in this process alone')
  assert loaded == []


def test_files_are_dealt_only_when_the_shares_are_even():
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  parts = input_pipeline.file_parts
  assert parts([10, 10, 10, 10], 2) == [[0, 2], [1, 3]]
  assert parts([64, 64, 1], 2) == [[0, 2], [1]]  # 65 vs 64 records.
  # A short last shard or too few files: by record instead (a worker with
  # 4 of 30 images would repeat them 3.5x per epoch).
  assert parts([26, 4], 2) is None
  assert parts([10, 10, 10], 2) is None
  assert parts([10], 2) is None


def test_a_refusal_before_the_run_state_is_read_is_one_line_on_every_worker(
    tmp_path):
  """--batch_size not a multiple of the replicas is refused before the
  worker reads --model_dir; every worker says so in one line."""
  tiny = helpers.write_tiny_dataset(tmp_path / 'data')
  ports = [helpers.free_port(), helpers.free_port()]
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'trainer.main', f'--data_dir={tiny.path}',
       f'--model_dir={tmp_path / "run"}', '--distribution=multi_worker',
       '--batch_size=5'], cwd=helpers.REPO_ROOT,
      env=dict(os.environ, TF_CONFIG=_tf_config(ports, index)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  for rc, _, err in _finish(processes, timeout=240):
    assert rc == 1, err[-2000:]
    assert 'Traceback' not in err
    assert helpers.error_lines(err) == [
        'error: --batch_size=5 must be a multiple of the 2 replicas of the '
        'cluster (it is the global batch, split evenly); pass e.g. '
        '--batch_size=4']
  assert not (tmp_path / 'run').exists()
