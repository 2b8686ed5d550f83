"""Tests for gathers from LoraWeights (xrapture/_src/lora/gather.py)."""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.testing import reference

import test_utils

# An embedding table [vocab = M, dim = N].
M, N, R = 48, 40, 4

check = reference.assert_matches_dense


def _lora(seed=0, lead=()):
  return xrapture.LoraWeight(
      test_utils.rand(seed, *lead, M, N, scale=0.2),
      test_utils.rand(seed + 1, *lead, R, N, scale=0.5),
      test_utils.rand(seed + 2, *lead, M, R, scale=0.5), alpha=2.0)


def _embed(lookup_style):
  transformed = hk.without_apply_rng(hk.transform(
      lambda ids: hk.Embed(M, N, lookup_style=lookup_style, name="embed")(ids)))
  return lambda ids, table: transformed.apply({"embed": {"embeddings": table}}, ids)


_ROW_IDS = np.array([[1, 2, 47], [0, 5, 5]], np.int32)
_COLUMN_IDS = np.array([[1, 2, 39], [0, 5, 5]], np.int32)


class GatherTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("rows", _ROW_IDS, lambda ids, w: w[ids]),
      ("rows_vector", _ROW_IDS[0], lambda ids, w: w[ids]),
      ("rows_take", _ROW_IDS, lambda ids, w: jnp.take(w, ids, axis=0)),
      ("rows_take_clip", _ROW_IDS, lambda ids, w: jnp.take(w, ids, axis=0,
                                                           mode="clip")),
      ("columns", _COLUMN_IDS, lambda ids, w: w[:, ids]),
      ("columns_take", _COLUMN_IDS, lambda ids, w: jnp.take(w, ids, axis=1)),
      ("hk_embed_array_index", _ROW_IDS, _embed(hk.EmbedLookupStyle.ARRAY_INDEX)),
      ("hk_embed_one_hot", _ROW_IDS, _embed(hk.EmbedLookupStyle.ONE_HOT)),
  )
  def test_matches_dense(self, ids, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, jnp.asarray(ids), _lora(), grad_x=False)

  def test_gathered_rows_only(self):
    # The low-rank part gathers rows of b: r numbers per token, never M x N.
    fn = xrapture.use_implicit_args(lambda ids, w: w[ids])
    jaxpr = jax.make_jaxpr(fn)(jnp.asarray(_ROW_IDS), _lora())
    gathers = [e for e in jaxpr.eqns if e.primitive.name == "gather"]
    self.assertEqual(sorted(tuple(e.outvars[0].aval.shape) for e in gathers),
                     [(2, 3, R), (2, 3, N)])

  def test_row_gradient(self):
    # Repeated ids accumulate into the same rows of the b gradient.
    lora, ids = _lora(), jnp.asarray([3, 3, 7])
    fn = xrapture.use_implicit_args(lambda ids, w: w[ids])
    db = jax.grad(lambda b: jnp.sum(fn(ids, lora.replace(b=b))))(lora.b)
    s = lora.get_scale()
    expected = np.zeros((M, R), np.float32)
    expected[3] = 2 * s * np.asarray(lora.a).sum(axis=1)
    expected[7] = s * np.asarray(lora.a).sum(axis=1)
    np.testing.assert_allclose(db, expected, rtol=1e-5, atol=1e-6)

  def test_gradient_wrt_w_is_zero(self):
    fn = xrapture.use_implicit_args(lambda ids, w: w[ids])
    grads = jax.grad(lambda lora: jnp.sum(fn(jnp.asarray(_ROW_IDS), lora)))(_lora())
    np.testing.assert_array_equal(grads.w, np.zeros((M, N)))

  def test_stacked_table_materializes_with_warning(self):
    lora = _lora(lead=(2,))
    fn = xrapture.use_implicit_args(lambda ids, w: w[:, ids])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = fn(jnp.asarray(_ROW_IDS[0]), lora)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, xrapture.MaterializationWarning)]
    self.assertTrue(any("gather" in m and "LoraWeight" in m for m in messages),
                    messages)
    np.testing.assert_allclose(out, reference.dense_value(lora)[:, _ROW_IDS[0]],
                               rtol=1e-5, atol=1e-6)


def _layout_lora(shape, layout, r=3, seed=0):
  ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
  outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
  return xrapture.LoraWeight(
      test_utils.rand(seed, *shape, scale=0.2), test_utils.rand(seed + 1, r, *outs, scale=0.5),
      test_utils.rand(seed + 2, *ins, r, scale=0.5), alpha=2.0, layout=layout)


class GatherLayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # A tied table seen from its unembedding first: [V, D] with layout 'oi'.
      ("rows_of_out_group", (9, 6), "oi", lambda ids, w: w[ids]),
      ("columns_of_in_group", (6, 9), "io", lambda ids, w: w[:, ids]),
      # A table whose rows are multi-axis: [V, heads, dim].
      ("rows_multi_axis", (9, 2, 5), "ioo", lambda ids, w: w[ids]),
      ("rows_multi_axis_take", (9, 2, 5), "ioo",
       lambda ids, w: jnp.take(w, ids, axis=0)),
      ("rows_multi_axis_transposed", (2, 9, 5), "oio", lambda ids, w: w[:, ids]),
  )
  def test_matches_dense(self, shape, layout, fn):
    ids = jnp.asarray([[1, 8, 3], [0, 3, 3]], jnp.int32)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, ids, _layout_lora(shape, layout), grad_x=False)

  def test_multi_axis_group_along_the_gathered_axis_materializes(self):
    lora = _layout_lora((9, 2, 5), "iio")
    fn = xrapture.use_implicit_args(lambda ids, w: w[ids])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = fn(jnp.asarray([1, 2]), lora)
    self.assertTrue(any(issubclass(w.category, xrapture.MaterializationWarning)
                        for w in caught))
    np.testing.assert_allclose(out, reference.dense_value(lora)[[1, 2]], rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
