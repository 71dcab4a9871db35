"""GLUE metrics against scikit-learn and scipy on random data (with ties and degenerate cases)."""
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from bipft_jax.glue import metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 200)
  predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)  # correlated, not equal
  assert metrics.accuracy(labels, predictions) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))
  assert metrics.f1(labels, predictions) == pytest.approx(sklearn.metrics.f1_score(labels, predictions))
  assert metrics.matthews_corr(labels, predictions) == pytest.approx(
      sklearn.metrics.matthews_corrcoef(labels, predictions))


def test_multiclass_accuracy_matches_sklearn():
  rng = np.random.default_rng(7)
  labels, predictions = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
  assert metrics.accuracy(labels, predictions) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))


def test_degenerate_classification_cases_match_sklearn():
  labels = np.array([0, 1, 0, 1])
  for predictions in (np.zeros(4, int), np.ones(4, int)):  # a constant predictor
    assert metrics.matthews_corr(labels, predictions) == sklearn.metrics.matthews_corrcoef(labels, predictions) == 0
    assert metrics.f1(labels, predictions) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions, zero_division=0.0))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  labels = np.round(rng.uniform(0, 5, 300), 1)  # STS-B-like scores, many ties
  predictions = labels + rng.normal(0, 1.5, 300)
  predictions[:40] = np.round(predictions[:40])  # ties in the predictions too
  assert metrics.pearson(labels, predictions) == pytest.approx(scipy.stats.pearsonr(labels, predictions)[0], abs=1e-10)
  assert metrics.spearman(labels, predictions) == pytest.approx(
      scipy.stats.spearmanr(labels, predictions)[0], abs=1e-10)
  np.testing.assert_allclose(metrics._ranks(predictions), scipy.stats.rankdata(predictions))


def test_compute_reports_percentages():
  out = metrics.compute(("accuracy", "f1"), [1, 0, 1, 1], [1, 0, 0, 1])
  assert out == pytest.approx({"accuracy": 75.0, "f1": 100 * sklearn.metrics.f1_score([1, 0, 1, 1], [1, 0, 0, 1])})
  labels, predictions = [1.0, 2.0, 3.5, 0.5], [1.1, 1.7, 3.0, 1.0]
  assert metrics.compute(("pearson_spearman",), labels, predictions)["pearson_spearman"] == pytest.approx(
      50 * (scipy.stats.pearsonr(labels, predictions)[0] + scipy.stats.spearmanr(labels, predictions)[0]))
