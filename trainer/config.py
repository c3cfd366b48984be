"""What a training run is: its settings, the names of what it writes.

No TensorFlow here: `python -m trainer.main --help` imports only this (and
absl), so it answers at once. The flags of trainer.main are defined from
`TrainConfig`'s fields and defaults; nothing is written twice.

A run's folder (--model_dir):

  best.keras                 the best epoch's model
  export/                    SavedModel, endpoint `serve(image_bytes)`
  model_config.json          ModelConfig: classes and the ModelInput
  history.csv                one row per epoch (column `epoch`)
  metrics.json               best epoch's val metrics, test metrics, ...
  training_curves.png        accuracy and loss, train vs validation
  train_samples.png          a training batch as the model receives it
  confusion_matrix.png       on test (or validation), with
  classification_report.txt  per-class precision/recall/F1
  predictions.csv            every validation/test image: file, given and
                             predicted class, each class's probability
  mistakes.png               those images, wrong ones first (trainer.mistakes)
  suspect_labels.json, .png  images whose label the model contradicts
  model_summary.txt          the model's layers (model.summary())
  tensorboard/               TensorBoard logs
  checkpoint/                resume state (see trainer.callbacks)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from pipelines.common import paths
from pipelines.common import run_files
from pipelines.common.errors import UserError
from pipelines.preprocessing import model_input as model_input_lib
from pipelines.records_to_batches import augment_config
from trainer import model_table

MODELS = model_table.MODEL_NAMES  # One entry each in trainer.model_table.
BASE_MODELS = model_table.BASE_MODEL_NAMES
OPTIMIZERS = ('rmsprop', 'adam', 'sgd')
DISTRIBUTIONS = ('default', 'mirrored', 'multi_worker')
MONITORS = ('val_loss', 'val_accuracy', 'loss', 'accuracy')
CLASS_WEIGHTS = ('none', 'balanced')


class ModelError(UserError):
  """A model that cannot be built for this dataset; the message says why."""


def check_model_names(model: str, base_model: str) -> None:
  """ModelError for a --model or --base_model that is not one (no Keras
  needed: the trainer checks before TensorFlow loads)."""
  if model not in MODELS:
    raise ModelError(f'--model={model} is not a model; choose one of '
                     f'{", ".join(MODELS)}')
  if base_model not in BASE_MODELS:
    raise ModelError(f'--base_model={base_model} is not one of '
                     f'{", ".join(BASE_MODELS)}')

def check_image_side(model: str, need: int, height: int, width: int) -> None:
  """ModelError when height x width images are too small for --model (which
  needs sides of at least `need`)."""
  if min(height, width) < need:
    raise ModelError(
        f'--model={model} needs images of at least {need}x{need}, this '
        f'dataset has {height}x{width}: rebuild with a larger --image_size '
        'or pass --image_size')


def check_image_size(model: str, base_model: str,
                     size: tuple[int, int],
                     conv_filters: Optional[tuple[int, ...]] = None) -> None:
  """ModelError when --model (on --base_model, with --conv_filters) cannot
  take size=(height, width) images; no Keras needed, so the trainer checks
  before TensorFlow loads (the model's builder checks again)."""
  name = model
  if model_table.get(model).uses_base_model:
    name = f'{model} --base_model={base_model}'
  elif conv_filters:
    name = f'{model} --conv_filters={",".join(map(str, conv_filters))}'
  check_image_side(name, model_table.min_side(model, base_model, conv_filters),
                   *size)


def check_fine_tuning(config: 'TrainConfig') -> None:
  """UserError for fine-tuning flags that do not fit together (no Keras:
  the trainer checks before TensorFlow loads; the layer name is checked
  when the model is built)."""
  if config.fine_tune_from is None:
    if config.fine_tune_epochs:
      raise UserError(f'--fine_tune_epochs={config.fine_tune_epochs} needs '
                      '--fine_tune_from=LAYER (the first base layer to '
                      'train, e.g. mixed7 for inception_v3)')
    return
  if not model_table.get(config.model).uses_base_model:
    raise UserError(f'--fine_tune_from={config.fine_tune_from}: --model='
                    f'{config.model} has no pretrained base; fine-tuning is '
                    'for --model=transfer')
  if config.fine_tune_epochs < 1:
    raise UserError(f'--fine_tune_from={config.fine_tune_from} needs '
                    '--fine_tune_epochs >= 1 (epochs after the --epochs of '
                    f'the frozen base; now {config.fine_tune_epochs})')
  if not 0 < config.fine_tune_learning_rate < float('inf'):  # And not NaN.
    raise UserError(f'--fine_tune_learning_rate='
                    f'{config.fine_tune_learning_rate} must be a finite '
                    'number > 0')
  if config.distribution == 'multi_worker':
    raise UserError('--fine_tune_from with --distribution=multi_worker is not '
                    'supported; fine-tune in one process (or with '
                    '--distribution=mirrored)')


def check_class_weight(class_weight: str) -> None:
  """UserError for a --class_weight that is not one of CLASS_WEIGHTS."""
  if class_weight not in CLASS_WEIGHTS:
    raise UserError(f'--class_weight={class_weight} is not one of '
                    f'{", ".join(CLASS_WEIGHTS)}')


def architecture_args(model: str, *, conv_filters, dense_units) -> dict:
  """--model's builder arguments with --conv_filters / --dense_units;
  ModelError naming the flag when they do not apply or are not positive."""
  try:
    return model_table.architecture_args(model, conv_filters=conv_filters,
                                         dense_units=dense_units)
  except ValueError as e:
    raise ModelError(str(e)) from None


def parse_int_list(flag: str, text: Optional[str]
                   ) -> Optional[tuple[int, ...]]:
  """'16,32,64' -> (16, 32, 64); None or '' -> None; UserError naming
  the flag otherwise."""
  if text is None or not str(text).strip():
    return None
  try:
    return tuple(int(part) for part in str(text).split(','))
  except ValueError:
    raise UserError(f'--{flag}={text}: expected comma-separated positive '
                    'integers, e.g. --conv_filters=16,32,64') from None


def balanced_class_weights(class_counts) -> dict[int, float]:
  """--class_weight=balanced: class -> n / (K * n_k) from the train
  split's per-class counts (scikit-learn's 'balanced'; 1 for every class of
  a balanced dataset). A class with no image gets 1 (it cannot occur)."""
  counts = [int(c) for c in class_counts]
  total, k = sum(counts), len(counts)
  return {i: (total / (k * c) if c else 1.0) for i, c in enumerate(counts)}


# Files and folders of a run (--model_dir).
BEST_MODEL_FILE = 'best.keras'
EXPORT_DIR = run_files.EXPORT_DIR
MODEL_CONFIG_FILE = run_files.MODEL_CONFIG_FILE
HISTORY_FILE = 'history.csv'
METRICS_FILE = 'metrics.json'
CURVES_FILE = 'training_curves.png'
TRAIN_SAMPLES_FILE = 'train_samples.png'
CONFUSION_FILE = 'confusion_matrix.png'
CLASS_REPORT_FILE = 'classification_report.txt'
MODEL_SUMMARY_FILE = 'model_summary.txt'
TENSORBOARD_DIR = run_files.TENSORBOARD_DIR
CHECKPOINT_DIR = run_files.CHECKPOINT_DIR
STATE_FILE = run_files.STATE_FILE


@dataclasses.dataclass(frozen=True)
class ClusterTask:
  """This process's place in a --distribution=multi_worker cluster.

  Read from TF_CONFIG (`tf.distribute.cluster_resolver.TFConfigClusterResolver`
  reads the same): every machine runs the same command, only TF_CONFIG
  differs. The chief (task type `chief`, else worker 0) writes --model_dir.
  """
  task_type: str
  task_index: int
  num_workers: int  # Every training process (chief included).
  address: str
  has_chief: bool = False  # The cluster lists a "chief" task.

  @property
  def is_chief(self) -> bool:
    return self.task_type == 'chief' or (
        self.task_index == 0 and not self.has_chief)

  @property
  def id_in_cluster(self) -> int:
    """0 for the chief, then the workers in order (the input pipeline id)."""
    if self.task_type == 'chief':
      return 0
    return self.task_index + int(self.has_chief)

  def describe(self) -> str:
    role = 'chief' if self.is_chief else 'not the chief: writes nothing'
    return (f'{self.task_type} {self.task_index} of {self.num_workers} '
            f'processes at {self.address} ({role})')


def cluster_task(tf_config: Optional[str]) -> ClusterTask:
  """TF_CONFIG's text -> ClusterTask; ValueError naming what is wrong."""
  example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\' on '
             'the first machine, index 1 on the second')
  if not tf_config or not tf_config.strip():
    raise ValueError(f'--distribution=multi_worker needs TF_CONFIG set on '
                     f'every machine; {example}')
  try:
    value = json.loads(tf_config)
  except ValueError as e:
    raise ValueError(f'TF_CONFIG is not JSON ({e}); {example}') from None
  cluster = value.get('cluster') if isinstance(value, dict) else None
  task = value.get('task') if isinstance(value, dict) else None
  if not isinstance(cluster, dict) or not isinstance(task, dict):
    raise ValueError(f'TF_CONFIG needs "cluster" and "task" objects; {example}')
  trainers = {}
  for kind in ('chief', 'worker'):
    addresses = cluster.get(kind, [])
    if not isinstance(addresses, list) or not all(
        isinstance(a, str) and a.rpartition(':')[2].isdigit()
        for a in addresses):
      raise ValueError(f'TF_CONFIG cluster "{kind}" must be a list of '
                       f'"HOST:PORT" strings, not {addresses!r}; {example}')
    trainers[kind] = addresses
  if len(trainers['chief']) > 1:
    raise ValueError('TF_CONFIG lists more than one "chief"; list one (or '
                     'none: worker 0 is then the chief)')
  extra = sorted(set(cluster) - {'chief', 'worker'})
  if extra:
    raise ValueError(f'TF_CONFIG cluster has {", ".join(extra)}: '
                     '--distribution=multi_worker uses only "chief" and '
                     '"worker" (parameter servers and evaluators are not '
                     'supported)')
  kind, index = task.get('type'), task.get('index', 0)
  if not isinstance(index, int) or isinstance(index, bool):
    raise ValueError(f'TF_CONFIG task "index" must be a number, not '
                     f'{index!r}; {example}')
  if kind not in ('chief', 'worker') or not (
      0 <= index < len(trainers[kind])):
    raise ValueError(
        f'TF_CONFIG task {task!r} is not in its cluster ({len(trainers["worker"])} '
        f'workers, {len(trainers["chief"])} chief); set "task": '
        '{"type": "worker", "index": N} with N from 0 on each machine'
        + (' (and {"type": "chief", "index": 0} on the chief)'
           if trainers['chief'] else ''))
  addresses = trainers[kind]
  return ClusterTask(task_type=kind, task_index=index,
                     num_workers=len(trainers['chief']) + len(trainers['worker']),
                     address=addresses[index],
                     has_chief=bool(trainers['chief']))


