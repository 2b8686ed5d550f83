"""Tests for several adapters over one base (xrapture/_src/transform/multi_adapter.py).

References: each adapter's own params run directly (switching), the base
model (disabling), numpy sums and SVDs of the updates (combinations), and
real PEFT's ``add_weighted_adapter`` on a torch twin of the model.
"""

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import xrapture
from xrapture._src.lora import dora
from xrapture._src.testing import optional
from xrapture._src.testing import reference

import test_utils

torch, peft = optional.modules("torch", "peft")
nn = torch.nn if torch is not None else None

VOCAB, DIM, HIDDEN, OUT = 11, 8, 10, 5


def _forward(ids):
  h = hk.Embed(VOCAB, DIM, name="embed")(ids)
  h = jnp.tanh(hk.Linear(HIDDEN, name="up")(h))
  return hk.Linear(OUT, name="down")(h)


_NAME_MAP = {"embed/embeddings": "embed", "up/w": "up", "down/w": "down"}


def _randomized(params, seed, ranks=None, alpha=3.0):
  """Every kernel of ``params`` with random non-zero factors."""
  rng = np.random.default_rng(seed)
  out = {}
  for module, ps in params.items():
    out[module] = {}
    for name, w in ps.items():
      rank = (ranks or {}).get(module, 2)
      if name in ("w", "embeddings") and rank:
        m, n = w.shape
        out[module][name] = xrapture.LoraWeight(
            w, jnp.asarray(rng.normal(0, 0.3, (rank, n)), jnp.float32),
            jnp.asarray(rng.normal(0, 0.3, (m, rank)), jnp.float32), alpha=alpha)
      else:
        out[module][name] = w
  return out


def _deltas(params):
  """Path -> scale·b@a in float64 numpy."""
  out = {}
  for module, ps in params.items():
    for name, v in ps.items():
      if isinstance(v, xrapture.LoraWeight):
        out[f"{module}/{name}"] = reference.delta(
            v, np.asarray(v.a, np.float64), np.asarray(v.b, np.float64), np)
  return out


class AdapterSetTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.ids = np.random.default_rng(0).integers(0, VOCAB, (2, 4)).astype(np.int32)
    self.base = hk.transform(_forward).init(jax.random.PRNGKey(0), self.ids)
    self.apply = xrapture.use_implicit_args(hk.transform(_forward).apply)
    self.fr = _randomized(self.base, 1)
    self.de = _randomized(self.base, 2, ranks={"up": 3, "embed": 0})
    adapters = xrapture.AdapterSet(self.base)
    adapters = xrapture.add_adapter(adapters, "fr", self.fr)
    self.adapters = xrapture.add_adapter(adapters, "de", self.de)

  def _run(self, params):
    return np.asarray(self.apply(params, None, self.ids))

  def test_switch_disable_delete(self):
    base_out = self._run(self.base)
    self.assertIsNone(self.adapters.active)
    np.testing.assert_array_equal(self._run(xrapture.adapter_params(self.adapters)),
                                  base_out)
    for name, params in (("fr", self.fr), ("de", self.de)):
      active = xrapture.set_adapter(self.adapters, name)
      got = self._run(xrapture.adapter_params(active))
      np.testing.assert_array_equal(got, self._run(params))
      self.assertGreater(np.abs(got - base_out).max(), 1e-3)   # adapters matter
    de = xrapture.set_adapter(self.adapters, "de")
    np.testing.assert_array_equal(
        self._run(xrapture.adapter_params(xrapture.disable_adapters(de))), base_out)
    np.testing.assert_array_equal(self._run(xrapture.adapter_params(de, "__base__")),
                                  base_out)
    gone = xrapture.delete_adapter(de, "de")
    self.assertEqual(gone.names, ("fr",))
    self.assertIsNone(gone.active)
    # The set is a pytree: it goes through jit, the active name static.
    out = jax.jit(lambda s: self.apply(xrapture.adapter_params(s), None, self.ids))(de)
    np.testing.assert_allclose(out, self._run(self.de), rtol=1e-6, atol=1e-6)
    # Only the factors are stored per adapter; the base is shared.
    leaves = jax.tree_util.tree_leaves(self.adapters.adapters["fr"])
    self.assertEqual(sum(x.size for x in leaves),
                     2 * (VOCAB + DIM + DIM + HIDDEN + HIDDEN + OUT))

  def test_unknown_names_list_the_adapters(self):
    for fn in (xrapture.set_adapter, xrapture.delete_adapter,
               lambda s, n: xrapture.adapter_params(s, n)):
      with self.assertRaisesRegex(ValueError, r"No adapter named 'es'.*\['fr', 'de'\]"):
        fn(self.adapters, "es")
    with self.assertRaisesRegex(ValueError, r"'es'.*\['fr', 'de'\]"):
      xrapture.add_weighted_adapter(self.adapters, ["fr", "es"], [1, 1], "x", "cat")

  def test_bad_additions(self):
    with self.assertRaisesRegex(ValueError, "exists already"):
      xrapture.add_adapter(self.adapters, "fr", self.fr)
    with self.assertRaisesRegex(ValueError, "__base__"):
      xrapture.add_adapter(self.adapters, "__base__", self.fr)
    with self.assertRaisesRegex(ValueError, "does not fit the base"):
      xrapture.add_adapter(self.adapters, "x", {"up": self.fr["up"]})
    other = dict(self.fr, up=dict(self.fr["up"], w=xrapture.LoraWeight(
        jnp.zeros((DIM, 4)), jnp.zeros((2, 4)), jnp.zeros((DIM, 2)))))
    with self.assertRaisesRegex(ValueError, r"'up/w'.*\(8, 4\).*\(8, 10\)"):
      xrapture.add_adapter(self.adapters, "x", other)

  def test_full_trained_leaves_belong_to_the_adapter(self):
    lora_spec = jax.tree.map(lambda _: xrapture.LORA_FREEZE, self.base)
    lora_spec["down"]["b"] = xrapture.LORA_FULL
    lora_spec["up"]["w"] = 2
    tuned = dict(self.fr, down=dict(self.fr["down"], b=self.base["down"]["b"] + 1.0))
    adapters = xrapture.add_adapter(xrapture.AdapterSet(self.base), "t", tuned, lora_spec)
    params = xrapture.adapter_params(xrapture.set_adapter(adapters, "t"))
    np.testing.assert_array_equal(params["down"]["b"], tuned["down"]["b"])
    np.testing.assert_array_equal(self._run(params), self._run(tuned))

  @parameterized.parameters("cat", "svd", "linear")
  def test_combinations_against_numpy(self, method):
    weights = [0.7, -0.4]
    fr, de = _deltas(self.fr), _deltas(self.de)
    names = ["fr", "de"]
    if method == "linear":      # equal ranks and targets
      other = _randomized(self.base, 3)
      adapters = xrapture.add_adapter(self.adapters, "it", other)
      names, de = ["fr", "it"], _deltas(other)
    else:
      adapters = self.adapters
    mixed = xrapture.add_weighted_adapter(adapters, names, weights, "mix", method,
                                          svd_rank=2)
    got = xrapture.adapter_params(mixed, "mix")
    for path, d_fr in fr.items():
      module, name = path.split("/")
      lora = got[module][name]
      self.assertEqual(lora.get_scale(), 1.0)
      total = weights[0] * d_fr + weights[1] * de.get(path, 0.0)
      delta = reference.delta(lora, np.asarray(lora.a, np.float64),
                              np.asarray(lora.b, np.float64), np)
      if method == "cat":
        np.testing.assert_allclose(delta, total, atol=1e-5)
        self.assertEqual(lora.rank, 2 + (3 if path == "up/w" else 0 if path ==
                                         "embed/embeddings" else 2))
      elif method == "svd":
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        np.testing.assert_allclose(delta, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)
        self.assertEqual(lora.rank, 2)
      else:
        fa, ia = self.fr[module][name], other[module][name]
        sa, sb = np.sqrt(0.7 * fa.get_scale()), np.sqrt(0.4 * ia.get_scale())
        b = sa * np.asarray(fa.b) - sb * np.asarray(ia.b)
        a = sa * np.asarray(fa.a) + sb * np.asarray(ia.a)
        np.testing.assert_allclose(delta, b @ a, atol=1e-5)
        # Positive control: linear is not the weighted sum of the updates.
        self.assertGreater(np.abs(delta - total).max(), 1e-3)

  def test_svd_of_stacked_multi_axis_kernels(self):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32)   # 'siio'
    base = {"m": {"w": w}}
    def adapter(seed, r):
      g = np.random.default_rng(seed)
      return {"m": {"w": xrapture.LoraWeight(
          w, jnp.asarray(g.normal(size=(3, r, 6)), jnp.float32),
          jnp.asarray(g.normal(size=(3, 4, 5, r)), jnp.float32), alpha=2.0,
          layout="siio")}}
    adapters = xrapture.AdapterSet(base)
    adapters = xrapture.add_adapter(adapters, "p", adapter(1, 2))
    adapters = xrapture.add_adapter(adapters, "q", adapter(2, 3))
    mixed = xrapture.add_weighted_adapter(adapters, ["p", "q"], [1.0, 0.5], "m", "svd",
                                          svd_rank=3)
    lora = xrapture.adapter_params(mixed, "m")["m"]["w"]
    self.assertEqual((lora.layout, lora.rank), ("siio", 3))
    p, q = (xrapture.adapter_params(adapters, n)["m"]["w"] for n in "pq")
    total = (reference.delta(p, np.asarray(p.a, np.float64), np.asarray(p.b, np.float64), np)
             + 0.5 * reference.delta(q, np.asarray(q.a, np.float64),
                                     np.asarray(q.b, np.float64), np)).reshape(3, 20, 6)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    want = np.einsum("lik,lk,lkj->lij", u[..., :3], s[..., :3], vh[..., :3, :])
    got = reference.delta(lora, np.asarray(lora.a, np.float64),
                          np.asarray(lora.b, np.float64), np).reshape(3, 20, 6)
    np.testing.assert_allclose(got, want, atol=1e-4)

  def test_combination_errors(self):
    with self.assertRaisesRegex(ValueError, r"linear.*equal ranks.*'up/w'.*\[2, 3\]"):
      other = _randomized(self.base, 4, ranks={"up": 3})
      adapters = xrapture.add_adapter(self.adapters, "it", other)
      xrapture.add_weighted_adapter(adapters, ["fr", "it"], [1, 1], "mix", "linear")
    with self.assertRaisesRegex(ValueError, r"linear.*same targets.*embed/embeddings"):
      xrapture.add_weighted_adapter(self.adapters, ["fr", "de"], [1, 1], "mix", "linear")
    with self.assertRaisesRegex(ValueError, "combination_type must be one of"):
      xrapture.add_weighted_adapter(self.adapters, ["fr", "de"], [1, 1], "mix", "ties")
    with self.assertRaisesRegex(ValueError, "one weight per adapter"):
      xrapture.add_weighted_adapter(self.adapters, ["fr", "de"], [1], "mix", "cat")
    with self.assertRaisesRegex(ValueError, "taken or reserved"):
      xrapture.add_weighted_adapter(self.adapters, ["fr", "de"], [1, 1], "fr", "cat")
    doras = jax.tree.map(lambda v: dora.from_lora(v) if isinstance(v, xrapture.LoraWeight)
                         else v, self.fr,
                         is_leaf=lambda v: isinstance(v, xrapture.LoraWeight))
    adapters = xrapture.add_adapter(self.adapters, "d", doras)
    with self.assertRaisesRegex(ValueError, "DoRA"):
      xrapture.add_weighted_adapter(adapters, ["fr", "d"], [1, 1], "mix", "cat")

  def test_unmerge_recovers_the_base(self):
    merged = xrapture.merge_adapter(self.adapters, "fr")
    np.testing.assert_allclose(
        hk.transform(_forward).apply(merged, None, self.ids), self._run(self.fr),
        rtol=1e-5, atol=1e-5)
    back = xrapture.unmerge_adapter(merged, self.adapters, "fr")
    for module, ps in self.base.items():
      for name, v in ps.items():
        np.testing.assert_allclose(back[module][name], v, atol=1e-6)
    # Positive control: unmerging another adapter leaves something else.
    wrong = xrapture.unmerge_adapter(merged, self.adapters, "de")
    self.assertGreater(np.abs(wrong["up"]["w"] - self.base["up"]["w"]).max(), 1e-2)
    doras = jax.tree.map(lambda v: dora.from_lora(v) if isinstance(v, xrapture.LoraWeight)
                         else v, self.fr,
                         is_leaf=lambda v: isinstance(v, xrapture.LoraWeight))
    adapters = xrapture.add_adapter(self.adapters, "d", doras)
    with self.assertRaisesRegex(ValueError, "DoRA adapter"):
      xrapture.unmerge_adapter(xrapture.merge_adapter(adapters, "d"), adapters, "d")

  def test_a_pissa_adapter_is_added_for_the_sets_base(self):
    # A PiSSA adapter's kernels are the residual of the base: over the set's
    # (original) base its factors would count the top-r directions twice.
    config = xrapture.default_config()
    config.rank, config.init, config.targets = 2, "pissa", (".*/(w|embeddings)",)
    model = xrapture.transform(_forward, config)
    initial = model.adapt(jax.random.PRNGKey(3), self.base, self.ids)
    trained = jax.tree.map(  # "trained": a and b moved
        lambda x: x + 0.05 if isinstance(x, jax.Array) and x.ndim == 2 and x.shape[0] <= 2 else x,
        initial)
    self.assertNotEqual(_deltas(trained)["up/w"].sum(), _deltas(initial)["up/w"].sum())
    with self.assertRaisesRegex(ValueError, r"'pissa': '\w+/\w+' is a PiSSA adapter.*initial="):
      xrapture.add_adapter(self.adapters, "pissa", trained)
    adapters = xrapture.add_adapter(self.adapters, "pissa", trained, initial=initial)
    # Over the original base, the set's output is the trained model's.
    np.testing.assert_allclose(
        self._run(xrapture.adapter_params(adapters, "pissa")),
        np.asarray(model.apply(trained, None, self.ids)), atol=1e-5)
    # A set over the residual base itself takes it as it is.
    residual = jax.tree.map(lambda x: x.w if isinstance(x, xrapture.LoraWeight) else x,
                            trained, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))
    own = xrapture.add_adapter(xrapture.AdapterSet(residual), "pissa", trained)
    np.testing.assert_allclose(
        self._run(xrapture.adapter_params(own, "pissa")),
        np.asarray(model.apply(trained, None, self.ids)), atol=1e-5)

  def test_facade_exposes_the_same_functions(self):
    facade = xrapture.XRapTure
    adapters = facade.add_adapter(xrapture.AdapterSet(self.base), "fr", self.fr)
    adapters = facade.set_adapter(adapters, "fr")
    np.testing.assert_array_equal(self._run(facade.adapter_params(adapters)),
                                  self._run(self.fr))
    self.assertIsNone(facade.disable_adapters(adapters).active)
    self.assertEqual(facade.delete_adapter(adapters, "fr").names, ())
    mixed = facade.add_weighted_adapter(adapters, ["fr"], [2.0], "x")
    self.assertEqual(mixed.names, ("fr", "x"))
    back = facade.unmerge_adapter(facade.merge_adapter(adapters, "fr"), adapters, "fr")
    np.testing.assert_allclose(back["up"]["w"], self.base["up"]["w"], atol=1e-6)


