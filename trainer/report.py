"""Numbers people look at after training: confusion matrix, per-class report.

The pictures (curves, confusion matrix) are drawn by pipelines.plots.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def json_ready(value: Any) -> Any:
  """value with every non-finite float (NaN, inf) as None: json.dump(...,
  allow_nan=False) then always writes valid JSON (a bare NaN is not)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  return value


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
