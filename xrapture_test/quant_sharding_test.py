"""QuantizedArrays whose codes and scales carry NamedShardings on a device Mesh.

Runs on 8 host CPU devices faked by XLA; the flag must be set before jax is
first imported (conftest.py does the same for pytest).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import xrapture

import test_utils
# pylint: enable=g-import-not-at-top,wrong-import-position

K, N, L = 128, 48, 3
MODEL = 4  # devices along the mesh's "model" axis


class ShardingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest("needs 8 devices: XLA_FLAGS was set after jax was imported")
    self.mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, MODEL), ("data", "model"))

  def put(self, x, *spec):
    return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))

  def shard(self, q):
    """Codes and absmax split over "model" along the output channels; the rest replicated."""
    lead = (None,) * (q.ndim - 2)
    split = lambda x: self.put(x, *lead, "model", None)
    pieces = dict(codes=split(q.codes), absmax=split(q.absmax))
    if q.double_quant:
      pieces.update(absmax2=self.put(q.absmax2), offset=self.put(q.offset))
    return q.replace(**pieces)

  @parameterized.parameters(("nf4", False), ("nf4", True), ("int8", False))
  def test_forward_and_input_gradient_match_unsharded(self, scheme, double_quant):
    q = xrapture.quantize_array(test_utils.rand(0, K, N, scale=0.1), scheme,
                                double_quant=double_quant)
    x = test_utils.rand(1, 8, K)
    sharded, x_sharded = self.shard(q), self.put(x, "data", None)
    self.assertIsInstance(sharded.codes.sharding, NamedSharding)
    self.assertEqual(sharded.codes.sharding.spec, P("model", None))
    f = xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w))
    with xrapture.strict_mode():
      out = jax.jit(f)(x_sharded, sharded)
      grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2)))(x_sharded, sharded)
    dense = xrapture.dequantize(q)
    np.testing.assert_allclose(out, jnp.tanh(x @ dense), rtol=1e-5, atol=1e-5)
    self.assertIsInstance(out.sharding, NamedSharding)
    expected = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ dense) ** 2))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)

  def test_device_put_of_the_whole_array(self):
    q = xrapture.quantize_array(test_utils.rand(2, K, N, scale=0.1), "nf4", double_quant=True)
    shardings = jax.tree_util.tree_map(
        lambda x: NamedSharding(self.mesh, P("model") if x.ndim == 2 else P()), q)
    sharded = jax.device_put(q, shardings)
    self.assertIsInstance(sharded, xrapture.QuantizedArray)
    self.assertEqual(sharded.codes.sharding.spec, P("model"))
    self.assertLen(sharded.codes.addressable_shards, 8)
    self.assertEqual(sharded.codes.addressable_shards[0].data.shape, (N // MODEL, K // 2))
    np.testing.assert_array_equal(jax.jit(xrapture.dequantize)(sharded), xrapture.dequantize(q))

  def test_scan_over_sharded_stack(self):
    q = xrapture.quantize_array(test_utils.rand(3, L, K, K, scale=0.1), "nf4", double_quant=True)
    x = test_utils.rand(4, 8, K)
    layers = lambda x, ws: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
    f = jax.jit(xrapture.use_implicit_args(layers))
    with xrapture.strict_mode():
      out = f(self.put(x, "data", None), self.shard(q))
    np.testing.assert_allclose(out, layers(x, xrapture.dequantize(q)), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
