"""Small, independent NumPy (float64) implementations of the k-step family, for tests.

Workers are rows of a ``(W, D)`` array, node-major: worker ``w = node * L + local``. A model is
linear regression on a flat parameter vector ``theta = [w, b]``. Nothing here imports the
package under test.
"""

from __future__ import annotations

import numpy as np


def linreg_grads(theta_WxD: np.ndarray, x_WxMxF: np.ndarray, y_WxM: np.ndarray) -> np.ndarray:
  """Gradient of mean((x @ w + b - y)^2) per worker; theta = [w (F), b]."""
  w_WxF, b_W = theta_WxD[:, :-1], theta_WxD[:, -1]
  r_WxM = np.einsum("wmf,wf->wm", x_WxMxF, w_WxF) + b_W[:, None] - y_WxM
  m = y_WxM.shape[1]
  g_w = 2.0 * np.einsum("wmf,wm->wf", x_WxMxF, r_WxM) / m
  g_b = 2.0 * r_WxM.mean(axis=1)
  return np.concatenate([g_w, g_b[:, None]], axis=1)


def mean_over(x_WxD: np.ndarray, num_nodes: int, level: str) -> np.ndarray:
  """Mean over all workers (``'all'``) or over the workers of each node (``'node'``)."""
  if level == "all":
    return np.broadcast_to(x_WxD.mean(axis=0, keepdims=True), x_WxD.shape).copy()
  x_NxLxD = x_WxD.reshape(num_nodes, -1, x_WxD.shape[-1])
  return (
    np.broadcast_to(x_NxLxD.mean(axis=1, keepdims=True), x_NxLxD.shape).reshape(x_WxD.shape).copy()
  )


def merge_level(t: int, period_all: int | None, period_node: int | None = None) -> str | None:
  """'all' if the global period divides t, else 'node' if the within-node one does, else None."""
  if period_all is not None and t % period_all == 0:
    return "all"
  if period_node is not None and t % period_node == 0:
    return "node"
  return None


def kstep_adam(
  theta0_D, data, *, num_nodes, lr, periods, b1=0.9, b2=0.999, eps=1e-8, form="adam", clip=None
):
  """k-step Adam. ``periods``: state -> (global period, within-node period or None).

  Args:
    theta0_D: initial parameters.
    data: list over steps of ``(x_WxMxF, y_WxM)``.
    num_nodes: nodes (workers are split evenly among them).
    lr: learning rate.
    periods: e.g. ``{'params': (4, None), 'mu': (12, None)}``; missing states never merge.
    b1, b2, eps: Adam hyperparameters.
    form: 'adam' (bias-corrected, eps outside the root) or 'local_adam' (no bias correction,
      eps**2 inside the root).
    clip: coordinate-wise clipping threshold or None.

  Returns:
    List over steps of the ``(W, D)`` parameters after each step.
  """
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  history = []
  for t, (x, y) in enumerate(data, start=1):
    g = linreg_grads(theta, x, y)
    if clip is not None:
      g = np.clip(g, -clip, clip)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if form == "adam":
      d = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    else:
      d = m / np.sqrt(v + eps**2)
    theta = theta - lr * d
    for name in ("params", "mu", "nu"):
      level = merge_level(t, *periods.get(name, (None, None)))
      if level is None:
        continue
      if name == "params":
        theta = mean_over(theta, num_nodes, level)
      elif name == "mu":
        m = mean_over(m, num_nodes, level)
      else:
        v = mean_over(v, num_nodes, level)
    history.append(theta.copy())
  return history


