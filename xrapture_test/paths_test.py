"""Tests for Haiku parameter paths (xrapture/_src/transform/paths.py)."""

from absl.testing import absltest
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.transform import paths


class PathsTest(absltest.TestCase):

  def test_key_str(self):
    tu = jax.tree_util
    self.assertEqual(paths.key_str(tu.DictKey("mlp/~/linear_0")), "mlp/~/linear_0")
    self.assertEqual(paths.key_str(tu.GetAttrKey("a")), "a")
    self.assertEqual(paths.key_str(tu.SequenceKey(3)), "3")
    self.assertEqual(paths.key_str(tu.FlattenedIndexKey(2)), "2")
    self.assertEqual(paths.key_str("raw"), "raw")

  def test_haiku_paths(self):
    def fn(x):
      return hk.nets.MLP([4, 3])(hk.Embed(5, 2)(x))
    params = hk.transform(fn).init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))
    flat, treedef = paths.flatten_with_paths(params)
    self.assertEqual([p for p, _ in flat], [
        "embed/embeddings", "mlp/~/linear_0/b", "mlp/~/linear_0/w",
        "mlp/~/linear_1/b", "mlp/~/linear_1/w"])
    self.assertEqual(treedef, jax.tree.structure(params))

  def test_implicit_arrays_are_leaves(self):
    lw = xrapture.LoraWeight(jnp.ones((3, 4)), jnp.ones((1, 4)), jnp.ones((3, 1)))
    params = {"lin": {"w": lw, "b": jnp.ones(4)}}
    flat, treedef = paths.flatten_with_paths(params)
    self.assertEqual([p for p, _ in flat], ["lin/b", "lin/w"])
    self.assertIs(flat[1][1], lw)
    self.assertEqual(treedef.num_leaves, 2)

  def test_map_with_paths(self):
    lw = xrapture.LoraWeight(jnp.ones((3, 4)), jnp.ones((1, 4)), jnp.ones((3, 1)))
    params = {"lin": {"w": lw, "b": jnp.ones(4)}, "norm": {"scale": jnp.ones(2)}}
    seen = []

    def fn(path, leaf):
      seen.append((path, type(leaf).__name__))
      return path
    out = paths.map_with_paths(fn, params)
    self.assertEqual(out, {"lin": {"w": "lin/w", "b": "lin/b"}, "norm": {"scale": "norm/scale"}})
    self.assertIn(("lin/w", "LoraWeight"), seen)

  def test_describe(self):
    params = {"a": {"w": np.zeros((2, 3), np.float32)},
              "b": {"ids": np.zeros((4,), np.int32)}}
    self.assertEqual(paths.describe(params),
                     "  a/w  (2, 3) float32\n  b/ids  (4,) int32")
    many = {f"m{i:02d}": {"w": np.zeros(1)} for i in range(7)}
    text = paths.describe(many, limit=5)
    self.assertEqual(len(text.splitlines()), 6)
    self.assertTrue(text.endswith("... and 2 more"))


if __name__ == "__main__":
  absltest.main()
