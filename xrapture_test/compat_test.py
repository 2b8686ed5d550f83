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


_COUNT_PARAMS = ("num_consts", "num_carry", "ft_in", "ft_out")


def _without_counts(eqn):
  """The equation as a JAX that names none of its operand counts shows it."""
  params = {k: v for k, v in eqn.params.items() if k not in _COUNT_PARAMS}
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
      # num_consts/num_carry up to JAX 0.10, ft_in/ft_out since 0.11.
      self.assertTrue(set(_COUNT_PARAMS) & set(eqn.params), sorted(eqn.params))
      named = compat.scan_counts(eqn)
      self.assertEqual(compat.scan_counts(_without_counts(eqn)), named)

  def test_counts_of_a_known_scan(self):
    # body(c, (x0, x1)) closes over w: one const (w), one carry (c), two xs;
    # outputs: the carry and two ys.
    (eqn,) = _scan_eqns(_consts_carry_ys, _X[0], jnp.eye(4))
    self.assertLen(eqn.invars, 4)
    self.assertEqual(compat.scan_counts(eqn), (1, 1))
    self.assertEqual(compat.scan_counts(_without_counts(eqn)), (1, 1))

  def test_types_that_fit_no_reading_raise(self):
    (eqn,) = _scan_eqns(_consts_carry_ys, _X[0], jnp.eye(4))
    broken = _without_counts(eqn)
    # Drop the stacked axis from one output: no split of the operands fits.
    aval = eqn.outvars[-1].aval
    broken.outvars = list(eqn.outvars[:-1]) + [
        types.SimpleNamespace(aval=jax.core.ShapedArray(aval.shape[1:], aval.dtype))]
    with self.assertRaisesRegex(NotImplementedError, "could not tell consts, carry and xs"):
      compat.scan_counts(broken)


def _avals(vars_):
  return [(tuple(v.aval.shape), str(v.aval.dtype)) for v in vars_]


class SubJaxprsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("jit", lambda x, w: jax.jit(lambda x, w: x @ w)(x, w), ["jaxpr"]),
      ("checkpoint", lambda x, w: jax.checkpoint(lambda x, w: x @ w)(x, w), ["jaxpr"]),
      ("cond", lambda x, w: lax.cond(x.sum() > 0, lambda x, w: x @ w,
                                     lambda x, w: -x @ w, x, w),
       ["branches", "branches"]),
      ("while", lambda x, w: lax.while_loop(
          lambda c: c[0].sum() < w.sum(), lambda c: (c[0] @ w + 1.0, c[1]),
          (x, 2.0 * w))[0], ["cond_jaxpr", "body_jaxpr"]),
      ("scan", lambda x, w: lax.scan(lambda c, y: (c @ w + y, None), x,
                                     jnp.ones((3, 4)))[0], ["jaxpr"]),
      ("custom_jvp", lambda x, w: jax.nn.relu(x @ w), ["call_jaxpr"]),
  )
  def test_operands_match_the_sub_jaxpr_inputs(self, fn, params):
    closed = jax.make_jaxpr(fn)(_X[0], jnp.eye(4))
    jaxpr, _ = compat.jaxpr_and_consts(closed)
    found = []
    for eqn in jaxpr.eqns:
      for sub in compat.sub_jaxprs(eqn):
        found.append(sub.param)
        inner, _ = compat.jaxpr_and_consts(sub.jaxpr)
        self.assertIsNotNone(sub.operands, eqn.primitive.name)
        outer = _avals([eqn.invars[i] for i in sub.operands])
        if eqn.primitive.name == "scan":  # the body gets one slice of each xs
          first_xs = sum(compat.scan_counts(eqn))
          outer[first_xs:] = [(shape[1:], dtype) for shape, dtype in outer[first_xs:]]
        self.assertEqual(outer, _avals(inner.invars), eqn.primitive.name)
    self.assertEqual(found, params)

  def test_cond_branches_do_not_receive_the_index(self):
    fn = lambda x, w: lax.cond(x.sum() > 0, lambda x, w: x @ w, lambda x, w: x, x, w)
    jaxpr, _ = compat.jaxpr_and_consts(jax.make_jaxpr(fn)(_X[0], jnp.eye(4)))
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    for sub in compat.sub_jaxprs(eqn):
      self.assertEqual(sub.operands, (1, 2))

  def test_unknown_primitive_with_other_arity_has_no_mapping(self):
    inner = jax.make_jaxpr(lambda x: x * 2)(_X[0])
    outer = jax.make_jaxpr(lambda x, w: x @ w)(_X[0], jnp.eye(4))
    eqn = types.SimpleNamespace(
        primitive=types.SimpleNamespace(name="mystery"), invars=outer.jaxpr.invars,
        params={"body": inner, "other": 3})
    (sub,) = compat.sub_jaxprs(eqn)
    self.assertEqual((sub.param, sub.operands), ("body", None))


if __name__ == "__main__":
  absltest.main()
