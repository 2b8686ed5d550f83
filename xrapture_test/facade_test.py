"""Tests for the seed facade: XRapTureConfig, XRapTure, apply_lora."""

import functools
import logging
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import xrapture

import test_utils

_RANK = 2
_X = np.random.default_rng(0).normal(size=(4, 8, 3)).astype(np.float32)


def _net(x):
  h = jax.nn.gelu(hk.Conv1D(6, 3, name="conv")(x))
  h = hk.Linear(8, name="up")(h)
  h = hk.LayerNorm(-1, True, True)(jnp.tanh(h))
  return hk.Linear(3, name="head")(h)


@functools.lru_cache(maxsize=None)
def _base():
  """Base params, cached: tests copy before they change anything."""
  return hk.transform(_net).init(jax.random.PRNGKey(0), _X)


def _config(**kw):
  kw.setdefault("lora_fine_tune_parameters", ["w"])
  kw.setdefault("verbose", False)
  return xrapture.XRapTureConfig(_RANK, **kw)


def _dense(params, scale):
  """``w + scale · b @ a`` per LoraWeight, in float64 numpy."""
  def one(x):
    if not isinstance(x, xrapture.LoraWeight):
      return x
    w, a, b = (np.asarray(t, np.float64) for t in (x.w, x.a, x.b))
    return jnp.asarray(w + scale * np.matmul(b, a), x.w.dtype)
  return xrapture.tree_map_with_implicit(one, params)


def _inject(target, source):
  """``target``'s LoraWeights with ``source``'s a and b."""
  return jax.tree.map(
      lambda t, s: t.replace(a=s.a, b=s.b) if isinstance(t, xrapture.LoraWeight) else t,
      target, source, is_leaf=xrapture.is_implicit)


class ConfigAndSpecsTest(parameterized.TestCase):

  def test_config_defaults(self):
    config = xrapture.XRapTureConfig(4)
    self.assertEqual(config.lora_dim, 4)
    self.assertIsNone(config.fully_fine_tune_parameters)
    self.assertIsNone(config.lora_fine_tune_parameters)
    self.assertTrue(config.tune_vectors)
    self.assertTrue(config.verbose)
    self.assertEqual(config.dtype, jnp.float32)

  def test_base_decision_function(self):
    rapture = xrapture.XRapTure(_config(
        fully_fine_tune_parameters=["head"], lora_fine_tune_parameters=["w", "conv/b"]))
    def key(*names):
      return tuple(jax.tree_util.DictKey(n) for n in names)
    self.assertEqual(rapture.base_decision_function(key("head", "w")), xrapture.LORA_FULL)
    self.assertEqual(rapture.base_decision_function(key("up", "w")), _RANK)
    self.assertEqual(rapture.base_decision_function(key("conv", "b")), _RANK)  # regex
    self.assertEqual(rapture.base_decision_function(key("up", "b")), xrapture.LORA_FREEZE)
    nothing = xrapture.XRapTure(xrapture.XRapTureConfig(_RANK, verbose=False))
    self.assertEqual(nothing.base_decision_function(key("up", "w")), xrapture.LORA_FREEZE)

  @parameterized.parameters(False, True)
  def test_make_lora_specs(self, tune_vectors):
    rapture = xrapture.XRapTure(_config(fully_fine_tune_parameters=["head"]))
    lora_spec = rapture.make_lora_specs(_base(), tune_vectors=tune_vectors)
    vector = xrapture.LORA_FULL if tune_vectors else xrapture.LORA_FREEZE
    self.assertEqual(lora_spec, {
        "conv": {"w": _RANK, "b": vector},
        "up": {"w": _RANK, "b": vector},
        "layer_norm": {"scale": vector, "offset": vector},
        # full by name, except its bias which is a vector
        "head": {"w": xrapture.LORA_FULL, "b": vector}})

  def test_make_lora_specs_with_decision_fn(self):
    rapture = xrapture.XRapTure(_config())
    seen = []

    def decide(path, param):
      seen.append((jax.tree_util.keystr(path), param.shape))
      return 1 if jax.tree_util.keystr(path) == "['up']['w']" else xrapture.LORA_FREEZE
    lora_spec = rapture.make_lora_specs(_base(), decision_fn=decide)
    self.assertEqual(lora_spec["up"]["w"], 1)
    self.assertEqual(lora_spec["head"]["w"], xrapture.LORA_FREEZE)
    self.assertEqual(sorted(seen), [("['conv']['w']", (3, 3, 6)), ("['head']['w']", (8, 3)),
                                    ("['up']['w']", (6, 8))])  # vectors never asked

  def test_verbose_logs_through_absl(self):
    rapture = xrapture.XRapTure(_config(verbose=True))
    with self.assertLogs(level=logging.INFO) as logs:
      rapture.make_lora_specs(_base())
    text = "\n".join(logs.output)
    self.assertIn("up/w (6, 8) -> rank 2", text)
    self.assertIn("layer_norm/scale (8,) -> frozen", text)
    quiet = xrapture.XRapTure(_config(verbose=False))
    with self.assertNoLogs(level=logging.INFO):
      quiet.make_lora_specs(_base())


