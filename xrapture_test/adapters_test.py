"""Tests for xrapture/_src/transform/adapters.py: lora spec trees, init, merge, split."""

import math
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.transform import adapters
from xrapture._src.transform import layout as layout_lib

LoraWeight = xrapture.LoraWeight
FULL, FREEZE = xrapture.LORA_FULL, xrapture.LORA_FREEZE


def _config(**overrides):
  config = xrapture.default_config()
  config.rank = 2
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _params():
  rng = np.random.default_rng(0)

  def f(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "mlp/~/linear_0": {"w": f(4, 6), "b": f(6)},
      "mlp/~/linear_1": {"w": f(6, 3), "b": f(3)},
      "embed": {"embeddings": f(10, 4)},
      "norm": {"scale": f(6)},
  }


class LoraSpecTest(parameterized.TestCase):

  def test_default_targets(self):
    lora_spec = adapters.lora_spec_from_config(_params(), _config())
    self.assertEqual(lora_spec, {
        "mlp/~/linear_0": {"w": 2, "b": FREEZE},
        "mlp/~/linear_1": {"w": 2, "b": FREEZE},
        "embed": {"embeddings": FREEZE},
        "norm": {"scale": FREEZE}})

  def test_full_beats_targets_and_tune_vectors(self):
    lora_spec = adapters.lora_spec_from_config(
        _params(), _config(full=("mlp/~/linear_1/w", "embed/.*"), tune_vectors=True))
    self.assertEqual(lora_spec, {
        "mlp/~/linear_0": {"w": 2, "b": FULL},
        "mlp/~/linear_1": {"w": FULL, "b": FULL},
        "embed": {"embeddings": FULL},
        "norm": {"scale": FULL}})

  def test_targets_are_fullmatched(self):
    # "linear_0" alone matches no whole path.
    with self.assertRaisesRegex(ValueError, "match no parameter"):
      adapters.lora_spec_from_config(_params(), _config(targets=("linear_0",)))
    lora_spec = adapters.lora_spec_from_config(_params(), _config(targets=(".*linear_0/w",)))
    self.assertEqual(lora_spec["mlp/~/linear_0"]["w"], 2)
    self.assertEqual(lora_spec["mlp/~/linear_1"]["w"], FREEZE)

  def test_no_match_lists_every_path_shape_and_dtype(self):
    with self.assertRaises(ValueError) as ctx:
      adapters.lora_spec_from_config(_params(), _config(targets=("nothing",)))
    message = str(ctx.exception)
    self.assertIn("('nothing',)", message)
    for line in ("mlp/~/linear_0/w  (4, 6) float32", "mlp/~/linear_1/b  (3,) float32",
                 "embed/embeddings  (10, 4) float32", "norm/scale  (6,) float32"):
      self.assertIn(line, message)

  def test_one_dimensional_targets(self):
    # Skipped next to a kernel...
    lora_spec = adapters.lora_spec_from_config(_params(), _config(targets=(".*/b", ".*linear_0/w")))
    self.assertEqual(lora_spec["mlp/~/linear_0"]["b"], FREEZE)
    self.assertEqual(lora_spec["mlp/~/linear_0"]["w"], 2)
    # ... an error alone.
    with self.assertRaisesRegex(ValueError, "1-D parameters never get adapters"):
      adapters.lora_spec_from_config(_params(), _config(targets=(".*/b", "norm/scale")))

  def test_empty_targets_only_full(self):
    lora_spec = adapters.lora_spec_from_config(_params(), _config(targets=(), full=("embed/.*",)))
    self.assertEqual(lora_spec["embed"]["embeddings"], FULL)
    self.assertEqual(lora_spec["mlp/~/linear_0"]["w"], FREEZE)

  @parameterized.parameters((4, 4), (5, None), (3, 3))
  def test_rank_limit(self, rank, expected):
    params = {"lin": {"w": jnp.ones((4, 9))}}
    if expected is None:
      with self.assertRaisesRegex(ValueError, r"rank 5 for 'lin/w' exceeds min\(M, N\) = 4"):
        adapters.lora_spec_from_config(params, _config(rank=rank))
    else:
      self.assertEqual(adapters.lora_spec_from_config(params, _config(rank=rank))["lin"]["w"],
                       expected)

  def test_rank_limit_uses_the_last_two_axes(self):
    # Without a trace, a [k, in, out] kernel is taken as a stack: min(in, out).
    params = {"conv": {"w": jnp.ones((9, 3, 5))}}
    with self.assertRaisesRegex(ValueError, r"min\(M, N\) = 3"):
      adapters.lora_spec_from_config(params, _config(rank=4))

  def test_rank_limit_uses_the_layout(self):
    # Traced as a conv, the same kernel is the [9·3, 5] matrix.
    params = {"conv": {"w": jnp.ones((9, 3, 5))}}
    layouts = {0: layout_lib.KernelLayout("iio", uses=("conv_general_dilated",))}
    self.assertEqual(adapters.lora_spec_from_config(
        params, _config(rank=5), layouts)["conv"]["w"], 5)
    with self.assertRaisesRegex(ValueError, r"rank 6 .*min\(M, N\) = 5.*\[27, 5\]"):
      adapters.lora_spec_from_config(params, _config(rank=6), layouts)

  def test_all_linear(self):
    params = {"a": {"w": jnp.ones((4, 6))}, "head": {"w": jnp.ones((6, 1))},
              "table": {"embeddings": jnp.ones((9, 4))}, "b": {"k": jnp.ones((3, 4))}}
    layouts = {
        0: layout_lib.KernelLayout("io", uses=("dot_general",)),         # a/w
        1: layout_lib.KernelLayout("io", uses=("dot_general",)),         # b/k
        2: layout_lib.KernelLayout("io", uses=("dot_general",)),         # head/w
        3: layout_lib.KernelLayout("io", uses=("gather",)),              # embeddings
    }
    lora_spec = adapters.lora_spec_from_config(params, _config(targets=("all-linear",)), layouts)
    # Every contracted kernel, whatever its name; not the [6, 1] head nor the
    # embedding lookup.
    self.assertEqual(lora_spec, {"a": {"w": 2}, "b": {"k": 2}, "head": {"w": FREEZE},
                            "table": {"embeddings": FREEZE}})
    with self.assertRaisesRegex(ValueError, "all-linear.*example inputs"):
      adapters.lora_spec_from_config(params, _config(targets=("all-linear",)))

  def test_rank_pattern_zero_freezes(self):
    lora_spec = adapters.lora_spec_from_config(
        _params(), _config(rank_pattern=((".*linear_1/w", 0),)))
    self.assertEqual(lora_spec["mlp/~/linear_1"]["w"], FREEZE)
    self.assertEqual(lora_spec["mlp/~/linear_0"]["w"], 2)

  @parameterized.parameters(0, -2)
  def test_rank_below_one_names_the_rank(self, rank):
    # Was "targets match no parameter": the rank is the problem.
    with self.assertRaisesRegex(ValueError, rf"config.rank = {rank} must be an integer >= 1"):
      adapters.lora_spec_from_config(_params(), _config(rank=rank))

  @parameterized.parameters(
      ("targets", ("(",)), ("full", ("[a",)), ("rank_pattern", (("(", 2),)),
      ("alpha_pattern", (("(", 2.0),)))
  def test_bad_regex_names_the_field(self, field, value):
    # Was a bare re.error.
    with self.assertRaisesRegex(ValueError, rf"config.{field}\[0\].* is not a valid regex"):
      adapters.lora_spec_from_config(_params(), _config(**{field: value}))

  @parameterized.named_parameters(
      ("alpha_zero", "alpha", 0.0), ("alpha_nan", "alpha", float("nan")),
      ("alpha_inf", "alpha", float("inf")), ("init_stddev_zero", "init_stddev", 0.0),
      ("init_stddev_nan", "init_stddev", float("nan")), ("dtype_int8", "dtype", "int8"),
      ("dropout", "dropout", 1.5))
  def test_adapt_refuses_degenerate_values(self, field, value):
    # These were accepted and trained nothing (alpha, init_stddev), failed
    # inside jax.grad (dtype) or at the first step (dropout).
    config = _config(**{field: value})
    model = xrapture.transform(lambda x: hk.Linear(3)(x), config)
    x = jnp.ones((2, 4))
    base = model.init(jax.random.PRNGKey(0), x)
    with self.assertRaisesRegex(ValueError, rf"config.{field} = "):
      model.adapt(jax.random.PRNGKey(1), base)
    with self.assertRaisesRegex(ValueError, rf"config.{field} = "):
      model.lora_spec(base)
    setattr(config, field, getattr(xrapture.default_config(), field))  # positive control
    self.assertIsInstance(model.adapt(jax.random.PRNGKey(1), base)["linear"]["w"],
                          LoraWeight)

  @parameterized.parameters("targets", "full")
  def test_integer_params(self, field):
    params = {"lin": {"w": jnp.ones((4, 6))}, "table": {"ids": jnp.ones((4, 6), jnp.int32)}}
    with self.assertRaisesRegex(ValueError, r"'table/ids' has integer dtype int32"):
      adapters.lora_spec_from_config(params, _config(**{field: (".*",)}))

  def test_integer_vectors_are_not_trained_by_tune_vectors(self):
    params = {"lin": {"w": jnp.ones((4, 6)), "b": jnp.ones(6)},
              "step": {"n": jnp.zeros(1, jnp.int32)}}
    lora_spec = adapters.lora_spec_from_config(params, _config(tune_vectors=True))
    self.assertEqual(lora_spec["lin"]["b"], FULL)
    self.assertEqual(lora_spec["step"]["n"], FREEZE)


class InitLoraWeightTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("matrix", (5, 7), "io", (3, 7), (5, 3)),
      ("stack", (4, 5, 7), "sio", (4, 3, 7), (4, 5, 3)),
      ("conv1d", (4, 5, 7), "iio", (3, 7), (4, 5, 3)),
      ("conv2d", (3, 2, 5, 7), "iiio", (3, 7), (3, 2, 5, 3)),
      ("stack_of_conv", (4, 2, 5, 7), "siio", (4, 3, 7), (4, 2, 5, 3)),
      ("multi_axis_out", (5, 2, 7), "ioo", (3, 2, 7), (5, 3)),
      ("kernel_layout", (5, 2, 7), layout_lib.KernelLayout("oio"), (3, 5, 7), (2, 3)))
  def test_shapes(self, shape, layout, a_shape, b_shape):
    w = jnp.ones(shape)
    lw = adapters.init_lora_weight(jax.random.PRNGKey(0), w, 3, 6.0, layout, 0.01)
    self.assertIs(lw.w, w)
    self.assertEqual((lw.a.shape, lw.b.shape), (a_shape, b_shape))
    np.testing.assert_array_equal(lw.b, 0.0)
    self.assertEqual(lw.get_scale(), 2.0)
    np.testing.assert_array_equal(lw.materialize(), w)

  def test_init_distribution_dtype_and_rslora(self):
    w = jnp.ones((256, 128), jnp.float32)
    lw = adapters.init_lora_weight(jax.random.PRNGKey(0), w, 64, 16.0,
                                   "io", 0.25, "bfloat16", rslora=True)
    self.assertEqual((lw.a.dtype, lw.b.dtype), (jnp.bfloat16, jnp.bfloat16))
    a = np.asarray(lw.a, np.float32)
    self.assertAlmostEqual(float(a.std()), 0.25, delta=0.01)
    self.assertAlmostEqual(float(a.mean()), 0.0, delta=0.01)
    self.assertEqual(lw.get_scale(), 16.0 / math.sqrt(64))

  def test_stacked_layers_get_independent_adapters(self):
    lw = adapters.init_lora_weight(jax.random.PRNGKey(0), jnp.ones((3, 8, 8)), 2, 1.0,
                                   "sio", 0.1)
    self.assertFalse(np.array_equal(lw.a[0], lw.a[1]))


