"""Pictures and numbers people look at after training: curves, confusion."""

from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')  # Files only; no display on servers.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_training_curves(rows: Sequence[dict], path: str) -> None:
  """Accuracy and loss per epoch, train vs validation, as the course plots."""
  epochs = [r['epoch'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ('accuracy', 'loss')):
    for prefix, style in (('', 'o-'), ('val_', 's--')):
      values = [r.get(prefix + metric) for r in rows]
      if any(v is not None for v in values):
        ax.plot(epochs, values, style,
                label=('validation ' if prefix else 'training ') + metric)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(f'Training and validation {metric}')
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """int [K, K]: rows are true classes, columns predicted classes."""
  matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def per_class_report(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
  """Precision, recall, F1 and support per class, from a confusion matrix."""
  report = {}
  for i, name in enumerate(class_names):
    tp = matrix[i, i]
    predicted, actual = matrix[:, i].sum(), matrix[i].sum()
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    report[name] = {'precision': round(float(precision), 4),
                    'recall': round(float(recall), 4),
                    'f1': round(float(f1), 4), 'support': int(actual)}
  return report


def format_report(report: dict) -> str:
  width = max(10, *(len(n) for n in report))
  lines = [f'{"class":<{width}} precision  recall      f1  support']
  for name, r in report.items():
    lines.append(f'{name:<{width}} {r["precision"]:>9.3f} {r["recall"]:>7.3f} '
                 f'{r["f1"]:>7.3f} {r["support"]:>8d}')
  return '\n'.join(lines)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str],
                          path: str, *, title: str) -> None:
  k = len(class_names)
  size = max(4.0, 0.6 * k + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(matrix, cmap='Blues')
  ax.set_xticks(range(k), class_names, rotation=45, ha='right')
  ax.set_yticks(range(k), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  threshold = matrix.max() / 2 if matrix.size else 0
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(matrix[i, j]), ha='center', va='center',
              color='white' if matrix[i, j] > threshold else 'black')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)

