"""Tests for QLoRA: LoraWeights on a quantized base (xrapture.quantize, config.quantize).

xrapture/_src/transform/quantization.py, the config's quantization fields, and
the LoRA handlers on a nested (quantized) ``w``. References are independent:
the base as ``xrapture.quantize_array`` stores it (bit-equal to bitsandbytes,
see quant_test.py), and the adapted model computed densely in numpy / plain
JAX from the dequantized kernel plus ``scale · b @ a``.
"""

import functools
import os

import haiku as hk
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import xrapture
from xrapture._src.testing import dense_check

import test_utils

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


def _config(scheme="nf4", double_quant=False, **overrides):
  config = xrapture.default_config()
  config.rank, config.alpha = RANK, ALPHA
  config.targets = (r".*/w", r"embed/embeddings")
  config.quantize, config.double_quant, config.quantize_block = scheme, double_quant, 32
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _tokens(seed=0, shape=(3, 7)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


@functools.cache
def _jitted_init(f):
  return jax.jit(hk.transform(f).init)


def _base(f=lm, tokens=None):
  tokens = _tokens() if tokens is None else tokens
  return _jitted_init(f)(jax.random.PRNGKey(0), tokens)


# The dense references run jitted: one compilation each instead of one per
# primitive (op-by-op dispatch compiles every op on its own).
_dequantize = jax.jit(xrapture.dequantize)
_dense_apply = jax.jit(hk.transform(lm).apply)


def _adapt(config, base=None, seed=1):
  """``model.adapt`` of :func:`lm` under ``config`` (example tokens given: a layer stack)."""
  base = _base() if base is None else base
  return xrapture.transform(lm, config).adapt(jax.random.PRNGKey(seed), base, _tokens())


def _perturb(params, seed=0, stddev=0.1):
  """Non-zero random adapters, so that the low-rank path counts."""
  names, leaves, treedef = test_utils.flat_with_names(params)
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
  return np.asarray(_dequantize(w) if isinstance(w, xrapture.QuantizedArray) else w,
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
    config = _config(scheme, double_quant)
    params = _adapt(config, base)
    plain = _adapt(_config(None), base)
    names, leaves, _ = test_utils.flat_with_names(params)
    _, plain_leaves, _ = test_utils.flat_with_names(plain)
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
    params = _adapt(_config(), _base())
    lora = params["__layer_stack_no_per_layer/mid"]["w"]
    self.assertEqual(lora.w.shape, (L, H, H))
    self.assertEqual(lora.w.codes.shape, (L, H, H // 2))
    for i in range(L):
      alone = xrapture.quantize_array(_base()["__layer_stack_no_per_layer/mid"]["w"][i],
                                      "nf4", block_size=32)
      np.testing.assert_array_equal(lora.w.codes[i], alone.codes)

  def test_quantize_after_load_adapter_equals_adapt(self):
    base, config = _base(), _config("nf4", True)
    model = xrapture.transform(lm, _config(None))
    trained = _perturb(model.adapt(jax.random.PRNGKey(1), base, _tokens()))
    path = os.path.join(test_utils.tmpdir(self), "adapter.safetensors")
    xrapture.save_adapter(path, trained, model.lora_spec(base, _tokens()))
    loaded = xrapture.quantize(xrapture.load_adapter(path, base), config)
    direct = xrapture.quantize(trained, config)
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(direct)):
      np.testing.assert_array_equal(got, want)
    self.assertIsInstance(loaded["up"]["w"].w, xrapture.QuantizedArray)

  def test_materialize_gives_the_dequantized_base_plus_update(self):
    params = _perturb(_adapt(_config(), _base()))
    lora = params["up"]["w"]
    np.testing.assert_allclose(lora.materialize(), _numpy_merged(params)["up"]["w"],
                               rtol=1e-6, atol=1e-6)

  def test_quantize_frozen_kernels_too(self):
    config = _config("nf4", targets=(r"up/w",), quantize_frozen=(r".*/w", r".*/b"))
    base = _base()
    params = _adapt(config, base)
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
    params = _adapt(_config(None), _base())
    self.assertFalse([x for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, xrapture.QuantizedArray))
                      if isinstance(x, xrapture.QuantizedArray)])


def _kernel_shapes(params):
  """Every base kernel's shape and its last two axes swapped: what a dense copy would have."""
  shapes = set()
  for x in jax.tree_util.tree_leaves(params, is_leaf=xrapture.is_implicit):
    if isinstance(x, xrapture.LoraWeight):
      shape = tuple(x.shape)
      shapes |= {shape, shape[:-2] + shape[:-3:-1], shape[-2:], shape[:-3:-1]}
  return shapes


def _dense_loss(tokens, params):
  """The loss of the adapted model computed densely: ``deq(w) + s · b @ a`` in plain JAX.

  A function of :func:`_factors`; ``params`` gives the (dequantized) bases.
  """
  _, leaves, treedef = test_utils.flat_with_names(params)
  bases = [jnp.asarray(_dense_kernel(x.w)) if isinstance(x, xrapture.LoraWeight) else x
           for x in leaves]

  def loss(factors):
    def one(w, ab):
      if ab is None:
        return w
      a, b = ab
      return w + (ALPHA / RANK) * jnp.matmul(b, a)
    dense = treedef.unflatten([one(w, f) for w, f in zip(bases, factors)])
    return jnp.sum(jnp.tanh(hk.transform(lm).apply(dense, None, tokens)))
  return loss


def _factors(params):
  return [(x.a, x.b) if isinstance(x, xrapture.LoraWeight) else None
          for x in test_utils.flat_with_names(params)[1]]


class NestedTest(parameterized.TestCase):
  """The LoRA handlers on a quantized ``w``, in strict mode: nothing materialized."""

  def _params(self, scheme="nf4", double_quant=False, **overrides):
    return _perturb(_adapt(_config(scheme, double_quant, **overrides)))

  @parameterized.parameters(*SCHEMES)
  def test_forward_matches_dense(self, scheme, double_quant):
    params, tokens = self._params(scheme, double_quant), _tokens(3)
    model = xrapture.transform(lm, _config(scheme, double_quant))
    expected = _dense_apply(_numpy_merged(params), None, tokens)
    with xrapture.strict_mode():
      for got in (model.apply(params, None, tokens),
                  jax.jit(model.apply)(params, None, tokens)):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)

  @parameterized.parameters(*SCHEMES)
  def test_gradients_match_dense_and_none_for_w(self, scheme, double_quant):
    params, tokens = self._params(scheme, double_quant), _tokens(4)
    model = xrapture.transform(lm, _config(scheme, double_quant))
    loss = lambda p: jnp.sum(jnp.tanh(model.apply(p, None, tokens)))
    with xrapture.strict_mode():
      grads = jax.jit(jax.grad(loss, allow_int=True))(params)
    expected = jax.jit(jax.grad(_dense_loss(tokens, params)))(_factors(params))
    for got, want in zip(test_utils.flat_with_names(grads)[1], expected):
      if want is None:
        continue
      for g, w in ((got.a, want[0]), (got.b, want[1])):   # float32 sums of ~1e3 terms
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
      for leaf in jax.tree_util.tree_leaves(got.w):   # codes: float0; scales: zero
        self.assertTrue(leaf.dtype == jax.dtypes.float0 or not np.any(leaf))

  def test_no_dense_kernel_is_kept_or_formed(self):
    params, tokens = self._params("nf4", True), _tokens(5)
    model = xrapture.transform(lm, _config("nf4", True))
    loss = lambda p: jnp.sum(jnp.tanh(model.apply(p, None, tokens)))
    kernels = _kernel_shapes(params)

    def dense_residuals(fn, p):
      # The residuals' shapes and dtypes, traced abstractly (nothing is run).
      vjp = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], p)
      return [(l.shape, l.dtype) for l in jax.tree_util.tree_leaves(vjp)
              if tuple(l.shape) in kernels and jnp.issubdtype(l.dtype, jnp.floating)]

    with xrapture.strict_mode():
      self.assertEqual(dense_residuals(loss, params), [])
      traced = jax.jit(jax.grad(loss, allow_int=True)).trace(params)
    compiled = traced.lower().compile()
    # Outputs: the gradient holds nothing kernel-sized in floating point.
    grads = compiled(params)
    self.assertFalse([l.shape for l in jax.tree_util.tree_leaves(grads)
                      if tuple(l.shape) in kernels and l.dtype != jax.dtypes.float0])
    # No b @ a and no kernel gradient, in the jaxpr or the compiled HLO.
    dense_check.assert_no_dense_product_in_stages(
        traced, compiled, dense_check.weight_targets(params))
    # Positive control: dequantizing outside the handlers keeps dense kernels.
    dequantized = lambda p: loss(jax.tree_util.tree_map(
        lambda x: xrapture.dequantize(x) if isinstance(x, xrapture.QuantizedArray) else x,
        p, is_leaf=lambda x: isinstance(x, xrapture.QuantizedArray)))
    self.assertNotEmpty(dense_residuals(dequantized, params))

  def test_compiled_step_holds_one_dense_kernel_at_a_time(self):
    n, k = 6, 256

    def f(x):
      for i in range(n):
        x = jnp.tanh(hk.Linear(k, name=f"l{i}")(x))
      return x
    x = jnp.ones((4, k))
    model = xrapture.transform(f, _config("nf4"))
    params = _perturb(model.adapt(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x)))
    loss = lambda p, x: jnp.sum(model.apply(p, None, x))
    kernel_bytes = k * k * 4

    def planned_temp(fn):
      compiled = jax.jit(jax.grad(fn, argnums=(0, 1), allow_int=True)).lower(params, x).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    # XLA's buffer plan: dequantized kernels live one product at a time,
    # never all n from the forward pass to the backward pass.
    self.assertLess(planned_temp(loss), 2.5 * kernel_bytes)
    # Positive control: dequantizing every kernel up front keeps all n alive.
    dequantized = lambda p, x: loss(jax.tree_util.tree_map(
        lambda q: xrapture.dequantize(q) if isinstance(q, xrapture.QuantizedArray) else q,
        p, is_leaf=lambda q: isinstance(q, xrapture.QuantizedArray)), x)
    self.assertGreaterEqual(planned_temp(dequantized), n * kernel_bytes)

  def test_lora_dropout_matches_the_dequantized_base(self):
    config = _config("nf4", dropout=0.3)
    params, tokens = self._params(dropout=0.3), _tokens(6)
    model = xrapture.transform(lm, config)
    dense_base = jax.tree_util.tree_map(
        lambda x: jnp.asarray(_dense_kernel(x)) if isinstance(x, xrapture.QuantizedArray) else x,
        params, is_leaf=lambda x: isinstance(x, xrapture.QuantizedArray))
    rng = jax.random.PRNGKey(7)
    with xrapture.strict_mode():
      got = model.apply(params, rng, tokens)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(got, apply(dense_base, rng, tokens), rtol=1e-5, atol=1e-5)
    self.assertGreater(float(jnp.abs(got - apply(params, None, tokens)).max()), 1e-3)

  @parameterized.named_parameters(
      ("multi_axis_einsum", "btd,dhk->bthk", (3, 5, 64), (64, 4, 32), "ioo"),
      ("contract_two_axes", "bthk,hkd->btd", (3, 5, 4, 32), (4, 32, 64), "iio"),
  )
  def test_general_path(self, eq, x_shape, w_shape, layout):
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(0, 0.1, w_shape), jnp.float32)
    lora = xrapture.LoraWeight(w, *_factor_arrays(w_shape, layout, rng),
                               alpha=ALPHA, layout=layout)
    params = xrapture.quantize({"k": {"w": lora}}, _config("nf4"))
    q = params["k"]["w"]
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    fn = lambda x, w: jnp.einsum(eq, x, w)
    merged = _dense_kernel(q.w) + np.asarray(lora.delta())
    with xrapture.strict_mode():
      got = xrapture.use_implicit_args(fn)(x, q)
      gx = jax.jit(jax.grad(
          lambda x: jnp.sum(xrapture.use_implicit_args(fn)(x, q) ** 2)))(x)
    np.testing.assert_allclose(got, jax.jit(fn)(x, merged), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        gx, jax.jit(jax.grad(lambda x: jnp.sum(fn(x, merged) ** 2)))(x),
        rtol=1e-4, atol=1e-4)

  def test_conv(self):
    def f(x):
      return hk.Conv1D(32, 3, name="conv")(x)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 9, 64)), jnp.float32)
    model = xrapture.transform(f, _config("nf4", targets=(r"conv/w",)))
    params = _perturb(model.adapt(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x), x))
    self.assertEqual(params["conv"]["w"].w.codes.shape, (3, 32, 32))   # window slices, [out, in/2]
    with xrapture.strict_mode():
      got = model.apply(params, None, x)
    np.testing.assert_allclose(got, jax.jit(hk.transform(f).apply)(_numpy_merged(params),
                                                                   None, x),
                               rtol=1e-5, atol=1e-5)

  def test_ragged_dot_experts(self):
    rng = np.random.default_rng(10)
    groups = 3
    w = jnp.asarray(rng.normal(0, 0.1, (groups, 64, 32)), jnp.float32)
    a, b = _factor_arrays((groups, 64, 32), "sio", rng)
    lora = xrapture.LoraWeight(w, a, b, alpha=ALPHA, layout="sio")
    q = xrapture.quantize({"experts": {"w": lora}}, _config("nf4", True))["experts"]["w"]
    x = jnp.asarray(rng.normal(size=(10, 64)), jnp.float32)
    sizes = jnp.asarray([4, 1, 5], jnp.int32)
    fn = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
    with xrapture.strict_mode():
      got = xrapture.use_implicit_args(fn)(x, q)
    merged = _dense_kernel(q.w) + (ALPHA / RANK) * np.matmul(np.asarray(b), np.asarray(a))
    rows = np.repeat(np.arange(groups), np.asarray(sizes))
    expected = np.einsum("tk,tkn->tn", np.asarray(x), merged[rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  def test_mixed_precision(self):
    params, tokens = self._params("nf4"), _tokens(11)
    policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
    hk.mixed_precision.set_policy(hk.Linear, policy)
    self.addCleanup(hk.mixed_precision.clear_policy, hk.Linear)
    model = xrapture.transform(lm, _config("nf4"))
    with xrapture.strict_mode():
      got = model.apply(params, None, tokens)
    # A fresh jit: the policy is read at trace time.
    expected = jax.jit(hk.transform(lm).apply)(_numpy_merged(params), None, tokens)
    np.testing.assert_allclose(got, expected, rtol=0.1, atol=0.1)
    self.assertEqual(got.dtype, jnp.float32)

  def test_sharded_codes_and_scales(self):
    devices = jax.devices()
    if len(devices) < 8:
      self.skipTest("needs 8 (host) devices")
    mesh = jax.sharding.Mesh(np.asarray(devices[:8]).reshape(2, 4), ("data", "model"))
    P = jax.sharding.PartitionSpec

    def sharding(x):   # the launcher's rule: last axis over 'model' when it divides
      if np.ndim(x) >= 2 and np.shape(x)[-1] % 4 == 0:
        return jax.sharding.NamedSharding(mesh, P(*([None] * (np.ndim(x) - 1)), "model"))
      return jax.sharding.NamedSharding(mesh, P())

    params, tokens = self._params("nf4", True), _tokens(12, (4, 7))
    model = xrapture.transform(lm, _config("nf4", True))
    loss = lambda p, t: jnp.sum(jnp.tanh(model.apply(p, None, t)))
    shardings = jax.tree_util.tree_map(sharding, params)
    sharded = jax.device_put(params, shardings)
    codes = sharded["up"]["w"].w.codes
    self.assertEqual(codes.sharding.spec, P(None, "model"))
    batch = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P("data")))
    step = jax.jit(jax.value_and_grad(loss, allow_int=True))
    with xrapture.strict_mode():
      value, grads = step(sharded, batch)
    want_value, want_grads = jax.jit(jax.value_and_grad(loss, allow_int=True))(
        params, tokens)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    want = want_grads["up"]["w"].a   # float32 sums, summed in another order when sharded
    np.testing.assert_allclose(grads["up"]["w"].a, want, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()))


