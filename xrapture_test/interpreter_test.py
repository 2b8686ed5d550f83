"""Tests for use_implicit_args (xrapture/_src/implicit/interpreter.py)."""

import dataclasses
import doctest
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.testing import reference

import test_utils

M, N, R = 48, 40, 4


@dataclasses.dataclass
class Mode:  # unhashable: eq=True without frozen=True sets __hash__ = None
  temperature: float


@dataclasses.dataclass(frozen=True)
class FrozenMode:
  temperature: float


def _lora(seed=0, m=M, n=N):
  return xrapture.LoraWeight(test_utils.rand(seed, m, n), test_utils.rand(seed + 1, R, n),
                             test_utils.rand(seed + 2, m, R), alpha=2.0)


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
    params = {"layers": [_lora(0), _lora(10, N, M)], "bias": test_utils.rand(20, M)}

    def fn(params, x, *, scale):
      w1, w2 = params["layers"]
      return {"h": jnp.tanh(x @ w1) @ w2 * scale + params["bias"], "w": w2}

    x = test_utils.rand(30, 3, M)
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
    lora, x = _lora(), test_utils.rand(1, 3, M)
    self.assertEqual(fn(x, lora, 5).shape, (3, 5))
    self.assertEqual(fn(x, lora, 7).shape, (3, 7))
    self.assertEqual(fn.cache_size(), 2)

  @parameterized.named_parameters(
      ("positional", lambda fn, x, w: fn(x, w, Mode(2.0)), r"args\[2\]"),
      ("keyword", lambda fn, x, w: fn(x, w, mode=Mode(2.0)), r"kwargs\['mode'\]"),
      ("nested", lambda fn, x, w: fn(x, w, {"m": [Mode(2.0)]}), r"args\[2\]\['m'\]\[0\]"))
  def test_unhashable_static_argument_is_refused(self, call, where):
    fn = xrapture.use_implicit_args(lambda x, w, mode: x @ w)
    with self.assertRaises(TypeError) as ctx:
      call(fn, test_utils.rand(0, 3, M), _lora())
    message = str(ctx.exception)
    self.assertRegex(message, where)
    self.assertIn(f"{Mode.__module__}.Mode", message)  # the type (__main__ under Bazel)
    self.assertIn("unhashable", message)
    self.assertIn("frozen=True", message)  # the fixes
    self.assertIn("register_dataclass", message)
    self.assertEqual(fn.cache_size(), 0)

  def test_unhashable_argument_through_transform(self):
    # The reproducer: a plain dataclass selected a stale trace once
    # Python reused its id(); now it is refused, and a frozen one is exact.
    def forward(x, mode):
      return hk.Linear(16)(x) / mode.temperature

    model = xrapture.transform(forward)
    x = jnp.ones([2, 16])
    base = model.init(jax.random.PRNGKey(0), x, FrozenMode(1.0))
    params = model.adapt(jax.random.PRNGKey(1), base)
    with self.assertRaisesRegex(TypeError, r"args\[3\] .*Mode"):
      model.apply(params, None, x, Mode(1.0))
    plain = hk.transform(forward)
    for _ in range(5):  # fresh objects each time, as in a training loop
      for t in (1.0, 2.0, 4.0, 8.0):
        np.testing.assert_allclose(
            model.apply(params, None, x, FrozenMode(t)),
            plain.apply(base, None, x, FrozenMode(t)), rtol=1e-6)

  def test_array_arguments_stay_dynamic(self):
    traces = []
    fn = xrapture.use_implicit_args(
        lambda x, w, s: traces.append(None) or (x @ w) * s)
    lora, x = _lora(), test_utils.rand(1, 3, M)
    for s in (np.float32(2.0), np.array(3.0, np.float32), jnp.float32(4.0)):
      np.testing.assert_allclose(fn(x, lora, s), (x @ reference.dense_value(lora)) * s,
                                 rtol=1e-5, atol=1e-5)
    self.assertLen(traces, 1)

  def test_cache_is_bounded_and_evicted_entries_retrace(self):
    traces = []

    def f(x, w, n):
      traces.append(n)
      return (x @ w)[:, :n]

    fn = xrapture.use_implicit_args(f, max_traces=2)
    lora, x = _lora(), test_utils.rand(1, 3, M)
    dense = x @ reference.dense_value(lora)
    for n in (1, 2, 3, 2, 1):
      np.testing.assert_allclose(fn(x, lora, n), dense[:, :n], rtol=1e-5, atol=1e-5)
      self.assertLessEqual(fn.cache_size(), 2)
    # 2 was used most recently before 1 came back: only 1 was evicted.
    self.assertEqual(traces, [1, 2, 3, 1])

  def test_default_cache_bound(self):
    fn = xrapture.use_implicit_args(lambda x, n: x * n)
    x = jnp.ones(2)
    for n in range(interpreter.DEFAULT_MAX_TRACES + 3):
      fn(x, n)
    self.assertEqual(fn.cache_size(), interpreter.DEFAULT_MAX_TRACES)
    np.testing.assert_array_equal(fn(x, 0), x * 0)  # evicted, traced again

  def test_max_traces_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "max_traces"):
      xrapture.use_implicit_args(lambda x: x, max_traces=0)

  def test_no_implicit_arguments_binds_unchanged(self):
    fn = lambda x, w: jax.nn.relu(x @ w)
    x, w = test_utils.rand(0, 3, M), test_utils.rand(1, M, N)
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
      jitted(test_utils.rand(seed, 3, M), _lora(seed))
    self.assertEqual((len(traces), wrapped.cache_size()), (1, 1))
    # Eager calls reuse the same jaxpr.
    for seed in range(2):
      wrapped(test_utils.rand(seed, 3, M), _lora(seed))
    self.assertEqual((len(traces), wrapped.cache_size()), (1, 1))
    # A new shape, or a dense array where a LoraWeight was, traces again.
    jitted(test_utils.rand(0, 5, M), _lora())
    wrapped(test_utils.rand(0, 3, M), test_utils.rand(1, M, N))
    self.assertEqual((len(traces), wrapped.cache_size()), (3, 3))

  def test_value_dependent_python_control_flow_fails(self):
    # f is always traced, even when called eagerly: it may not branch on values.
    fn = xrapture.use_implicit_args(
        lambda x, w: x @ w if jnp.sum(x) > 0 else -(x @ w))
    with self.assertRaises(jax.errors.ConcretizationTypeError):
      fn(test_utils.rand(0, 3, M), _lora())

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
        fn(test_utils.rand(0, N, 3), _lora())
      # Everything handled: strict mode is silent.
      xrapture.use_implicit_args(lambda x, w: w @ x)(test_utils.rand(0, N, 3), _lora())

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
    lora, x = _lora(), test_utils.rand(1, 2, 3, M)
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
