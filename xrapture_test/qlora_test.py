"""Tests for QLoRA: LoraWeights on a quantized base (xrapture.quantize, spec.quantize).

xrapture/_src/transform/quantization.py, the spec's quantization fields, and
the LoRA handlers on a nested (quantized) ``w``. References are independent:
the base as ``xrapture.quantize_array`` stores it (bit-equal to bitsandbytes,
see quant_test.py), and the adapted model computed densely in numpy / plain
JAX from the dequantized kernel plus ``scale · b @ a``.
"""

import os
import tempfile

import haiku as hk
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import xrapture

V, D, H, L = 40, 64, 96, 2   # vocab, model width, hidden width, stacked layers
RANK, ALPHA = 4, 8.0
SCHEMES = (("nf4", False), ("nf4", True), ("int8", False))


def lm(tokens):
  """Embedding lookup, a Linear, a layer stack, a Linear, tied unembedding."""
  embed = hk.Embed(V, D, name="embed")
  h = embed(tokens)
  h = jax.nn.gelu(hk.Linear(H, name="up")(h))
  h = hk.layer_stack(L)(lambda h: jnp.tanh(hk.Linear(H, name="mid")(h)))(h)
  h = hk.Linear(D, name="down")(h)
  return h @ embed.embeddings.T


def _spec(scheme="nf4", double_quant=False, **overrides):
  spec = xrapture.default_spec()
  spec.rank, spec.alpha = RANK, ALPHA
  spec.targets = (r".*/w", r"embed/embeddings")
  spec.quantize, spec.double_quant, spec.quantize_block = scheme, double_quant, 32
  for key, value in overrides.items():
    setattr(spec, key, value)
  return spec


def _tokens(seed=0, shape=(3, 7)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def _base(f=lm, tokens=None):
  tokens = _tokens() if tokens is None else tokens
  return hk.transform(f).init(jax.random.PRNGKey(0), tokens)


def _adapt(spec, base=None, seed=1):
  """``model.adapt`` of :func:`lm` under ``spec`` (example tokens given: a layer stack)."""
  base = _base() if base is None else base
  return xrapture.transform(lm, spec).adapt(jax.random.PRNGKey(seed), base, _tokens())


def _flat(params):
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=xrapture.is_implicit)
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
  return names, [v for _, v in flat], treedef


def _perturb(params, seed=0, stddev=0.1):
  """Non-zero random adapters, so that the low-rank path counts."""
  names, leaves, treedef = _flat(params)
  out = []
  for i, leaf in enumerate(leaves):
    if isinstance(leaf, xrapture.LoraWeight):
      rng = np.random.default_rng(seed * 100 + i)
      leaf = leaf.replace(a=jnp.asarray(rng.normal(0, stddev, leaf.a.shape), leaf.a.dtype),
                          b=jnp.asarray(rng.normal(0, stddev, leaf.b.shape), leaf.b.dtype))
    out.append(leaf)
  del names
  return jax.tree_util.tree_unflatten(treedef, out)


def _dense_kernel(w):
  """A base kernel as numpy float32: dequantized when it is quantized."""
  return np.asarray(xrapture.dequantize(w) if isinstance(w, xrapture.QuantizedArray) else w,
                    np.float32)


def _numpy_merged(params):
  """Every LoraWeight as ``w + (alpha / r) · b @ a`` in float64 numpy (layout 'io', stacked)."""
  def one(x):
    if isinstance(x, xrapture.QuantizedArray):
      return jnp.asarray(_dense_kernel(x))
    if not isinstance(x, xrapture.LoraWeight):
      return x
    w = _dense_kernel(x.w).astype(np.float64)
    delta = (ALPHA / RANK) * np.matmul(np.asarray(x.b, np.float64), np.asarray(x.a, np.float64))
    return jnp.asarray((w + delta).astype(np.float32))
  return jax.tree_util.tree_map(one, params, is_leaf=xrapture.is_implicit)