class InitMergeTest(parameterized.TestCase):

  def test_init_lora_parameters(self):
    base = _base()
    rapture = xrapture.XRapTure(_config())
    lora_spec = rapture.make_lora_specs(base)
    params = xrapture.XRapTure.init_lora_parameters(
        base, lora_spec, jnp.bfloat16, jax.random.PRNGKey(3), stddev=0.5, alpha=3.0)
    up, conv = params["up"]["w"], params["conv"]["w"]
    self.assertIs(up.w, base["up"]["w"])
    self.assertEqual((up.b.shape, up.a.shape), ((6, _RANK), (_RANK, 8)))
    # The seed's conv layout: b spans the window, a is pointwise (layout
    # 'iio'; 0.1.0 kept a's window axes as size-1 axes: (1, r, 6)).
    self.assertEqual((conv.b.shape, conv.a.shape), ((3, 3, _RANK), (_RANK, 6)))
    self.assertEqual(conv.layout, "iio")
    self.assertEqual((up.a.dtype, up.b.dtype), (jnp.bfloat16, jnp.bfloat16))
    self.assertEqual(up.alpha, 3.0)
    np.testing.assert_array_equal(np.asarray(up.b, np.float32), 0.0)
    self.assertIs(params["head"]["b"], base["head"]["b"])
    default = xrapture.XRapTure.init_lora_parameters(base, lora_spec)
    self.assertEqual(default["up"]["w"].alpha, 1.0)  # the seed's default alpha
    self.assertEqual(default["up"]["w"].a.dtype, jnp.float32)

  def test_init_lora_parameters_rejects_vectors_with_rank(self):
    base = _base()
    lora_spec = jax.tree.map(lambda _: xrapture.LORA_FREEZE, base)
    lora_spec["up"]["b"] = 2
    with self.assertRaisesRegex(ValueError, "up/b"):
      xrapture.XRapTure.init_lora_parameters(base, lora_spec)

  def test_init_lora_parameters_is_leaf(self):
    # A custom container, taken whole by is_leaf, is kept as it is when frozen.
    base = {"lin": {"w": jnp.ones((4, 5))}, "meta": (jnp.ones(2), jnp.zeros(2))}
    lora_spec = {"lin": {"w": 2}, "meta": xrapture.LORA_FREEZE}
    params = xrapture.XRapTure.init_lora_parameters(
        base, lora_spec, is_leaf=lambda x: isinstance(x, tuple))
    self.assertIs(params["meta"], base["meta"])
    self.assertIsInstance(params["lin"]["w"], xrapture.LoraWeight)

  @parameterized.parameters(True, False)
  def test_merge_parameters(self, destructive):
    base = jax.tree.map(jnp.copy, _base())  # donation would delete the cached arrays
    rapture = xrapture.XRapTure(_config())
    params = test_utils.randomize_adapters(xrapture.XRapTure.init_lora_parameters(
        base, rapture.make_lora_specs(base), alpha=3.0))
    expected = _dense(params, 3.0 / _RANK)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # a, b cannot be donated: not worth a warning
      merged = xrapture.XRapTure.merge_parameters(params, destructive=destructive)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 merged, expected)
    # Destructive: w's buffer now holds the merged kernel.
    self.assertEqual(params["up"]["w"].w.is_deleted(), destructive)
    self.assertFalse(params["up"]["b"].is_deleted())


