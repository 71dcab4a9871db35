"""GLUE metrics: known values by hand, percentages, and the degenerate cases that must be 0, not NaN."""
import numpy as np
import pytest

from bipft_jax.glue import metrics


def test_binary_metrics_by_hand():
  labels, predictions = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0]  # tp 3, tn 3, fp 1, fn 1
  assert metrics.accuracy(labels, predictions) == 0.75
  assert metrics.f1(labels, predictions) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
  assert metrics.matthews_corr(labels, predictions) == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))


def test_correlations_by_hand_with_ties():
  labels, predictions = [1.0, 2.0, 2.0, 4.0], [1.0, 3.0, 2.0, 5.0]
  x, y = np.array(labels) - 2.25, np.array(predictions) - 2.75
  assert metrics.pearson(labels, predictions) == pytest.approx(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))
  ranks_l, ranks_p = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4.0])  # the tie shares its average rank
  a, b = ranks_l - ranks_l.mean(), ranks_p - ranks_p.mean()
  assert metrics.spearman(labels, predictions) == pytest.approx(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def test_degenerate_predictors_score_zero_not_nan():
  labels = np.array([0, 1, 0, 1])
  for constant in (np.zeros(4, int), np.ones(4, int)):
    assert metrics.matthews_corr(labels, constant) == 0.0
  assert metrics.f1(labels, np.zeros(4, int)) == 0.0
  assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0
  assert metrics.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_compute_reports_percentages():
  out = metrics.compute(("accuracy", "f1", "pearson_spearman"), [1, 0, 1, 1], [1, 0, 0, 1])
  assert out["accuracy"] == 75.0 and out["f1"] == pytest.approx(80.0)
  assert out["pearson_spearman"] == pytest.approx(50 * (metrics.pearson([1, 0, 1, 1], [1, 0, 0, 1])
                                                         + metrics.spearman([1, 0, 1, 1], [1, 0, 0, 1])))