class QuantizeTest(parameterized.TestCase):

  @parameterized.parameters(*SCHEMES)
  def test_adapt_stores_every_lora_base_quantized(self, scheme, double_quant):
    base = _base()
    spec = _spec(scheme, double_quant)
    params = _adapt(spec, base)
    plain = _adapt(_spec(None), base)
    names, leaves, _ = _flat(params)
    _, plain_leaves, _ = _flat(plain)
    loras = 0
    for name, leaf, plain_leaf in zip(names, leaves, plain_leaves):
      if not isinstance(leaf, xrapture.LoraWeight):
        self.assertIs(leaf, plain_leaf, name)   # biases: the same objects
        continue
      loras += 1
      q = leaf.w
      self.assertIsInstance(q, xrapture.QuantizedArray, name)
      self.assertEqual((q.scheme, q.double_quant), (scheme, double_quant), name)
      self.assertEqual((q.shape, q.dtype), (plain_leaf.w.shape, plain_leaf.w.dtype), name)
      axis = -1 if name.endswith("embeddings") else -2   # blocks along the input axis
      self.assertEqual(q.axis, axis, name)
      expected = xrapture.quantize_array(plain_leaf.w, scheme, block_size=32,
                                         double_quant=double_quant, axis=axis)
      for got, want in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(got, want, err_msg=name)
      # The adapters are those of the unquantized model.
      np.testing.assert_array_equal(leaf.a, plain_leaf.a)
      np.testing.assert_array_equal(leaf.b, plain_leaf.b)
      self.assertEqual((leaf.alpha, leaf.layout), (plain_leaf.alpha, plain_leaf.layout))
    self.assertEqual(loras, 4)

  def test_stacked_kernel_is_quantized_layer_by_layer(self):
    params = _adapt(_spec(), _base())
    lora = params["__layer_stack_no_per_layer/mid"]["w"]
    self.assertEqual(lora.w.shape, (L, H, H))
    self.assertEqual(lora.w.codes.shape, (L, H, H // 2))
    for i in range(L):
      alone = xrapture.quantize_array(_base()["__layer_stack_no_per_layer/mid"]["w"][i],
                                      "nf4", block_size=32)
      np.testing.assert_array_equal(lora.w.codes[i], alone.codes)

  def test_quantize_after_load_adapter_equals_adapt(self):
    base, spec = _base(), _spec("nf4", True)
    model = xrapture.transform(lm, _spec(None))
    trained = _perturb(model.adapt(jax.random.PRNGKey(1), base, _tokens()))
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    path = os.path.join(tmp.name, "adapter.safetensors")
    xrapture.save_adapter(path, trained, model.spec(base, _tokens()))
    loaded = xrapture.quantize(xrapture.load_adapter(path, base), spec)
    direct = xrapture.quantize(trained, spec)
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(direct)):
      np.testing.assert_array_equal(got, want)
    self.assertIsInstance(loaded["up"]["w"].w, xrapture.QuantizedArray)

  def test_materialize_gives_the_dequantized_base_plus_update(self):
    params = _perturb(_adapt(_spec(), _base()))
    lora = params["up"]["w"]
    np.testing.assert_allclose(lora.materialize(), _numpy_merged(params)["up"]["w"],
                               rtol=1e-6, atol=1e-6)

  def test_quantize_frozen_kernels_too(self):
    spec = _spec("nf4", targets=(r"up/w",), quantize_frozen=(r".*/w", r".*/b"))
    base = _base()
    params = _adapt(spec, base)
    self.assertIsInstance(params["up"]["w"].w, xrapture.QuantizedArray)
    for name in ("__layer_stack_no_per_layer/mid", "down"):
      q = params[name]["w"]
      self.assertIsInstance(q, xrapture.QuantizedArray, name)
      expected = xrapture.quantize_array(base[name]["w"], "nf4", block_size=32)
      np.testing.assert_array_equal(q.codes, expected.codes)
    self.assertIs(params["embed"]["embeddings"], base["embed"]["embeddings"])  # not matched
    self.assertIs(params["up"]["b"], base["up"]["b"])                          # 1-D
    stacked_bias = "__layer_stack_no_per_layer/mid"                            # [L, H]: vectors
    self.assertIs(params[stacked_bias]["b"], base[stacked_bias]["b"])

  def test_without_quantize_nothing_changes(self):
    params = _adapt(_spec(None), _base())
    self.assertFalse([x for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, xrapture.QuantizedArray))
                      if isinstance(x, xrapture.QuantizedArray)])


