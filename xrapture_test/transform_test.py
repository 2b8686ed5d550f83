"""Tests for xrapture.transform on real Haiku modules."""

import unittest
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import xrapture

import test_utils

_RANK = 2
_ALPHA = 4.0


def _config(**overrides):
  config = xrapture.default_config()
  config.rank = _RANK
  config.alpha = _ALPHA
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _perturb(params, seed=0, stddev=0.2):
  """Random non-zero ``a`` and ``b`` in every LoraWeight (in their dtypes)."""
  _, leaves, treedef = test_utils.flat_with_names(params)
  out = []
  for i, leaf in enumerate(leaves):
    if isinstance(leaf, xrapture.LoraWeight):
      rng = np.random.default_rng(seed * 1000 + i)
      a = rng.normal(0.0, stddev, leaf.a.shape).astype(np.float32)
      b = rng.normal(0.0, stddev, leaf.b.shape).astype(np.float32)
      leaf = leaf.replace(a=jnp.asarray(a, leaf.a.dtype), b=jnp.asarray(b, leaf.b.dtype))
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _delta(layout, b, a):
  """``b @ a`` laid out like ``w``: one einsum, a letter per axis of ``w``."""
  letters = "abcdefgh"[:len(layout)]
  pick = lambda role: "".join(l for l, c in zip(letters, layout) if c == role)
  return np.einsum(f"{pick('s')}{pick('i')}r,{pick('s')}r{pick('o')}->{letters}", b, a)


def _dense_reference(params, scale):
  """``w + scale · b @ a`` per LoraWeight, in float64 numpy, cast to w's dtype.

  ``scale`` is what the test expects (``alpha / r`` from the config), not what
  the LoraWeight says.
  """
  def one(x):
    if not isinstance(x, xrapture.LoraWeight):
      return x
    w = np.asarray(x.w, np.float64)
    a = np.asarray(x.a.astype(jnp.float32), np.float64)
    b = np.asarray(x.b.astype(jnp.float32), np.float64)
    return jnp.asarray(w + scale * _delta(x.layout, b, a), x.w.dtype)
  return xrapture.tree_map_with_implicit(one, params)


