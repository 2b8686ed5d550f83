"""Tests for the handler registry and strict mode (xrapture/_src/implicit/registry.py)."""

import warnings

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.implicit import registry


class Fill(xrapture.ImplicitArray):
  """An array of one repeated value, stored as that value."""

  value: jax.Array
  fill_shape: tuple = xrapture.aux_field(default=(2, 3))

  shape = property(lambda self: self.fill_shape)
  dtype = property(lambda self: self.value.dtype)

  def materialize(self):
    return jnp.full(self.fill_shape, self.value)


def _fill(value=2.0, shape=(2, 3)):
  return Fill(jnp.asarray(value, jnp.float32), shape)


def _record(fn, *args):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
  return out, [(w.category, str(w.message)) for w in caught]


class RegistryTest(absltest.TestCase):

  def register(self, names, handler):
    """Registers ``handler`` for this test only."""
    registry.primitive_handler(names)(handler)
    for name in (names,) if isinstance(names, str) else names:
      self.addCleanup(registry._HANDLERS[name].remove, handler)
    return handler

  def test_handler_runs_instead_of_materializing(self):
    def reduce_sum(primitive, x, *, axes, **params):
      del primitive, params
      if not isinstance(x, Fill):
        return NotImplemented
      count = np.prod([x.shape[a] for a in axes])
      kept = tuple(d for i, d in enumerate(x.shape) if i not in axes)
      return jnp.full(kept, x.value * count)

    self.register("reduce_sum", reduce_sum)
    fn = xrapture.use_implicit_args(lambda x: jnp.sum(x, axis=1))
    out, caught = _record(fn, _fill(2.0))
    self.assertEmpty(caught)
    np.testing.assert_array_equal(out, [6.0, 6.0])
    # Not a full materialization: the jaxpr never builds a [2, 3] array.
    jaxpr = jax.make_jaxpr(fn)(_fill(2.0))
    self.assertNotIn("f32[2,3]", str(jaxpr))

  def test_newest_first_and_not_implemented_passes(self):
    calls = []

    def old(primitive, x, **params):
      del primitive, params
      calls.append("old")
      return jnp.full(x.shape, 1.0) if isinstance(x, Fill) else NotImplemented

    def new(primitive, x, **params):
      del primitive, x, params
      calls.append("new")
      return NotImplemented

    self.register("exp", old)
    self.register(["exp", "log"], new)
    self.assertEqual(registry.handlers_for("exp")[:2], [new, old])
    self.assertEqual(registry.handlers_for("log")[0], new)
    out = xrapture.use_implicit_args(jnp.exp)(_fill())
    np.testing.assert_array_equal(out, np.ones((2, 3)))
    self.assertEqual(calls, ["new", "old"])
    self.assertEqual(registry.handlers_for("no_such_primitive"), [])

  def test_no_handler_materializes_with_warning(self):
    out, caught = _record(xrapture.use_implicit_args(jnp.sin), _fill(0.5))
    np.testing.assert_allclose(out, np.full((2, 3), np.sin(0.5)), rtol=1e-6)
    self.assertLen(caught, 1)
    category, message = caught[0]
    self.assertTrue(issubclass(category, xrapture.MaterializationWarning))
    self.assertTrue(issubclass(category, UserWarning))
    self.assertIn("materialized", message)
    self.assertIn("'sin'", message)
    self.assertIn("Fill", message)
    self.assertIn("(2, 3)", message)

  def test_default_handler(self):
    self.register("cos", xrapture.default_handler)
    out, caught = _record(xrapture.use_implicit_args(jnp.cos), _fill(0.5))
    np.testing.assert_allclose(out, np.full((2, 3), np.cos(0.5)), rtol=1e-6)
    self.assertLen(caught, 1)
    self.assertIn("no handler for primitive 'cos'", caught[0][1])

  def test_strict_mode(self):
    fn = xrapture.use_implicit_args(jnp.sin)
    self.assertFalse(registry.is_strict())
    with xrapture.strict_mode():
      self.assertTrue(registry.is_strict())
      with self.assertRaisesRegex(xrapture.MaterializationError,
                                  r"Fill.*materialized.*'sin'.*strict mode"):
        fn(_fill())
      with xrapture.strict_mode(False):
        _, caught = _record(fn, _fill())
        self.assertLen(caught, 1)
      self.assertTrue(registry.is_strict())
    self.assertFalse(registry.is_strict())

  def test_strict_mode_under_jit(self):
    fn = jax.jit(xrapture.use_implicit_args(jnp.sin))
    with xrapture.strict_mode():
      with self.assertRaises(xrapture.MaterializationError):
        fn(_fill())

  def test_strict_mode_resets_after_an_error(self):
    with self.assertRaises(KeyError):
      with xrapture.strict_mode():
        raise KeyError()
    self.assertFalse(registry.is_strict())

  def test_materialize_passes_dense_values(self):
    x = jnp.ones(2)
    self.assertIs(registry.materialize(x, "unused"), x)

  def test_warning_classes(self):
    self.assertTrue(issubclass(xrapture.CustomRuleDroppedWarning, UserWarning))
    self.assertTrue(issubclass(xrapture.MaterializationError, RuntimeError))


if __name__ == "__main__":
  absltest.main()
