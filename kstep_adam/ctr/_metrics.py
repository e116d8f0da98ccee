"""CTR metrics on host arrays: ROC AUC (ties handled exactly) and logloss."""

from __future__ import annotations

import numpy as np


def _check(labels_N: np.ndarray, scores_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels_N, dtype=np.float64).reshape(-1)
  scores = np.asarray(scores_N, dtype=np.float64).reshape(-1)
  if labels.shape != scores.shape:
    raise ValueError(
      f"labels and scores must have the same length, got {labels.shape[0]} and {scores.shape[0]}"
    )
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError("labels must be 0 or 1")
  return labels, scores


def auc(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
  """Return the ROC AUC: the chance a random positive outscores a random negative.

  .. math::
    \\mathrm{AUC} = \\frac{\\sum_{i:y_i=1} r_i - n_+(n_+ + 1)/2}{n_+ n_-}

  with ``r_i`` the 1-based rank of score ``i``; tied scores share their mean rank, so a tie
  counts one half (the Mann-Whitney statistic).

  Args:
    labels_N: 0/1 labels.
    scores_N: scores or probabilities; only their order matters.

  Returns:
    The AUC in ``[0, 1]``, or ``nan`` if one class is absent.

  Examples:
    >>> auc(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.5, 0.5]))
    0.875
  """
  labels, scores = _check(labels_N, scores_N)
  n_pos = labels.sum()
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
  rank_sum_pos = mean_rank[inverse][labels == 1].sum()
  return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels_N: np.ndarray, probs_N: np.ndarray, *, eps: float = 1e-7) -> float:
  """Return the mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``.

  Examples:
    >>> round(logloss(np.array([1, 0]), np.array([0.5, 0.5])), 4)
    0.6931
  """
  labels, probs = _check(labels_N, probs_N)
  p = np.clip(probs, eps, 1 - eps)
  return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def eval_metrics(labels_N: np.ndarray, probs_N: np.ndarray, *, split: str = "test") -> dict:
  """AUC and logloss of click probabilities, or None with a reason where one is undefined.

  Args:
    labels_N: 0/1 labels.
    probs_N: predicted click probabilities.
    split: the held-out set scored, ``'test'`` or ``'val'``: the prefix of every key.

  Returns:
    ``test_auc`` and ``test_logloss`` (floats, or None), ``test_examples``, ``test_positives``
    and, when a metric is None, ``test_note`` saying why: a test set with a single class has
    no AUC, and non-finite predictions (a diverged model) have neither (their number is then
    ``test_nonfinite_predictions``). With
    ``split='val'`` the keys are ``val_auc``, ``val_logloss``, and so on.

  Examples:
    >>> eval_metrics(np.array([0.0, 0.0]), np.array([0.2, 0.4]))["test_note"]
    'the test set has a single class (2 examples, all labelled 0): AUC is undefined'
  """
  labels_N, probs_N = np.asarray(labels_N), np.asarray(probs_N)
  positives = int(labels_N.sum())
  result = {
    f"{split}_auc": None,
    f"{split}_logloss": None,
    f"{split}_examples": int(labels_N.size),
    f"{split}_positives": positives,
  }
  note = f"{split}_note"
  if labels_N.size == 0:
    return {**result, note: f"the {split} set is empty"}
  bad = int(np.count_nonzero(~np.isfinite(probs_N)))
  if bad:
    return {
      **result,
      f"{split}_nonfinite_predictions": bad,
      note: f"{bad} of {labels_N.size} predictions are not finite (the model diverged)",
    }
  result[f"{split}_logloss"] = logloss(labels_N, probs_N)
  if positives in (0, labels_N.size):
    return {
      **result,
      note: f"the {split} set has a single class ({labels_N.size} examples, all labelled "
      f"{int(positives > 0)}): AUC is undefined",
    }
  return {**result, f"{split}_auc": auc(labels_N, probs_N)}
