"""Tests for LoRA dropout (xrapture/_src/lora/dropout.py) and handler keys
(xrapture/_src/implicit/randomness.py), alone and through xrapture.transform."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.implicit import randomness
from xrapture._src.lora import dropout

import test_utils

_X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
_SEQ = np.random.default_rng(1).normal(size=(2, 8, 3)).astype(np.float32)


class RandomnessTest(absltest.TestCase):

  def test_outside_no_keys(self):
    self.assertFalse(randomness.active())
    self.assertIsNone(randomness.next_key())
    with randomness.handler_rng(None):
      self.assertFalse(randomness.active())
    with randomness.loop_step(3):  # a no-op outside
      self.assertIsNone(randomness.next_key())

  def test_keys_are_fresh_per_call_and_step(self):
    key = jax.random.PRNGKey(0)
    with randomness.handler_rng(key):
      self.assertTrue(randomness.active())
      first, second = randomness.next_key(), randomness.next_key()
      with randomness.loop_step(0):
        step0 = randomness.next_key()
      with randomness.loop_step(1):
        step1 = randomness.next_key()
    self.assertFalse(randomness.active())
    keys = [np.asarray(jax.random.key_data(k)) for k in (first, second, step0, step1)]
    for i in range(len(keys)):
      for j in range(i):
        self.assertFalse(np.array_equal(keys[i], keys[j]), (i, j))
    # Reproducible from the same key.
    with randomness.handler_rng(key):
      np.testing.assert_array_equal(randomness.next_key(), first)

  def test_nested_contexts_restore(self):
    with randomness.handler_rng(jax.random.PRNGKey(0)):
      with randomness.handler_rng(None):
        self.assertFalse(randomness.active())
      self.assertTrue(randomness.active())


class LoraDropoutContextTest(parameterized.TestCase):

  @parameterized.parameters(-0.1, 1.0, 1.5)
  def test_rate_out_of_range(self, rate):
    with self.assertRaisesRegex(ValueError, r"\[0, 1\)"):
      with dropout.lora_dropout(rate, jax.random.PRNGKey(0)):
        pass

  def test_active(self):
    self.assertFalse(dropout.active())
    with dropout.lora_dropout(0.5, jax.random.PRNGKey(0)):
      self.assertTrue(dropout.active())
    with dropout.lora_dropout(0.5, None):
      self.assertFalse(dropout.active())
    with dropout.lora_dropout(0.0, jax.random.PRNGKey(0)):
      self.assertFalse(dropout.active())
    self.assertFalse(dropout.active())

  def test_maybe_drop(self):
    x = jnp.ones((200, 50))
    self.assertIs(dropout.maybe_drop(x), x)
    with dropout.lora_dropout(0.25, jax.random.PRNGKey(0)):
      y1, y2 = dropout.maybe_drop(x), dropout.maybe_drop(x)
    for y in (y1, y2):
      values = set(np.unique(np.asarray(y)).tolist())
      self.assertEqual(values, {0.0, np.float32(1 / 0.75)})
      self.assertAlmostEqual(float((y == 0).mean()), 0.25, delta=0.02)
    self.assertFalse(np.array_equal(y1, y2))  # a new mask per call


def _config(rate, **kw):
  config = xrapture.default_config()
  config.rank, config.alpha, config.dropout = 2, 2.0, rate
  for k, v in kw.items():
    setattr(config, k, v)
  return config


def _linear(x):
  return hk.Linear(5)(x)


def _conv(x):
  return hk.Conv1D(4, 3)(x)


@functools.lru_cache(maxsize=None)
def _models_cached(fn):
  """(dropout model, same without dropout, base, trained params), shared by tests."""
  x = {_linear: _X, _conv: _SEQ}[fn]
  model = xrapture.transform(fn, _config(0.5))
  plain = xrapture.transform(fn, _config(0.0))
  base = model.init(jax.random.PRNGKey(0), x)
  params = test_utils.randomize_adapters(model.adapt(jax.random.PRNGKey(1), base, x))
  return model, plain, base, params


class TransformDropoutTest(parameterized.TestCase):

  def _models(self, fn, x):
    del x  # _models_cached picks the input that goes with fn
    return _models_cached(fn)

  @parameterized.named_parameters(("linear", _linear, _X), ("conv1d", _conv, _SEQ))
  def test_rng_none_is_no_dropout(self, fn, x):
    model, plain, _, params = self._models(fn, x)
    y = model.apply(params, None, x)
    np.testing.assert_array_equal(y, model.apply(params, None, x))
    np.testing.assert_array_equal(y, plain.apply(params, None, x))
    np.testing.assert_array_equal(y, plain.apply(params, jax.random.PRNGKey(3), x))

  @parameterized.named_parameters(("linear", _linear, _X), ("conv1d", _conv, _SEQ))
  def test_rng_makes_it_stochastic_and_reproducible(self, fn, x):
    model, plain, _, params = self._models(fn, x)
    apply = jax.jit(model.apply)
    y1 = apply(params, jax.random.PRNGKey(1), x)
    y2 = apply(params, jax.random.PRNGKey(2), x)
    np.testing.assert_array_equal(y1, apply(params, jax.random.PRNGKey(1), x))
    self.assertGreater(float(jnp.abs(y1 - y2).max()), 1e-3)
    self.assertGreater(float(jnp.abs(y1 - plain.apply(params, None, x)).max()), 1e-3)

  def test_rng_by_keyword(self):
    # Haiku's apply takes rng by keyword too; dropout must not silently stop.
    model, _, _, params = self._models(_linear, _X)
    by_position = model.apply(params, jax.random.PRNGKey(3), _X)
    by_keyword = model.apply(params, rng=jax.random.PRNGKey(3), x=_X)
    np.testing.assert_array_equal(by_keyword, by_position)
    self.assertGreater(float(jnp.abs(by_keyword - model.apply(params, None, _X)).max()), 1e-3)
    np.testing.assert_array_equal(model.apply(params, rng=None, x=_X),
                                  model.apply(params, None, _X))

  def test_only_the_low_rank_path_is_dropped(self):
    # Fresh adapters (b = 0): the LoRA path is zero, so dropout changes nothing.
    model = xrapture.transform(_linear, _config(0.9))
    base = model.init(jax.random.PRNGKey(0), _X)
    params = model.adapt(jax.random.PRNGKey(1), base)
    np.testing.assert_allclose(model.apply(params, jax.random.PRNGKey(5), _X),
                               hk.transform(_linear).apply(base, None, _X), rtol=1e-6)

  @parameterized.named_parameters(("linear", _linear, _X), ("conv1d", _conv, _SEQ))
  def test_expectation_is_no_dropout(self, fn, x):
    model, plain, _, params = self._models(fn, x)
    n = 2000
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    ys = jax.jit(jax.vmap(lambda k: model.apply(params, k, x)))(keys)
    expected = plain.apply(params, None, x)
    mean, stderr = ys.mean(0), ys.std(0) / np.sqrt(n)
    self.assertGreater(float(stderr.max()), 0.0)
    np.testing.assert_array_less(np.abs(mean - expected), 5 * stderr + 1e-6)

  def test_masks_differ_per_layer_of_a_layer_stack(self):
    # Every layer sees the same input and, below, the same params: without
    # dropout the per-layer outputs are equal, with it they differ.
    def fn(x):
      def layer(carry, _):
        return carry, hk.Linear(6)(carry)
      _, ys = hk.layer_stack(3, with_per_layer_inputs=True)(layer)(x, jnp.zeros(3))
      return ys
    model = xrapture.transform(fn, _config(0.5))
    base = model.init(jax.random.PRNGKey(0), _X)
    params = test_utils.randomize_adapters(model.adapt(jax.random.PRNGKey(1), base, _X))
    same = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), params)
    layer_outputs = model.apply(same, None, _X)
    np.testing.assert_array_equal(layer_outputs[0], layer_outputs[1])
    dropped = model.apply(same, jax.random.PRNGKey(3), _X)
    self.assertGreater(float(jnp.abs(dropped[0] - dropped[1]).max()), 1e-3)
    self.assertGreater(float(jnp.abs(dropped[1] - dropped[2]).max()), 1e-3)

  def test_masks_differ_per_call_site(self):
    def fn(x):
      lin = hk.Linear(6)
      return lin(x), lin(x)
    model = xrapture.transform(fn, _config(0.5))
    base = model.init(jax.random.PRNGKey(0), _X)
    params = test_utils.randomize_adapters(model.adapt(jax.random.PRNGKey(1), base))
    one, two = model.apply(params, jax.random.PRNGKey(3), _X)
    self.assertGreater(float(jnp.abs(one - two).max()), 1e-3)

  def test_gradients_and_state(self):
    def fn(x):
      h = hk.Linear(6)(x)
      return hk.BatchNorm(True, True, 0.9)(h, is_training=True)
    model = xrapture.transform_with_state(fn, _config(0.5))
    base, state = model.init(jax.random.PRNGKey(0), _X)
    params = test_utils.randomize_adapters(model.adapt(jax.random.PRNGKey(1), base))

    def loss(p, rng):
      y, _ = model.apply(p, state, rng, _X)
      return jnp.sum(y ** 2)
    grad = jax.jit(jax.grad(loss))
    g1, g2 = grad(params, jax.random.PRNGKey(1)), grad(params, jax.random.PRNGKey(2))
    self.assertTrue(np.all(np.isfinite(g1["linear"]["w"].b)))
    self.assertFalse(np.allclose(g1["linear"]["w"].b, g2["linear"]["w"].b))
    g_none = jax.jit(jax.grad(lambda p: loss(p, None)))(params)
    plain = xrapture.transform_with_state(fn, _config(0.0))
    g_plain = jax.jit(jax.grad(
        lambda p: jnp.sum(plain.apply(p, state, None, _X)[0] ** 2)))(params)
    np.testing.assert_allclose(g_none["linear"]["w"].b, g_plain["linear"]["w"].b, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