def sync_adam(theta0_D, data, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Adam on the worker-averaged gradient; every worker stays identical."""
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  history = []
  for t, (x, y) in enumerate(data, start=1):
    g = mean_over(linreg_grads(theta, x, y), 1, "all")
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    history.append(theta.copy())
  return history


def local_sgd(theta0_D, data, *, lr, k, momentum=None, nesterov=False):
  """Local SGD with local heavy-ball/Nesterov momentum, parameters averaged every k steps."""
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  buf = np.zeros_like(theta)
  history = []
  for t, (x, y) in enumerate(data, start=1):
    g = linreg_grads(theta, x, y)
    if momentum is not None:
      buf = g + momentum * buf
      g = g + momentum * buf if nesterov else buf
    theta = theta - lr * g
    if t % k == 0:
      theta = mean_over(theta, 1, "all")
    history.append(theta.copy())
  return history


def diloco(
  theta0_D,
  data,
  *,
  inner_lr,
  inner_steps,
  outer_lr=0.7,
  outer_momentum=0.9,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
):
  """DiLoCo: local Adam steps; every H steps an outer Nesterov SGD step on the mean delta."""
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  anchor = np.asarray(theta0_D, np.float64).copy()
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  outer_buf = np.zeros_like(anchor)
  history = []
  for t, (x, y) in enumerate(data, start=1):
    g = linreg_grads(theta, x, y)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - inner_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    if t % inner_steps == 0:
      delta = (anchor[None] - theta).mean(axis=0)
      outer_buf = delta + outer_momentum * outer_buf
      anchor = anchor - outer_lr * (delta + outer_momentum * outer_buf)
      theta = np.tile(anchor, (num_workers, 1))
    history.append(theta.copy())
  return history


# Compressed exchanges. A model's parameters are leaves (named slices of theta), each
# compressed on its own, as the optimizers compress each leaf of the parameter pytree.


def _signs_times_scale(x: np.ndarray) -> np.ndarray:
  """1-bit compression: sign(x) (zero counts as +) times ||x||_2 / sqrt(len(x))."""
  if x.size == 0:
    return x.copy()
  scale = np.sqrt(np.sum(x * x) / x.size)
  return np.where(x >= 0, scale, -scale)


def onebit_chunk(d: int, num_workers: int) -> int:
  """Elements each worker serves of a d-element leaf: d split n ways, rounded up to bytes."""
  return 8 * -(-d // (8 * num_workers))


def onebit_mean(m_WxD, worker_error_WxD, server_error, leaves):
  """1-bit Adam's compressed all-reduce with worker and server error feedback.

  Args:
    m_WxD: each worker's momentum.
    worker_error_WxD: each worker's compression error.
    server_error: leaf name -> ``(W, chunk)`` errors; row j belongs to worker j, the server of
      chunk j of that leaf.
    leaves: leaf name -> slice of the D columns.

  Returns:
    ``(mean_WxD, worker_error_WxD, server_error)``; every row of the mean is the same.
  """
  num_workers = m_WxD.shape[0]
  x = m_WxD + worker_error_WxD
  sent = np.empty_like(x)
  for sl in leaves.values():
    for w in range(num_workers):
      sent[w, sl] = _signs_times_scale(x[w, sl])
  mean = np.empty(x.shape[1])
  new_server_error = {}
  for name, sl in leaves.items():
    d = sl.stop - sl.start
    chunk = onebit_chunk(d, num_workers)
    errors = server_error[name].copy()
    for j in range(num_workers):
      lo, hi = min(j * chunk, d), min((j + 1) * chunk, d)
      q = sent[:, sl][:, lo:hi].mean(axis=0) + errors[j, : hi - lo]
      compressed = _signs_times_scale(q)
      errors[j, : hi - lo] = q - compressed
      mean[sl.start + lo : sl.start + hi] = compressed
    new_server_error[name] = errors
  return np.tile(mean, (num_workers, 1)), x - sent, new_server_error


def onebit_adam(theta0_D, data, *, lr, warmup_steps, leaves, b1=0.9, b2=0.999, eps=1e-8):
  """1-bit Adam: Adam on mean gradients for ``warmup_steps``, then frozen v and 1-bit momentum.

  Both moments are bias-corrected as in Adam; v's correction stops at the warm-up's end.

  Returns:
    ``(history, states)``: per step the ``(W, D)`` parameters, and a dict with the momentum,
    worker errors ``(W, D)`` and server errors (leaf -> ``(W, chunk)``) after the step.
  """
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  worker_error = np.zeros_like(theta)
  server_error = {
    name: np.zeros((num_workers, onebit_chunk(sl.stop - sl.start, num_workers)))
    for name, sl in leaves.items()
  }
  history, states = [], []
  for t, (x, y) in enumerate(data, start=1):
    g = linreg_grads(theta, x, y)
    if t <= warmup_steps:
      g = mean_over(g, 1, "all")
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
    else:
      m = b1 * m + (1 - b1) * g
      m, worker_error, server_error = onebit_mean(m, worker_error, server_error, leaves)
    v_hat = v / (1 - b2 ** min(t, warmup_steps))
    theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v_hat) + eps)
    history.append(theta.copy())
    states.append(
      {"mu": m.copy(), "worker_error": worker_error.copy(), "server_error": dict(server_error)}
    )
  return history, states


def sparse_ef_adam(
  theta0_D,
  data,
  *,
  lr,
  density,
  leaves,
  method="topk",
  indices=None,
  warmup_steps=0,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
):
  """Adam on the mean of sparsified gradients with error feedback (top-k or given indices).

  Each worker sends ``k = max(1, round(density * d))`` entries of ``g + e`` per leaf (the
  largest in magnitude, lower index first on ties, or ``indices(t, leaf_name)`` for
  random-k) and keeps the rest as its error ``e``. Warm-up steps average dense gradients.

  Returns:
    ``(history, errors)``: per step the ``(W, D)`` parameters and the ``(W, D)`` errors.
  """
  num_workers = data[0][1].shape[0]
  theta = np.tile(np.asarray(theta0_D, np.float64), (num_workers, 1))
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  error = np.zeros_like(theta)
  history, errors = [], []
  for t, (x, y) in enumerate(data, start=1):
    g = linreg_grads(theta, x, y)
    if t <= warmup_steps:
      g = mean_over(g, 1, "all")
    else:
      p = g + error
      sent = np.zeros_like(p)
      for name, sl in leaves.items():
        d = sl.stop - sl.start
        k = min(d, max(1, round(density * d)))
        for w in range(num_workers):
          if method == "topk":
            idx = np.argsort(-np.abs(p[w, sl]), kind="stable")[:k]
          else:
            idx = np.asarray(indices(t, name))
          sent[w, sl.start + idx] = p[w, sl.start + idx]
      error = p - sent
      g = mean_over(sent, 1, "all")
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    history.append(theta.copy())
    errors.append(error.copy())
  return history, errors
