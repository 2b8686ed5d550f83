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
               alpha_pattern=(), dropout=0.0, init="default", use_dora=False,
               quantize=None, quantize_block=64, double_quant=False, quantize_frozen=())


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


class ValidateTest(parameterized.TestCase):

  def _spec(self, **kw):
    spec = xrapture.default_spec()
    for k, v in kw.items():
      setattr(spec, k, v)
    return spec

  def test_default_spec_is_valid(self):
    spec_lib.validate(xrapture.default_spec())

  @parameterized.named_parameters(
      ("rank_pattern_zero_freezes", dict(rank_pattern=(("a/w", 0),))),
      ("low_precision", dict(dtype="bfloat16")),
      ("float16", dict(dtype="float16")),
      ("negative_alpha", dict(alpha=-4.0)),
      ("dropout", dict(dropout=0.5)),
      ("no_targets_no_rank", dict(targets=(), rank=0, full=(".*",))),
      ("nf4", dict(quantize="nf4", quantize_block=128, double_quant=True)),
      ("int8_frozen", dict(quantize="int8", quantize_frozen=(".*/w",))),
  )
  def test_valid_values(self, overrides):
    spec_lib.validate(self._spec(**overrides))

  @parameterized.named_parameters(
      ("rank_zero", dict(rank=0), r"spec.rank = 0 must be an integer >= 1"),
      ("rank_negative", dict(rank=-3), r"spec.rank = -3 must be an integer >= 1"),
      ("alpha_zero", dict(alpha=0.0), r"spec.alpha = 0.0 must be a finite number other than 0"),
      ("alpha_nan", dict(alpha=float("nan")), r"spec.alpha = nan must be a finite"),
      ("alpha_inf", dict(alpha=float("inf")), r"spec.alpha = inf must be a finite"),
      ("init_stddev_zero", dict(init_stddev=0.0),
       r"spec.init_stddev = 0.0 must be a finite number > 0"),
      ("init_stddev_nan", dict(init_stddev=float("nan")), r"spec.init_stddev = nan must be"),
      ("init_stddev_inf", dict(init_stddev=float("inf")), r"spec.init_stddev = inf must be"),
      ("dropout_high", dict(dropout=1.5), r"spec.dropout = 1.5 must be a number in \[0, 1\)"),
      ("dropout_one", dict(dropout=1.0), r"spec.dropout = 1.0 must be a number in \[0, 1\)"),
      ("dropout_negative", dict(dropout=-0.1), r"spec.dropout = -0.1 must be"),
      ("dropout_nan", dict(dropout=float("nan")), r"spec.dropout = nan must be"),
      ("dtype_int8", dict(dtype="int8"),
       r"spec.dtype = 'int8' must be None .* or a floating-point dtype name: "
       r"'float32', 'bfloat16', 'float16'"),
      ("dtype_bool", dict(dtype="bool"), r"spec.dtype = 'bool' must be None"),
      ("dtype_unknown", dict(dtype="flaot32"), r"spec.dtype = 'flaot32' must be None"),
      ("targets_regex", dict(targets=(".*/w", "(")),
       r"spec.targets\[1\] = '\(' is not a valid regex"),
      ("full_regex", dict(full=("[",)), r"spec.full\[0\] = '\[' is not a valid regex"),
      ("rank_pattern_regex", dict(rank_pattern=(("a(", 2),)),
       r"spec.rank_pattern\[0\]\[0\] = 'a\(' is not a valid regex"),
      ("alpha_pattern_regex", dict(alpha_pattern=(("*", 2.0),)),
       r"spec.alpha_pattern\[0\]\[0\] = '\*' is not a valid regex"),
      ("rank_pattern_negative", dict(rank_pattern=(("a", -1),)),
       r"spec.rank_pattern\[0\]\[1\] = -1 must be an integer >= 0"),
      ("rank_pattern_float", dict(rank_pattern=(("a", 2.5),)),
       r"spec.rank_pattern\[0\]\[1\] = 2.5 must be an integer"),
      ("alpha_pattern_zero", dict(alpha_pattern=(("a", 0.0),)),
       r"spec.alpha_pattern\[0\]\[1\] = 0.0 must be a finite number other than 0"),
      ("pattern_not_pairs", dict(alpha_pattern=(("a", 1.0, 2.0),)),
       r"spec.alpha_pattern = .* must be \(regex, value\) pairs"),
      ("quantize_unknown", dict(quantize="nf8"),
       r"spec.quantize = 'nf8' must be None \(full-precision base\) or one of "
       r"\('nf4', 'int8'\)"),
      ("quantize_upper_case", dict(quantize="NF4"), r"spec.quantize = 'NF4' must be None"),
      ("quantize_block_not_power", dict(quantize="nf4", quantize_block=48),
       r"spec.quantize_block = 48 must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"),
      ("quantize_block_zero", dict(quantize_block=0), r"spec.quantize_block = 0 must be one of"),
      ("double_quant_int8", dict(quantize="int8", double_quant=True),
       r"spec.double_quant = True applies to quantize='nf4' only \(quantize is 'int8'\)"),
      ("double_quant_alone", dict(double_quant=True),
       r"spec.double_quant = True applies to quantize='nf4' only \(quantize is None\)"),
      ("quantize_frozen_without_scheme", dict(quantize_frozen=(".*/w",)),
       r"spec.quantize_frozen = .* needs spec.quantize \('nf4' or 'int8'\)"),
      ("quantize_frozen_regex", dict(quantize="nf4", quantize_frozen=("(",)),
       r"spec.quantize_frozen\[0\] = '\(' is not a valid regex"),
  )
  def test_invalid_values(self, overrides, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      spec_lib.validate(self._spec(**overrides))

  def test_all_problems_are_listed(self):
    with self.assertRaises(ValueError) as ctx:
      spec_lib.validate(self._spec(rank=0, alpha=0.0, dtype="int8"))
    for field in ("spec.rank", "spec.alpha", "spec.dtype"):
      self.assertIn(field, str(ctx.exception))

  def test_patterns_as_mapping(self):
    spec = types.SimpleNamespace(**dict(_FIELDS, rank_pattern={"a/w": 5},
                                        alpha_pattern={"(": 2.0}))
    with self.assertRaisesRegex(ValueError, r"spec.alpha_pattern\[0\]\[0\] = '\('"):
      spec_lib.validate(spec)


if __name__ == "__main__":
  absltest.main()
