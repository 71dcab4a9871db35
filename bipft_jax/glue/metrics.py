"""GLUE metrics in numpy: Matthews correlation, accuracy, F1, Pearson, Spearman.

Each takes labels and predictions (class ids, or scores for STS-B) and returns a float; `compute`
returns the named ones as percentages, as GLUE tables print them.
"""
import numpy as np


def accuracy(labels, predictions) -> float:
  return float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def _confusion(labels, predictions):
  labels, predictions = np.asarray(labels).astype(bool), np.asarray(predictions).astype(bool)
  tp = float(np.sum(labels & predictions))
  tn = float(np.sum(~labels & ~predictions))
  fp = float(np.sum(~labels & predictions))
  fn = float(np.sum(labels & ~predictions))
  return tp, tn, fp, fn


def f1(labels, predictions) -> float:
  """F1 of the positive class (label 1), 0 when there are no true or predicted positives."""
  tp, _, fp, fn = _confusion(labels, predictions)
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(labels, predictions) -> float:
  """Matthews correlation of binary labels; 0 when a row or column of the confusion matrix is empty."""
  tp, tn, fp, fn = _confusion(labels, predictions)
  denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(labels, predictions) -> float:
  x = np.asarray(labels, np.float64) - np.mean(labels)
  y = np.asarray(predictions, np.float64) - np.mean(predictions)
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denominator) if denominator else 0.0


def _ranks(values) -> np.ndarray:
  """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
  values = np.asarray(values)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
  group = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)
  last = np.r_[first[1:], len(values)] - 1
  ranks = np.empty(len(values), np.float64)
  ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
  return ranks


def spearman(labels, predictions) -> float:
  return pearson(_ranks(labels), _ranks(predictions))


def pearson_spearman(labels, predictions) -> float:
  """Mean of Pearson and Spearman: the STS-B score the release selects epochs by."""
  return (pearson(labels, predictions) + spearman(labels, predictions)) / 2


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr, "pearson": pearson,
           "spearman": spearman, "pearson_spearman": pearson_spearman}


def compute(names, labels, predictions) -> dict:
  """{name: 100 * metric} for each name in `names`."""
  return {name: 100.0 * METRICS[name](labels, predictions) for name in names}
