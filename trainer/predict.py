r"""Predicts the class of image files with a model trained by trainer.main.

  python -m trainer.predict --model_dir=runs/photos my_cat.jpg holiday.png

One line per file: path, predicted class, its probability, tab-separated.
--top_k=N appends the next most probable classes to the line, as more
class, probability pairs (most probable first; N over the class count
gives every class). --json prints JSON lines instead ({"path", "class",
"probability"}, and "top_k": [{"class", "probability"}, ...] when N > 1);
--csv prints CSV (Python's csv module, so any class name survives): a
header `path,class,probability,<every class name>,error`, then a row per
file with every class's probability (4 decimals), or, for a file that
failed, the reason in `error` and the probabilities left empty.

A folder stands for the images in it and its sub-folders (sorted;
hidden files and folders skipped; the image extensions the build reads).
Files go through the build's own image path
(pipelines.preprocessing.source_image: any size or format the build
accepts, EXIF orientation, alpha, 16-bit), then the exported serving
function, so a file is preprocessed exactly as it would be for training.
Unreadable files get an error line (an error row with --csv); the exit
status is non-zero when any file failed. Lines are printed as files are
done, and a reader that stops early (`| head`) ends the run quietly
(status 141, as a process killed by SIGPIPE).
"""

import csv
import json
import os
import sys

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pipelines.common import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  # Before TensorFlow loads: its start-up chatter would bury a one-line error.
  cli.filter_noise()
  cli.skip_unused_imports()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.preprocessing import source_image  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common import paths as paths_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common import walk  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'The --model_dir of trainer.main.')
_JSON = flags.DEFINE_boolean('json', False, 'Print JSON lines.')
_CSV = flags.DEFINE_boolean(
    'csv', False, 'Print CSV: a header, then a row per file with every '
    "class's probability (and an error column).")
_TOP_K = flags.DEFINE_integer(
    'top_k', 1, 'How many of the most probable classes to print per file '
    '(most probable first; more than the class count gives every class).')
_MAX_FILE_BYTES = flags.DEFINE_integer(
    'max_file_bytes', source_image.DEFAULT_MAX_FILE_BYTES,
    'Larger files are rejected without being read (as in the build).')


# model_config.json is a few KB; a larger one is not one a run wrote.
_MAX_CONFIG_BYTES = 1 << 20
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `... | head`.


def load(model_dir: str):
  """(loaded SavedModel, ModelConfig); call `.serve(bytes [N])` on the first.

  Keep the loaded object alive while serving: its variables die with it.
  Raises UserError (one line: the folder or file, and what to do) for a
  missing or unfinished model_dir, or an unreadable config or export.
  """
  rerun = ('rerun the `python -m trainer.main` command of that run to write '
           'it again')
  # Local or on an object store (a finished run copied to a bucket).
  if not paths_lib.isdir(model_dir):
    raise UserError(
        f'--model_dir={model_dir} ' + ('is a file, not a folder' if
                                       paths_lib.exists(model_dir) else
                                       'does not exist') +
        '; pass the --model_dir of a finished `python -m trainer.main` run')
  config_path = os.path.join(model_dir, config_lib.MODEL_CONFIG_FILE)
  if not paths_lib.exists(config_path):
    raise UserError(
        f'--model_dir={model_dir} has no {config_lib.MODEL_CONFIG_FILE}; pass the '
        '--model_dir of a finished `python -m trainer.main` run (it is '
        'written when training ends)')
  try:
    text = paths_lib.read_text(config_path, max_bytes=_MAX_CONFIG_BYTES)
  except OSError as e:
    raise UserError(f'{config_path} cannot be read ({e.strerror or e}); '
                    f'{rerun}') from None
  except ValueError as e:  # Not a regular file, too large, not UTF-8.
    raise UserError(f'{config_path} {e}; {rerun}') from None
  try:
    data = json.loads(text)
  except ValueError as e:
    raise UserError(f'{config_path} is not valid JSON ({e}); {rerun}'
                    ) from None
  try:
    config = config_lib.ModelConfig.from_json_dict(data)
  except ValueError as e:
    raise UserError(f'{config_path} {e}; {rerun}') from None
  export_path = os.path.join(model_dir, config_lib.EXPORT_DIR)
  special = paths_lib.special_entry(export_path)
  if special:  # TensorFlow's loader would open it and wait forever.
    raise UserError(f'{special[0]} is not a regular file but {special[1]}; '
                    f'{rerun}')
  # Only now: a mistyped --model_dir is answered before TensorFlow starts.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    served = tf.saved_model.load(export_path)
  except (OSError, ValueError, tf.errors.OpError) as e:
    detail = cli.one_line(e, 200)
    raise UserError(f'{export_path} cannot be loaded ({type(e).__name__}: '
                    f'{detail}); {rerun}') from None
  if not hasattr(served, 'serve'):
    raise UserError(f'{export_path} has no serve() endpoint; {rerun}')
  return served, config