def _factor_arrays(w_shape, layout, rng):
  """Random ``(a, b)`` for a kernel of ``w_shape`` and ``layout`` (rank RANK)."""
  s = [w_shape[d] for d, c in enumerate(layout) if c == "s"]
  i = [w_shape[d] for d, c in enumerate(layout) if c == "i"]
  o = [w_shape[d] for d, c in enumerate(layout) if c == "o"]
  a = jnp.asarray(rng.normal(0, 0.1, s + [RANK] + o), jnp.float32)
  b = jnp.asarray(rng.normal(0, 0.1, s + i + [RANK]), jnp.float32)
  return a, b


class TrainingTest(parameterized.TestCase):
  """wrap_optimizer, split_lora_params and count_trainable on a quantized base."""

  @parameterized.parameters(*SCHEMES)
  def test_training_steps_leave_the_base_bit_equal(self, scheme, double_quant):
    base, tokens = _base(), _tokens(13)
    config = _config(scheme, double_quant)
    model = xrapture.transform(lm, config)
    lora_spec = model.lora_spec(base, tokens)
    params = _adapt(config, base)
    tx = xrapture.wrap_optimizer(optax.adam(1e-2), lora_spec)
    opt_state = tx.init(params)
    codes = {x.codes.shape for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, xrapture.QuantizedArray))
             if isinstance(x, xrapture.QuantizedArray)}
    state_leaves = jax.tree_util.tree_leaves(opt_state)
    self.assertFalse([l for l in state_leaves if l.dtype == jnp.uint8 or l.shape in codes])

    loss = lambda p: jnp.mean((model.apply(p, None, tokens) - 1.0) ** 2)

    @jax.jit
    def step(params, opt_state):
      value, grads = jax.value_and_grad(loss, allow_int=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    new, values = params, []
    with xrapture.strict_mode():
      for _ in range(3):
        new, opt_state, value = step(new, opt_state)
        values.append(float(value))
    self.assertLess(values[-1], values[0])
    for name in ("up", "down", "__layer_stack_no_per_layer/mid", "embed"):
      key = "embeddings" if name == "embed" else "w"
      before, after = params[name][key], new[name][key]
      for x, y in zip(jax.tree_util.tree_leaves(before.w), jax.tree_util.tree_leaves(after.w)):
        self.assertEqual(np.asarray(x).dtype, np.asarray(y).dtype)
        np.testing.assert_array_equal(x, y)    # the frozen base, bit for bit
      self.assertGreater(float(jnp.abs(after.b - before.b).max()), 0.0)

  def test_count_and_split(self):
    base = _base()
    model = xrapture.transform(lm, _config("nf4", True))
    lora_spec = model.lora_spec(base, _tokens())
    quantized = _adapt(_config("nf4", True), base)
    plain = _adapt(_config(None), base)
    self.assertEqual(xrapture.count_trainable(quantized, lora_spec),
                     xrapture.count_trainable(plain, lora_spec))
    trainable = jax.tree_util.tree_leaves(xrapture.split_lora_params(quantized, lora_spec))
    self.assertEqual(sorted(l.shape for l in trainable),
                     sorted(l.shape for l in jax.tree_util.tree_leaves(
                         xrapture.split_lora_params(plain, lora_spec))))
    self.assertFalse([l for l in trainable if l.dtype == jnp.uint8])

  def test_plain_grad_names_the_fix(self):
    params = _adapt(_config("nf4"))
    model = xrapture.transform(lm, _config("nf4"))
    with self.assertRaisesRegex(TypeError, "allow_int"):
      jax.grad(lambda p: jnp.sum(model.apply(p, None, _tokens())))(params)


class MergeTest(parameterized.TestCase):

  def test_merge_params_gives_full_precision(self):
    config = _config("nf4", True, quantize_frozen=(r"down/w",), targets=(r"up/w", r".*/mid/w"))
    params, tokens = _perturb(_adapt(config)), _tokens(14)
    self.assertIsInstance(params["down"]["w"], xrapture.QuantizedArray)
    merged = xrapture.merge_params(params)
    expected = _numpy_merged(params)
    for got, want in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected)):
      self.assertIsInstance(got, jax.Array)
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with xrapture.strict_mode():
      adapted = xrapture.transform(lm, config).apply(params, None, tokens)
    np.testing.assert_allclose(_dense_apply(merged, None, tokens), adapted,
                               rtol=2e-5, atol=2e-5)

  @parameterized.parameters(*SCHEMES)
  def test_merge_and_requantize(self, scheme, double_quant):
    config = _config(scheme, double_quant)
    params, tokens = _perturb(_adapt(config)), _tokens(15)
    merged, errors = xrapture.merge_and_requantize(params)
    reference = _numpy_merged(params)           # float64 numpy: deq(w) + s · b @ a
    names, leaves, _ = test_utils.flat_with_names(params)
    _, merged_leaves, _ = test_utils.flat_with_names(merged)
    _, reference_leaves, _ = test_utils.flat_with_names(reference)
    self.assertEqual(sorted(errors), sorted(n for n, x in zip(names, leaves)
                                            if isinstance(x, xrapture.LoraWeight)))
    for name, old, new, ref in zip(names, leaves, merged_leaves, reference_leaves):
      if not isinstance(old, xrapture.LoraWeight):
        self.assertIs(new, old)
        continue
      self.assertIsInstance(new, xrapture.QuantizedArray)
      self.assertEqual((new.scheme, new.double_quant, new.block_size, new.axis, new.shape),
                       (old.w.scheme, old.w.double_quant, old.w.block_size, old.w.axis,
                        old.w.shape))
      err = _dense_kernel(new).astype(np.float64) - np.asarray(ref, np.float64)
      update = (ALPHA / RANK) * np.matmul(np.asarray(old.b, np.float64),
                                          np.asarray(old.a, np.float64))
      stats = errors[name]
      np.testing.assert_allclose(stats["max_abs"], np.abs(err).max(), rtol=1e-3)
      np.testing.assert_allclose(stats["rms"], np.sqrt(np.mean(err ** 2)), rtol=1e-3)
      np.testing.assert_allclose(
          stats["relative_rms"], np.sqrt(np.mean(err ** 2) / np.mean(np.asarray(ref) ** 2)),
          rtol=1e-3)
      np.testing.assert_allclose(stats["update_rms"], np.sqrt(np.mean(update ** 2)), rtol=1e-5)
      self.assertGreater(stats["max_abs"], 0.0)   # a real new rounding
    # The requantized model runs quantized, and computes its dequantized weights.
    with xrapture.strict_mode():
      got = xrapture.use_implicit_args(hk.transform(lm).apply)(merged, None, tokens)
    np.testing.assert_allclose(got, _dense_apply(_numpy_merged(merged), None, tokens),
                               rtol=2e-5, atol=2e-5)