class BadInputTest(parameterized.TestCase):

  def test_block_size_not_dividing_the_input_axis(self):
    spec = _spec("nf4", quantize_block=64)   # H = 96 is not a multiple of 64
    with self.assertRaisesRegex(
        ValueError, r"Cannot quantize the base kernel of LoraWeight "
        r"'__layer_stack_no_per_layer/mid/w' of shape \(2, 96, 96\) with spec.quantize = "
        r"'nf4', spec.quantize_block = 64: .*size 96.*use one of \[32\]"):
      _adapt(spec, _base())

  @parameterized.parameters("nf8", "NF4", "int4")
  def test_unknown_scheme(self, scheme):
    spec = _spec(scheme)
    with self.assertRaisesRegex(
        ValueError, rf"spec.quantize = '{scheme}' must be None \(full-precision base\) or "
        r"one of \('nf4', 'int8'\)"):
      _adapt(spec, _base())
    with self.assertRaisesRegex(ValueError, rf"spec.quantize = '{scheme}'"):
      xrapture.quantize({}, spec)

  def test_quantize_without_scheme(self):
    with self.assertRaisesRegex(ValueError, r"spec.quantize = None.*one of \('nf4', 'int8'\)"):
      xrapture.quantize({}, _spec(None))

  def test_already_quantized_kernel(self):
    spec = _spec()
    params = _adapt(spec, _base())
    with self.assertRaisesRegex(
        ValueError, r"Cannot quantize the base kernel of LoraWeight '\S+/w': it is "
        r"already a QuantizedArray"):
      xrapture.quantize(params, spec)

  def test_integer_kernels(self):
    w = jnp.arange(64 * 8, dtype=jnp.int32).reshape(64, 8)
    with self.assertRaisesRegex(ValueError, r"Cannot quantize frozen parameter 'table/w' of "
                                r"dtype int32 \(shape \(64, 8\)\).*floating-point kernels only"):
      xrapture.quantize({"table": {"w": w}}, _spec(quantize_frozen=(r".*/w",)))
    lora = xrapture.LoraWeight(w, jnp.zeros((2, 8)), jnp.zeros((64, 2)))
    with self.assertRaisesRegex(ValueError, r"LoraWeight 'lin/w' of dtype int32"):
      xrapture.quantize({"lin": {"w": lora}}, _spec())

  def test_quantized_adapter_factors(self):
    w = jnp.ones((64, 64))
    q = xrapture.quantize_array(np.ones((2, 64), np.float32), "int8")
    lora = xrapture.LoraWeight(w, q, jnp.zeros((64, 2)))
    with self.assertRaisesRegex(ValueError, r"LoraWeight 'lin/w' has a quantized adapter "
                                r"factor 'a': adapters are trained"):
      xrapture.quantize({"lin": {"w": lora}}, _spec())

  def test_quantize_frozen_matching_a_trained_parameter(self):
    spec = _spec(targets=(r"up/w",), full=(r"down/w",), quantize_frozen=(r".*/w",))
    # Without quantize_frozen, down/w (trained in full) is left alone ...
    _adapt(_spec(targets=(r"up/w",), full=(r"down/w",)), _base())
    with self.assertRaisesRegex(ValueError, r"spec.quantize_frozen matches 'down/w', which "
                                r"spec.full trains: only frozen parameters"):
      _adapt(spec, _base())


if __name__ == "__main__":
  absltest.main()
