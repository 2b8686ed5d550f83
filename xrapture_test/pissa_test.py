"""Tests for PiSSA initialization and its export rule (xrapture/_src/transform/pissa.py).

References: numpy's SVD of the grouped matrix; real PEFT's
``init_lora_weights="pissa"`` on a torch twin; and the converted export
loaded by ``peft.PeftModel.from_pretrained`` on the ORIGINAL torch base.
"""

import json
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors

import xrapture
from xrapture._src.lora import lora_weight
from xrapture._src.testing import optional
from xrapture._src.testing import reference
from xrapture._src.transform import pissa

import test_utils

torch, peft = optional.modules("torch", "peft")
nn = torch.nn if torch is not None else None

IN, HIDDEN, OUT = 7, 9, 5


def _np_delta(lora):
  return reference.delta(lora, np.asarray(lora.a, np.float64),
                         np.asarray(lora.b, np.float64), np)


class PissaInitTest(parameterized.TestCase):

  @parameterized.parameters(("io", (12, 10), 3), ("iio", (3, 4, 10), 4),
                            ("sio", (2, 12, 10), 3), ("oii", (10, 3, 4), 2))
  def test_top_r_part_and_residual(self, layout, shape, r):
    w = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    a_shape, b_shape = lora_weight.factor_shapes(shape, layout, r)
    lora = xrapture.LoraWeight(w, jnp.zeros(a_shape), jnp.zeros(b_shape), alpha=2.0,
                               layout=layout)
    init = pissa.pissa_init(lora)
    delta = _np_delta(init)
    # w keeps the residual: residual + update is the original kernel.
    np.testing.assert_allclose(np.asarray(init.w, np.float64) + delta, w, atol=2e-5)
    # The update is the top-r part of the grouped matrix's SVD (numpy's).
    groups = lora_weight.groups(layout)
    order = sum(groups, ())
    s_shape = tuple(shape[d] for d in groups[0])
    m, n = lora.grouped_shape
    grouped = np.transpose(np.asarray(w, np.float64), order).reshape(s_shape + (m, n))
    u, s, vh = np.linalg.svd(grouped, full_matrices=False)
    top = np.einsum("...ik,...k,...kj->...ij", u[..., :r], s[..., :r], vh[..., :r, :])
    got = np.transpose(delta, order).reshape(s_shape + (m, n))
    np.testing.assert_allclose(got, top, atol=2e-5)
    # b and a are U_r·sqrt(S_r/s) and sqrt(S_r/s)·V_rᵀ: orthogonal, equal norms.
    b = np.asarray(init.b, np.float64).reshape(s_shape + (m, r))
    a = np.asarray(init.a, np.float64).reshape(s_shape + (r, n))
    want = np.einsum("...k,kl->...kl", s[..., :r] / init.get_scale(), np.eye(r))
    np.testing.assert_allclose(np.swapaxes(b, -1, -2) @ b, want, atol=1e-4)
    np.testing.assert_allclose(a @ np.swapaxes(a, -1, -2), want, atol=1e-4)

  def test_transform_starts_equal_to_the_base(self):
    config = xrapture.default_config()
    config.rank, config.init = 2, "pissa"
    forward = lambda x: hk.Linear(OUT)(jnp.tanh(hk.Linear(HIDDEN)(x)))
    model = xrapture.transform(forward, config)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, IN)), jnp.float32)
    base = model.init(jax.random.PRNGKey(0), x)
    params = model.adapt(jax.random.PRNGKey(1), base)
    np.testing.assert_allclose(model.apply(params, None, x),
                               hk.transform(forward).apply(base, None, x), atol=1e-5)
    self.assertGreater(np.abs(params["linear"]["w"].w - base["linear"]["w"]).max(), 0.1)
    config.init = "olora"
    with self.assertRaisesRegex(ValueError, r"config.init must be one of \('default', 'pissa'\)"):
      xrapture.transform(forward, config).adapt(jax.random.PRNGKey(1), base)


def _forward(x):
  return hk.Linear(OUT, name="head")(jnp.tanh(hk.Linear(HIDDEN, name="up")(x)))


