"""Tests for use_implicit_args (xrapture/_src/implicit/interpreter.py)."""

import doctest
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.testing import reference

M, N, R = 48, 40, 4


def _rand(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _lora(seed=0, m=M, n=N):
  return xrapture.LoraWeight(_rand(seed, m, n), _rand(seed + 1, R, n),
                             _rand(seed + 2, m, R), alpha=2.0)


class WrongShape(xrapture.ImplicitArray):
  value: jax.Array
  shape = property(lambda self: self.value.shape)
  dtype = property(lambda self: self.value.dtype)

  def materialize(self):
    return self.value


def _record(fn, *args, **kwargs):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args, **kwargs)
  return out, [str(w.message) for w in caught]


class UseImplicitArgsTest(parameterized.TestCase):

  def test_pytree_arguments_and_outputs(self):
    params = {"layers": [_lora(0), _lora(10, N, M)], "bias": _rand(20, M)}

    def fn(params, x, *, scale):
      w1, w2 = params["layers"]
      return {"h": jnp.tanh(x @ w1) @ w2 * scale + params["bias"], "w": w2}

    x = _rand(30, 3, M)
    out, caught = _record(xrapture.use_implicit_args(fn), params, x, scale=2.0)
    self.assertEmpty(caught)
    self.assertIsInstance(out["w"], xrapture.LoraWeight)  # returned unchanged
    self.assertIs(out["w"].w, params["layers"][1].w)
    dense = {"layers": [jnp.asarray(reference.dense_value(w))
                        for w in params["layers"]], "bias": params["bias"]}
    np.testing.assert_allclose(out["h"], fn(dense, x, scale=2.0)["h"],
                               rtol=1e-4, atol=1e-4)

  def test_static_arguments(self):
    fn = xrapture.use_implicit_args(lambda x, w, n: (x @ w)[:, :n])
    lora, x = _lora(), _rand(1, 3, M)
    self.assertEqual(fn(x, lora, 5).shape, (3, 5))
    self.assertEqual(fn(x, lora, 7).shape, (3, 7))
    self.assertEqual(fn.cache_size(), 2)

  def test_no_implicit_arguments_binds_unchanged(self):
    fn = lambda x, w: jax.nn.relu(x @ w)
    x, w = _rand(0, 3, M), _rand(1, M, N)
    names = lambda j: [e.primitive.name for e in j.eqns]
    self.assertEqual(names(jax.make_jaxpr(xrapture.use_implicit_args(fn))(x, w)),
                     names(jax.make_jaxpr(fn)(x, w)))
    np.testing.assert_array_equal(xrapture.use_implicit_args(fn)(x, w), fn(x, w))

  def test_traced_once_under_jit(self):
    traces = []

    def fn(x, w):
      traces.append(None)
      return jnp.tanh(x @ w)

    wrapped = xrapture.use_implicit_args(fn)
    jitted = jax.jit(wrapped)
    for seed in range(3):
      jitted(_rand(seed, 3, M), _lora(seed))
    self.assertEqual((len(traces), wrapped.cache_size()), (1, 1))
    # Eager calls reuse the same jaxpr.
    for seed in range(2):
      wrapped(_rand(seed, 3, M), _lora(seed))
    self.assertEqual((len(traces), wrapped.cache_size()), (1, 1))
    # A new shape, or a dense array where a LoraWeight was, traces again.
    jitted(_rand(0, 5, M), _lora())
    wrapped(_rand(0, 3, M), _rand(1, M, N))
    self.assertEqual((len(traces), wrapped.cache_size()), (3, 3))

  def test_value_dependent_python_control_flow_fails(self):
    # f is always traced, even when called eagerly: it may not branch on values.
    fn = xrapture.use_implicit_args(
        lambda x, w: x @ w if jnp.sum(x) > 0 else -(x @ w))
    with self.assertRaises(jax.errors.ConcretizationTypeError):
      fn(_rand(0, 3, M), _lora())

  def test_unhandled_primitive_warning_text(self):
    fn = xrapture.use_implicit_args(lambda w: jnp.exp(w))
    out, caught = _record(fn, _lora())
    self.assertLen(caught, 1)
    self.assertRegex(caught[0], r"LoraWeight of shape \(48, 40\) materialized")
    self.assertIn("'exp'", caught[0])
    np.testing.assert_allclose(out, np.exp(reference.dense_value(_lora())),
                               rtol=1e-5)

  def test_strict_mode(self):
    fn = xrapture.use_implicit_args(lambda x, w: jnp.exp(w) @ x)
    with xrapture.strict_mode():
      with self.assertRaisesRegex(xrapture.MaterializationError, "'exp'"):
        fn(_rand(0, N, 3), _lora())
      # Everything handled: strict mode is silent.
      xrapture.use_implicit_args(lambda x, w: w @ x)(_rand(0, N, 3), _lora())

  def test_handler_with_wrong_output_shape(self):
    def bad(primitive, x, **params):
      del primitive, params
      return x.value[:1] if isinstance(x, WrongShape) else NotImplemented

    registry.primitive_handler("sin")(bad)
    self.addCleanup(registry._HANDLERS["sin"].remove, bad)
    with self.assertRaisesRegex(TypeError, r"returned shape \(1,\).*gives \(3,\)"):
      xrapture.use_implicit_args(jnp.sin)(WrongShape(jnp.ones(3)))

  def test_eval_jaxpr_checks_arity(self):
    closed = jax.make_jaxpr(lambda x: x + 1)(1.0)
    with self.assertRaisesRegex(TypeError, "expects 1 inputs, got 2"):
      interpreter.eval_jaxpr(closed.jaxpr, closed.consts, 1.0, 2.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_and_vmap_compose(self):
    lora, x = _lora(), _rand(1, 2, 3, M)
    fn = xrapture.use_implicit_args(lambda x, w: jnp.sum(jnp.tanh(x @ w)))

    @self.variant
    def per_example_grads(x, lora):
      return jax.vmap(jax.grad(lambda a, x: fn(x, lora.replace(a=a))),
                      in_axes=(None, 0))(lora.a, x)

    grads = per_example_grads(x, lora)
    dense = lambda a, x: jnp.sum(jnp.tanh(x @ (
        lora.w + lora.get_scale() * lora.b @ a)))
    expected = jax.vmap(jax.grad(dense), in_axes=(None, 0))(lora.a, x)
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-4)

  def test_docstring_example(self):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(interpreter.use_implicit_args, "use_implicit_args",
                            globs={}):
      runner.run(test)
    results = runner.summarize(verbose=False)
    self.assertGreater(results.attempted, 0)
    self.assertEqual(results.failed, 0)


if __name__ == "__main__":
  absltest.main()