def _count_expected(shapes_layouts, rank):
  """r·(prod(in) + prod(out)) per stacked element."""
  total = 0
  for shape, layout in shapes_layouts:
    size = {role: int(np.prod([n for n, c in zip(shape, layout) if c == role]))
            for role in "sio"}
    total += size["s"] * rank * (size["i"] + size["o"])
  return total


class AdaptMergeSplitTest(parameterized.TestCase):

  def _adapted(self, config=None, layouts=None):
    config = config or _config(full=("embed/.*",))
    params = _params()
    params["stack"] = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 5)),
                                        jnp.float32)}
    params["conv"] = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 5)),
                                       jnp.float32)}
    lora_spec = adapters.lora_spec_from_config(params, config)
    leaves = jax.tree.leaves(params)
    conv_index = [i for i, x in enumerate(leaves) if x is params["conv"]["w"]][0]

    def layouts_fn(wanted):
      # adapt asks about every targeted kernel (two 2-D, two 3-D here).
      self.assertLen(wanted, 4)
      return layouts or {conv_index: layout_lib.KernelLayout("iio")}
    adapted = adapters.adapt_params(jax.random.PRNGKey(0), params, lora_spec, config, layouts_fn)
    return params, adapted, lora_spec

  def test_adapt_params(self):
    params, adapted, _ = self._adapted()
    self.assertIs(adapted["embed"]["embeddings"], params["embed"]["embeddings"])
    self.assertIs(adapted["norm"]["scale"], params["norm"]["scale"])
    self.assertIs(adapted["mlp/~/linear_0"]["b"], params["mlp/~/linear_0"]["b"])
    self.assertEqual(adapted["stack"]["w"].a.shape, (3, 2, 5))  # no layout given: stacked
    self.assertEqual(adapted["conv"]["w"].a.shape, (2, 5))
    self.assertEqual(adapted["conv"]["w"].b.shape, (3, 4, 2))
    self.assertEqual(adapted["mlp/~/linear_0"]["w"].alpha, 16.0)
    # Different keys per leaf.
    self.assertFalse(np.array_equal(adapted["mlp/~/linear_0"]["w"].a[:, :3],
                                    adapted["mlp/~/linear_1"]["w"].a[:, :3]))

  def test_adapt_params_alpha_pattern(self):
    config = _config(alpha_pattern=(("conv/w", 3.0), (".*", 5.0)), rslora=True)
    _, adapted, _ = self._adapted(config)
    self.assertEqual(adapted["conv"]["w"].alpha, 3.0)
    self.assertEqual(adapted["stack"]["w"].alpha, 5.0)
    self.assertTrue(adapted["stack"]["w"].rslora)

  def test_adapt_params_rejects_a_lora_spec_of_another_tree(self):
    with self.assertRaisesRegex(ValueError, "lora_spec has 1 leaves"):
      adapters.adapt_params(jax.random.PRNGKey(0), _params(), {"x": 2}, _config(),
                            lambda wanted: {})

  @parameterized.parameters(False, True)
  def test_merge_params_against_numpy(self, destructive):
    _, adapted, _ = self._adapted()
    rng = np.random.default_rng(5)
    trained = xrapture.tree_map_with_implicit(
        lambda x: x.replace(a=jnp.asarray(rng.normal(size=x.a.shape), jnp.float32),
                            b=jnp.asarray(rng.normal(size=x.b.shape), jnp.float32))
        if isinstance(x, LoraWeight) else x, adapted)
    expected = {}
    for module, subscripts in (("mlp/~/linear_0", "mr,rn->mn"), ("stack", "lmr,lrn->lmn"),
                         ("conv", "kmr,rn->kmn")):
      lw = trained[module]["w"]
      w, a, b = (np.asarray(t, np.float64) for t in (lw.w, lw.a, lw.b))
      expected[module] = w + (16.0 / 2) * np.einsum(subscripts, b, a)
    # Hand-written for the conv: one low-rank pair spanning the window, so
    # the [3·4, 5] matrix has rank 2.
    lw = trained["conv"]["w"]
    for k in range(3):
      np.testing.assert_allclose(
          expected["conv"][k],
          np.asarray(lw.w[k], np.float64) + 8.0 * np.asarray(lw.b[k], np.float64)
          @ np.asarray(lw.a, np.float64), rtol=1e-12)
    delta = (expected["conv"] - np.asarray(lw.w, np.float64)).reshape(12, 5)
    self.assertEqual(np.linalg.matrix_rank(delta), 2)
    embeddings = trained["embed"]["embeddings"]
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      merged = xrapture.merge_params(trained, destructive=destructive)
    for module, want in expected.items():
      got = merged[module]["w"]
      self.assertNotIsInstance(got, LoraWeight)
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    self.assertIs(merged["embed"]["embeddings"], embeddings)

  def test_merge_keeps_base_dtype(self):
    w = jnp.ones((4, 6), jnp.bfloat16)
    lw = LoraWeight(w, jnp.ones((2, 6), jnp.float32), jnp.ones((4, 2), jnp.float32), alpha=2.0)
    merged = xrapture.merge_params({"w": lw})["w"]
    self.assertEqual(merged.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(merged, jnp.full((4, 6), 3.0, jnp.bfloat16))

  def test_split_and_count(self):
    params, adapted, lora_spec = self._adapted()
    split = xrapture.split_lora_params(adapted, lora_spec)
    self.assertIs(split["embed"]["embeddings"], params["embed"]["embeddings"])  # full
    self.assertIs(split["norm"]["scale"], xrapture.EmptyNode)
    self.assertIs(split["stack"]["w"].w, xrapture.EmptyNode)
    self.assertIs(split["stack"]["w"].a, adapted["stack"]["w"].a)
    expected = _count_expected([((4, 6), "io"), ((6, 3), "io"), ((3, 4, 5), "sio"),
                                ((3, 4, 5), "iio")], 2) + 10 * 4
    self.assertEqual(expected, 2 * (10 + 9 + 3 * 9 + 17) + 40)
    self.assertEqual(xrapture.count_trainable(adapted, lora_spec), expected)
    self.assertEqual(sum(x.size for x in jax.tree.leaves(split)), expected)
    # No adapters: the count is the full leaves only (zero here).
    self.assertEqual(xrapture.count_trainable(params, jax.tree.map(lambda _: FREEZE, params)),
                     0)

  def test_split_round_trips_through_jit(self):
    _, adapted, lora_spec = self._adapted()
    split = xrapture.split_lora_params(adapted, lora_spec)
    again = jax.jit(lambda t: t)(split)
    self.assertEqual(jax.tree.structure(again), jax.tree.structure(split))


if __name__ == "__main__":
  absltest.main()
