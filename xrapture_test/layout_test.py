"""Tests for kernel layouts read from apply's jaxpr (xrapture/_src/transform/layout.py)."""

import re

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from xrapture._src.transform import layout as layout_lib

_SEQ = np.zeros((2, 8, 4), np.float32)
_IMG = np.zeros((2, 6, 6, 4), np.float32)
_VOL = np.zeros((1, 4, 4, 4, 2), np.float32)
_VEC = np.zeros((2, 4), np.float32)


def _layouts(fn, *inputs, abstract=False, names=r".*/w", **kwargs):
  """{path: layout} for every parameter whose path fullmatches ``names``."""
  transformed = hk.transform(fn)

  # Layouts need shapes only: abstract params (static inputs stay Python values).
  def init(rng, *arrays):
    return transformed.init(rng, *[arrays[i] if isinstance(x, np.ndarray) else x
                                   for i, x in enumerate(inputs)], **kwargs)
  params = jax.eval_shape(init, jax.random.PRNGKey(0),
                          *[x if isinstance(x, np.ndarray) else None for x in inputs])
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = ["/".join(k.key for k in p) for p, _ in flat]
  wanted = [i for i, name in enumerate(paths) if re.fullmatch(names, name)]
  args = (None,) + inputs
  if abstract:
    args = (None,) + tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                           if isinstance(x, np.ndarray) else x for x in inputs)
  else:
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  found = layout_lib.kernel_layouts(transformed.apply, params, args, kwargs, wanted)
  return {paths[i]: found[i] for i in wanted}


def _conv1d(x):
  return hk.Conv1D(4, 3)(x)


def _stack(n, layer):
  return lambda x: hk.layer_stack(n)(layer)(x)


def _mixed_conv(x):
  policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  with hk.mixed_precision.push_policy(hk.Conv1D, policy):
    return hk.Conv1D(4, 3)(x)


def _conv_in_hk_scan(x):
  conv = hk.Conv1D(4, 3)

  def step(h, _):
    h = jnp.tanh(conv(h))
    return h, None
  h, _ = hk.scan(step, x, None, length=3)
  return h


def _conv_in_fori_loop(x):
  conv = hk.Conv1D(4, 3)
  conv(x)  # create the param outside the loop
  return hk.fori_loop(0, 3, lambda i, h: jnp.tanh(conv(h)), x)


def _conv_in_cond(x):
  conv = hk.Conv1D(4, 3)
  conv(x)  # both branches must see the same params
  return hk.cond(x.sum() > 0, conv, lambda h: h, x)


def _conv_in_jit(x):
  conv = hk.Conv1D(4, 3)
  conv(x)
  return hk.remat(conv)(x) + jax.jit(lambda h: h * 2)(x)


def _einsum_3d(x):
  w = hk.get_parameter("w", [3, 4, 5], init=jnp.ones)
  return jnp.einsum("bi,kij->bkj", x, w)


def _index_3d(x):
  w = hk.get_parameter("w", [3, 4, 4], init=jnp.ones)
  for i in range(3):
    x = x @ w[i]
  return x


def _same_shape_conv_and_stack(x):
  # Both kernels are [3, 4, 4]: only their use tells them apart.
  h = hk.Conv1D(4, 3, name="conv")(x)
  return hk.layer_stack(3)(lambda h: jnp.tanh(hk.Linear(4, name="lin")(h)))(h)


def _attention(x):
  """Multi-axis einsum attention kernels, as in published Haiku models."""
  wq = hk.get_parameter("query_w", [4, 2, 3], init=jnp.ones)      # [in, heads, dim]
  wo = hk.get_parameter("output_w", [2, 3, 5], init=jnp.ones)     # [heads, dim, out]
  q = jnp.einsum("bd,dhk->bhk", x, wq)
  return jnp.einsum("bhk,hkd->bd", q, wo)


def _tied_embedding(ids):
  table = hk.get_parameter("embeddings", [7, 4], init=jnp.ones)
  h = table[ids]
  return h @ table.T


