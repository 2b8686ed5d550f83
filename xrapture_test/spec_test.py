"""Tests for xrapture.default_spec and the spec lookups (xrapture/_src/transform/spec.py)."""

import re
import types

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import xrapture
from xrapture._src.transform import spec as spec_lib

_FIELDS = dict(rank=8, alpha=16.0, targets=(".*/w",), full=(), tune_vectors=False,
               rslora=False, init_stddev=0.01, dtype=None, rank_pattern=(),
               alpha_pattern=(), dropout=0.0, init="default", use_dora=False)


class DefaultSpecTest(parameterized.TestCase):

  def test_fields_and_defaults(self):
    spec = xrapture.default_spec()
    self.assertIsInstance(spec, ml_collections.ConfigDict)
    self.assertEqual(set(spec.keys()), set(_FIELDS))
    for name, value in _FIELDS.items():
      self.assertEqual(spec[name], value, name)
      self.assertEqual(type(spec[name]), type(value), name)  # pylint: disable=unidiomatic-typecheck

  def test_every_field_is_documented(self):
    doc = xrapture.default_spec.__doc__
    for name in _FIELDS:
      self.assertRegex(doc, rf"\n\s+{name}: ", name)

  @parameterized.parameters("ranks", "target", "lora_dropout", "r")
  def test_unknown_field_is_an_error(self, name):
    spec = xrapture.default_spec()
    with self.assertRaisesRegex(AttributeError, f"{name}.*locked"):
      setattr(spec, name, 1)

  def test_wrong_type_is_an_error(self):
    spec = xrapture.default_spec()
    with self.assertRaises(TypeError):
      spec.rank = "eight"
    with self.assertRaises(TypeError):
      spec.rank_pattern = {"a/w": 2}  # regex keys cannot be ConfigDict keys: pairs

  def test_fields_can_be_set(self):
    spec = xrapture.default_spec()
    spec.rank = 4
    spec.alpha = 8  # an int is accepted for a float field
    spec.dtype = "bfloat16"
    spec.rank_pattern = (("attn/.*", 16),)
    spec.dropout = 0.1
    self.assertEqual((spec.rank, spec.alpha, spec.dtype), (4, 8.0, "bfloat16"))
    spec.dtype = None
    self.assertIsNone(spec.dtype)

  def test_each_call_is_a_new_spec(self):
    first = xrapture.default_spec()
    first.rank = 2
    self.assertEqual(xrapture.default_spec().rank, 8)

  def test_default_targets(self):
    targets = xrapture.default_spec().targets
    for path in ("mlp/~/linear_0/w", "conv2_d/w", "~/w",
                 "__layer_stack_no_per_layer/multi_head_attention/query/w"):
      self.assertTrue(spec_lib.matches_any(targets, path), path)
    for path in ("embed/embeddings", "linear/b", "layer_norm/scale", "mlp/~/linear_0/w2",
                 "w"):
      self.assertFalse(spec_lib.matches_any(targets, path), path)


class LookupTest(parameterized.TestCase):

  def _spec(self, **kw):
    spec = xrapture.default_spec()
    for k, v in kw.items():
      setattr(spec, k, v)
    return spec

  def test_rank_for(self):
    spec = self._spec(rank=4, rank_pattern=((".*attn.*", 16), (".*/query/w", 2)))
    self.assertEqual(spec_lib.rank_for(spec, "mlp/~/linear_0/w"), 4)
    self.assertEqual(spec_lib.rank_for(spec, "attn/query/w"), 16)  # first match wins
    self.assertEqual(spec_lib.rank_for(spec, "mha/query/w"), 2)

  def test_alpha_for(self):
    spec = self._spec(alpha=8.0, alpha_pattern=(("head/w", 1),))
    self.assertEqual(spec_lib.alpha_for(spec, "head/w"), 1.0)
    self.assertIsInstance(spec_lib.alpha_for(spec, "head/w"), float)
    self.assertEqual(spec_lib.alpha_for(spec, "body/head/w"), 8.0)  # fullmatch

  def test_patterns_as_mapping(self):
    spec = types.SimpleNamespace(rank=3, rank_pattern={"a/w": 5}, alpha=1.0,
                                 alpha_pattern={"b/.*": 2.0})
    self.assertEqual(spec_lib.rank_for(spec, "a/w"), 5)
    self.assertEqual(spec_lib.rank_for(spec, "b/w"), 3)
    self.assertEqual(spec_lib.alpha_for(spec, "b/w"), 2.0)

  def test_matches_any_is_fullmatch(self):
    self.assertTrue(spec_lib.matches_any(["lin.*"], "linear/w"))
    self.assertFalse(spec_lib.matches_any(["linear"], "linear/w"))
    self.assertFalse(spec_lib.matches_any([], "linear/w"))
    with self.assertRaises(re.error):
      spec_lib.matches_any(["("], "x")


if __name__ == "__main__":
  absltest.main()
