"""A streaming, Criteo-shaped synthetic CTR data set with a hidden teacher (known ground truth).

Each example has ``num_dense`` count features (log-transformed the Criteo way) and
``num_categorical`` fields whose ids follow a Zipf law over per-field vocabularies. A hidden
*teacher* turns an example into a click probability:

.. math::
  z = b + w^\\top \\tilde x + \\sum_f s_f\\, a_f(i_f) + \\sum_{(f,g)\\in P} \\langle u_f(i_f), u_g(i_g) \\rangle,
  \\qquad y \\sim \\mathrm{Bernoulli}(\\sigma(z)),

with per-id scalars ``a`` and vectors ``u`` drawn from a hash of (seed, field, id), so nothing
of size "vocabulary" or "data set" is ever materialized. Labels are Bernoulli draws, so even
the teacher's AUC is below 1: it is the Bayes-optimal reference a student can at best reach.
The pairwise terms are dot products of field embeddings, the interaction DLRM, DCN-v2 and
DeepFM can represent, so a student can close most of the gap in a short run.

Every chunk comes from ``np.random.default_rng([seed, split, worker, index])``: the stream is
deterministic in the seed, random-access, and identical however it is consumed.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import numpy as np

from kstep_adam.ctr._metrics import auc
from kstep_adam.ctr.data._records import CTRBatch
from kstep_adam.ctr.data._records import concat_batches
from kstep_adam.ctr.data._records import feature_keys
from kstep_adam.embedding import splitmix64
from kstep_adam.embedding import uniform01

_TRAIN, _TEST, _CALIBRATE, _FILE, _VAL = 0, 1, 2, 3, 4
SHARDINGS = ("iid", "non_iid")
_HEAD_IDS = 8192  # per field, the teacher values of ids below this rank are precomputed


def _hashed_normals(seed: int, field_BxF: np.ndarray, id_BxF: np.ndarray, n: int) -> np.ndarray:
  """Standard normals [B, F, n] that depend only on (seed, field, id): the teacher's 'tables'.

  The embedding tier's SplitMix64 counters and uniforms, turned into normals by Box-Muller.
  """
  base = splitmix64(
    id_BxF.astype(np.uint64) * np.uint64(1_000_003)
    ^ splitmix64(field_BxF.astype(np.uint64) + np.uint64(seed) * np.uint64(7919))
  )
  cols = [splitmix64(base + np.uint64(j + 1)) for j in range(n + (n % 2))]
  u = np.stack([uniform01(c) for c in cols], axis=-1)  # in (0, 1): log(u1) is finite
  u1, u2 = u[..., 0::2], u[..., 1::2]
  r = np.sqrt(-2.0 * np.log(u1))
  z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=-1)
  return z[..., :n]


class SyntheticCTR:
  """Deterministic streaming CTR data with a hidden teacher.

  Args:
    num_dense: number of count features (Criteo: 13).
    num_categorical: number of categorical fields (Criteo: 26).
    vocab_size: largest per-field vocabulary; field vocabularies spread log-uniformly from 4
      up to this (Criteo's fields range from a handful to millions of values).
    zipf_exponent: Zipf exponent ``> 1`` of id popularity within a field.
    key_bits: feature keys live in ``[0, 2**key_bits)`` (up to 2**40 and beyond; the
      embedding tier hashes them into its rows).
    teacher_dim: width of the teacher's interaction vectors.
    num_interactions: number of field pairs with a teacher interaction term.
    logit_std: standard deviation of the teacher logit (sets how predictable clicks are).
    base_ctr: target mean click probability.
    num_workers: number of data-parallel shards.
    sharding: ``'iid'`` (every shard draws from the same law) or ``'non_iid'`` (each shard
      has its own popular ids in a quarter of the fields; the union is the global law).
    seed: seed of the teacher and of every stream.

  Examples:
    >>> data = SyntheticCTR(num_workers=2, seed=0)
    >>> batch, p = data.batch(step=0, worker=1, batch_size=4)
    >>> batch.keys_BxF.shape, p.shape
    ((4, 26), (4,))
  """

  def __init__(
    self,
    *,
    num_dense: int = 13,
    num_categorical: int = 26,
    vocab_size: int = 20_000,
    zipf_exponent: float = 1.2,
    key_bits: int = 40,
    teacher_dim: int = 4,
    num_interactions: int = 16,
    logit_std: float = 1.5,
    base_ctr: float = 0.25,
    num_workers: int = 1,
    sharding: str = "iid",
    seed: int = 0,
  ):
    for name, value, low in (
      ("num_dense", num_dense, 0),
      ("num_categorical", num_categorical, 2),
      ("vocab_size", vocab_size, 4),
      ("teacher_dim", teacher_dim, 1),
      ("num_interactions", num_interactions, 0),
      ("num_workers", num_workers, 1),
    ):
      if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not zipf_exponent > 1.0:
      raise ValueError(f"zipf_exponent must be > 1, got {zipf_exponent!r}")
    if not 0.0 < base_ctr < 1.0:
      raise ValueError(f"base_ctr must be in (0, 1), got {base_ctr!r}")
    if not logit_std > 0:
      raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
    if sharding not in SHARDINGS:
      raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    self.num_dense, self.num_categorical = int(num_dense), int(num_categorical)
    self.key_bits, self.teacher_dim = key_bits, teacher_dim
    self.zipf_exponent, self.seed = float(zipf_exponent), int(seed)
    self.num_workers, self.sharding = int(num_workers), sharding
    self.config = dict(
      num_dense=num_dense,
      num_categorical=num_categorical,
      vocab_size=vocab_size,
      zipf_exponent=zipf_exponent,
      key_bits=key_bits,
      teacher_dim=teacher_dim,
      num_interactions=num_interactions,
      logit_std=logit_std,
      base_ctr=base_ctr,
      num_workers=num_workers,
      sharding=sharding,
      seed=seed,
    )

    rng = np.random.default_rng([self.seed, 12345])
    F = self.num_categorical
    self.vocab_F = rng.permutation(
      np.round(np.logspace(np.log10(4), np.log10(vocab_size), F)).astype(np.int64)
    )
    self._dense_mu_I = rng.uniform(0.5, 3.0, num_dense)
    self._w_I = rng.normal(0, 0.3, num_dense)
    self._field_scale_F = 0.6 * np.exp(-rng.uniform(0, 2.5, F))
    pairs = [(f, g) for f in range(F) for g in range(f + 1, F)]
    picked = rng.choice(len(pairs), size=min(num_interactions, len(pairs)), replace=False)
    self._pairs_Px2 = np.array([pairs[i] for i in picked], dtype=np.int64).reshape(-1, 2)
    self._skewed_F = np.zeros(F, bool)
    self._skewed_F[rng.choice(F, size=max(1, F // 4), replace=False)] = True
    head = int(min(self.vocab_F.max(), _HEAD_IDS))
    ids_FxH = np.broadcast_to(np.arange(head), (F, head))
    fields_FxH = np.broadcast_to(np.arange(F)[:, None], (F, head))
    # C = 1 + teacher_dim values per id: its scalar a and its interaction vector u.
    self._head_FxHxC = _hashed_normals(self.seed, fields_FxH, ids_FxH, 1 + teacher_dim)
    self._scale, self._bias = 1.0, 0.0
    raw_logit = self._teacher_logit(
      *self._sample(np.random.default_rng([self.seed, _CALIBRATE]), 20_000, None)[1:]
    )
    self._scale = logit_std / max(float(raw_logit.std()), 1e-9)
    logit = raw_logit * self._scale
    bias = np.log(base_ctr / (1 - base_ctr)) - logit.mean()
    for _ in range(20):  # Newton steps on the mean CTR of the calibration sample
      p = 1 / (1 + np.exp(-(logit + bias)))
      bias -= (p.mean() - base_ctr) / max(float((p * (1 - p)).mean()), 1e-9)
    self._bias = float(bias)

  # -- sampling ----------------------------------------------------------------------------
  def _sample(self, rng: np.random.Generator, n: int, worker_B: np.ndarray | None):
    """Draw n examples: (dense features, standardized dense, ids); non-IID if worker_B given."""
    F = self.num_categorical
    raw_BxI = np.floor(np.exp(rng.normal(self._dense_mu_I, 1.0, (n, self.num_dense))))
    dense_BxI = np.log1p(raw_BxI)
    std_BxI = dense_BxI - self._dense_mu_I
    # Truncated Zipf by inverting the CDF of the continuous power law on [1, V + 1).
    one_minus_a = 1.0 - self.zipf_exponent
    top_F = (self.vocab_F + 1.0) ** one_minus_a
    u_BxF = rng.random((n, F))
    x_BxF = (1.0 + u_BxF * (top_F - 1.0)) ** (1.0 / one_minus_a)
    rank_BxF = np.minimum(x_BxF.astype(np.int64) - 1, self.vocab_F - 1)
    if worker_B is not None and self.sharding == "non_iid" and self.num_workers > 1:
      shift_BxF = (worker_B[:, None] * self.vocab_F[None, :]) // self.num_workers
      rank_BxF = np.where(self._skewed_F[None, :], (rank_BxF + shift_BxF) % self.vocab_F, rank_BxF)
    return dense_BxI.astype(np.float32), std_BxI, rank_BxF

  def _teacher_normals(self, id_BxF: np.ndarray) -> np.ndarray:
    """The teacher's per-id values [B, F, 1 + teacher_dim]: a lookup for the popular ids
    (precomputed, bounded size), hashed on the fly for the tail."""
    field_BxF = np.broadcast_to(np.arange(self.num_categorical), id_BxF.shape)
    head = self._head_FxHxC.shape[1]
    out = self._head_FxHxC[field_BxF, np.minimum(id_BxF, head - 1)]
    tail = id_BxF >= head
    if tail.any():
      out[tail] = _hashed_normals(
        self.seed, field_BxF[tail][:, None], id_BxF[tail][:, None], out.shape[-1]
      )[:, 0]
    return out

  def _teacher_logit(self, std_BxI: np.ndarray, id_BxF: np.ndarray) -> np.ndarray:
    normals_BxFxC = self._teacher_normals(id_BxF)
    logit = std_BxI @ self._w_I + normals_BxFxC[..., 0] @ self._field_scale_F
    u_BxFxT = normals_BxFxC[..., 1:] / np.sqrt(self.teacher_dim)
    f, g = self._pairs_Px2[:, 0], self._pairs_Px2[:, 1]
    logit = logit + np.einsum("bpt,bpt->b", u_BxFxT[:, f], u_BxFxT[:, g])
    return logit * self._scale + self._bias

  def _draw(self, rng: np.random.Generator, n: int, worker_B: np.ndarray | None):
    """Draw n labelled examples: (dense features, ids, teacher probabilities, clicks)."""
    dense_BxI, std_BxI, id_BxF = self._sample(rng, n, worker_B)
    p_B = 1 / (1 + np.exp(-self._teacher_logit(std_BxI, id_BxF)))
    return dense_BxI, id_BxF, p_B, rng.random(n) < p_B

  def _make(self, rng: np.random.Generator, n: int, worker_B: np.ndarray | None):
    dense_BxI, id_BxF, p_B, click_B = self._draw(rng, n, worker_B)
    keys_BxF = feature_keys(id_BxF, key_bits=self.key_bits)
    return CTRBatch(dense_BxI, keys_BxF, click_B.astype(np.float32)), p_B.astype(np.float32)

  # -- public streams ----------------------------------------------------------------------
  def batch(self, step: int, worker: int, batch_size: int) -> tuple[CTRBatch, np.ndarray]:
    """Return worker ``worker``'s training batch at ``step`` and its teacher probabilities."""
    if not 0 <= worker < self.num_workers:
      raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rng = np.random.default_rng([self.seed, _TRAIN, worker, step])
    return self._make(rng, batch_size, np.full(batch_size, worker))

  def global_batch(self, step: int, batch_size: int) -> CTRBatch:
    """All workers' batches at ``step`` concatenated: rows [w*B, (w+1)*B) are worker w's."""
    return concat_batches([self.batch(step, w, batch_size)[0] for w in range(self.num_workers)])

  def test_batches(
    self, num_examples: int, batch_size: int = 8192
  ) -> Iterator[tuple[CTRBatch, np.ndarray]]:
    """Yield the held-out set (the global mixture over shards) with teacher probabilities."""
    return self._held_out(_TEST, num_examples, batch_size)

  def val_batches(
    self, num_examples: int, batch_size: int = 8192
  ) -> Iterator[tuple[CTRBatch, np.ndarray]]:
    """Yield a validation set: the same law as :meth:`test_batches`, from a stream of its
    own, so choices made on it (a learning rate) never see the test examples."""
    return self._held_out(_VAL, num_examples, batch_size)

  def _held_out(self, split: int, num_examples: int, batch_size: int):
    if num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples!r}")
    for index, start in enumerate(range(0, num_examples, batch_size)):
      n = min(batch_size, num_examples - start)
      rng = np.random.default_rng([self.seed, split, index])
      yield self._make(rng, n, rng.integers(0, self.num_workers, n))

  def write_criteo(self, path: str, num_lines: int, *, chunk: int = 8192) -> None:
    """Write ``num_lines`` examples as a Criteo TSV file (gzip if ``path`` ends in .gz):
    label, 13 integer counts, 26 hex ids, so a real-format file with a known teacher can be
    fed to the readers. Needs ``num_dense == 13`` and ``num_categorical == 26``."""
    if (self.num_dense, self.num_categorical) != (13, 26):
      raise ValueError(
        f"write_criteo needs 13 dense and 26 categorical fields, got "
        f"{self.num_dense} and {self.num_categorical}"
      )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
      for index, start in enumerate(range(0, num_lines, chunk)):
        n = min(chunk, num_lines - start)
        rng = np.random.default_rng([self.seed, _FILE, index])
        dense_BxI, id_BxF, _, click_B = self._draw(rng, n, rng.integers(0, self.num_workers, n))
        label_B = click_B.astype(int)
        counts_BxI = np.rint(np.expm1(dense_BxI)).astype(np.int64)
        for b in range(n):
          f.write(
            "\t".join([str(label_B[b]), *map(str, counts_BxI[b]), *(f"{v:08x}" for v in id_BxF[b])])
            + "\n"
          )

  def teacher_auc(self, num_examples: int) -> float:
    """AUC of the teacher's own probabilities on the first ``num_examples`` test examples."""
    labels, probs = [], []
    for batch, p in self.test_batches(num_examples):
      labels.append(batch.label_B)
      probs.append(p)
    return auc(np.concatenate(labels), np.concatenate(probs))
