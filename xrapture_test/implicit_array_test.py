"""Tests for ImplicitArray and tree utilities (xrapture/_src/implicit/implicit_array.py)."""

import dataclasses

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.implicit import implicit_array


class Scaled(xrapture.ImplicitArray):
  """``value * factor``, with ``factor`` static."""

  value: jax.Array
  factor: float = xrapture.aux_field(default=2.0, metadata={"doc": "scale"})

  @property
  def shape(self):
    return tuple(self.value.shape)

  @property
  def dtype(self):
    return self.value.dtype

  def materialize(self):
    return self.value * self.factor


class Checked(xrapture.ImplicitArray):
  """Validates in __post_init__, like LoraWeight."""

  value: jax.Array

  def __post_init__(self):
    if self.value.ndim != 2:
      raise ValueError("need 2-D")

  shape = property(lambda self: self.value.shape)
  dtype = property(lambda self: self.value.dtype)

  def materialize(self):
    return self.value


class Incomplete(xrapture.ImplicitArray):
  value: jax.Array


class ImplicitArrayTest(absltest.TestCase):

  def test_subclass_becomes_a_dataclass(self):
    self.assertTrue(dataclasses.is_dataclass(Scaled))
    fields = {f.name: f for f in dataclasses.fields(Scaled)}
    self.assertEqual(set(fields), {"value", "factor"})
    self.assertEqual(fields["factor"].metadata["doc"], "scale")
    self.assertEqual(Scaled(jnp.ones(3)).factor, 2.0)

  def test_pytree_children_and_static_fields(self):
    x = Scaled(jnp.arange(3.0), factor=4.0)
    leaves, treedef = jax.tree.flatten(x)
    self.assertLen(leaves, 1)
    doubled = jax.tree.map(lambda v: v * 2, x)
    self.assertIsInstance(doubled, Scaled)
    self.assertEqual(doubled.factor, 4.0)
    np.testing.assert_array_equal(doubled.value, [0.0, 2.0, 4.0])
    self.assertNotEqual(treedef, jax.tree.structure(Scaled(jnp.arange(3.0), 5.0)))

  def test_key_paths_name_fields(self):
    paths = jax.tree_util.tree_flatten_with_path({"p": Scaled(jnp.ones(2))})[0]
    self.assertEqual(jax.tree_util.keystr(paths[0][0]), "['p'].value")

  def test_unflatten_skips_post_init(self):
    checked = Checked(jnp.ones((2, 2)))
    with self.assertRaises(ValueError):
      Checked(jnp.ones(2))
    labels = jax.tree.map(lambda _: "frozen", checked)
    self.assertEqual(labels.value, "frozen")

  def test_array_properties(self):
    x = Scaled(jnp.ones((2, 3), jnp.bfloat16))
    self.assertEqual((x.ndim, x.size), (2, 6))
    self.assertEqual(x.aval, jax.ShapeDtypeStruct((2, 3), jnp.bfloat16))

  def test_incomplete_subclass(self):
    x = Incomplete(jnp.ones(2))
    for get in (lambda: x.shape, lambda: x.dtype, x.materialize):
      with self.assertRaisesRegex(NotImplementedError, "Incomplete must define"):
        get()

  def test_jax_operation_outside_use_implicit_args(self):
    with self.assertRaisesRegex(TypeError, "Scaled reached a JAX operation"):
      jnp.sin(Scaled(jnp.ones(2)))

  def test_jit_and_grad_see_children(self):
    x = Scaled(jnp.arange(3.0), factor=3.0)
    out = jax.jit(lambda s: s.materialize())(x)
    np.testing.assert_array_equal(out, [0.0, 3.0, 6.0])
    grad = jax.grad(lambda s: jnp.sum(s.materialize()))(x)
    self.assertIsInstance(grad, Scaled)
    np.testing.assert_array_equal(grad.value, [3.0, 3.0, 3.0])

  def test_is_implicit(self):
    self.assertTrue(xrapture.is_implicit(Scaled(jnp.ones(2))))
    self.assertFalse(xrapture.is_implicit(jnp.ones(2)))


class EmptyNodeTest(absltest.TestCase):

  def test_singleton_without_leaves(self):
    self.assertIs(type(xrapture.EmptyNode)(), xrapture.EmptyNode)
    self.assertEqual(repr(xrapture.EmptyNode), "EmptyNode")
    tree = {"kept": jnp.ones(2), "removed": xrapture.EmptyNode}
    self.assertLen(jax.tree.leaves(tree), 1)
    mapped = jax.tree.map(lambda x: x + 1, tree)
    self.assertIs(mapped["removed"], xrapture.EmptyNode)


class TreeUtilsTest(absltest.TestCase):

  def test_tree_map_with_implicit_sees_whole_arrays(self):
    tree = {"x": Scaled(jnp.ones(2)), "y": jnp.zeros(3)}
    kinds = xrapture.tree_map_with_implicit(lambda v: type(v).__name__, tree)
    self.assertEqual(kinds["x"], "Scaled")
    shapes = xrapture.tree_map_with_implicit(
        lambda a, b: (a.shape, b), tree, {"x": 1, "y": 2})
    self.assertEqual(shapes, {"x": ((2,), 1), "y": ((3,), 2)})

  def test_materialize_nested(self):
    lora = xrapture.LoraWeight(jnp.ones((3, 2)), jnp.ones((1, 2)), jnp.ones((3, 1)))
    tree = {"lora": lora, "scaled_lora": Scaled(lora, factor=3.0),
            "dense": jnp.arange(2.0), "static": "keep"}
    out = xrapture.materialize_nested(tree)
    np.testing.assert_array_equal(out["lora"], np.full((3, 2), 2.0))
    np.testing.assert_array_equal(out["scaled_lora"], np.full((3, 2), 6.0))
    np.testing.assert_array_equal(out["dense"], [0.0, 1.0])
    self.assertEqual(out["static"], "keep")

  def test_map_fields(self):
    lora = xrapture.LoraWeight(jnp.ones((3, 2)), jnp.ones((1, 2)), jnp.ones((3, 1)))
    names = implicit_array.map_fields(lambda name, _: name, lora)
    self.assertEqual((names.w, names.a, names.b), ("w", "a", "b"))


if __name__ == "__main__":
  absltest.main()
