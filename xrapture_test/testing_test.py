"""xrapture.testing: the public checks, as a user imports them."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture import testing


def _lora(m=48, n=40, r=4):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return xrapture.LoraWeight(jax.random.normal(k1, (m, n)), jax.random.normal(k2, (r, n)),
                             jax.random.normal(k3, (m, r)), alpha=2.0)


class PublicTestingTest(absltest.TestCase):

  def test_exports_resolve(self):
    for name in testing.__all__:
      self.assertTrue(callable(getattr(testing, name)), name)

  def test_lora_model_passes_and_dense_model_is_caught(self):
    lora, x = _lora(), jnp.ones((3, 48))
    fn = xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w))
    testing.assert_no_dense_product(fn, x, lora)
    with self.assertRaisesRegex(AssertionError, "dense product"):
      testing.assert_no_dense_product(lambda x, w: jnp.tanh(x @ w.materialize()), x, lora)

  def test_dense_value_is_the_formula(self):
    lora = _lora()
    expected = np.asarray(lora.w) + 2.0 / 4 * np.asarray(lora.b) @ np.asarray(lora.a)
    np.testing.assert_allclose(testing.dense_value(lora), expected, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
