"""compat: reading jaxpr equations the same way across JAX releases."""

import types

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax
from xrapture._src.implicit import compat


def _scan_eqns(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  found = []

  def walk(j):
    j, _ = compat.jaxpr_and_consts(j)
    for eqn in j.eqns:
      if eqn.primitive.name == "scan":
        found.append(eqn)
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            walk(sub)
  walk(jaxpr)
  return found


def _without_counts(eqn):
  """The equation as a JAX that does not name num_consts/num_carry shows it."""
  params = {k: v for k, v in eqn.params.items() if k not in ("num_consts", "num_carry")}
  return types.SimpleNamespace(params=params, invars=eqn.invars, outvars=eqn.outvars)


def _consts_carry_ys(x, w):
  def body(c, xs):
    return jnp.tanh(c @ w + xs[0]), (c.sum(), xs[1] * 2)
  return lax.scan(body, x, (jnp.ones((5, 4)), jnp.arange(5.0)))


def _layer_stack(x):
  return hk.layer_stack(3)(lambda h: jax.nn.gelu(hk.Linear(4)(h)))(x)


_STACK = hk.transform(_layer_stack)
_X = jnp.ones((2, 4))


class ScanCountsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("consts_carry_xs_ys", _consts_carry_ys, (_X[0], jnp.eye(4))),
      ("layer_stack", lambda p, x: _STACK.apply(p, None, x),
       (_STACK.init(jax.random.PRNGKey(0), _X), _X)),
      ("fori_loop_as_scan", lambda x: lax.fori_loop(0, 3, lambda i, c: c * 2.0, x), (_X,)),
  )
  def test_derived_from_types_equals_named(self, fn, args):
    eqns = _scan_eqns(fn, *args)
    self.assertNotEmpty(eqns)
    for eqn in eqns:
      named = (eqn.params["num_consts"], eqn.params["num_carry"])
      self.assertEqual(compat.scan_counts(eqn), named)
      self.assertEqual(compat.scan_counts(_without_counts(eqn)), named)

  def test_types_that_fit_no_reading_raise(self):
    (eqn,) = _scan_eqns(_consts_carry_ys, _X[0], jnp.eye(4))
    broken = _without_counts(eqn)
    # Drop the stacked axis from one output: no split of the operands fits.
    aval = eqn.outvars[-1].aval
    broken.outvars = list(eqn.outvars[:-1]) + [
        types.SimpleNamespace(aval=jax.core.ShapedArray(aval.shape[1:], aval.dtype))]
    with self.assertRaisesRegex(NotImplementedError, "could not tell consts, carry and xs"):
      compat.scan_counts(broken)


if __name__ == "__main__":
  absltest.main()