def distribution_task(distribution: str,
                      tf_config: Optional[str]) -> Optional[ClusterTask]:
  """This process's ClusterTask for --distribution=multi_worker, else None.

  UserError for a TF_CONFIG that does not parse, or one set while
  --distribution is not multi_worker. No TensorFlow: the command line
  answers before it loads.
  """
  if distribution != 'multi_worker':
    if (tf_config or '').strip():
      raise UserError(
          f'TF_CONFIG is set but --distribution={distribution}: pass '
          '--distribution=multi_worker to train on its cluster, or unset '
          'TF_CONFIG to train in this process alone')
    return None
  try:
    return cluster_task(tf_config)
  except ValueError as e:
    raise UserError(str(e)) from None


def single_unit(num_classes: int) -> bool:
  """Two classes train one sigmoid unit (binary cross-entropy); more, softmax."""
  return num_classes == 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on (flags of trainer.main, same names)."""
  data_dir: Optional[str]  # None with --tfds: where the import goes.
  model_dir: str
  model: str = MODELS[0]
  epochs: int = 15
  batch_size: int = 32
  learning_rate: float = 1e-3
  optimizer: str = OPTIMIZERS[0]
  early_stopping_patience: int = 3
  early_stopping_monitor: str = MONITORS[0]
  target_accuracy: Optional[float] = None
  augment: Optional[augment_config.AugmentConfig] = None
  dropout: Optional[float] = None
  image_size: Optional[tuple[int, int]] = None
  seed: int = 0
  mixed_precision: bool = False
  jit_compile: bool = False
  distribution: str = DISTRIBUTIONS[0]
  base_model: str = BASE_MODELS[0]
  base_weights: Optional[str] = None
  base_cutoff_layer: Optional[str] = None
  conv_filters: Optional[tuple[int, ...]] = None
  dense_units: Optional[int] = None
  class_weight: str = CLASS_WEIGHTS[0]
  fine_tune_from: Optional[str] = None
  fine_tune_epochs: int = 0
  fine_tune_learning_rate: float = 1e-5
  tfds: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  cache: Optional[str] = None
  data_service: Optional[str] = None
  data_service_timeout: float = 300
  multi_worker_timeout: int = 600

  def fingerprint(self, spec=None) -> dict:
    """Settings a resumed run must share (epochs may grow).

    Keys are flag names. Paths are absolute and resolved, so the same run
    given relative paths, or through a link, is the same run; model_dir is
    left out (the run lives there, and may be moved). With the dataset's
    spec, `image_size` is the size trained at and `dataset` says what the
    data is, so a dataset rebuilt in place is another run.
    """
    out = dataclasses.asdict(self)
    out.pop('epochs')
    out.pop('fine_tune_epochs')  # May grow too.
    out.pop('model_dir')
    out.pop('data_service')  # Where batches are made, not what the run is.
    out.pop('tfds_data_dir')  # Where TFDS keeps files; `dataset` says what.
    out.pop('multi_worker_timeout')
    out.pop('data_service_timeout')
    out['data_dir'] = normalized_path(self.data_dir)
    out['cache'] = (self.cache if self.cache in (None, '', 'memory')
                    else normalized_path(self.cache))
    out['base_weights'] = (
        self.base_weights if self.base_weights in (None, '', 'none')
        else normalized_path(self.base_weights))
    out['augment'] = augment_config.to_text(self.augment)
    size = self.image_size or (spec and (spec.height, spec.width))
    out['image_size'] = list(size) if size else None
    if self.conv_filters is not None:  # As JSON gives it back.
      out['conv_filters'] = list(self.conv_filters)
    if spec is not None:
      out['dataset'] = dataset_summary(spec)
    return out


def normalized_path(path: Optional[str]) -> Optional[str]:
  """Absolute, resolved local path (URLs such as gs://... unchanged)."""
  if not path or paths.is_remote(path):
    return path
  return os.path.realpath(os.path.expanduser(path))


def dataset_digest(spec) -> str:
  """sha256 of everything metadata.json says (sizes, classes, every shard)."""
  return hashlib.sha256(json.dumps(spec.to_json_dict(), sort_keys=True,
                                   default=str).encode()).hexdigest()


def dataset_summary(spec) -> str:
  """What a dataset is, readable, ending in its metadata digest."""
  names = list(spec.class_names)
  shown = ', '.join(names[:4]) + (f', ... ({len(names)} in all)'
                                  if len(names) > 4 else '')
  counts = '/'.join(str(spec.splits[s].num_examples if s in spec.splits
                        else 0) for s in ('train', 'validation', 'test'))
  return (f'{spec.height}x{spec.width}x{spec.channels} {spec.image_format} '
          f'images, classes {shown}, {counts} train/validation/test, '
          f'metadata {dataset_digest(spec)[:12]}')


def same_setting(key: str, saved, current) -> bool:
  """Fingerprint values equal in another spelling (runs of older versions)."""
  if key in ('data_dir', 'cache', 'base_weights') and isinstance(saved, str):
    if saved not in ('', 'memory', 'none'):
      saved = normalized_path(saved)
  if key == 'augment' and isinstance(saved, str) and saved != current:
    saved = augment_config.to_text(_old_augment(saved))
  return saved == current


def _old_augment(saved: str):
  """An older run's augment (JSON of a preset name or a dict), as a config."""
  try:
    value = json.loads(saved)
  except ValueError:
    value = saved
  try:
    if isinstance(value, str):
      return augment_config.parse(value)
    return augment_config.resolve(value)
  except (ValueError, TypeError):
    return saved


def _flag_value(key: str, value) -> str:
  """A fingerprint value as it is spelled on the command line."""
  if value is None:
    return '(not set)'
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return ','.join(str(v) for v in value)
  return str(value)


def settings_message(config: TrainConfig, differences) -> str:
  """One line naming each differing setting as a flag, and the way out."""
  checkpoint = os.path.join(config.model_dir, CHECKPOINT_DIR)
  keys = {key for key, _, _ in differences}
  parts = []
  for key, saved, current in differences:
    if key == 'dataset':
      parts.append(f'--data_dir={config.data_dir} holds another dataset than '
                   f'the saved run ({saved} in the saved run, {current} now)')
    elif key == 'image_size' and 'dataset' in keys and not config.image_size:
      continue  # The stored size changed with the dataset: said above.
    else:
      parts.append(f'--{key}: {_flag_value(key, saved)} in the saved run, '
                   f'{_flag_value(key, current)} now')
  if 'dataset' in keys:
    fix = ('the saved run cannot resume on it: pass a new --model_dir to '
           f'train on this dataset (or delete {checkpoint}/ to start over '
           'there)')
  else:
    fix = ('to resume it, rerun with its settings; to start another run, '
           f'pass a new --model_dir (or delete {checkpoint}/ to start over '
           'there)')
  return (f'--model_dir={config.model_dir} holds a run with other settings: '
          + '; '.join(parts) + f'. {fix[0].upper()}{fix[1:]}')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """model_config.json: what a trained model takes and predicts.

  Saved flat (model_input's fields beside `model` and `class_names`), as
  earlier versions wrote it, so their files still load.
  """
  model: str
  class_names: tuple[str, ...]
  model_input: model_input_lib.ModelInput

  @property
  def single_unit(self) -> bool:
    return single_unit(len(self.class_names))

  def to_json_dict(self) -> dict:
    out = {'model': self.model, 'class_names': list(self.class_names)}
    out.update(dataclasses.asdict(self.model_input))
    return out

  @classmethod
  def from_json_dict(cls, d: Any) -> 'ModelConfig':
    """Raises ValueError naming what is missing or wrong."""
    if not isinstance(d, dict):
      d = {}
    fields = {f.name: f for f in dataclasses.fields(model_input_lib.ModelInput)}
    required = ['class_names'] + [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and n not in ('stored_height',
                                                           'stored_width')]
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f'lacks {", ".join(missing)}')
    values = {k: d[k] for k in fields if d.get(k) is not None}
    # Versions before the serving export kept the stored size: the read size.
    values.setdefault('stored_height', d['height'])
    values.setdefault('stored_width', d['width'])
    for key in ('mean', 'std'):
      if key in values:
        values[key] = tuple(values[key])
    try:
      return cls(model=d.get('model', ''),
                 class_names=tuple(d['class_names']),
                 model_input=model_input_lib.ModelInput(**values))
    except TypeError as e:
      raise ValueError(str(e)) from None


def with_tfds_data(config: TrainConfig) -> TrainConfig:
  """config with data_dir the --tfds dataset in this toolkit's format
  (imported now unless an earlier run did); config itself without --tfds.
  UserError (one line) for a dataset TFDS does not know, cannot prepare, or
  that is not image classification."""
  if not config.tfds:
    return config
  from pipelines import tfds_import  # pylint: disable=g-import-not-at-top
  data_dir = tfds_import.import_dataset(
      config.tfds, tfds_data_dir=config.tfds_data_dir,
      output_dir=config.data_dir or None, image_size=config.image_size)
  return dataclasses.replace(config, data_dir=data_dir)


def default(name: str):
  """The default of TrainConfig field `name` (what its flag defaults to)."""
  return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
