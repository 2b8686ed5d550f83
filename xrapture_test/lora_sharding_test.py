"""LoraWeights whose leaves carry NamedShardings on a device Mesh.

Runs on 8 host CPU devices faked by XLA; the flag must be set before jax is
first imported (conftest.py does the same for pytest).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import xrapture
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils
# pylint: enable=g-import-not-at-top,wrong-import-position

M, N, R, L = 48, 40, 4, 5
MODEL = 4  # devices along the mesh's "model" axis; N // MODEL = 10


def _lora(lead=()):
  return xrapture.LoraWeight(0.2 * test_utils.rand(0, *lead, M, N),
                             0.5 * test_utils.rand(1, *lead, R, N),
                             0.5 * test_utils.rand(2, *lead, M, R), alpha=2.0)


class ShardingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest("needs 8 devices: XLA_FLAGS was set after jax was imported")
    self.mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, MODEL),
                     ("data", "model"))

  def put(self, x, *spec):
    return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))

  def shard(self, lora):
    """w and a split along N over "model"; b replicated."""
    lead = (None,) * (lora.ndim - 2)
    return lora.replace(w=self.put(lora.w, *lead, None, "model"),
                        a=self.put(lora.a, *lead, None, "model"),
                        b=self.put(lora.b))

  def test_forward_and_grads_match_unsharded(self):
    lora, x = _lora(), test_utils.rand(3, 8, M)
    sharded, x_sharded = self.shard(lora), self.put(x, "data", None)
    self.assertIsInstance(sharded.w.sharding, NamedSharding)
    f = xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w))
    out = jax.jit(f)(x_sharded, sharded)
    np.testing.assert_allclose(out, jax.jit(f)(x, lora), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, np.tanh(np.asarray(x) @ reference.dense_value(lora)),
                               rtol=1e-4, atol=1e-4)
    self.assertIsInstance(out.sharding, NamedSharding)

    loss = lambda a, b, x, w: jnp.sum(f(x, w.replace(a=a, b=b)) ** 2)
    grad = jax.jit(jax.grad(loss, (0, 1)))
    sharded_grads = grad(sharded.a, sharded.b, x_sharded, sharded)
    for g, ref in zip(sharded_grads, grad(lora.a, lora.b, x, lora)):
      np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)
    # The SPMD program holds per-device shapes: look for those too.
    shapes = [(M, N), (M, N // MODEL)]
    self.assertEqual(dense_check.find_dense_products_in_hlo(
        jax.grad(loss, (0, 1)), sharded.a, sharded.b, x_sharded, sharded,
        shapes=shapes), [])

  def test_scan_over_sharded_stack(self):
    lora, x = _lora((L,)), test_utils.rand(3, 8, M)
    back = test_utils.rand(4, N, M) * 0.2
    layers = lambda x, ws: lax.scan(
        lambda h, w: (h + jnp.tanh(h @ w) @ back, None), x, ws)[0]
    f = jax.jit(xrapture.use_implicit_args(layers))
    out = f(self.put(x, "data", None), self.shard(lora))
    np.testing.assert_allclose(out, f(x, lora), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, layers(x, reference.dense_value(lora)),
                               rtol=1e-4, atol=1e-4)

  def test_nested_jit_keeps_its_output_sharding(self):
    # The interpreter inlines a nested jit; its out_shardings stay as
    # sharding constraints instead of being dropped.
    lora, x = _lora(), test_utils.rand(3, 8, M)
    spec = P(None, "model")
    inner = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(self.mesh, spec))
    f = jax.jit(xrapture.use_implicit_args(lambda x, w: inner(x, w) * 2.0))
    out = f(self.put(x, "data", None), self.shard(lora))
    self.assertEqual(out.sharding.spec, spec)
    np.testing.assert_allclose(out, 2 * np.asarray(x) @ reference.dense_value(lora),
                               rtol=1e-4, atol=1e-4)

  def test_explicit_sharding_constraint(self):
    lora, x = _lora(), test_utils.rand(3, 8, M)
    spec = P("data", "model")
    f = jax.jit(xrapture.use_implicit_args(lambda x, w: lax.with_sharding_constraint(
        x @ w, NamedSharding(self.mesh, spec))))
    out = f(x, self.shard(lora))
    self.assertEqual(out.sharding.spec, spec)
    np.testing.assert_allclose(out, np.asarray(x) @ reference.dense_value(lora),
                               rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
