"""Tests for kernel layouts read from apply's jaxpr (xrapture/_src/transform/layout.py)."""

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from xrapture._src.transform import layout as layout_lib

KernelLayout = layout_lib.KernelLayout
_SEQ = np.zeros((2, 8, 4), np.float32)
_IMG = np.zeros((2, 6, 6, 4), np.float32)
_VOL = np.zeros((1, 4, 4, 4, 2), np.float32)
_VEC = np.zeros((2, 4), np.float32)


def _layouts(fn, *inputs, abstract=False, **kwargs):
  """{path: layout} for every kernel (a param named ``w``)."""
  transformed = hk.transform(fn)

  # Layouts need shapes only: abstract params (static inputs stay Python values).
  def init(rng, *arrays):
    return transformed.init(rng, *[arrays[i] if isinstance(x, np.ndarray) else x
                                   for i, x in enumerate(inputs)], **kwargs)
  params = jax.eval_shape(init, jax.random.PRNGKey(0),
                          *[x if isinstance(x, np.ndarray) else None for x in inputs])
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  names = ["/".join(k.key for k in p) for p, _ in flat]
  wanted = [i for i, name in enumerate(names) if name.endswith("/w")]
  args = (None,) + inputs
  if abstract:
    args = (None,) + tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                           if isinstance(x, np.ndarray) else x for x in inputs)
  else:
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  found = layout_lib.kernel_layouts(transformed.apply, params, args, kwargs, wanted)
  return {names[i]: found[i] for i in wanted}


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


class KernelLayoutsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("linear", lambda x: hk.Linear(3)(x), _VEC, {"linear/w": KernelLayout(0, 0)}),
      ("layer_stack_linear", _stack(3, lambda h: hk.Linear(4)(h)), _VEC,
       {"__layer_stack_no_per_layer/linear/w": KernelLayout(1, 0, 1)}),
      ("conv1d", _conv1d, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("conv2d", lambda x: hk.Conv2D(3, 3)(x), _IMG, {"conv2_d/w": KernelLayout(0, 2)}),
      ("conv3d", lambda x: hk.Conv3D(3, 2)(x), _VOL, {"conv3_d/w": KernelLayout(0, 3)}),
      ("conv2d_transpose", lambda x: hk.Conv2DTranspose(3, 3, stride=2)(x), _IMG,
       {"conv2_d_transpose/w": KernelLayout(0, 2)}),
      ("layer_stack_conv1d", _stack(2, lambda h: jnp.tanh(hk.Conv1D(4, 3)(h))), _SEQ,
       {"__layer_stack_no_per_layer/conv1_d/w": KernelLayout(1, 1, 1)}),
      ("nested_stack_linear",
       _stack(2, lambda h: hk.layer_stack(3)(lambda g: hk.Linear(4)(g))(h)), _VEC,
       {"__layer_stack_no_per_layer/__layer_stack_no_per_layer/linear/w":
        KernelLayout(2, 0, 2)}),
      ("nested_stack_conv2d",
       _stack(2, lambda h: hk.layer_stack(2)(lambda g: hk.Conv2D(4, 3)(g))(h)), _IMG,
       {"__layer_stack_no_per_layer/__layer_stack_no_per_layer/conv2_d/w":
        KernelLayout(2, 2, 2)}),
      ("remat_conv", lambda x: hk.remat(_conv1d)(x), _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("stack_of_remat_conv",
       _stack(2, lambda h: hk.remat(lambda g: jnp.tanh(hk.Conv1D(4, 3)(g)))(h)), _SEQ,
       {"__layer_stack_no_per_layer/conv1_d/w": KernelLayout(1, 1, 1)}),
      ("mixed_precision_conv", _mixed_conv, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("conv_in_hk_scan", _conv_in_hk_scan, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("conv_in_fori_loop", _conv_in_fori_loop, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("conv_in_cond", _conv_in_cond, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("conv_in_remat_and_jit", _conv_in_jit, _SEQ, {"conv1_d/w": KernelLayout(0, 1)}),
      ("einsum_3d", _einsum_3d, _VEC, {"~/w": KernelLayout(1, 0)}),
      ("indexed_3d", _index_3d, _VEC, {"~/w": KernelLayout(1, 0)}),
      ("same_shapes", _same_shape_conv_and_stack, _SEQ,
       {"conv/w": KernelLayout(0, 1), "__layer_stack_no_per_layer/lin/w": KernelLayout(1, 0, 1)}),
  )
  def test_layouts(self, fn, x, expected):
    self.assertEqual(_layouts(fn, x), expected)

  def test_abstract_params_and_inputs(self):
    self.assertEqual(_layouts(_same_shape_conv_and_stack, _SEQ, abstract=True),
                     {"conv/w": KernelLayout(0, 1),
                      "__layer_stack_no_per_layer/lin/w": KernelLayout(1, 0, 1)})

  def test_static_arguments_stay_static(self):
    def fn(x, use_conv, scale=1.0):
      if use_conv:  # Python control flow on a static argument
        return hk.Conv1D(4, 3)(x) * scale
      return x
    self.assertEqual(_layouts(fn, _SEQ, True, scale=2.0), {"conv1_d/w": KernelLayout(0, 1)})

  def test_stacked(self):
    self.assertEqual(layout_lib.stacked(2), KernelLayout(0, 0))
    self.assertEqual(layout_lib.stacked(4), KernelLayout(2, 0))


if __name__ == "__main__":
  absltest.main()
