"""Tests for freeze_subtrees / freeze_keys (xrapture/_src/optim/freeze.py)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import xrapture

import test_utils

M, N, R = 48, 40, 4


def _params():
  return {
      "linear": {"w": xrapture.LoraWeight(test_utils.rand(0, M, N), test_utils.rand(1, R, N),
                                          test_utils.rand(2, M, R)),
                 "b": test_utils.rand(3, N)},
      "norm": {"scale": test_utils.rand(4, N)},
  }


def _grads(params):
  return jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)


def _array_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _state_floats(state):
  """Number of optimizer-state numbers, step counters excluded."""
  return sum(x.size for x in _array_leaves(state) if x.ndim > 0)


_ADAPTERS_AND_DENSE = R * N + M * R + N + N  # a, b, linear bias, norm scale


class FreezeKeysTest(parameterized.TestCase):

  def test_adam_state_only_for_trainable_leaves(self):
    params = _params()
    state = xrapture.freeze_keys(optax.adam(1e-2), xrapture.LoraWeight, "w").init(
        params)
    # Two moments per trainable number; nothing of w's shape.
    self.assertEqual(_state_floats(state), 2 * _ADAPTERS_AND_DENSE)
    self.assertNotIn((M, N), [x.shape for x in _array_leaves(state)])
    full = optax.adam(1e-2).init(params)
    self.assertEqual(_state_floats(full) - _state_floats(state), 2 * M * N)

  @parameterized.parameters(False, True)
  def test_frozen_leaves_get_zero_updates(self, use_scalar_zeros):
    params = _params()
    tx = xrapture.freeze_keys(optax.adam(1e-2), xrapture.LoraWeight, "w",
                              use_scalar_zeros=use_scalar_zeros)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(_grads(params), state, params)
    w_update = updates["linear"]["w"].w
    self.assertEqual(w_update.shape, () if use_scalar_zeros else (M, N))
    np.testing.assert_array_equal(w_update, 0.0)
    for trained in (updates["linear"]["w"].a, updates["linear"]["w"].b,
                    updates["linear"]["b"], updates["norm"]["scale"]):
      self.assertGreater(float(jnp.abs(trained).min()), 0.0)
    new = optax.apply_updates(params, updates)
    self.assertEqual(jax.tree.map(jnp.shape, new), jax.tree.map(jnp.shape, params))
    np.testing.assert_array_equal(new["linear"]["w"].w, params["linear"]["w"].w)
    self.assertFalse(np.allclose(new["linear"]["w"].a, params["linear"]["w"].a))

  def test_training_loop_keeps_w(self):
    params = _params()
    x = test_utils.rand(5, 3, M)
    tx = xrapture.freeze_keys(optax.adamw(1e-2, weight_decay=0.1),
                              xrapture.LoraWeight, "w", use_scalar_zeros=True)
    f = xrapture.use_implicit_args(
        lambda p, x: jnp.sum(jnp.tanh(x @ p["linear"]["w"] + p["linear"]["b"])
                             * p["norm"]["scale"]))

    @jax.jit
    def step(params, state):
      grads = jax.grad(f)(params, x)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    new = params
    for _ in range(3):
      new, state = step(new, state)
    np.testing.assert_array_equal(new["linear"]["w"].w, params["linear"]["w"].w)
    self.assertFalse(np.allclose(new["linear"]["w"].b, params["linear"]["w"].b))

  def test_several_keys(self):
    params = _params()
    tx = xrapture.freeze_keys(optax.adam(1e-2), xrapture.LoraWeight, ("w", "b"))
    state = tx.init(params)
    self.assertEqual(_state_floats(state), 2 * (R * N + N + N))
    updates, _ = tx.update(_grads(params), state, params)
    np.testing.assert_array_equal(updates["linear"]["w"].b, 0.0)
    # The "b" key names a LoraWeight field, not the linear bias.
    self.assertGreater(float(jnp.abs(updates["linear"]["b"]).min()), 0.0)


class FreezeSubtreesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("prefix", {"linear": True, "norm": False}),
      ("full_tree", {"linear": {"w": xrapture.LoraWeight(True, True, True),
                                "b": True}, "norm": {"scale": False}}),
      ("callable", lambda p: {"linear": True, "norm": False}),
  )
  def test_frozen_subtrees(self, labels):
    params = _params()
    tx = xrapture.freeze_subtrees(optax.adam(1e-2), labels)
    state = tx.init(params)
    self.assertEqual(_state_floats(state), 2 * N)  # norm scale only
    updates, _ = tx.update(_grads(params), state, params)
    for frozen in jax.tree.leaves(updates["linear"]):
      np.testing.assert_array_equal(frozen, 0.0)
    self.assertGreater(float(jnp.abs(updates["norm"]["scale"]).min()), 0.0)

  def test_scalar_zeros(self):
    params = _params()
    tx = xrapture.freeze_subtrees(optax.sgd(0.1), {"linear": True, "norm": False},
                                  use_scalar_zeros=True)
    updates, _ = tx.update(_grads(params), tx.init(params), params)
    self.assertEqual({x.shape for x in jax.tree.leaves(updates["linear"])}, {()})
    new = optax.apply_updates(params, updates)
    chex_equal = lambda a, b: np.testing.assert_array_equal(a, b)
    jax.tree.map(chex_equal, new["linear"], params["linear"])

  @parameterized.product(use_scalar_zeros=(False, True), pass_params=(False, True))
  def test_frozen_integer_leaves_with_float0_gradients(self, use_scalar_zeros,
                                                       pass_params):
    # jax.grad(allow_int=True) gives integer leaves float0 gradients, which
    # support no arithmetic; optax.apply_updates must still work.
    params = {"scale": test_utils.rand(0, N), "step": jnp.arange(3, dtype=jnp.int32)}
    loss = lambda p: jnp.sum(p["scale"] ** 2) + 0.0 * p["step"].sum()
    grads = jax.grad(loss, allow_int=True)(params)
    self.assertEqual(grads["step"].dtype, jax.dtypes.float0)
    tx = xrapture.freeze_subtrees(optax.adam(0.1), {"scale": False, "step": True},
                                  use_scalar_zeros=use_scalar_zeros)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params if pass_params else None)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["step"], np.arange(3))
    self.assertEqual(new["step"].dtype, jnp.int32)
    np.testing.assert_allclose(new["scale"], params["scale"] - 0.1 * np.sign(params["scale"]),
                               rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