class ApplyLoraTest(parameterized.TestCase):

  def _functional(self, alpha):
    config = xrapture.default_config()
    config.rank, config.alpha = _RANK, alpha
    model = xrapture.transform(_net, config)
    base = model.init(jax.random.PRNGKey(0), _X)
    return model, base, model.adapt(jax.random.PRNGKey(9), base, _X)

  @parameterized.named_parameters(("transformed", "transformed"), ("pure_fn", "pure"))
  def test_same_numbers_as_functional_api(self, kind):
    alpha = 3.0
    model, base, functional = self._functional(alpha)
    base_fn = hk.transform(_net)
    if kind == "transformed":
      module = base_fn

      def run(m, p, x):
        return m.apply(p, None, x)
    else:
      def module(params, x):
        return base_fn.apply(params, None, x)

      def run(m, p, x):
        return m(p, x)
    rapture = xrapture.XRapTure(_config())
    out = rapture.apply_lora(module, base, optax.adam(1e-2), alpha=alpha,
                             rng=jax.random.PRNGKey(4))
    self.assertIsInstance(out, xrapture.XRapTureModule)
    self.assertEqual(out.lora_specs, jax.tree.map(lambda s: max(s, 0), model.lora_spec(base, _X)))
    # At init both equal the base model.
    np.testing.assert_allclose(run(out.lora_module, out.lora_parameters, _X),
                               base_fn.apply(base, None, _X), rtol=1e-6, atol=1e-6)
    # Identical adapters: identical outputs, equal to the dense reference.
    seed_params = test_utils.randomize_adapters(out.lora_parameters)
    functional = _inject(functional, seed_params)
    y_seed = run(out.lora_module, seed_params, _X)
    y_functional = model.apply(functional, None, _X)
    y_reference = base_fn.apply(_dense(seed_params, alpha / _RANK), None, _X)
    np.testing.assert_allclose(y_seed, y_functional, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_seed, y_reference, rtol=1e-4, atol=1e-5)
    merged = xrapture.XRapTure.merge_parameters(seed_params, destructive=False)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 merged, xrapture.merge_params(functional))

    # Three optimizer steps: the seed's wrap_tx and wrap_optimizer agree.
    def train(apply_fn, params, tx):
      state = tx.init(params)

      @jax.jit
      def step(p, s):
        grads = jax.grad(lambda p: jnp.mean(apply_fn(p) ** 2))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s
      for _ in range(3):
        params, state = step(params, state)
      return params
    seed_trained = train(lambda p: run(out.lora_module, p, _X), seed_params, out.lora_tx)
    functional_trained = train(
        lambda p: model.apply(p, None, _X), functional,
        xrapture.wrap_optimizer(optax.adam(1e-2), model.lora_spec(base, _X)))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 seed_trained, functional_trained)
    # ... and trained something: adapters moved, w did not.
    self.assertFalse(np.allclose(seed_trained["up"]["w"].a, seed_params["up"]["w"].a))
    np.testing.assert_array_equal(seed_trained["up"]["w"].w, base["up"]["w"])
    # The optimizer state holds moments for the adapters only.
    moments = sum(x.size for x in jax.tree.leaves(out.lora_opt_state)
                  if jnp.issubdtype(x.dtype, jnp.floating))
    self.assertEqual(moments, 2 * xrapture.count_trainable(seed_params, out.lora_specs))

  def test_pure_jnp_function(self):
    def f(params, x):
      return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["bias"]
    rng = np.random.default_rng(0)
    base = {"w1": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),
            "bias": jnp.zeros(4)}
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    rapture = xrapture.XRapTure(_config(lora_fine_tune_parameters=["w1", "w2"]))
    out = rapture.apply_lora(f, base, optax.sgd(0.1), tune_vectors=True, alpha=2.0)
    self.assertEqual(out.lora_specs, {"w1": _RANK, "w2": _RANK, "bias": xrapture.LORA_FULL})
    params = test_utils.randomize_adapters(out.lora_parameters)
    expected = f(_dense(params, 2.0 / _RANK), x)
    with xrapture.strict_mode():
      y = out.lora_module(params, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The vector is trained in full, w never.
    grads = jax.jit(jax.grad(lambda p: out.lora_module(p, x).sum()))(params)
    updates, _ = out.lora_tx.update(grads, out.lora_opt_state, params)
    new = optax.apply_updates(params, updates)
    self.assertFalse(np.array_equal(new["bias"], params["bias"]))
    np.testing.assert_array_equal(new["w1"].w, base["w1"])

  def test_layer_stack_gets_the_seed_layout_and_right_numbers(self):
    def net(x):
      return hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(5)(h)))(x)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    base_fn = hk.transform(net)
    base = base_fn.init(jax.random.PRNGKey(0), x)
    out = xrapture.XRapTure(_config()).apply_lora(base_fn, base, optax.sgd(0.1))
    lw = out.lora_parameters["__layer_stack_no_per_layer/linear"]["w"]
    # The seed does not tell stacks from convs: one pair spans the stack.
    self.assertEqual((lw.b.shape, lw.a.shape), ((2, 5, _RANK), (_RANK, 5)))
    params = test_utils.randomize_adapters(out.lora_parameters)
    # a is shared by the layers, so the scan over layers materializes the
    # kernel (xrapture.transform's per-layer adapters do not).
    # (Not assertWarns: it walks sys.modules, and haiku's lazy modules raise.)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      y = out.lora_module.apply(params, None, x)
    self.assertTrue(any(issubclass(w.category, xrapture.MaterializationWarning)
                        for w in caught))
    np.testing.assert_allclose(y, base_fn.apply(_dense(params, 1.0 / _RANK), None, x),
                               rtol=1e-5, atol=1e-5)

  def test_transformed_with_state(self):
    def net(x):
      h = hk.Linear(4)(x)
      return hk.BatchNorm(True, True, 0.9)(h, is_training=True)
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    base_fn = hk.transform_with_state(net)
    base, state = base_fn.init(jax.random.PRNGKey(0), x)
    out = xrapture.XRapTure(_config()).apply_lora(base_fn, base, optax.sgd(0.1))
    params = test_utils.randomize_adapters(out.lora_parameters)
    y, new_state = out.lora_module.apply(params, state, None, x)
    y_ref, state_ref = base_fn.apply(_dense(params, 1.0 / _RANK), state, None, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6),
                 new_state, state_ref)

  @parameterized.parameters(False, True)
  def test_wrap_tx(self, scalar_frozen_grads):
    base = _base()
    rapture = xrapture.XRapTure(_config(fully_fine_tune_parameters=["head"]))
    lora_spec = rapture.make_lora_specs(base)
    params = test_utils.randomize_adapters(xrapture.XRapTure.init_lora_parameters(base, lora_spec))
    tx = xrapture.XRapTure.wrap_tx(optax.sgd(0.5), lora_spec, scalar_frozen_grads)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    frozen_shape = () if scalar_frozen_grads else base["up"]["w"].shape
    self.assertEqual(updates["up"]["w"].w.shape, frozen_shape)
    np.testing.assert_array_equal(updates["up"]["w"].w, 0.0)
    np.testing.assert_array_equal(updates["up"]["b"], 0.0)
    np.testing.assert_array_equal(updates["up"]["w"].a, -0.5)
    np.testing.assert_array_equal(updates["head"]["w"], -0.5)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["up"]["w"].w, params["up"]["w"].w)
    np.testing.assert_array_equal(new["layer_norm"]["scale"], params["layer_norm"]["scale"])


class SplitLoraParamsTest(absltest.TestCase):

  def test_trainable_only(self):
    base = _base()
    rapture = xrapture.XRapTure(_config(fully_fine_tune_parameters=["head"]))
    lora_spec = rapture.make_lora_specs(base)
    params = xrapture.XRapTure.init_lora_parameters(base, lora_spec)
    split = xrapture.split_lora_params(params, lora_spec)
    self.assertIs(split["up"]["w"].w, xrapture.EmptyNode)
    self.assertIs(split["up"]["w"].a, params["up"]["w"].a)
    self.assertIs(split["up"]["w"].b, params["up"]["w"].b)
    self.assertIs(split["up"]["b"], xrapture.EmptyNode)
    self.assertIs(split["layer_norm"]["scale"], xrapture.EmptyNode)
    self.assertIs(split["head"]["w"], params["head"]["w"])
    leaves = jax.tree.leaves(split)
    conv, up = base["conv"]["w"].shape, base["up"]["w"].shape
    expected = (_RANK * (conv[0] * conv[1] + conv[2]) + _RANK * (up[0] + up[1])
                + base["head"]["w"].size)
    self.assertEqual(sum(x.size for x in leaves), expected)


if __name__ == "__main__":
  absltest.main()
