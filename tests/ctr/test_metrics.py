"""AUC and logloss (``kstep_adam.ctr._metrics``), against their definitions."""

import itertools

import numpy as np
import pytest

from kstep_adam import ctr


def test_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = rng.integers(0, 10, 200).astype(float)  # many ties
  pos, neg = scores[labels == 1], scores[labels == 0]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  assert ctr.auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))
  assert ctr.auc(labels, -scores) == pytest.approx(1 - ctr.auc(labels, scores))
  assert np.isnan(ctr.auc(np.ones(3), np.arange(3)))
  assert ctr.logloss(np.array([1.0, 0.0]), np.array([0.8, 0.2])) == pytest.approx(-np.log(0.8))