class BadInputTest(parameterized.TestCase):

  def test_block_size_not_dividing_the_input_axis(self):
    config = _config("nf4", quantize_block=64)   # H = 96 is not a multiple of 64
    with self.assertRaisesRegex(
        ValueError, r"Cannot quantize the base kernel of LoraWeight "
        r"'__layer_stack_no_per_layer/mid/w' of shape \(2, 96, 96\) with config.quantize = "
        r"'nf4', config.quantize_block = 64: .*size 96.*use one of \[32\]"):
      _adapt(config, _base())

  @parameterized.parameters("nf8", "NF4", "int4")
  def test_unknown_scheme(self, scheme):
    config = _config(scheme)
    with self.assertRaisesRegex(
        ValueError, rf"config.quantize = '{scheme}' must be None \(full-precision base\) or "
        r"one of \('nf4', 'int8'\)"):
      _adapt(config, _base())
    with self.assertRaisesRegex(ValueError, rf"config.quantize = '{scheme}'"):
      xrapture.quantize({}, config)

  def test_quantize_without_scheme(self):
    with self.assertRaisesRegex(ValueError, r"config.quantize = None.*one of \('nf4', 'int8'\)"):
      xrapture.quantize({}, _config(None))

  def test_already_quantized_kernel(self):
    config = _config()
    params = _adapt(config, _base())
    with self.assertRaisesRegex(
        ValueError, r"Cannot quantize the base kernel of LoraWeight '\S+/w': it is "
        r"already a QuantizedArray"):
      xrapture.quantize(params, config)

  def test_integer_kernels(self):
    w = jnp.arange(64 * 8, dtype=jnp.int32).reshape(64, 8)
    with self.assertRaisesRegex(ValueError, r"Cannot quantize frozen parameter 'table/w' of "
                                r"dtype int32 \(shape \(64, 8\)\).*floating-point kernels only"):
      xrapture.quantize({"table": {"w": w}}, _config(quantize_frozen=(r".*/w",)))
    lora = xrapture.LoraWeight(w, jnp.zeros((2, 8)), jnp.zeros((64, 2)))
    with self.assertRaisesRegex(ValueError, r"LoraWeight 'lin/w' of dtype int32"):
      xrapture.quantize({"lin": {"w": lora}}, _config())

  def test_quantized_adapter_factors(self):
    w = jnp.ones((64, 64))
    q = xrapture.quantize_array(np.ones((2, 64), np.float32), "int8")
    lora = xrapture.LoraWeight(w, q, jnp.zeros((64, 2)))
    with self.assertRaisesRegex(ValueError, r"LoraWeight 'lin/w' has a quantized adapter "
                                r"factor 'a': adapters are trained"):
      xrapture.quantize({"lin": {"w": lora}}, _config())

  def test_quantize_frozen_matching_a_trained_parameter(self):
    config = _config(targets=(r"up/w",), full=(r"down/w",), quantize_frozen=(r".*/w",))
    # Without quantize_frozen, down/w (trained in full) is left alone ...
    _adapt(_config(targets=(r"up/w",), full=(r"down/w",)), _base())
    with self.assertRaisesRegex(ValueError, r"config.quantize_frozen matches 'down/w', which "
                                r"config.full trains: only frozen parameters"):
      _adapt(config, _base())


if __name__ == "__main__":
  absltest.main()
