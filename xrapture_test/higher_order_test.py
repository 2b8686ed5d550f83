"""Tests for primitives that hold jaxprs (xrapture/_src/implicit/higher_order.py).

Weights pass through jit, calls, remat, scan, while, cond and custom
derivatives without being formed; carries and cond outputs materialize with
a warning; custom rules are kept unless an implicit value enters them.
"""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax
import numpy as np
import xrapture
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils

M, N, R, L = 48, 40, 4, 5

check = reference.assert_matches_dense
dense_value = reference.dense_value


def _lora(seed=0, lead=(), a_lead=None, shape=(M, N)):
  m, n = shape
  a_lead = lead if a_lead is None else a_lead
  return xrapture.LoraWeight(
      test_utils.rand(seed, *lead, m, n, scale=0.2),
      test_utils.rand(seed + 1, *a_lead, R, n, scale=0.5),
      test_utils.rand(seed + 2, *lead, m, R, scale=0.5), alpha=2.0)


def _record(fn, *args):
  """``fn(*args)`` and the warnings it raised, as (category, message) pairs."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
  return out, [(w.category, str(w.message)) for w in caught]


def _of(category, caught):
  return [m for c, m in caught if issubclass(c, category)]


_BACK = test_utils.rand(50, N, M, scale=0.2)  # maps a layer's output back to width M


def _closed_call(fn, *example_args):
  """``fn`` as a function whose jaxpr holds a ``closed_call`` equation."""
  inner = jax.make_jaxpr(fn)(*example_args)
  outer = jax.make_jaxpr(lambda *a: jax.jit(fn)(*a))(*example_args)
  (eqn,) = outer.jaxpr.eqns
  call = jex_core.new_jaxpr_eqn(
      list(eqn.invars), list(eqn.outvars), jex_core.primitives.closed_call_p,
      dict(call_jaxpr=inner), inner.effects)
  jaxpr = jex_core.Jaxpr(outer.jaxpr.constvars, outer.jaxpr.invars,
                         outer.jaxpr.outvars, [call], outer.jaxpr.effects,
                         outer.jaxpr.debug_info)
  return jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, outer.consts))


def _layer(h, w):
  return h + jnp.tanh(h @ w) @ _BACK


class PassThroughTest(parameterized.TestCase):
  """The weight reaches its dot_general inside the sub-jaxpr, unformed."""

  @parameterized.named_parameters(
      ("jit", lambda x, w: jax.jit(lambda x, w: jnp.tanh(x @ w))(x, w)),
      # `inline` is a bool up to JAX 0.11.1 and an enum (`Inline`) since 0.11.2.
      ("jit_inline", lambda x, w: jax.jit(lambda x, w: jnp.tanh(x @ w), inline=True)(x, w)),
      ("nested_jit", lambda x, w: jax.jit(
          lambda x, w: jax.jit(lambda x, w: jnp.tanh(x @ w))(x, w) * 2.0)(x, w)),
      ("jit_closing_over_activation", lambda x, w: jax.jit(
          lambda w: jnp.tanh(x @ w))(w)),
      ("checkpoint", lambda x, w: jax.checkpoint(
          lambda x, w: jnp.tanh(x @ w))(x, w)),
      ("checkpoint_policy", lambda x, w: jax.checkpoint(
          lambda x, w: jnp.tanh(x @ w),
          policy=jax.checkpoint_policies.nothing_saveable)(x, w)),
      ("cond", lambda x, w: lax.cond(
          jnp.sum(x) > 0, lambda x, w: jnp.tanh(x @ w),
          lambda x, w: jnp.sin(x @ w), x, w)),
      ("cond_other_branch", lambda x, w: lax.cond(
          jnp.sum(x) < 0, lambda x, w: jnp.tanh(x @ w),
          lambda x, w: jnp.sin(x @ w), x, w)),
      ("switch", lambda x, w: lax.switch(
          2, [lambda x, w: x @ w, lambda x, w: -(x @ w),
              lambda x, w: jnp.tanh(x @ w.T.T)], x, w)),
      ("cond_closed_over", lambda x, w: lax.cond(
          jnp.sum(x) > 0, lambda x: x @ w, lambda x: 2.0 * x @ w, x)),
      ("scan_closed_over", lambda x, w: lax.scan(
          lambda h, _: (_layer(h, w), None), x, None, length=3)[0]),
      ("scan_ys", lambda x, w: lax.scan(
          lambda h, i: (h, jnp.tanh(h @ w) * i), x, jnp.arange(3.0))[1]),
      ("fori_loop_static", lambda x, w: lax.fori_loop(
          0, 3, lambda i, h: _layer(h, w), x)),
  )
  def test_unstacked_weight(self, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      warnings.simplefilter("error", xrapture.CustomRuleDroppedWarning)
      check(fn, test_utils.rand(7, 3, M), _lora())

  def test_closed_call(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = _closed_call(lambda x, w: jnp.tanh(x @ w), x, jnp.zeros((M, N)))
    # `closed_call` until JAX 0.11.0, `eval_jaxpr` since 0.11.1.
    call_name = jex_core.primitives.closed_call_p.name
    self.assertIn(f"= {call_name}[", str(jax.make_jaxpr(fn)(x, lora.w)))
    fn_single = lambda x, w: fn(x, w)[0]
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn_single, x, lora)

  @parameterized.named_parameters(
      ("scan", lambda x, ws: lax.scan(lambda h, w: (_layer(h, w), None), x, ws)[0]),
      ("scan_reverse", lambda x, ws: lax.scan(
          lambda h, w: (_layer(h, w), None), x, ws, reverse=True)[0]),
      ("scan_unroll", lambda x, ws: lax.scan(
          lambda h, w: (_layer(h, w), None), x, ws, unroll=2)[0]),
      ("scan_ys", lambda x, ws: lax.scan(lambda h, w: (h, h @ w), x, ws)[1]),
      ("scan_remat_body", lambda x, ws: lax.scan(
          jax.checkpoint(lambda h, w: (_layer(h, w), None)), x, ws)[0]),
  )
  def test_stacked_weight_as_scan_xs(self, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, 3, M), _lora(lead=(L,)))

  def test_scan_slices_weights_without_forming_them(self):
    lora = _lora(lead=(L,))
    fn = xrapture.use_implicit_args(
        lambda ws: lax.scan(lambda c, w: (c, w.T), 0.0, ws)[1])
    out = fn(lora)
    # Implicit per-step outputs are stacked back into a LoraWeight.
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.shape, (L, N, M))
    np.testing.assert_allclose(dense_value(out),
                               np.swapaxes(dense_value(lora), -1, -2), rtol=1e-6)

  def test_scan_over_broadcast_factor_materializes(self):
    # a has leading axis 1 (shared by every layer): it cannot be sliced as xs.
    lora, x = _lora(lead=(L,), a_lead=(1,)), test_utils.rand(7, 3, M)
    fn = xrapture.use_implicit_args(
        lambda x, ws: lax.scan(lambda h, w: (_layer(h, w), None), x, ws)[0])
    out, caught = _record(fn, x, lora)
    messages = _of(xrapture.MaterializationWarning, caught)
    self.assertLen(messages, 1)
    self.assertIn("scan", messages[0])
    ref = lax.scan(lambda h, w: (_layer(h, w), None), x, dense_value(lora))[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

  def test_while_loop_weight_as_constant(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = lambda x, w: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, _layer(c[1], w)), (0, x))[1]
    implicit = xrapture.use_implicit_args(fn)
    out, caught = _record(jax.jit(implicit), x, lora)
    self.assertEmpty(caught)
    np.testing.assert_allclose(out, fn(x, dense_value(lora)), rtol=1e-4, atol=1e-4)
    # Reverse-mode does not go through while loops: check the forward pass.
    self.assertEqual(dense_check.find_dense_products(implicit, x, lora), [])
    self.assertEqual(dense_check.find_dense_products_in_hlo(implicit, x, lora), [])

  def test_fori_loop_traced_bound(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = lambda inputs, w: lax.fori_loop(
        0, inputs[1], lambda i, h: _layer(h, w), inputs[0])
    implicit = xrapture.use_implicit_args(fn)
    out, caught = _record(jax.jit(implicit), (x, 3), lora)
    self.assertEmpty(caught)
    np.testing.assert_allclose(out, fn((x, 3), dense_value(lora)),
                               rtol=1e-4, atol=1e-4)
    self.assertEqual(dense_check.find_dense_products(implicit, (x, 3), lora), [])


class HaikuTest(absltest.TestCase):

  def test_layer_stack(self):
    def forward(x):
      @hk.experimental.layer_stack(L)
      def layer(h):
        up = hk.Linear(N, with_bias=False, name="up")(h)
        return h + hk.Linear(M, with_bias=False, name="down")(jnp.tanh(up))
      return layer(x)

    transformed = hk.without_apply_rng(hk.transform(forward))
    x = test_utils.rand(7, 3, M)
    params = jax.jit(transformed.init)(jax.random.PRNGKey(0), x)
    (up_name,) = [k for k in params if k.endswith("/up")]
    (down_name,) = [k for k in params if k.endswith("/down")]
    up, down = _lora(0, (L,)), _lora(10, (L,), shape=(N, M))
    apply = lambda up, down, x: transformed.apply(
        {up_name: {"w": up}, down_name: {"w": down}}, x)
    implicit = xrapture.use_implicit_args(apply)
    out, caught = _record(jax.jit(implicit), up, down, x)
    self.assertEmpty(caught)
    ref = jax.jit(apply)(jnp.asarray(dense_value(up)), jnp.asarray(dense_value(down)), x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    def loss(adapters, x):
      (ua, ub), (da, db) = adapters
      return jnp.sum(jnp.sin(implicit(up.replace(a=ua, b=ub),
                                      down.replace(a=da, b=db), x)))

    def dense_loss(adapters, x):
      (ua, ub), (da, db) = adapters
      w = lambda lora, a, b: lora.w + lora.get_scale() * jnp.matmul(b, a)
      return jnp.sum(jnp.sin(apply(w(up, ua, ub), w(down, da, db), x)))

    adapters = ((up.a, up.b), (down.a, down.b))
    traced = jax.jit(jax.grad(loss)).trace(adapters, x)
    compiled = traced.lower().compile()
    grads = compiled(adapters, x)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    jax.tree.map(chex_close, grads, jax.jit(jax.grad(dense_loss))(adapters, x))
    dense_check.assert_no_dense_product(implicit, up, down, x, hlo=False)
    dense_check.assert_no_dense_product_in_stages(traced, compiled, [(M, N)])

  def test_remat(self):
    def forward(x):
      linear = lambda h: hk.Linear(N, with_bias=False, name="linear")(h)
      layer = hk.remat(lambda h: jnp.tanh(linear(h)))
      return layer(x)

    transformed = hk.without_apply_rng(hk.transform(forward))
    fn = lambda x, w: transformed.apply({"linear": {"w": w}}, x)
    self.assertIn("remat", str(jax.make_jaxpr(fn)(test_utils.rand(7, 3, M), jnp.zeros((M, N)))))
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, 3, M), _lora())

  def test_remat_policy_decides_what_the_backward_keeps(self):
    # Memory on demand: the user's hk.remat policy, not xrapture, decides
    # which activations of a LoRA model live until the backward pass.
    from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top
    tokens, hidden = 8, 3 * M

    def make(policy):
      def forward(x):
        def block(h):
          up = hk.Linear(hidden, name="up")(h)
          return h + hk.Linear(M, name="down")(jax.nn.gelu(up))
        if policy is not None:
          block = hk.remat(block, policy=policy)
        for i in range(3):
          with hk.name_scope(f"layer_{i}"):
            x = block(x)
        return jnp.sum(x)
      return forward

    config = xrapture.default_config()
    config.rank, config.targets = R, (r".*/(up|down)/w",)
    x = test_utils.rand(1, tokens, M)
    base = hk.transform(make(None)).init(jax.random.PRNGKey(0), x)

    def kept(policy):
      model = xrapture.transform(make(policy), config)
      params = model.adapt(jax.random.PRNGKey(1), base, x)
      residuals = ad_checkpoint.saved_residuals(lambda p: model.apply(p, None, x), params)
      per_token = [r.shape for r, _ in residuals if r.shape[:1] == (tokens,)]
      grads = jax.grad(lambda p: model.apply(p, None, x))(params)
      return per_token, grads

    plain, plain_grads = kept(None)
    nothing, nothing_grads = kept(jax.checkpoint_policies.nothing_saveable)
    dots, _ = kept(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    # Without remat the hidden activations are kept; with nothing_saveable
    # only each block's input (the example input is a constant); dots keep
    # the products but not the GELU's intermediates.
    self.assertGreater(plain.count((tokens, hidden)), 3)
    self.assertEqual(nothing, [(tokens, M)] * 3)
    self.assertLess(len(nothing), len(dots))
    self.assertLess(len(dots), len(plain))
    self.assertEqual(dots.count((tokens, hidden)), 6)  # up's output, in x@w and x@b@a
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nothing_grads, plain_grads)


class MaterializedValuesTest(absltest.TestCase):
  """Where JAX needs a dense value of fixed structure, with a warning."""

  def _check_materializes(self, fn, x, lora, where):
    implicit = xrapture.use_implicit_args(fn)
    out, caught = _record(implicit, x, lora)
    messages = _of(xrapture.MaterializationWarning, caught)
    self.assertNotEmpty(messages)
    self.assertIn(where, messages[0])
    self.assertIn("materialized", messages[0])
    self.assertIn("LoraWeight", messages[0])
    np.testing.assert_allclose(out, fn(x, jnp.asarray(dense_value(lora))),
                               rtol=1e-4, atol=1e-4)
    with xrapture.strict_mode():
      with self.assertRaises(xrapture.MaterializationError):
        implicit(x, lora)

  def test_scan_carry(self):
    fn = lambda x, w: x @ lax.scan(lambda c, _: (c * 0.5, None), w, None, length=2)[0]
    self._check_materializes(fn, test_utils.rand(7, 3, M), _lora(), "scan carry")

  def test_while_carry(self):
    fn = lambda x, w: x @ lax.while_loop(
        lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * 0.5), (0, w))[1]
    self._check_materializes(fn, test_utils.rand(7, 3, M), _lora(), "while_loop carry")

  def test_cond_output(self):
    fn = lambda x, w: x @ lax.cond(jnp.sum(x) > 0, lambda w: w, lambda w: -w, w)
    self._check_materializes(fn, test_utils.rand(7, 3, M), _lora(), "cond")


@jax.custom_jvp
def _odd_tanh(x):
  return jnp.tanh(x)


# A deliberately wrong derivative: it shows whether the rule was used.
_odd_tanh.defjvp(lambda primals, tangents: (_odd_tanh(primals[0]), 3.0 * tangents[0]))


@jax.custom_vjp
def _odd_sin(x):
  return jnp.sin(x)


_odd_sin.defvjp(lambda x: (jnp.sin(x), None), lambda _, g: (5.0 * g,))


class CustomDerivativeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("relu", jax.nn.relu), ("gelu", jax.nn.gelu), ("silu", jax.nn.silu),
      ("softplus", jax.nn.softplus), ("softmax", jax.nn.softmax),
  )
  def test_activation_keeps_its_rule(self, activation):
    fn = lambda x, w: activation(x @ w)
    lora, x = _lora(), test_utils.rand(7, 3, M)
    implicit = xrapture.use_implicit_args(fn)
    _, caught = _record(implicit, x, lora)
    self.assertEmpty(caught)
    # relu's kink: the ReLU mask of an fp32 sum can flip between two ways of
    # computing it, so compare where the pre-activation is not near zero.
    pre = np.asarray(x) @ dense_value(lora)
    out = implicit(x, lora)
    far = np.abs(pre) > 1e-3
    np.testing.assert_allclose(np.asarray(out)[far],
                               np.asarray(fn(x, jnp.asarray(dense_value(lora))))[far],
                               rtol=1e-4, atol=1e-4)
    self.assertEqual(dense_check.find_dense_products(implicit, x, lora), [])

  def test_custom_jvp_rule_is_used_on_activations(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = xrapture.use_implicit_args(lambda x, w: _odd_tanh(x @ w))
    self.assertIn("custom_jvp_call", str(jax.make_jaxpr(fn)(x, lora)))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, lora))))(x)
    # d/dx sum(3 · x W) = 3 · W 1: the odd rule, not tanh's derivative.
    expected = 3.0 * dense_value(lora).sum(axis=1)
    np.testing.assert_allclose(grad, np.broadcast_to(expected, x.shape),
                               rtol=1e-4, atol=1e-4)

  def test_custom_vjp_rule_is_used_on_activations(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = lambda x, w: _odd_sin(x @ w)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.CustomRuleDroppedWarning)
      # check() compares against the dense function with the same odd rule.
      check(fn, x, lora)
    grad = jax.jit(jax.grad(
        lambda x: jnp.sum(xrapture.use_implicit_args(fn)(x, lora))))(x)
    expected = 5.0 * dense_value(lora).sum(axis=1)
    np.testing.assert_allclose(grad, np.broadcast_to(expected, x.shape),
                               rtol=1e-4, atol=1e-4)

  @parameterized.named_parameters(
      ("custom_jvp", _odd_tanh, "_odd_tanh", lambda w: 1 - np.tanh(w) ** 2),
      ("custom_vjp", _odd_sin, "_odd_sin", np.cos),
  )
  def test_rule_applied_to_a_weight_is_dropped(self, rule_fn, name, derivative):
    lora = _lora()
    fn = xrapture.use_implicit_args(lambda w: rule_fn(w))
    out, caught = _record(fn, lora)
    dropped = _of(xrapture.CustomRuleDroppedWarning, caught)
    self.assertLen(dropped, 1)
    self.assertIn(f"'{name}'", dropped[0])
    self.assertIn("dropped", dropped[0])
    dense = dense_value(lora)
    np.testing.assert_allclose(out, rule_fn(jnp.asarray(dense)), rtol=1e-5, atol=1e-6)
    # The primal is differentiated directly: the true derivative, not the rule.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      da = jax.jit(jax.grad(lambda a: jnp.sum(fn(lora.replace(a=a)))))(lora.a)
    expected = lora.get_scale() * np.asarray(lora.b).T @ derivative(dense)
    np.testing.assert_allclose(da, expected, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
