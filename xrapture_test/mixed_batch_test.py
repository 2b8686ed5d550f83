"""Tests for per-example adapters in one batch (mixed_lora.py, mixed_batch.py).

Reference: each example run alone through the plain Haiku model with its
adapter merged into dense weights (``merge_adapter``), or the base params
for ``"__base__"``: nothing of the mixed-batch code is involved.
"""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import xrapture
from xrapture._src.lora import dora
from xrapture._src.testing import dense_check

VOCAB, DIM, HIDDEN, LAYERS, SEQ = 13, 8, 12, 2, 5


def _forward(ids):
  embed = hk.Embed(VOCAB, DIM, name="embed")
  h = embed(ids)

  def block(h):
    q, k, v = (hk.Linear(DIM, name=n)(h) for n in ("q", "k", "v"))
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(DIM))
    h = h + hk.Linear(DIM, name="o")(jnp.einsum("bts,bsd->btd", att, v))
    return h + hk.Linear(DIM, name="down")(jnp.tanh(hk.Linear(HIDDEN, name="up")(h)))

  h = hk.layer_stack(LAYERS)(block)(h)
  return h @ embed.embeddings.T           # tied unembedding


def _config(rank, targets):
  config = xrapture.default_config()
  config.rank, config.alpha, config.targets = rank, 2.0 * rank, targets
  return config


def _randomize(params, seed):
  """Non-zero factors everywhere (adapt() starts b at zero)."""
  rng = np.random.default_rng(seed)
  def one(x):
    if isinstance(x, xrapture.LoraWeight):
      return x.replace(a=jnp.asarray(rng.normal(0, 0.3, x.a.shape), x.a.dtype),
                       b=jnp.asarray(rng.normal(0, 0.3, x.b.shape), x.b.dtype))
    return x
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))


class MixedBatchTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ids = np.random.default_rng(0).integers(0, VOCAB, (6, SEQ)).astype(np.int32)
    plain = hk.transform(_forward)
    cls.base = jax.jit(plain.init)(jax.random.PRNGKey(0), cls.ids)
    cls.plain_apply = staticmethod(jax.jit(plain.apply))
    adapters = xrapture.AdapterSet(cls.base)
    # Different ranks and targets: "c" has no embedding adapter, "d" only attention.
    for seed, (name, rank, targets) in enumerate((
        ("a", 2, (r".*/w", r"embed/embeddings")), ("b", 4, (r".*/w", r"embed/embeddings")),
        ("c", 3, (r".*/w",)), ("d", 1, (r".*/(q|v)/w",)))):
      model = xrapture.transform(_forward, _config(rank, targets))
      params = _randomize(model.adapt(jax.random.PRNGKey(seed), cls.base, cls.ids), seed)
      adapters = xrapture.add_adapter(adapters, name, params)
    cls.adapters = adapters
    cls.apply = staticmethod(xrapture.use_implicit_args(plain.apply))
    cls.stacked = xrapture.mixed_adapter_params(adapters)

  def _reference(self, choice):
    """Each example alone, through the plain model with dense merged weights."""
    rows = []
    for e, name in enumerate(choice):
      params = (self.base if name == "__base__"
                else xrapture.merge_adapter(self.adapters, name))
      rows.append(np.asarray(self.plain_apply(params, None, self.ids[e:e + 1]))[0])
    return np.stack(rows)

  def test_each_example_runs_its_own_adapter(self):
    choice = ["c", "__base__", "a", "d", "b", "a"]
    params = xrapture.with_adapter_ids(self.stacked, choice)
    with xrapture.strict_mode():
      got = self.apply(params, None, self.ids)
    want = self._reference(choice)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Positive control: the adapters differ from each other and from the base.
    for e, name in enumerate(choice):
      other = self._reference(["a" if name != "a" else "b"] * 6)[e]
      self.assertGreater(np.abs(want[e] - other).max(), 1e-3, name)

  def test_jit_with_traced_ids(self):
    names = self.adapters.names
    run = jax.jit(lambda stacked, ids, x: self.apply(
        xrapture.with_adapter_ids(stacked, ids), None, x))
    for choice in (["a", "b", "c", "d", "a", "b"], ["__base__", "d", "d", "c", "b", "a"]):
      ids = jnp.asarray([-1 if n == "__base__" else names.index(n) for n in choice])
      np.testing.assert_allclose(run(self.stacked, ids, self.ids), self._reference(choice),
                                 rtol=2e-5, atol=2e-5)
    # A traced id out of range poisons its own example only (NaN), never
    # silently runs another adapter.
    out = np.asarray(run(self.stacked, jnp.asarray([0, 7, 1, -1, -3, 2]), self.ids))
    self.assertTrue(np.isnan(out[[1, 4]]).all())
    self.assertFalse(np.isnan(out[[0, 2, 3, 5]]).any())

  def test_no_per_example_dense_weight(self):
    params = xrapture.with_adapter_ids(self.stacked, [0, 1, 2, 3, -1, 0])
    shapes = [(DIM, DIM), (DIM, HIDDEN), (HIDDEN, DIM), (VOCAB, DIM)]
    dense_check.assert_no_dense_product(
        lambda p, x: self.apply(p, None, x), params, self.ids, shapes=shapes)
    # Positive control: per-example dense weights (w + b_e @ a_e) are caught.
    w = self.base["embed"]["embeddings"]
    b = jnp.ones((6, VOCAB, 2))
    a = jnp.ones((6, 2, DIM))
    naive = lambda x, w, b, a: jnp.einsum("ev,evd->ed", x, w + b @ a)
    self.assertNotEmpty(dense_check.find_dense_products(
        naive, jnp.ones((6, VOCAB)), w, b, a, shapes=[(VOCAB, DIM)]))

  def test_subset_of_adapters_in_slot_order(self):
    stacked = xrapture.mixed_adapter_params(self.adapters, ["d", "a"])
    got = self.apply(xrapture.with_adapter_ids(stacked, [0, 1, -1, 1, 0, 0]), None, self.ids)
    np.testing.assert_allclose(got, self._reference(["d", "a", "__base__", "a", "d", "d"]),
                               rtol=2e-5, atol=2e-5)

  def test_bad_ids(self):
    with self.assertRaisesRegex(ValueError, r"ids \[-2, 4\] out of range.*-1.*3"):
      xrapture.with_adapter_ids(self.stacked, [0, 4, -2, 1, 1, 1])
    with self.assertRaisesRegex(ValueError, r"\['zz'\] are not in this mixed batch.*'a'"):
      xrapture.with_adapter_ids(self.stacked, ["a", "zz", "a", "a", "a", "a"])
    with self.assertRaisesRegex(ValueError, "4 adapter ids for a batch of 6"):
      self.apply(xrapture.with_adapter_ids(self.stacked, [0, 1, 2, 3]), None, self.ids)
    with self.assertRaisesRegex(ValueError, "with_adapter_ids"):
      self.apply(self.stacked, None, self.ids)
    with self.assertRaisesRegex(ValueError, "No adapter named 'zz'"):
      xrapture.mixed_adapter_params(self.adapters, ["a", "zz"])
    with self.assertRaisesRegex(ValueError, "no MixedLoraWeight"):
      xrapture.with_adapter_ids(self.base, [0])

  def test_dora_adapters_are_refused(self):
    params = xrapture.adapter_params(self.adapters, "a")
    doras = jax.tree.map(lambda v: dora.from_lora(v) if isinstance(v, xrapture.LoraWeight)
                         else v, params,
                         is_leaf=lambda v: isinstance(v, xrapture.LoraWeight))
    adapters = xrapture.add_adapter(self.adapters, "dora", doras)
    with self.assertRaisesRegex(ValueError, "DoRA"):
      xrapture.mixed_adapter_params(adapters, ["a", "dora"])

  def test_unsupported_use_is_a_clear_error(self):
    params = xrapture.with_adapter_ids(self.stacked, [0] * 6)
    fn = xrapture.use_implicit_args(lambda p: jnp.sin(p["embed"]["embeddings"]))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with self.assertRaisesRegex(ValueError, "no single dense value.*adapter_params"):
        fn(params)


if __name__ == "__main__":
  absltest.main()