_NAME_MAP = {"up/w": "up", "head/w": "head"}


def _data():
  """Inputs, targets and the base params of ``_forward``."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, IN)).astype(np.float32)
  y = rng.normal(size=(6, OUT)).astype(np.float32)
  return x, y, hk.transform(_forward).init(jax.random.PRNGKey(0), x)


@absltest.skipIf(peft is None, optional.MISSING)
class PissaPeftTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x, self.y, self.base = _data()
    self.model = _pissa_model()
    self.config = self.model.config
    self.tmp = test_utils.tmpdir(self)

  def _torch(self):
    model = nn.Sequential()
    model.up, model.act, model.head = nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)
    b = self.base
    state = {"up.weight": b["up"]["w"].T, "up.bias": b["up"]["b"],
             "head.weight": b["head"]["w"].T, "head.bias": b["head"]["b"]}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()

  def test_init_matches_peft(self):
    model = peft.get_peft_model(self._torch(), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["up", "head"], init_lora_weights="pissa"))
    params = self.model.adapt(jax.random.PRNGKey(1), self.base)
    for name in ("up", "head"):
      layer = getattr(model.base_model.model, name)
      residual = layer.base_layer.weight.detach().numpy().T
      np.testing.assert_allclose(params[name]["w"].w, residual, atol=1e-5)
      update = (layer.scaling["default"] * layer.lora_B["default"].weight
                @ layer.lora_A["default"].weight).detach().numpy().T
      np.testing.assert_allclose(_np_delta(params[name]["w"]), update, atol=1e-5)

  def test_trained_export_loads_on_the_original_base(self):
    initial = self.model.adapt(jax.random.PRNGKey(1), self.base)
    lora_spec = self.model.lora_spec(self.base)
    tx = xrapture.wrap_optimizer(optax.adam(3e-2), lora_spec)
    params, state = initial, tx.init(initial)
    loss = lambda p: jnp.mean((self.model.apply(p, None, self.x) - self.y) ** 2)
    for _ in range(2):
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    want = np.asarray(self.model.apply(params, None, self.x))
    base_out = np.asarray(hk.transform(_forward).apply(self.base, None, self.x))
    self.assertGreater(np.abs(want - base_out).max(), 1e-3)   # training moved it

    with self.assertRaisesRegex(ValueError, "PiSSA.*initial="):
      xrapture.export_peft(self.tmp + "/x", params, self.config, _NAME_MAP)
    plain_config = xrapture.default_config()
    plain_config.rank = 2
    wrong = xrapture.transform(_forward, plain_config).adapt(jax.random.PRNGKey(1), self.base)
    with self.assertRaisesRegex(ValueError, "initial params for 'head/w'.*does not belong"):
      xrapture.export_peft(self.tmp + "/x", params, self.config, _NAME_MAP, initial=wrong)

    path = os.path.join(self.tmp, "converted")
    xrapture.export_peft(path, params, self.config, _NAME_MAP, initial=initial)
    with open(os.path.join(path, "adapter_config.json")) as f:
      config = json.load(f)
    self.assertEqual((config["r"], config["lora_alpha"], config["init_lora_weights"]),
                     (4, 6, True))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      loaded = peft.PeftModel.from_pretrained(self._torch(), path).eval()
    with torch.no_grad():
      got = loaded(torch.from_numpy(self.x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Positive control: the trained factors alone on the original base differ.
    unconverted = os.path.join(self.tmp, "unconverted")
    xrapture.export_peft(unconverted, params, None, _NAME_MAP)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      wrong_model = peft.PeftModel.from_pretrained(self._torch(), unconverted).eval()
    with torch.no_grad():
      self.assertGreater(np.abs(wrong_model(torch.from_numpy(self.x)).numpy() - want).max(),
                         1e-2)
    # And import_peft of the converted file onto the original base reproduces it.
    back = xrapture.import_peft(path, self.base, _NAME_MAP)
    np.testing.assert_allclose(
        xrapture.use_implicit_args(hk.transform(_forward).apply)(back, None, self.x),
        want, atol=1e-5)


def _pissa_model(**fields):
  config = xrapture.default_config()
  config.rank, config.alpha, config.init = 2, 3.0, "pissa"
  for k, v in fields.items():
    setattr(config, k, v)
  return xrapture.transform(_forward, config)


def _trained(model, initial, x, y):
  """``initial`` after two Adam steps on a regression loss."""
  lora_spec = jax.tree.map(lambda p: 2 if isinstance(p, xrapture.LoraWeight) else 0,
                           initial, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))
  tx = xrapture.wrap_optimizer(optax.adam(3e-2), lora_spec)
  params, state = initial, tx.init(initial)
  loss = lambda p: jnp.mean((model.apply(p, None, x) - y) ** 2)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _header(path):
  with safetensors.safe_open(path, framework="numpy") as f:
    return json.loads(f.metadata()["xrapture"])


class PissaAdapterFileTest(absltest.TestCase):
  """save_adapter / load_adapter of PiSSA adapters: onto the residual, or converted."""

  def setUp(self):
    super().setUp()
    self.x, self.y, self.base = _data()
    self.model = _pissa_model()
    self.lora_spec = self.model.lora_spec(self.base, self.x)
    self.initial = self.model.adapt(jax.random.PRNGKey(1), self.base)
    self.params = _trained(self.model, self.initial, self.x, self.y)
    self.want = np.asarray(self.model.apply(self.params, None, self.x))
    self.path = os.path.join(test_utils.tmpdir(self), "adapter.safetensors")

  def apply(self, params):
    return np.asarray(xrapture.use_implicit_args(hk.transform(_forward).apply)(
        params, None, self.x))

  def test_plain_file_refuses_the_original_base(self):
    xrapture.save_adapter(self.path, self.params, self.lora_spec)
    header = _header(self.path)
    self.assertEqual(header["format_version"], 2)
    self.assertEqual(len(header["entries"]["up/w"]["residual"]["values"]), IN * HIDDEN)
    with self.assertRaises(ValueError) as ctx:
      xrapture.load_adapter(self.path, self.base)
    message = str(ctx.exception)
    for part in (self.path, "'head/w', 'up/w'", "PiSSA", "model.adapt(rng, base_params)",
                 "initial="):
      self.assertIn(part, message)
    # Positive control: the factors on the original kernels compute something else.
    lora = lambda p, w: p.replace(w=w, residual=False)
    wrong = {name: dict(self.params[name], w=lora(self.params[name]["w"],
                                                   self.base[name]["w"]))
             for name in ("up", "head")}
    self.assertGreater(np.abs(self.apply(wrong) - self.want).max(), 1e-2)

  def test_plain_file_loads_onto_the_residual(self):
    xrapture.save_adapter(self.path, self.params, self.lora_spec)
    # The residual as model.adapt gives it again, or as plain kernels.
    residual = self.model.adapt(jax.random.PRNGKey(7), self.base)
    kernels = jax.tree.map(lambda p: p.w if isinstance(p, xrapture.LoraWeight) else p,
                           residual, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))
    for onto in (residual, kernels):
      loaded = xrapture.load_adapter(self.path, onto)
      for name in ("up", "head"):
        got, trained = loaded[name]["w"], self.params[name]["w"]
        self.assertTrue(got.residual)
        np.testing.assert_array_equal(got.a, trained.a)
        np.testing.assert_array_equal(got.b, trained.b)
      np.testing.assert_allclose(self.model.apply(loaded, None, self.x), self.want,
                                 rtol=1e-6, atol=1e-6)
    # Saved again, it is still a PiSSA file.
    xrapture.save_adapter(self.path, loaded, self.lora_spec)
    with self.assertRaisesRegex(ValueError, "PiSSA adapters"):
      xrapture.load_adapter(self.path, self.base)

  def test_residual_up_to_rounding(self):
    xrapture.save_adapter(self.path, self.params, self.lora_spec)
    w = np.asarray(self.initial["up"]["w"].w)
    noise = np.random.default_rng(5).normal(size=w.shape)
    onto = lambda w_up: {**self.initial, "up": dict(self.initial["up"], w=w_up)}
    # Recomputed elsewhere: every value off by ~1e-5 of the scale; a few by a lot.
    close = w + 1e-5 * np.abs(w).mean() * noise
    close.reshape(-1)[[3, 30, 50]] += 1.0
    xrapture.load_adapter(self.path, onto(jnp.asarray(close, jnp.float32)))
    # Another kernel near the residual (2%) is not it.
    near = w + 0.02 * np.sqrt(np.mean(w ** 2)) * noise
    with self.assertRaisesRegex(ValueError, r"other kernels .* at 'up/w': the outputs"):
      xrapture.load_adapter(self.path, onto(jnp.asarray(near, jnp.float32)))

  def test_file_with_initial_fits_the_original_base(self):
    xrapture.save_adapter(self.path, self.params, self.lora_spec, initial=self.initial)
    header = _header(self.path)
    self.assertEqual(header["format_version"], 1)
    self.assertNotIn("residual", header["entries"]["up/w"])
    loaded = xrapture.load_adapter(self.path, self.base)
    self.assertEqual((loaded["up"]["w"].rank, loaded["up"]["w"].residual), (4, False))
    # Reference: the original kernels plus s·(b@a - b₀@a₀), by hand in float64.
    dense = {}
    for name in ("up", "head"):
      t, i = self.params[name]["w"], self.initial[name]["w"]
      f64 = lambda v: np.asarray(v, np.float64)
      delta = 1.5 * (f64(t.b) @ f64(t.a) - f64(i.b) @ f64(i.a))   # alpha / r = 3 / 2
      dense[name] = (f64(self.base[name]["w"]) + delta, f64(self.base[name]["b"]))
    h = np.tanh(self.x @ dense["up"][0] + dense["up"][1])
    reference = h @ dense["head"][0] + dense["head"][1]
    np.testing.assert_allclose(reference, self.want, atol=1e-5)
    np.testing.assert_allclose(self.apply(loaded), reference, atol=1e-5)
    # It was not trained on a residual: PiSSA-adapted params refuse it.
    with self.assertRaisesRegex(ValueError, r"'head/w', 'up/w' that were not trained on a "
                                            "residual kernel"):
      xrapture.load_adapter(self.path, self.initial)

  def test_initial_must_be_the_starting_point(self):
    config = xrapture.default_config()
    config.rank = 2
    plain = xrapture.transform(_forward, config)
    wrong = plain.adapt(jax.random.PRNGKey(1), self.base)
    with self.assertRaisesRegex(ValueError, "initial params for 'head/w'.*does not belong"):
      xrapture.save_adapter(self.path, self.params, self.lora_spec, initial=wrong)
    self.assertFalse(os.path.exists(self.path))

  def test_dora(self):
    model = _pissa_model(use_dora=True)
    initial = model.adapt(jax.random.PRNGKey(1), self.base)
    params = _trained(model, initial, self.x, self.y)
    xrapture.save_adapter(self.path, params, self.lora_spec)
    with self.assertRaisesRegex(ValueError, "PiSSA adapters .* at 'head/w', 'up/w'"):
      xrapture.load_adapter(self.path, self.base)
    loaded = xrapture.load_adapter(self.path, initial)
    self.assertIsInstance(loaded["up"]["w"], xrapture.DoraWeight)
    self.assertTrue(loaded["up"]["w"].residual)
    np.testing.assert_allclose(model.apply(loaded, None, self.x),
                               model.apply(params, None, self.x), rtol=1e-6, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "'head/w' is a DoRA adapter: initial="):
      xrapture.save_adapter(self.path, params, self.lora_spec, initial=initial)


def _wide(x):
  """Kernels whose input axes NF4's 64-blocks divide."""
  return hk.Linear(8, name="head")(jnp.tanh(hk.Linear(64, name="up")(x)))


