"""GLUE metrics: Matthews correlation, accuracy, F1 (scikit-learn), Pearson and Spearman (scipy), as
the release and Hugging Face's GLUE metric compute them; `compute` returns the named ones in percent.

One rule is ours: a metric that is undefined for a degenerate split or predictor (a constant
prediction's correlation, F1 without positives) is 0 rather than NaN, so an early epoch that
predicts one value can still be compared with the others when the best epoch is selected.
"""
import numpy as np
import scipy.stats
import sklearn.metrics


def accuracy(labels, predictions) -> float:
  return float(sklearn.metrics.accuracy_score(labels, predictions))


def f1(labels, predictions) -> float:
  """F1 of the positive class (label 1)."""
  return float(sklearn.metrics.f1_score(labels, predictions, zero_division=0.0))


def matthews_corr(labels, predictions) -> float:
  return float(sklearn.metrics.matthews_corrcoef(labels, predictions))


def _correlation(statistic, labels, predictions) -> float:
  if np.ptp(np.asarray(labels, np.float64)) == 0 or np.ptp(np.asarray(predictions, np.float64)) == 0:
    return 0.0  # constant input: undefined (scipy warns and returns NaN)
  return float(statistic(labels, predictions)[0])


def pearson(labels, predictions) -> float:
  return _correlation(scipy.stats.pearsonr, labels, predictions)


def spearman(labels, predictions) -> float:
  return _correlation(scipy.stats.spearmanr, labels, predictions)


def pearson_spearman(labels, predictions) -> float:
  """Mean of Pearson and Spearman: the STS-B score the release selects epochs by."""
  return (pearson(labels, predictions) + spearman(labels, predictions)) / 2


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr, "pearson": pearson,
           "spearman": spearman, "pearson_spearman": pearson_spearman}


def compute(names, labels, predictions) -> dict:
  """{name: 100 * metric} for each name in `names`."""
  return {name: 100.0 * METRICS[name](labels, predictions) for name in names}
