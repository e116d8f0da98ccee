"""Scoring a replica on a held-out set through the sparse tier (AUC, logloss)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kstep_adam.ctr._metrics import eval_metrics
from kstep_adam.ctr.data._prefetch import IndexedBatch
from kstep_adam.ctr.train._tier import Tier


def evaluate(
  held_out: Iterable[IndexedBatch],
  tier: Tier,
  predict,
  params,
  *,
  split: str = "test",
  gather=None,
) -> dict:
  """:func:`eval_metrics` of ``params`` (one replica) on the held-out set ``held_out``.

  ``gather`` (a multi-process run) joins every process's labels and predictions, so each
  scores the whole held-out set.
  """
  labels, probs = [], []
  for item in held_out:
    rows_RxD, inverse_GxF = tier.eval_rows(item.row_ids_U, item.inverse_GxF)
    probs.append(np.asarray(predict(params, rows_RxD, inverse_GxF, item.batch.dense_BxI)))
    labels.append(item.batch.label_B)
  if gather is not None:
    empty = [np.zeros(0, np.float32)]
    labels, probs = (
      [gather(np.concatenate(empty + labels))],
      [gather(np.concatenate(empty + probs))],
    )
  if not labels:
    return eval_metrics(np.zeros(0), np.zeros(0), split=split)
  return eval_metrics(np.concatenate(labels), np.concatenate(probs), split=split)
