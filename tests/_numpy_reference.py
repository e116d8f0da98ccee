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