# ----------------------------------------------------------------------------
# Real PEFT's add_weighted_adapter.

if torch is not None:

  class _Torch(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, DIM)
      self.up = nn.Linear(DIM, HIDDEN)
      self.down = nn.Linear(HIDDEN, OUT)

    def forward(self, ids):
      return self.down(torch.tanh(self.up(self.embed(ids))))


@absltest.skipIf(peft is None, optional.MISSING)
class PeftWeightedAdapterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.ids = np.random.default_rng(0).integers(0, VOCAB, (2, 4)).astype(np.int32)
    self.base = hk.transform(_forward).init(jax.random.PRNGKey(0), self.ids)
    self.apply = xrapture.use_implicit_args(hk.transform(_forward).apply)
    self.tmp = test_utils.tmpdir(self)

  def _torch(self):
    model = _Torch()
    b = self.base
    state = {"embed.weight": b["embed"]["embeddings"], "up.weight": b["up"]["w"].T,
             "up.bias": b["up"]["b"], "down.weight": b["down"]["w"].T,
             "down.bias": b["down"]["b"]}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model

  @parameterized.parameters(("cat", (2, 3)), ("svd", (2, 3)), ("linear", (2, 2)))
  def test_matches_peft(self, method, ranks):
    targets = ["embed", "up", "down"]
    model = peft.get_peft_model(self._torch(), peft.LoraConfig(
        r=ranks[0], lora_alpha=3, target_modules=targets), adapter_name="p")
    model.add_adapter("q", peft.LoraConfig(r=ranks[1], lora_alpha=5,
                                           target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "lora_" in name:
          p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      model.save_pretrained(self.tmp)          # adapters in <tmp>/p? and <tmp>/q
    adapters = xrapture.AdapterSet(self.base)
    for name in ("p", "q"):
      where = self.tmp if name == "p" else os.path.join(self.tmp, name)
      if os.path.isdir(os.path.join(self.tmp, name)):
        where = os.path.join(self.tmp, name)
      adapters = xrapture.add_adapter(
          adapters, name, xrapture.import_peft(where, self.base, _NAME_MAP))
    weights = [0.8, -0.5]
    model.add_weighted_adapter(["p", "q"], weights, "mix", combination_type=method,
                               svd_rank=2)
    model.set_adapter("mix")
    model.eval()
    with torch.no_grad():
      want = model(torch.from_numpy(self.ids).long()).numpy()
    mixed = xrapture.add_weighted_adapter(adapters, ["p", "q"], weights, "mix", method,
                                          svd_rank=2)
    got = self.apply(xrapture.adapter_params(mixed, "mix"), None, self.ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Each PEFT module's combined rank is ours.
    up = xrapture.adapter_params(mixed, "mix")["up"]["w"]
    self.assertEqual(up.rank, model.base_model.model.up.r["mix"])


if __name__ == "__main__":
  absltest.main()
