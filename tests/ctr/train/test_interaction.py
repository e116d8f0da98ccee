"""DLRM's pair interaction: the C++ kernel and XLA's form against the gathered Gram matrix,
the kernel's per-example bits, and where it runs (vmap, shard_map, explicit sharding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kstep_adam.ctr.train import _interaction
from kstep_adam.ctr.train._interaction import native_pairwise_dots
from kstep_adam.ctr.train._interaction import pairwise_dots
from kstep_adam.ctr.train._interaction import xla_pairwise_dots

FORMS = {"auto": pairwise_dots, "native": native_pairwise_dots, "xla": xla_pairwise_dots}


@pytest.fixture(scope="module", autouse=True)
def _kernel_built():
  # The suite runs on a CPU with a C++ compiler: a kernel that did not build is a failure
  # here, not a silent fallback to the XLA form.
  assert _interaction.native_available()


def _reference_dots(v_BxNxD):
  i, j = np.triu_indices(v_BxNxD.shape[1], k=1)
  return jnp.einsum("bnd,bmd->bnm", v_BxNxD, v_BxNxD)[:, i, j]


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# The train step's shape; a batch that is not a multiple of the kernel's 8 lanes or its tasks
# of 64 examples; widths that are not a multiple of 8; one vector more than 8 accumulators;
# 2 vectors (one pair). 27, 5 and 2 vectors are padded to a multiple of 4 by the XLA form.
SHAPES = [(4096, 27, 16), (1000, 27, 16), (13, 6, 5), (9, 11, 24), (3, 40, 1), (7, 2, 3), (2, 8, 3)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pairwise_dots_and_their_gradient_match_the_gathered_gram_matrix(shape, form):
  # Full size too: XLA:CPU has miscompiled other formulations at this shape.
  v = _normal(shape)
  weights = _normal(shape[1] * (shape[1] - 1) // 2, seed=1)
  # The weights are an argument, not a constant XLA would fold the reference's scatter into.
  ours = jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(FORMS[form](v) * w)))
  reference = jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(_reference_dots(v) * w)))
  (value, grad), (ref_value, ref_grad) = ours(v, weights), reference(v, weights)
  np.testing.assert_allclose(FORMS[form](v), _reference_dots(v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_one_vector_has_no_pairs():
  v = _normal((2, 1, 3))
  assert pairwise_dots(v).shape == (2, 0)
  assert np.all(jax.grad(lambda v: pairwise_dots(v).sum())(v) == 0)


def _custom_calls(fn, *args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {target for target in _interaction.TARGETS if f'custom_call_target="{target}"' in text}


def test_the_kernel_runs_on_a_cpu_unless_switched_off(monkeypatch):
  v = _normal((64, 27, 16))
  # A new function each time: the switch is read when a function is traced, and JAX keeps
  # the traces of a function it has seen.
  grad = lambda: jax.grad(lambda v: jnp.sum(pairwise_dots(v) ** 2))
  assert _custom_calls(grad(), v) == {"KstepPairDots", "KstepPairDotsGrad"}
  assert not _custom_calls(grad(), v.astype(jnp.bfloat16))  # float32 only
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "0")
  assert not _custom_calls(grad(), v)
  with pytest.raises(RuntimeError, match=r"kernel is not there.*use pairwise_dots"):
    native_pairwise_dots(v)
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "yes")
  with pytest.raises(ValueError, match=r"KSTEP_ADAM_NATIVE_KERNELS='yes': must be 1"):
    pairwise_dots(v)


def test_an_example_gets_the_same_bits_alone_as_in_its_batch_on_any_thread():
  # Each example is summed in one order whichever of the threads and lanes runs it: a
  # batch's result does not depend on its neighbours, the thread pool, or the run.
  v = _normal((1000, 27, 16))
  cotangent = _normal((1000, 351), seed=1)
  fwd = jax.jit(native_pairwise_dots)
  bwd = jax.jit(lambda v, c: jax.vjp(native_pairwise_dots, v)[1](c)[0])
  whole, whole_grad = fwd(v), bwd(v, cotangent)
  np.testing.assert_array_equal(fwd(v), whole)
  np.testing.assert_array_equal(bwd(v, cotangent), whole_grad)
  for start, stop in [(0, 1), (5, 6), (999, 1000), (61, 70), (64, 128)]:
    np.testing.assert_array_equal(fwd(v[start:stop]), whole[start:stop])
    np.testing.assert_array_equal(bwd(v[start:stop], cotangent[start:stop]), whole_grad[start:stop])


def _sum_of_squares_grad(form):
  return jax.value_and_grad(lambda v: jnp.sum(form(v) ** 2))


def test_the_kernel_under_vmap_shard_map_and_explicit_sharding():
  v = _normal((3, 16, 9, 8))  # vmap over the first axis; 16 examples split over 8 devices
  expected = jax.vmap(_sum_of_squares_grad(xla_pairwise_dots))(v)
  for got in (
    jax.jit(jax.vmap(_sum_of_squares_grad(pairwise_dots)))(v),
    _sum_of_squares_grad(jax.vmap(pairwise_dots))(v),  # the kernel sees leading axes [3, 16]
  ):
    np.testing.assert_allclose(got[0].sum(), expected[0].sum(), rtol=1e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-5)

  x = v[0]
  value, grad = _sum_of_squares_grad(xla_pairwise_dots)(x)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  per_shard = jax.shard_map(
    lambda x: jax.grad(lambda y: jnp.sum(pairwise_dots(y) ** 2))(x),
    mesh=mesh,
    in_specs=P("batch"),
    out_specs=P("batch"),
  )
  sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  np.testing.assert_allclose(jax.jit(per_shard)(sharded), grad, rtol=1e-5, atol=1e-5)
  with jax.set_mesh(mesh):  # the global view, the batch sharded over an Explicit axis
    got_value, got_grad = jax.jit(_sum_of_squares_grad(pairwise_dots))(sharded)
    assert jax.typeof(pairwise_dots(sharded)).sharding.spec == P("batch", None)
    # Each device runs the kernel on its own part, not on the gathered batch.
    text = jax.jit(_sum_of_squares_grad(pairwise_dots)).lower(sharded).compile().as_text()
    assert 'custom_call_target="KstepPairDots"' in text and "all-gather" not in text
  np.testing.assert_allclose(got_value, value, rtol=1e-5)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-5)


INTERACTION_SHAPES = [(4096, 26, 16), (1000, 26, 16), (13, 5, 5), (9, 1, 3), (7, 10, 24)]


@pytest.mark.parametrize("shape", INTERACTION_SHAPES)
def test_the_interaction_kernel_has_the_pair_kernels_bits_and_xlas_values(shape):
  # [h, dots of (h, e)]: from the pair-dots kernel on the stacked vectors bit for bit (dh is
  # the sum of the same two terms), from XLA's form up to rounding; forward and backward.
  batch, fields, dim = shape
  h, e = _normal((batch, dim)), _normal(shape, seed=1)
  weights = _normal(dim + (fields + 1) * fields // 2, seed=2)

  def stacked(h, e):
    v = jnp.concatenate([h[:, None], e], axis=1)
    return jnp.concatenate([h, native_pairwise_dots(v)], axis=1)

  results = {}
  for name, form in (
    ("fused", _interaction.dlrm_interaction),
    ("stacked", stacked),
    ("xla", _interaction.xla_dlrm_interaction),
  ):
    loss = lambda h, e, form=form: jnp.sum(form(h, e) * weights)
    results[name] = jax.jit(form)(h, e), *jax.jit(jax.grad(loss, argnums=(0, 1)))(h, e)
  for fused, stacked_form, xla_form in zip(*results.values(), strict=True):
    np.testing.assert_array_equal(fused, stacked_form)
    np.testing.assert_allclose(fused, xla_form, rtol=1e-5, atol=1e-5)
  loss = lambda h, e: jnp.sum(_interaction.dlrm_interaction(h, e) * weights)
  assert _custom_calls(jax.value_and_grad(loss, argnums=(0, 1)), h, e) == {
    "KstepDlrmInteraction",
    "KstepDlrmInteractionGrad",
  }


def test_the_interaction_kernel_under_explicit_sharding_runs_per_device():
  h, e = _normal((16, 8)), _normal((16, 5, 8), seed=1)
  loss = lambda form: jax.value_and_grad(lambda h, e: jnp.sum(form(h, e) ** 2), argnums=(0, 1))
  value, grads = loss(_interaction.xla_dlrm_interaction)(h, e)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("batch")))
  with jax.set_mesh(mesh):
    fn = jax.jit(loss(_interaction.dlrm_interaction))
    got_value, got_grads = fn(put(h), put(e))
    text = fn.lower(put(h), put(e)).compile().as_text()
    assert 'custom_call_target="KstepDlrmInteraction"' in text and "all-gather" not in text
  np.testing.assert_allclose(got_value, value, rtol=1e-5)
  for got, expected in zip(got_grads, grads, strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