def _experts(x):
  w = hk.get_parameter("w", [3, 4, 5], init=jnp.ones)            # [experts, in, out]
  return jnp.einsum("ecd,edf->ecf", jnp.broadcast_to(x, (3,) + x.shape), w)


def _ragged(x):
  w = hk.get_parameter("w", [3, 4, 5], init=jnp.ones)
  return jax.lax.ragged_dot(x, w, jnp.array([1, 0, 1], jnp.int32))


def _gru(x):
  core = hk.GRU(6)
  out, _ = hk.dynamic_unroll(core, x, core.initial_state(x.shape[1]), time_major=True)
  return out


def _two_contractions(x):
  w = hk.get_parameter("w", [4, 4], init=jnp.ones)
  return x @ w + x @ w.T  # (in, out) and (out, in): the same partition, compatible


def _incompatible(x):
  w = hk.get_parameter("w", [4, 2, 2], init=jnp.ones)
  return jnp.einsum("bi,ijk->bjk", x, w).sum() + jnp.einsum("bj,ijk->bik", x[:, :2], w).sum()


def _codebook(x):
  e = hk.get_parameter("embeddings", [4, 6], init=jnp.ones)
  return x @ e - jnp.sum(e ** 2, axis=0)


def _depthwise(x):
  return hk.DepthwiseConv1D(1, 3)(x)


def _reshaped(x):
  w = hk.get_parameter("w", [4, 2, 3], init=jnp.ones)
  return x @ w.reshape(4, 6)


class KernelLayoutsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("linear", lambda x: hk.Linear(3)(x), _VEC, {"linear/w": ("io", 0)}),
      ("layer_stack_linear", _stack(3, lambda h: hk.Linear(4)(h)), _VEC,
       {"__layer_stack_no_per_layer/linear/w": ("sio", 1)}),
      ("conv1d", _conv1d, _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("conv2d", lambda x: hk.Conv2D(3, 3)(x), _IMG, {"conv2_d/w": ("iiio", 0)}),
      ("conv3d", lambda x: hk.Conv3D(3, 2)(x), _VOL, {"conv3_d/w": ("iiiio", 0)}),
      # HWOI: the input features are the last axis.
      ("conv2d_transpose", lambda x: hk.Conv2DTranspose(3, 3, stride=2)(x), _IMG,
       {"conv2_d_transpose/w": ("iioi", 0)}),
      ("layer_stack_conv1d", _stack(2, lambda h: jnp.tanh(hk.Conv1D(4, 3)(h))), _SEQ,
       {"__layer_stack_no_per_layer/conv1_d/w": ("siio", 1)}),
      ("nested_stack_linear",
       _stack(2, lambda h: hk.layer_stack(3)(lambda g: hk.Linear(4)(g))(h)), _VEC,
       {"__layer_stack_no_per_layer/__layer_stack_no_per_layer/linear/w": ("ssio", 2)}),
      ("nested_stack_conv2d",
       _stack(2, lambda h: hk.layer_stack(2)(lambda g: hk.Conv2D(4, 3)(g))(h)), _IMG,
       {"__layer_stack_no_per_layer/__layer_stack_no_per_layer/conv2_d/w":
        ("ssiiio", 2)}),
      ("remat_conv", lambda x: hk.remat(_conv1d)(x), _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("stack_of_remat_conv",
       _stack(2, lambda h: hk.remat(lambda g: jnp.tanh(hk.Conv1D(4, 3)(g)))(h)), _SEQ,
       {"__layer_stack_no_per_layer/conv1_d/w": ("siio", 1)}),
      ("mixed_precision_conv", _mixed_conv, _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("conv_in_hk_scan", _conv_in_hk_scan, _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("conv_in_fori_loop", _conv_in_fori_loop, _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("conv_in_cond", _conv_in_cond, _SEQ, {"conv1_d/w": ("iio", 0)}),
      ("conv_in_remat_and_jit", _conv_in_jit, _SEQ, {"conv1_d/w": ("iio", 0)}),
      # x [b, i] @ w [k, i, j] over i: the in group is i; k and j are free.
      ("einsum_3d", _einsum_3d, _VEC, {"~/w": ("oio", 0)}),
      ("indexed_3d", _index_3d, _VEC, {"~/w": ("sio", 0)}),
      ("same_shapes", _same_shape_conv_and_stack, _SEQ,
       {"conv/w": ("iio", 0), "__layer_stack_no_per_layer/lin/w": ("sio", 1)}),
      ("multi_axis_attention", _attention, _VEC,
       {"~/query_w": ("ioo", 0), "~/output_w": ("iio", 0)}),
      ("experts_einsum", _experts, _VEC, {"~/w": ("sio", 0)}),
      ("experts_ragged_dot", _ragged, _VEC, {"~/w": ("sio", 0)}),
      ("reshaped_to_grouped_matrix", _reshaped, _VEC, {"~/w": ("ioo", 0)}),
      ("two_orientations", _two_contractions, _VEC, {"~/w": ("io", 0)}),
      ("gru_split_gates", _gru, np.zeros((3, 2, 4), np.float32),
       {"gru/w_i": ("io", 0), "gru/w_h": ("io", 0)}),
  )
  def test_layouts(self, fn, x, expected):
    found = _layouts(fn, x, names=r".*/(w|\w+_w|w_\w|embeddings)")
    self.assertEqual({k: (v.layout, v.scanned) for k, v in found.items()}, expected)
    for layout in found.values():
      self.assertTrue(layout.low_rank, layout)

  def test_tied_embedding_orientation_from_first_use(self):
    found = _layouts(_tied_embedding, np.zeros((2, 3), np.int32),
                     names=".*/embeddings")["~/embeddings"]
    # Looked up by rows first: rows are the in group; x @ E.T agrees.
    self.assertEqual(found.layout, "io")
    self.assertEqual(found.uses, ("gather", "dot_general"))
    self.assertIsNone(found.conflict)

  def test_incompatible_uses(self):
    found = _layouts(_incompatible, _VEC)["~/w"]
    self.assertIn("dot_general (in axes (0,), out axes (1, 2))", found.conflict)
    self.assertIn("dot_general (in axes (1,), out axes (0, 2))", found.conflict)
    self.assertFalse(found.low_rank)

  def test_elementwise_use_is_a_problem(self):
    found = _layouts(_codebook, _VEC[:, :4], names=".*/embeddings")["~/embeddings"]
    self.assertEqual(found.layout, "io")
    self.assertEqual(found.uses, ("dot_general",))
    self.assertTrue(any(p.startswith("integer_pow") for p in found.problems),
                    found.problems)

  def test_grouped_conv(self):
    found = _layouts(_depthwise, _SEQ)["depthwise_conv1_d/w"]
    self.assertTrue(found.grouped_conv)
    self.assertIn("grouped conv", found.problems[0])

  def test_abstract_params_and_inputs(self):
    found = _layouts(_same_shape_conv_and_stack, _SEQ, abstract=True)
    self.assertEqual({k: (v.layout, v.scanned) for k, v in found.items()},
                     {"conv/w": ("iio", 0), "__layer_stack_no_per_layer/lin/w": ("sio", 1)})

  def test_static_arguments_stay_static(self):
    def fn(x, use_conv, scale=1.0):
      if use_conv:  # Python control flow on a static argument
        return hk.Conv1D(4, 3)(x) * scale
      return x
    self.assertEqual(_layouts(fn, _SEQ, True, scale=2.0)["conv1_d/w"].layout, "iio")

  def test_unused_kernel_gets_the_default(self):
    def fn(x):
      hk.get_parameter("w", [3, 4, 5], init=jnp.ones)
      return x
    found = _layouts(fn, _VEC)["~/w"]
    self.assertEqual((found.layout, found.uses, found.problems), ("sio", (), ()))
    self.assertEqual(layout_lib.default(2).layout, "io")


if __name__ == "__main__":
  absltest.main()