class QuantizedPissaFileTest(absltest.TestCase):
  """QLoRA: a PiSSA adapter trained on the quantized residual; ordinary ones."""

  def setUp(self):
    super().setUp()
    self.x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    self.base = hk.transform(_wide).init(jax.random.PRNGKey(0), self.x)
    self.path = os.path.join(test_utils.tmpdir(self), "adapter.safetensors")

  def model(self, **fields):
    config = xrapture.default_config()
    config.rank, config.alpha = 2, 8.0
    for k, v in fields.items():
      setattr(config, k, v)
    return xrapture.transform(_wide, config)

  def test_pissa_on_the_quantized_residual(self):
    model = self.model(init="pissa", quantize="nf4")
    params = model.adapt(jax.random.PRNGKey(1), self.base)
    self.assertIsInstance(params["up"]["w"].w, xrapture.QuantizedArray)
    xrapture.save_adapter(self.path, params, model.lora_spec(self.base))
    self.assertEqual(_header(self.path)["entries"]["up/w"]["residual"]["quantized"],
                     dict(scheme="nf4", block_size=64, axis=-2, double_quant=False))
    with self.assertRaisesRegex(ValueError, "PiSSA adapters .* at 'head/w', 'up/w'"):
      xrapture.load_adapter(self.path, self.base)
    want = model.apply(params, None, self.x)
    # The quantized residual, or the float one (quantized, it is the same).
    loaded = xrapture.load_adapter(self.path, model.adapt(jax.random.PRNGKey(2), self.base))
    np.testing.assert_allclose(model.apply(loaded, None, self.x), want, atol=1e-6)
    float_residual = self.model(init="pissa").adapt(jax.random.PRNGKey(2), self.base)
    loaded = xrapture.load_adapter(self.path, float_residual)
    for name in ("up", "head"):
      got = loaded[name]["w"]
      self.assertIs(got.w, float_residual[name]["w"].w)
      np.testing.assert_array_equal(got.a, params[name]["w"].a)
      np.testing.assert_array_equal(got.b, params[name]["w"].b)

  def test_initial_converts_from_the_quantized_residual(self):
    # to_plain_lora compares quantized kernels piece by piece.
    model = self.model(init="pissa", quantize="nf4")
    initial = model.adapt(jax.random.PRNGKey(1), self.base)
    rng = np.random.default_rng(4)
    params = jax.tree.map(
        lambda p: p.replace(a=p.a + 0.1 * rng.normal(size=p.a.shape).astype(np.float32))
        if isinstance(p, xrapture.LoraWeight) else p,
        initial, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))
    xrapture.save_adapter(self.path, params, model.lora_spec(self.base), initial=initial)
    loaded = xrapture.load_adapter(self.path, self.base)
    # Reference: W + s·(b@a - b₀@a₀) by hand (s = alpha / r = 8 / 2), float64.
    f64 = lambda v: np.asarray(v, np.float64)
    dense = {}
    for name in ("up", "head"):
      t, i = params[name]["w"], initial[name]["w"]
      delta = 4.0 * (f64(t.b) @ f64(t.a) - f64(i.b) @ f64(i.a))
      dense[name] = (f64(self.base[name]["w"]) + delta, f64(self.base[name]["b"]))
    h = np.tanh(self.x @ dense["up"][0] + dense["up"][1])
    reference = h @ dense["head"][0] + dense["head"][1]
    got = xrapture.use_implicit_args(hk.transform(_wide).apply)(loaded, None, self.x)
    np.testing.assert_allclose(got, reference, atol=1e-5)

  def test_ordinary_qlora_adapter_loads_onto_the_float_base(self):
    model = self.model(quantize="nf4")
    params = model.adapt(jax.random.PRNGKey(1), self.base)
    params = jax.tree.map(
        lambda p: p.replace(b=jnp.ones_like(p.b)) if isinstance(p, xrapture.LoraWeight)
        else p, params, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))
    xrapture.save_adapter(self.path, params, model.lora_spec(self.base))
    self.assertEqual(_header(self.path)["format_version"], 1)
    loaded = xrapture.load_adapter(self.path, self.base)
    self.assertIs(loaded["up"]["w"].w, self.base["up"]["w"])
    np.testing.assert_array_equal(loaded["up"]["w"].b, params["up"]["w"].b)


if __name__ == "__main__":
  absltest.main()