def expand_paths(paths, *, note=None):
  """Command-line paths -> (path, error or None), folders expanded.

  A folder gives the image files in it and in its sub-folders, in sorted
  order, with the build's walker and link policy (pipelines.common.walk): a
  link to a folder is followed unless it leads into the folder, to one of
  its parents or to a folder already read (then it is skipped, with a
  note). Hidden files and folders and files without an image extension
  are skipped as the build skips them, counted in one note per folder;
  files named on the command line are kept whatever their name. A folder
  with no images, or one that cannot be listed, is an error entry, so it
  is not silently nothing.

  note: called with each line for stderr (what was skipped, and why).
  """
  note = note or (lambda line: None)
  for path in paths:
    if not os.path.isdir(path):
      yield path, None
      continue
    found, hidden, other = False, 0, []
    for item in walk.walk_local(path):
      if isinstance(item, walk.Skipped):
        where = os.path.join(path, item.relpath)
        if item.outcome == walk.IGNORED_LINK:
          note(f'skipped {where}: {item.reason}')
        else:
          yield where, item.reason
        continue
      parts = item.split('/')
      if any(walk.is_hidden(part) for part in parts):
        hidden += 1
      elif (os.path.splitext(parts[-1])[1].lower() not in
            source_image.EXTENSION_FORMATS):
        other.append(item)
      else:
        found = True
        yield os.path.join(path, item), None
    if hidden or other:
      names = ', '.join(walk.escaped(n) for n in other[:3]) + (
          ', ...' if len(other) > 3 else '')
      note(f'{walk.escaped(path)}: skipped ' + '; '.join(
          ([f'{hidden} hidden file(s)'] if hidden else []) +
          ([f'{len(other)} file(s) without an image extension ({names})']
           if other else [])))
    if not found:
      yield path, ('folder has no images (' +
                   ', '.join(sorted(source_image.EXTENSION_FORMATS)) + ')')


def preprocess(data: bytes, extension: str,
               config: config_lib.ModelConfig) -> bytes:
  """Source bytes -> the bytes the build would have stored for them."""
  return source_image.process(
      data, extension=extension,
      options=config.model_input.source_options()).encoded