def _assert_close(actual, expected, rtol):
  """``|actual - expected| <= rtol · max|expected|`` elementwise."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_array_less(np.abs(actual - expected),
                               rtol * np.max(np.abs(expected)) + 1e-30)


# ---------------------------------------------------------------------------
# Models. Each: (fn, inputs, extra config fields, {adapted path: layout}).
# ---------------------------------------------------------------------------

_X3 = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
_IDS = np.array([[1, 2, 3], [0, 9, 2]], np.int32)
_IMG = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype(np.float32)
_SEQ = np.random.default_rng(2).normal(size=(2, 8, 4)).astype(np.float32)
_VEC = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
_INIT = hk.initializers.VarianceScaling(1.0)


def _linear(x):
  return hk.Linear(7)(x)


def _mha(x):
  return hk.MultiHeadAttention(num_heads=2, key_size=3, w_init=_INIT)(x, x, x)


def _embed_array_index(ids):
  return hk.Embed(10, 6, lookup_style="ARRAY_INDEX")(ids)


def _embed_one_hot(ids):
  return hk.Embed(10, 6, lookup_style="ONE_HOT")(ids)


def _conv1d(x):
  return hk.Conv1D(5, 3)(x)


def _conv2d(x):
  return hk.Conv2D(5, 3)(x)


def _conv2d_transpose(x):
  return hk.Conv2DTranspose(4, 3, stride=2)(x)


def _stack_linear(x):
  return hk.layer_stack(3)(lambda h: jnp.tanh(hk.Linear(6)(h)))(x)


def _stack_conv1d(x):
  return hk.layer_stack(2)(lambda h: jnp.tanh(hk.Conv1D(4, 3)(h)))(x)


def _remat(x):
  def block(h):
    return hk.Linear(5)(jnp.tanh(hk.Linear(8)(h)))
  return hk.remat(block)(x)


_MODELS = dict(
    linear=(_linear, (_X3,), {}, {"linear/w": "io"}),
    multi_head_attention=(_mha, (_X3,), {}, {
        "multi_head_attention/query/w": "io",
        "multi_head_attention/key/w": "io",
        "multi_head_attention/value/w": "io",
        "multi_head_attention/linear/w": "io"}),
    embed_array_index=(_embed_array_index, (_IDS,),
                       {"targets": (".*/embeddings",)}, {"embed/embeddings": "io"}),
    embed_one_hot=(_embed_one_hot, (_IDS,),
                   {"targets": (".*/embeddings",)}, {"embed/embeddings": "io"}),
    # A conv's window joins its input channels: [k·in, out].
    conv1d=(_conv1d, (_SEQ,), {}, {"conv1_d/w": "iio"}),
    conv2d=(_conv2d, (_IMG,), {}, {"conv2_d/w": "iiio"}),
    # HWOI: the input channels are the last axis.
    conv2d_transpose=(_conv2d_transpose, (_IMG,), {}, {"conv2_d_transpose/w": "iioi"}),
    layer_stack_linear=(_stack_linear, (_VEC,), {},
                        {"__layer_stack_no_per_layer/linear/w": "sio"}),
    layer_stack_conv1d=(_stack_conv1d, (_SEQ,), {},
                        {"__layer_stack_no_per_layer/conv1_d/w": "siio"}),
    remat=(_remat, (_X3,), {}, {"linear/w": "io", "linear_1/w": "io"}),
)


def _expected_factor_shapes(shape, layout, rank):
  """(a, b) shapes: a [*S, r, *O], b [*S, *I, r], from the shape and layout alone."""
  pick = lambda role: tuple(n for n, c in zip(shape, layout) if c == role)
  return pick("s") + (rank,) + pick("o"), pick("s") + pick("i") + (rank,)


def _expected_trainable(shape, layout, rank):
  """r·(prod(in) + prod(out)) per stacked element."""
  pick = lambda role: int(np.prod([n for n, c in zip(shape, layout) if c == role]))
  return pick("s") * rank * (pick("i") + pick("o"))


class HaikuModulesTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name,) + v for name, v in _MODELS.items()])
  def test_adapt_apply_merge_and_dense_reference(self, fn, inputs, overrides, layouts):
    model = xrapture.transform(fn, _config(**overrides))
    base = model.init(jax.random.PRNGKey(0), *inputs)
    params = model.adapt(jax.random.PRNGKey(1), base, *inputs)
    names, leaves, _ = test_utils.flat_with_names(params)
    base_names, base_leaves, _ = test_utils.flat_with_names(base)
    self.assertEqual(names, base_names)

    # Exactly the expected kernels are adapted, with the expected layouts.
    base_by_name = dict(zip(base_names, base_leaves))
    adapted = {n: v for n, v in zip(names, leaves) if isinstance(v, xrapture.LoraWeight)}
    self.assertCountEqual(adapted, layouts)
    for name, leaf in zip(names, leaves):
      if name in layouts:
        base_w = base_by_name[name]
        self.assertIs(leaf.w, base_w)
        self.assertEqual(leaf.layout, layouts[name], name)
        a_shape, b_shape = _expected_factor_shapes(base_w.shape, layouts[name], _RANK)
        self.assertEqual((leaf.a.shape, leaf.b.shape), (a_shape, b_shape), name)
        np.testing.assert_array_equal(leaf.b, 0.0)
        self.assertGreater(float(jnp.abs(leaf.a).max()), 0.0)
      else:
        self.assertIs(leaf, base_by_name[name])

    base_apply = jax.jit(hk.transform(fn).apply)
    apply = jax.jit(model.apply)
    y_base = base_apply(base, None, *inputs)
    # No materialization: strict mode, and any warning is an error.
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      y_adapted = apply(params, None, *inputs)
      perturbed = _perturb(params)
      y = apply(perturbed, None, *inputs)
    _assert_close(y_adapted, y_base, 1e-6)

    y_merged = base_apply(xrapture.merge_params(perturbed), None, *inputs)
    y_reference = base_apply(_dense_reference(perturbed, _ALPHA / _RANK), None, *inputs)
    # Positive control: the perturbation changes the output.
    self.assertGreater(float(np.max(np.abs(y_reference - y_base))),
                       0.05 * float(np.max(np.abs(y_base))))
    _assert_close(y, y_merged, 1e-4)
    _assert_close(y, y_reference, 1e-4)

    # The trainable count follows from the base shapes and layouts alone.
    expected = sum(_expected_trainable(base_by_name[n].shape,
                                       layouts[n], _RANK) for n in layouts)
    self.assertEqual(xrapture.count_trainable(params, model.lora_spec(base, *inputs)),
                     expected)

  def test_layer_stack_output_matches_a_python_loop_over_layers(self):
    # Independent of Haiku's scan: apply the adapted layers one by one in numpy.
    model = xrapture.transform(_stack_linear, _config())
    base = model.init(jax.random.PRNGKey(0), _VEC)
    params = _perturb(model.adapt(jax.random.PRNGKey(1), base, _VEC))
    lw = params["__layer_stack_no_per_layer/linear"]["w"]
    bias = np.asarray(params["__layer_stack_no_per_layer/linear"]["b"], np.float64)
    w, a, b = (np.asarray(t, np.float64) for t in (lw.w, lw.a, lw.b))
    h = _VEC.astype(np.float64)
    for layer in range(w.shape[0]):
      h = np.tanh(h @ w[layer] + bias[layer]
                  + (_ALPHA / _RANK) * (h @ b[layer]) @ a[layer])
    _assert_close(model.apply(params, None, _VEC), h, 1e-5)

  def test_linear_output_matches_numpy(self):
    model = xrapture.transform(_linear, _config())
    base = model.init(jax.random.PRNGKey(0), _X3)
    params = _perturb(model.adapt(jax.random.PRNGKey(1), base, _X3))
    lw, bias = params["linear"]["w"], np.asarray(params["linear"]["b"], np.float64)
    w, a, b = (np.asarray(t, np.float64) for t in (lw.w, lw.a, lw.b))
    x = _X3.astype(np.float64)
    expected = x @ w + bias + (_ALPHA / _RANK) * (x @ b) @ a
    _assert_close(model.apply(params, None, _X3), expected, 1e-5)

  def test_embed_lookup_matches_numpy(self):
    model = xrapture.transform(_embed_array_index, _config(targets=(".*/embeddings",)))
    base = model.init(jax.random.PRNGKey(0), _IDS)
    params = _perturb(model.adapt(jax.random.PRNGKey(1), base, _IDS))
    lw = params["embed"]["embeddings"]
    w, a, b = (np.asarray(t, np.float64) for t in (lw.w, lw.a, lw.b))
    expected = w[_IDS] + (_ALPHA / _RANK) * b[_IDS] @ a
    _assert_close(model.apply(params, None, _IDS), expected, 1e-5)

  def test_default_config_adapts_kernels_not_embeddings(self):
    def fn(ids):
      return hk.Linear(3)(hk.Embed(10, 4)(ids))
    model = xrapture.transform(fn)  # default config, rank 8 > 3 is an error
    base = model.init(jax.random.PRNGKey(0), _IDS)
    with self.assertRaisesRegex(ValueError, "rank 8 .*linear/w"):
      model.adapt(jax.random.PRNGKey(1), base, _IDS)
    model = xrapture.transform(fn, _config())
    lora_spec = model.lora_spec(base, _IDS)
    self.assertEqual(lora_spec["linear"]["w"], _RANK)
    self.assertEqual(lora_spec["embed"]["embeddings"], xrapture.LORA_FREEZE)
    self.assertEqual(lora_spec["linear"]["b"], xrapture.LORA_FREEZE)

  def test_bf16_mixed_precision(self):
    policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")

    def fn(x):
      return hk.Linear(4)(jax.nn.gelu(hk.Linear(8)(x)))
    with hk.mixed_precision.push_policy(hk.Linear, policy):
      model = xrapture.transform(fn, _config())
      base = model.init(jax.random.PRNGKey(0), _X3)
      params = model.adapt(jax.random.PRNGKey(1), base, _X3)
      base_apply = jax.jit(hk.transform(fn).apply)   # traced under the policy
      y_base = base_apply(base, None, _X3)
      with xrapture.strict_mode():
        y_adapted = model.apply(params, None, _X3)
        perturbed = _perturb(params)
        y = model.apply(perturbed, None, _X3)
      y_reference = base_apply(_dense_reference(perturbed, _ALPHA / _RANK), None, _X3)
      y_merged = base_apply(xrapture.merge_params(perturbed), None, _X3)
    self.assertEqual(y.dtype, jnp.float32)
    _assert_close(y_adapted, y_base, 1e-6)
    self.assertGreater(float(np.max(np.abs(y_reference - y_base))),
                       0.05 * float(np.max(np.abs(y_base))))
    # bf16 compute: the LoRA path and the merged kernel round differently.
    _assert_close(y, y_reference, 3e-2)
    _assert_close(y, y_merged, 3e-2)

  def test_batch_norm_with_state(self):
    def fn(x, is_training):
      h = hk.Conv1D(6, 3)(x)  # a 3-D kernel: adapt traces apply with the flag
      h = hk.BatchNorm(True, True, 0.9)(h, is_training)
      return hk.Linear(3)(h)
    model = xrapture.transform_with_state(fn, _config())
    base_fn = hk.transform_with_state(fn)
    base_apply = jax.jit(base_fn.apply, static_argnums=4)
    base, state = model.init(jax.random.PRNGKey(0), _SEQ, True)
    params = model.adapt(jax.random.PRNGKey(1), base, _SEQ, True)
    self.assertEqual(params["conv1_d"]["w"].a.shape, (_RANK, 6))
    self.assertIsInstance(params["linear"]["w"], xrapture.LoraWeight)
    self.assertIs(params["batch_norm"]["scale"], base["batch_norm"]["scale"])

    y_base, s_base = base_apply(base, state, None, _SEQ, True)
    with xrapture.strict_mode():
      y_adapted, s_adapted = model.apply(params, state, None, _SEQ, True)
    _assert_close(y_adapted, y_base, 1e-6)
    jax.tree.map(lambda u, v: _assert_close(u, v, 1e-6), s_adapted, s_base)

    perturbed = _perturb(params)
    with xrapture.strict_mode():
      y, new_state = model.apply(perturbed, state, None, _SEQ, True)
    dense = _dense_reference(perturbed, _ALPHA / _RANK)
    y_reference, state_reference = base_apply(dense, state, None, _SEQ, True)
    _assert_close(y, y_reference, 1e-4)
    jax.tree.map(lambda u, v: _assert_close(u, v, 1e-4), new_state, state_reference)
    # The moving averages moved, so the state really went through the model.
    mean = new_state["batch_norm/~/mean_ema"]["average"]
    self.assertGreater(float(jnp.abs(mean - state["batch_norm/~/mean_ema"]["average"]).max()), 0)
    # Inference mode with the updated state.
    y_eval, _ = model.apply(perturbed, new_state, None, _SEQ, False)
    y_eval_ref, _ = base_apply(dense, new_state, None, _SEQ, False)
    _assert_close(y_eval, y_eval_ref, 1e-4)

  def test_transform_with_state_reads_stack_layouts(self):
    def fn(x):
      h = hk.layer_stack(2)(lambda h: jnp.tanh(hk.Conv1D(4, 3)(h)))(x)
      counter = hk.get_state("n", [], jnp.int32, init=jnp.zeros)
      hk.set_state("n", counter + 1)
      return h
    model = xrapture.transform_with_state(fn, _config())
    base, state = model.init(jax.random.PRNGKey(0), _SEQ)
    params = model.adapt(jax.random.PRNGKey(1), base, _SEQ)
    lw = params["__layer_stack_no_per_layer/conv1_d"]["w"]
    self.assertEqual(lw.a.shape, (2, _RANK, 4))
    self.assertEqual(lw.b.shape, (2, 3, 4, _RANK))
    perturbed = _perturb(params)
    y, new_state = model.apply(perturbed, state, None, _SEQ)
    y_ref, _ = jax.jit(hk.transform_with_state(fn).apply)(
        _dense_reference(perturbed, _ALPHA / _RANK), state, None, _SEQ)
    _assert_close(y, y_ref, 1e-4)
    self.assertEqual(int(new_state["~"]["n"]), 1)


class ConfigOptionsTest(parameterized.TestCase):

  def _two_linears(self, config):
    def fn(x):
      return hk.Linear(5, name="first")(jnp.tanh(hk.Linear(8, name="second")(x)))
    model = xrapture.transform(fn, config)
    base = model.init(jax.random.PRNGKey(0), _X3)
    return fn, model, base

  def test_rank_and_alpha_patterns_and_rslora(self):
    for rslora in (False, True):
      config = _config(rank_pattern=(("second/w", 4),), alpha_pattern=(("first/w", 1.0),),
                   rslora=rslora)
      fn, model, base = self._two_linears(config)
      params = _perturb(model.adapt(jax.random.PRNGKey(1), base))
      first, second = params["first"]["w"], params["second"]["w"]
      self.assertEqual((first.b.shape[-1], second.b.shape[-1]), (_RANK, 4))
      scale = (lambda alpha, r: alpha / np.sqrt(r)) if rslora else (lambda alpha, r: alpha / r)
      dense = dict(first=_dense_reference({"w": first}, scale(1.0, _RANK))["w"],
                   second=_dense_reference({"w": second}, scale(_ALPHA, 4))["w"])
      ref_params = {k: dict(v, w=dense[k]) for k, v in params.items()}
      base_apply = jax.jit(hk.transform(fn).apply)
      y_ref = base_apply(ref_params, None, _X3)
      _assert_close(model.apply(params, None, _X3), y_ref, 1e-4)
      _assert_close(base_apply(xrapture.merge_params(params), None, _X3),
                    y_ref, 1e-4)

  def test_rslora_changes_the_output(self):
    # rank 4: alpha/r and alpha/sqrt(r) differ, so the test above can fail.
    outs = []
    for rslora in (False, True):
      _, model, base = self._two_linears(_config(rank=4, rslora=rslora))
      params = _perturb(model.adapt(jax.random.PRNGKey(1), base))
      outs.append(model.apply(params, None, _X3))
    self.assertGreater(float(jnp.abs(outs[0] - outs[1]).max()), 1e-3)

  @parameterized.named_parameters(
      ("linear_bf16_adapters", "linear", jnp.float32, "bfloat16"),
      ("conv1d_bf16_adapters", "conv1d", jnp.float32, "bfloat16"),
      ("conv2d_transpose_bf16_adapters", "conv2d_transpose", jnp.float32, "bfloat16"),
      ("conv1d_f32_adapters_on_bf16", "conv1d", jnp.bfloat16, "float32"))
  def test_adapter_dtype(self, model_name, base_dtype, adapter_dtype):
    fn, (x,), _, layouts = _MODELS[model_name]
    x = x.astype(base_dtype)
    model = xrapture.transform(fn, _config(dtype=adapter_dtype))
    base = jax.tree.map(lambda p: p.astype(base_dtype), model.init(jax.random.PRNGKey(0), x))
    params = model.adapt(jax.random.PRNGKey(1), base, x)
    (name,) = layouts
    module, param = name.rsplit("/", 1)
    lw = params[module][param]
    self.assertEqual((lw.a.dtype, lw.b.dtype, lw.w.dtype),
                     (jnp.dtype(adapter_dtype),) * 2 + (jnp.dtype(base_dtype),))
    base_apply = jax.jit(hk.transform(fn).apply)
    with xrapture.strict_mode():
      y = model.apply(params, None, x)
    self.assertEqual(y.dtype, base_dtype)
    _assert_close(y, base_apply(base, None, x), 1e-6)
    perturbed = _perturb(params)
    y_ref = base_apply(_dense_reference(perturbed, _ALPHA / _RANK), None, x)
    with xrapture.strict_mode():
      y = model.apply(perturbed, None, x)
    _assert_close(y, y_ref, 3e-2)
    grads = jax.jit(jax.grad(
        lambda p: model.apply(p, None, x).astype(jnp.float32).sum()))(perturbed)
    g = grads[module][param]
    self.assertEqual((g.a.dtype, g.b.dtype), (jnp.dtype(adapter_dtype),) * 2)
    self.assertGreater(float(jnp.abs(g.b.astype(jnp.float32)).max()), 0.0)

  def test_init_stddev(self):
    def fn(x):
      return hk.Linear(64)(x)
    x = np.ones((1, 64), np.float32)
    model = xrapture.transform(fn, _config(rank=32, init_stddev=0.5))
    params = model.adapt(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x))
    a = np.asarray(params["linear"]["w"].a)
    self.assertAlmostEqual(float(a.std()), 0.5, delta=0.03)
    self.assertAlmostEqual(float(a.mean()), 0.0, delta=0.03)

  def test_full_and_tune_vectors(self):
    config = _config(full=("second/w",), tune_vectors=True)
    _, model, base = self._two_linears(config)
    lora_spec = model.lora_spec(base)
    self.assertEqual(lora_spec["second"]["w"], xrapture.LORA_FULL)
    self.assertEqual(lora_spec["first"]["w"], _RANK)
    self.assertEqual(lora_spec["first"]["b"], xrapture.LORA_FULL)
    params = model.adapt(jax.random.PRNGKey(1), base)
    self.assertIs(params["second"]["w"], base["second"]["w"])
    expected = (_RANK * (8 + 5)) + 6 * 8 + 8 + 5
    self.assertEqual(xrapture.count_trainable(params, lora_spec), expected)

  def test_one_dimensional_target_is_skipped(self):
    _, model, base = self._two_linears(_config(targets=(".*/b", "first/w")))
    lora_spec = model.lora_spec(base)
    self.assertEqual(lora_spec["first"]["b"], xrapture.LORA_FREEZE)
    self.assertEqual(lora_spec["second"]["b"], xrapture.LORA_FREEZE)
    params = model.adapt(jax.random.PRNGKey(1), base)
    self.assertIs(params["first"]["b"], base["first"]["b"])
    self.assertIsInstance(params["first"]["w"], xrapture.LoraWeight)

  def test_only_one_dimensional_targets_is_an_error(self):
    _, model, base = self._two_linears(_config(targets=(".*/b",)))
    with self.assertRaisesRegex(ValueError, r"(?s)match no parameter.*first/w.*second/b"):
      model.adapt(jax.random.PRNGKey(1), base)

  def test_targets_matching_nothing_list_available_paths(self):
    _, model, base = self._two_linears(_config(targets=("mlp/.*",)))
    with self.assertRaises(ValueError) as ctx:
      model.lora_spec(base)
    for path in ("first/w", "first/b", "second/w", "second/b"):
      self.assertIn(path, str(ctx.exception))

  def test_rank_larger_than_kernel(self):
    _, model, base = self._two_linears(_config(rank_pattern=(("second/w", 7),)))
    with self.assertRaisesRegex(ValueError, r"rank 7.*second/w.*6"):
      model.adapt(jax.random.PRNGKey(1), base)

  def test_integer_param_targeted(self):
    def fn(x):
      table = hk.get_parameter("table", [4, 6], jnp.int32, init=jnp.zeros)
      return hk.Linear(3)(x) + table.sum()
    model = xrapture.transform(fn, _config(targets=(".*",)))
    base = model.init(jax.random.PRNGKey(0), _VEC)
    with self.assertRaisesRegex(ValueError, r"'~/table'.*int32"):
      model.adapt(jax.random.PRNGKey(1), base, _VEC)
    # Not targeted, it is left alone.
    model = xrapture.transform(fn, _config())
    params = model.adapt(jax.random.PRNGKey(1), base, _VEC)
    self.assertIs(params["~"]["table"], base["~"]["table"])

  def test_three_dimensional_kernel_needs_example_inputs(self):
    model = xrapture.transform(_conv1d, _config())
    base = model.init(jax.random.PRNGKey(0), _SEQ)  # remembers nothing
    with self.assertRaisesRegex(ValueError, r"(?s)'conv1_d/w' \(3, 4, 5\): targeted.*"
                                r"Pass the example inputs: model\.adapt\(rng, params, \*inputs\)"):
      model.adapt(jax.random.PRNGKey(1), base)
    with self.assertRaisesRegex(ValueError, r"(?s)'conv1_d/w' \(3, 4, 5\): targeted.*"
                                r"Pass the example inputs: model\.lora_spec\(params, \*inputs\)"):
      model.lora_spec(base)
    for example in (_SEQ, jax.ShapeDtypeStruct(_SEQ.shape, _SEQ.dtype)):
      params = model.adapt(jax.random.PRNGKey(1), base, example)
      self.assertEqual(params["conv1_d"]["w"].a.shape, (_RANK, 5))
    # Two-dimensional kernels need no inputs.
    model = xrapture.transform(_linear, _config())
    params = model.adapt(jax.random.PRNGKey(1),
                         hk.transform(_linear).init(jax.random.PRNGKey(0), _X3))
    self.assertIsInstance(params["linear"]["w"], xrapture.LoraWeight)

  def test_layer_stack_vectors_are_vectors(self):
    """Inside hk.layer_stack a bias or LayerNorm scale is [L, D]: a vector.

    The config reads the scan depth from apply's jaxpr, so tune_vectors trains
    these per-layer vectors in full and a target matching them skips them.
    """
    def fn(x):
      return hk.layer_stack(3)(lambda h: hk.LayerNorm(-1, True, True)(hk.Linear(6)(h)))(x)
    stack = "__layer_stack_no_per_layer"
    model = xrapture.transform(fn, _config(tune_vectors=True))
    base = model.init(jax.random.PRNGKey(0), _VEC)
    lora_spec = model.lora_spec(base, _VEC)
    self.assertEqual(lora_spec[f"{stack}/linear"]["w"], _RANK)
    self.assertEqual(lora_spec[f"{stack}/linear"]["b"], xrapture.LORA_FULL)
    self.assertEqual(lora_spec[f"{stack}/layer_norm"]["scale"], xrapture.LORA_FULL)
    model = xrapture.transform(fn, _config(targets=(".*",)))
    params = model.adapt(jax.random.PRNGKey(1), base, _VEC)
    self.assertIs(params[f"{stack}/layer_norm"]["scale"], base[f"{stack}/layer_norm"]["scale"])

  def test_adapt_is_deterministic_in_rng(self):
    model = xrapture.transform(_linear, _config())
    base = model.init(jax.random.PRNGKey(0), _X3)
    one = model.adapt(jax.random.PRNGKey(1), base)["linear"]["w"].a
    two = model.adapt(jax.random.PRNGKey(1), base)["linear"]["w"].a
    three = model.adapt(jax.random.PRNGKey(2), base)["linear"]["w"].a
    np.testing.assert_array_equal(one, two)
    self.assertFalse(np.array_equal(one, three))

  def test_init_is_haiku_init(self):
    model = xrapture.transform(_mha, _config())
    ours = model.init(jax.random.PRNGKey(3), _X3)
    theirs = hk.transform(_mha).init(jax.random.PRNGKey(3), _X3)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    self.assertEqual(model.config.rank, _RANK)


# A small transformer: Embed + layer_stack(MHA + MLP + LayerNorm) + tied or untied head.
_VOCAB, _D, _LAYERS, _T = 13, 16, 2, 6


def _lm(ids):
  """Logits of a tied head (``h @ Eᵀ``) and of an untied one (``hk.Linear``)."""
  embed = hk.Embed(_VOCAB, _D)
  h = embed(ids)

  def block(h):
    n1 = hk.LayerNorm(-1, True, True)(h)
    h = h + hk.MultiHeadAttention(2, _D // 2, w_init=_INIT)(n1, n1, n1)
    n2 = hk.LayerNorm(-1, True, True)(h)
    return h + hk.nets.MLP([2 * _D, _D], activation=jax.nn.gelu)(n2)
  h = hk.layer_stack(_LAYERS)(block)(h)
  h = hk.LayerNorm(-1, True, True)(h)
  return h @ embed.embeddings.T, hk.Linear(_VOCAB, name="head")(h)


def _lm_loss(logits, ids):
  total = 0.0
  for l in logits:
    logp = jax.nn.log_softmax(l)
    total -= jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()
  return total


class TransformerTest(parameterized.TestCase):

  def test_strict_mode_forward_and_grad(self):
    model = xrapture.transform(_lm, _config(targets=(".*/w", ".*/embeddings")))
    ids = np.random.default_rng(0).integers(0, _VOCAB, (2, _T)).astype(np.int32)
    base = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
    params = _perturb(model.adapt(jax.random.PRNGKey(1), base, ids), stddev=0.05)
    stack = "__layer_stack_no_per_layer"
    self.assertEqual(params[f"{stack}/mlp/~/linear_0"]["w"].a.shape,
                     (_LAYERS, _RANK, 2 * _D))
    self.assertIsInstance(params["embed"]["embeddings"], xrapture.LoraWeight)

    # Trainable count from the shapes: per layer q, k, v, o (d×d), up (d×2d),
    # down (2d×d); then the embeddings (V×d) and the untied head (d×V).
    d, r = _D, _RANK
    per_layer = 4 * r * (d + d) + r * (d + 2 * d) + r * (2 * d + d)
    self.assertEqual(xrapture.count_trainable(params, model.lora_spec(base, ids)),
                     _LAYERS * per_layer + 2 * r * (_VOCAB + d))

    def loss(p):
      return _lm_loss(model.apply(p, None, ids), ids)

    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      value, grads = jax.jit(jax.value_and_grad(loss))(params)

    # Reference: the dense model, differentiated through w + s·b@a for a few
    # kernels (a stacked MLP kernel, the tied embeddings, the untied head).
    keys = ((f"{stack}/mlp/~/linear_0", "w"), ("embed", "embeddings"), ("head", "w"))
    dense = _dense_reference(params, _ALPHA / _RANK)

    def loss_through_factors(factors):
      p = {k: dict(v) for k, v in dense.items()}
      for (module, name), (a, b) in factors.items():
        p[module][name] = params[module][name].w + (_ALPHA / _RANK) * jnp.matmul(b, a)
      return _lm_loss(hk.transform(_lm).apply(p, None, ids), ids)
    factors = {key: (params[key[0]][key[1]].a, params[key[0]][key[1]].b) for key in keys}
    expected_value, expected = jax.jit(jax.value_and_grad(loss_through_factors))(factors)
    np.testing.assert_allclose(value, expected_value, rtol=1e-4)
    for module, name in keys:
      got = grads[module][name]
      self.assertGreater(float(jnp.abs(got.b).max()), 0.0)
      np.testing.assert_allclose(got.a, expected[(module, name)][0], rtol=2e-3, atol=1e-6)
      np.testing.assert_allclose(got.b, expected[(module, name)][1], rtol=2e-3, atol=1e-6)


def _einsum_attention(x):
  """Attention with multi-axis kernels, as published Haiku models write it."""
  init = hk.initializers.VarianceScaling(1.0)
  d, heads, dim = x.shape[-1], 2, 3
  wq = hk.get_parameter("query_w", [d, heads, dim], init=init)
  wk = hk.get_parameter("key_w", [d, heads, dim], init=init)
  wo = hk.get_parameter("output_w", [heads, dim, 5], init=init)
  logit = hk.get_parameter("logit_w", [d, 1], init=init)  # a scalar head
  q, k = jnp.einsum("btd,dhk->bthk", x, wq), jnp.einsum("btd,dhk->bthk", x, wk)
  attn = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
  out = jnp.einsum("bhts,bshk->bthk", attn, k)
  return jnp.einsum("bthk,hkd->btd", out, wo) + x @ logit


class LayoutFromUseTest(parameterized.TestCase):

  def test_multi_axis_kernels_get_their_grouped_matrix(self):
    model = xrapture.transform(_einsum_attention, _config(targets=("all-linear",)))
    base = model.init(jax.random.PRNGKey(0), _X3)
    params = model.adapt(jax.random.PRNGKey(1), base, _X3)
    lw = params["~"]
    self.assertEqual((lw["query_w"].layout, lw["key_w"].layout, lw["output_w"].layout),
                     ("ioo", "ioo", "iio"))
    # The [d, 1] logit is a scalar head: all-linear skips it rather than refuse.
    self.assertNotIsInstance(lw["logit_w"], xrapture.LoraWeight)
    # r·(in + out) numbers per kernel, and rank <= r as the grouped matrix.
    expected = _RANK * ((6 + 6) + (6 + 6) + (6 + 5))
    self.assertEqual(xrapture.count_trainable(params, model.lora_spec(base, _X3)), expected)
    perturbed = _perturb(params)
    merged = xrapture.merge_params(perturbed)
    for name, rows in (("query_w", 6), ("key_w", 6), ("output_w", 6)):
      delta = np.asarray(merged["~"][name], np.float64) - np.asarray(base["~"][name])
      self.assertEqual(np.linalg.matrix_rank(delta.reshape(rows, -1), tol=1e-5), _RANK)
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      y = jax.jit(model.apply)(perturbed, None, _X3)
    _assert_close(y, jax.jit(hk.transform(_einsum_attention).apply)(merged, None, _X3),
                  1e-4)

  def test_conv_rank_limit_counts_the_window(self):
    # ResNet's stem (7, 7, 3, c): rank 8 > 3 input channels is fine on [147, c].
    model = xrapture.transform(lambda x: hk.Conv2D(16, 7, stride=2)(x), _config(rank=8))
    base = model.init(jax.random.PRNGKey(0), _IMG)
    params = model.adapt(jax.random.PRNGKey(1), base, _IMG)
    self.assertEqual(params["conv2_d"]["w"].grouped_shape, (147, 16))
    with self.assertRaisesRegex(ValueError, r"rank 20 .*min\(M, N\) = 16.*\[147, 16\]"):
      xrapture.transform(lambda x: hk.Conv2D(16, 7)(x), _config(rank=20)).adapt(
          jax.random.PRNGKey(1), base, _IMG)

  def test_incompatible_uses_are_an_error_at_adapt(self):
    def fn(x):
      w = hk.get_parameter("w", [6, 2, 3], init=jnp.ones)
      return (jnp.einsum("bti,ijk->btjk", x, w).sum()
              + jnp.einsum("btj,ijk->btik", x[..., :2], w).sum())
    model = xrapture.transform(fn, _config(targets=(".*/w",)))
    base = model.init(jax.random.PRNGKey(0), _X3)
    with self.assertRaisesRegex(
        ValueError, r"(?s)'~/w' \(6, 2, 3\).*in axes \(0,\).*in axes \(1,\).*Exclude"):
      model.adapt(jax.random.PRNGKey(1), base, _X3)

  def test_grouped_conv_is_an_error_at_adapt(self):
    model = xrapture.transform(lambda x: hk.DepthwiseConv1D(1, 3)(x), _config(rank=1))
    base = model.init(jax.random.PRNGKey(0), _SEQ)
    with self.assertRaisesRegex(
        ValueError, r"(?s)grouped or depthwise conv.*'depthwise_conv1_d/w'.*Exclude"):
      model.adapt(jax.random.PRNGKey(1), base, _SEQ)
    # all-linear skips it (and finds nothing else here).
    model = xrapture.transform(lambda x: hk.Linear(3)(hk.DepthwiseConv1D(1, 3)(x)),
                               _config(rank=1, targets=("all-linear",)))
    base = model.init(jax.random.PRNGKey(0), _SEQ)
    lora_spec = model.lora_spec(base, _SEQ)
    self.assertEqual(lora_spec["depthwise_conv1_d"]["w"], xrapture.LORA_FREEZE)
    self.assertEqual(lora_spec["linear"]["w"], 1)

  def test_elementwise_use_warns_at_adapt(self):
    def fn(x):
      e = hk.get_parameter("codebook", [6, 4], init=jnp.ones)
      return x @ e - jnp.sum(e ** 2, axis=0)  # distances to each code
    model = xrapture.transform(fn, _config(targets=(".*/codebook",)))
    base = model.init(jax.random.PRNGKey(0), _X3)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      model.adapt(jax.random.PRNGKey(1), base, _X3)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, xrapture.MaterializationWarning)]
    self.assertLen(messages, 1)
    self.assertIn("'~/codebook'", messages[0])
    self.assertIn("integer_pow", messages[0])
    with xrapture.strict_mode():
      with self.assertRaisesRegex(xrapture.MaterializationError, "~/codebook"):
        model.adapt(jax.random.PRNGKey(1), base, _X3)
    # all-linear leaves it alone.
    model = xrapture.transform(lambda x: hk.Linear(3)(fn(x)),
                               _config(targets=("all-linear",)))
    base = model.init(jax.random.PRNGKey(0), _X3)
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      params = model.adapt(jax.random.PRNGKey(1), base, _X3)
    self.assertNotIsInstance(params["~"]["codebook"], xrapture.LoraWeight)
    self.assertIsInstance(params["linear"]["w"], xrapture.LoraWeight)

  def test_all_linear_needs_example_inputs(self):
    model = xrapture.transform(_linear, _config(targets=("all-linear",)))
    base = hk.transform(_linear).init(jax.random.PRNGKey(0), _X3)
    with self.assertRaisesRegex(ValueError, "all-linear.*example inputs"):
      model.adapt(jax.random.PRNGKey(1), base)
    self.assertIsInstance(model.adapt(jax.random.PRNGKey(1), base, _X3)["linear"]["w"],
                          xrapture.LoraWeight)

  def test_eval_mode_batch_norm_takes_the_state(self):
    def fn(x):
      h = hk.Conv1D(6, 3)(x)
      return hk.BatchNorm(True, True, 0.9)(h, is_training=False)
    base, state = hk.transform_with_state(
        lambda x: hk.BatchNorm(True, True, 0.9)(hk.Conv1D(6, 3)(x), is_training=True)
    ).init(jax.random.PRNGKey(0), _SEQ)
    model = xrapture.transform_with_state(fn, _config())
    with self.assertRaisesRegex(ValueError, r"(?s)init failed.*average.*state=state"):
      model.adapt(jax.random.PRNGKey(1), base, _SEQ)
    params = model.adapt(jax.random.PRNGKey(1), base, _SEQ, state=state)
    self.assertEqual(params["conv1_d"]["w"].layout, "iio")
    perturbed = _perturb(params)
    with xrapture.strict_mode():
      y, _ = model.apply(perturbed, state, None, _SEQ)
    y_ref, _ = jax.jit(hk.transform_with_state(fn).apply)(
        _dense_reference(perturbed, _ALPHA / _RANK), state, None, _SEQ)
    _assert_close(y, y_ref, 1e-4)
    self.assertEqual(model.lora_spec(base, _SEQ, state=state)["conv1_d"]["w"], _RANK)


def _stack_conv_norm(x):
  """A layer stack: a [L, k, in, out] conv kernel and [L, D] bias and norms."""
  return hk.layer_stack(2)(
      lambda h: hk.LayerNorm(-1, True, True)(jnp.tanh(hk.Conv1D(4, 3)(h))))(x)


def _linear_after_embed(ids):
  return hk.Linear(3)(hk.Embed(10, 4)(ids))


def _trees_equal(x, y):
  """The same tree (LoraWeight layouts included) with bit-equal leaves."""
  flat_x, tree_x = jax.tree_util.tree_flatten(x)
  flat_y, tree_y = jax.tree_util.tree_flatten(y)
  return tree_x == tree_y and all(np.array_equal(u, v) for u, v in zip(flat_x, flat_y))


class NoHiddenStateTest(parameterized.TestCase):
  """``lora_spec`` and ``adapt`` answer from their arguments, whatever ran before."""

  _STACK = "__layer_stack_no_per_layer"

  def test_same_answer_whether_or_not_init_ran(self):
    config = _config(tune_vectors=True)
    used = xrapture.transform(_stack_conv_norm, config)
    base = used.init(jax.random.PRNGKey(0), _SEQ)
    fresh = xrapture.transform(_stack_conv_norm, config)  # init never ran on it
    # An init with other shapes afterwards changes nothing either.
    used.init(jax.random.PRNGKey(0), _SEQ[:1, :5])
    conv, norm = f"{self._STACK}/conv1_d", f"{self._STACK}/layer_norm"
    for inputs in ((_SEQ,), (jax.ShapeDtypeStruct(_SEQ.shape, _SEQ.dtype),)):
      want = fresh.lora_spec(base, *inputs)
      # Independent of xrapture's answer: the stacked kernel gets the rank,
      # the [L, D] bias and norms are vectors that tune_vectors trains.
      self.assertEqual(want, {conv: {"w": _RANK, "b": xrapture.LORA_FULL},
                              norm: {"scale": xrapture.LORA_FULL,
                                     "offset": xrapture.LORA_FULL}})
      self.assertEqual(used.lora_spec(base, *inputs), want)
      adapted = fresh.adapt(jax.random.PRNGKey(1), base, *inputs)
      self.assertEqual(adapted[conv]["w"].layout, "siio")
      self.assertTrue(_trees_equal(used.adapt(jax.random.PRNGKey(1), base, *inputs),
                                   adapted))
    # Without inputs both refuse, with the same message.
    errors = []
    for model in (used, fresh):
      with self.assertRaises(ValueError) as ctx:
        model.lora_spec(base)
      errors.append(str(ctx.exception))
    self.assertEqual(errors[0], errors[1])

  def test_without_inputs_the_error_names_each_parameter_and_the_fix(self):
    model = xrapture.transform(_stack_conv_norm, _config(tune_vectors=True))
    base = model.init(jax.random.PRNGKey(0), _SEQ)
    conv, norm = f"{self._STACK}/conv1_d", f"{self._STACK}/layer_norm"
    with self.assertRaises(ValueError) as ctx:
      model.lora_spec(base)
    message = str(ctx.exception)
    self.assertIn(f"'{conv}/w' (2, 3, 4, 4): targeted", message)
    for path in (f"{conv}/b", f"{norm}/scale", f"{norm}/offset"):
      self.assertIn(f"'{path}' (2, 4): tune_vectors", message)
    self.assertTrue(message.endswith(
        "Pass the example inputs: model.lora_spec(params, *inputs)."), message)
    # adapt's result does not depend on tune_vectors: only the kernel is named.
    with self.assertRaises(ValueError) as ctx:
      model.adapt(jax.random.PRNGKey(1), base)
    message = str(ctx.exception)
    self.assertIn(f"'{conv}/w' (2, 3, 4, 4): targeted", message)
    self.assertNotIn(norm, message)
    self.assertTrue(message.endswith(
        "Pass the example inputs: model.adapt(rng, params, *inputs)."), message)
    # ... but what quantize_frozen quantizes does: a [L, D] norm is not.
    model = xrapture.transform(_stack_conv_norm, _config(
        targets=(), quantize="nf4", quantize_frozen=(r".*/scale",)))
    with self.assertRaisesRegex(ValueError, rf"'{norm}/scale' \(2, 4\): quantize_frozen"):
      model.adapt(jax.random.PRNGKey(1), base)
    with self.assertRaisesRegex(ValueError, r'all-linear.*model\.lora_spec\(params, \*inputs\)'):
      xrapture.transform(_linear, _config(targets=("all-linear",))).lora_spec(
          hk.transform(_linear).init(jax.random.PRNGKey(0), _X3))

  def test_two_dimensional_kernels_need_no_inputs(self):
    model = xrapture.transform(_linear, _config(tune_vectors=True))
    base = model.init(jax.random.PRNGKey(0), _X3)
    self.assertEqual(model.lora_spec(base), model.lora_spec(base, _X3))
    self.assertEqual(model.lora_spec(base)["linear"],
                     {"w": _RANK, "b": xrapture.LORA_FULL})
    self.assertTrue(_trees_equal(model.adapt(jax.random.PRNGKey(1), base),
                                 model.adapt(jax.random.PRNGKey(1), base, _X3)))
    # An untargeted 2-D parameter could be a layer stack's vectors: with
    # tune_vectors that takes the inputs; without, it is frozen either way.
    model = xrapture.transform(_linear_after_embed, _config(tune_vectors=True))
    base = model.init(jax.random.PRNGKey(0), _IDS)
    with self.assertRaisesRegex(ValueError, r"'embed/embeddings' \(10, 4\): tune_vectors"):
      model.lora_spec(base)
    self.assertEqual(model.lora_spec(base, _IDS)["embed"]["embeddings"],
                     xrapture.LORA_FREEZE)
    model = xrapture.transform(_linear_after_embed, _config())
    self.assertEqual(model.lora_spec(base), model.lora_spec(base, _IDS))


if __name__ == "__main__":
  absltest.main()