def predict_files(paths, served, config, *,
                  max_file_bytes: int = source_image.DEFAULT_MAX_FILE_BYTES,
                  top_k: int = 1, every_class: bool = False) -> list[dict]:
  """One result dict per path: class/probability, or an error.

  'path' is the path as text: bytes of a name that are not UTF-8 are shown
  as \\xNN escapes (as the build reports them), so every line prints.
  top_k > 1 adds 'top_k': that many {'class', 'probability'}, most probable
  first (the first is 'class'; at most every class). every_class adds
  'probabilities': every class's, in config.class_names order. A failed
  file has 'error' (the reason) instead of all of these.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from trainer import export as export_lib  # pylint: disable=g-import-not-at-top
  results = []
  for path in paths:
    shown = walk.escaped(path)
    try:
      # The build's safe read: regular files only, size limit, header first
      # (a FIFO, /dev/zero or a huge file is refused, never read in full).
      data = source_image.read_source(path, max_bytes=max_file_bytes)
      encoded = preprocess(data, os.path.splitext(path)[1], config)
    except source_image.ImageRejected as e:
      results.append({'path': shown, 'error': e.reason})
      continue
    try:
      out = served.serve(tf.constant([encoded]))
    except tf.errors.OpError as e:  # The export refused it: say why.
      # One file per request: its index in the request says nothing.
      reason = export_lib.error_reason(e).removeprefix('image_bytes[0]: ')
      results.append({'path': shown,
                      'error': f'the model refused it ({reason[:300]})'})
      continue
    probabilities = out['probabilities'][0].numpy()
    if not np.isfinite(probabilities).all():
      results.append({'path': shown, 'error': (
          'the model gives non-finite probabilities (nan or inf) for it: the '
          'model is damaged or its training diverged; retrain it (e.g. with '
          'a lower --learning_rate)')})
      continue
    index = int(out['class_index'][0])
    result = {'path': shown, 'class': config.class_names[index],
              'probability': round(float(probabilities[index]), 4)}
    if top_k > 1:
      result['top_k'] = [
          {'class': config.class_names[i],
           'probability': round(float(probabilities[i]), 4)}
          for i in _most_probable(probabilities, index)[:top_k]]
    if every_class:
      result['probabilities'] = [float(p) for p in probabilities]
    results.append(result)
  return results


def _most_probable(probabilities: np.ndarray, first: int) -> list[int]:
  """Class indices by falling probability (ties: by index), `first` (the
  export's class_index) first whatever argmax's tie-breaking."""
  order = np.argsort(-probabilities, kind='stable').tolist()
  order.remove(first)
  return [first] + order


def _print(result: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(result, allow_nan=False), flush=True)
  elif 'error' in result:
    print(f'{result["path"]}\terror: {result["error"]}', flush=True)
  else:
    ranked = result.get('top_k') or [result]
    print('\t'.join([result['path']] + [
        f'{entry["class"]}\t{entry["probability"]:.4f}' for entry in ranked]),
          flush=True)


class _CsvOut:
  """--csv: the header, then one row per result, each flushed when done.

  Columns: path, class, probability, one per class name (every class's
  probability, in the model's class order), error (the reason a file
  failed; its probabilities stay empty). The csv module quotes what needs
  it (a class name with a comma or quote); lines end in \\n, as the other
  formats' do.
  """

  def __init__(self, class_names):
    self._classes = len(class_names)
    self._writer = csv.writer(sys.stdout, lineterminator='\n')
    self._write(['path', 'class', 'probability', *class_names, 'error'])

  def _write(self, row) -> None:
    self._writer.writerow(row)
    sys.stdout.flush()

  def write(self, result: dict) -> None:
    if 'error' in result:
      self._write([result['path'], '', '', *[''] * self._classes,
                   result['error']])
    else:
      self._write([result['path'], result['class'],
                   f'{result["probability"]:.4f}',
                   *[f'{p:.4f}' for p in result['probabilities']], ''])


def _stdout_closed() -> None:
  """The reader went away (`| head`): stop quietly, as SIGPIPE would."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not fail.
  except (OSError, ValueError):
    pass
  sys.exit(SIGPIPE_STATUS)


def main(argv):
  paths = argv[1:]
  if not _MODEL_DIR.value or not paths:
    sys.exit('error: usage: python -m trainer.predict --model_dir=DIR '
             '[--top_k=N] [--json | --csv] IMAGE|FOLDER [IMAGE|FOLDER ...]')
  if _MAX_FILE_BYTES.value < 1:
    sys.exit(f'error: --max_file_bytes={_MAX_FILE_BYTES.value} is out of '
             'range; pass a positive size in bytes, e.g. '
             f'{source_image.DEFAULT_MAX_FILE_BYTES} (256 MiB)')
  if _TOP_K.value < 1:
    sys.exit(f'error: --top_k={_TOP_K.value} is out of range; pass how many '
             'classes to print per file, 1 or more (e.g. --top_k=3)')
  if _CSV.value and _JSON.value:
    sys.exit('error: --csv and --json both given; pass one of them (one '
             'output format)')
  if _CSV.value and _TOP_K.value != 1:
    sys.exit(f'error: --top_k={_TOP_K.value} with --csv: the CSV has every '
             "class's probability already; drop --top_k")
  try:
    served, config = load(paths_lib.expand(_MODEL_DIR.value))
  except UserError as e:
    sys.exit(f'error: {cli.one_line(e)}')
  except KeyboardInterrupt:
    sys.exit('error: interrupted (Ctrl-C)')
  top_k = min(_TOP_K.value, len(config.class_names))
  failed = done = 0
  try:
    if _CSV.value:
      write = _CsvOut(config.class_names).write
    else:
      write = lambda result: _print(result, _JSON.value)
    for path, error in expand_paths(paths, note=lambda line: print(
        f'[predict] {line}', file=sys.stderr, flush=True)):
      # One file at a time: each line is out as soon as it is known.
      results = ([{'path': walk.escaped(path), 'error': error}] if error
                 else predict_files([path], served, config,
                                    max_file_bytes=_MAX_FILE_BYTES.value,
                                    top_k=top_k, every_class=_CSV.value))
      for result in results:
        done += 1
        failed += 'error' in result
        write(result)
  except BrokenPipeError:
    _stdout_closed()
  except KeyboardInterrupt:
    sys.exit(f'error: interrupted (Ctrl-C) after {done} file(s)')
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
