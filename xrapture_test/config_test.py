"""Tests for xrapture.default_config and the config lookups (xrapture/_src/transform/config.py)."""

import re
import types

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import xrapture
from xrapture._src.transform import config as config_lib

_FIELDS = dict(rank=8, alpha=16.0, targets=(".*/w",), full=(), tune_vectors=False,
               rslora=False, init_stddev=0.01, dtype=None, rank_pattern=(),
               alpha_pattern=(), dropout=0.0, init="default", use_dora=False,
               quantize=None, quantize_block=64, double_quant=False, quantize_frozen=())


class DefaultConfigTest(parameterized.TestCase):

  def test_fields_and_defaults(self):
    config = xrapture.default_config()
    self.assertIsInstance(config, ml_collections.ConfigDict)
    self.assertEqual(set(config.keys()), set(_FIELDS))
    for name, value in _FIELDS.items():
      self.assertEqual(config[name], value, name)
      self.assertEqual(type(config[name]), type(value), name)  # pylint: disable=unidiomatic-typecheck

  def test_every_field_is_documented(self):
    doc = xrapture.default_config.__doc__
    for name in _FIELDS:
      self.assertRegex(doc, rf"\n\s+{name}: ", name)

  @parameterized.parameters("ranks", "target", "lora_dropout", "r")
  def test_unknown_field_is_an_error(self, name):
    config = xrapture.default_config()
    with self.assertRaisesRegex(AttributeError, f"{name}.*locked"):
      setattr(config, name, 1)

  def test_wrong_type_is_an_error(self):
    config = xrapture.default_config()
    with self.assertRaises(TypeError):
      config.rank = "eight"
    with self.assertRaises(TypeError):
      config.rank_pattern = {"a/w": 2}  # regex keys cannot be ConfigDict keys: pairs

  def test_fields_can_be_set(self):
    config = xrapture.default_config()
    config.rank = 4
    config.alpha = 8  # an int is accepted for a float field
    config.dtype = "bfloat16"
    config.rank_pattern = (("attn/.*", 16),)
    config.dropout = 0.1
    self.assertEqual((config.rank, config.alpha, config.dtype), (4, 8.0, "bfloat16"))
    config.dtype = None
    self.assertIsNone(config.dtype)

  def test_each_call_is_a_new_config(self):
    first = xrapture.default_config()
    first.rank = 2
    self.assertEqual(xrapture.default_config().rank, 8)

  def test_default_targets(self):
    targets = xrapture.default_config().targets
    for path in ("mlp/~/linear_0/w", "conv2_d/w", "~/w",
                 "__layer_stack_no_per_layer/multi_head_attention/query/w"):
      self.assertTrue(config_lib.matches_any(targets, path), path)
    for path in ("embed/embeddings", "linear/b", "layer_norm/scale", "mlp/~/linear_0/w2",
                 "w"):
      self.assertFalse(config_lib.matches_any(targets, path), path)


def _config(**fields):
  """The default config with ``fields`` set."""
  config = xrapture.default_config()
  for k, v in fields.items():
    setattr(config, k, v)
  return config


class LookupTest(parameterized.TestCase):

  def test_rank_for(self):
    config = _config(rank=4, rank_pattern=((".*attn.*", 16), (".*/query/w", 2)))
    self.assertEqual(config_lib.rank_for(config, "mlp/~/linear_0/w"), 4)
    self.assertEqual(config_lib.rank_for(config, "attn/query/w"), 16)  # first match wins
    self.assertEqual(config_lib.rank_for(config, "mha/query/w"), 2)

  def test_alpha_for(self):
    config = _config(alpha=8.0, alpha_pattern=(("head/w", 1),))
    self.assertEqual(config_lib.alpha_for(config, "head/w"), 1.0)
    self.assertIsInstance(config_lib.alpha_for(config, "head/w"), float)
    self.assertEqual(config_lib.alpha_for(config, "body/head/w"), 8.0)  # fullmatch

  def test_patterns_as_mapping(self):
    config = types.SimpleNamespace(rank=3, rank_pattern={"a/w": 5}, alpha=1.0,
                                 alpha_pattern={"b/.*": 2.0})
    self.assertEqual(config_lib.rank_for(config, "a/w"), 5)
    self.assertEqual(config_lib.rank_for(config, "b/w"), 3)
    self.assertEqual(config_lib.alpha_for(config, "b/w"), 2.0)

  def test_matches_any_is_fullmatch(self):
    self.assertTrue(config_lib.matches_any(["lin.*"], "linear/w"))
    self.assertFalse(config_lib.matches_any(["linear"], "linear/w"))
    self.assertFalse(config_lib.matches_any([], "linear/w"))
    with self.assertRaises(re.error):
      config_lib.matches_any(["("], "x")


class ValidateTest(parameterized.TestCase):

  def test_default_config_is_valid(self):
    config_lib.validate(xrapture.default_config())

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
    config_lib.validate(_config(**overrides))

  @parameterized.named_parameters(
      ("rank_zero", dict(rank=0), r"config.rank = 0 must be an integer >= 1"),
      ("rank_negative", dict(rank=-3), r"config.rank = -3 must be an integer >= 1"),
      ("alpha_zero", dict(alpha=0.0), r"config.alpha = 0.0 must be a finite number other than 0"),
      ("alpha_nan", dict(alpha=float("nan")), r"config.alpha = nan must be a finite"),
      ("alpha_inf", dict(alpha=float("inf")), r"config.alpha = inf must be a finite"),
      ("init_stddev_zero", dict(init_stddev=0.0),
       r"config.init_stddev = 0.0 must be a finite number > 0"),
      ("init_stddev_nan", dict(init_stddev=float("nan")), r"config.init_stddev = nan must be"),
      ("init_stddev_inf", dict(init_stddev=float("inf")), r"config.init_stddev = inf must be"),
      ("dropout_high", dict(dropout=1.5), r"config.dropout = 1.5 must be a number in \[0, 1\)"),
      ("dropout_one", dict(dropout=1.0), r"config.dropout = 1.0 must be a number in \[0, 1\)"),
      ("dropout_negative", dict(dropout=-0.1), r"config.dropout = -0.1 must be"),
      ("dropout_nan", dict(dropout=float("nan")), r"config.dropout = nan must be"),
      ("dtype_int8", dict(dtype="int8"),
       r"config.dtype = 'int8' must be None .* or a floating-point dtype name: "
       r"'float32', 'bfloat16', 'float16'"),
      ("dtype_bool", dict(dtype="bool"), r"config.dtype = 'bool' must be None"),
      ("dtype_unknown", dict(dtype="flaot32"), r"config.dtype = 'flaot32' must be None"),
      ("targets_regex", dict(targets=(".*/w", "(")),
       r"config.targets\[1\] = '\(' is not a valid regex"),
      ("full_regex", dict(full=("[",)), r"config.full\[0\] = '\[' is not a valid regex"),
      ("rank_pattern_regex", dict(rank_pattern=(("a(", 2),)),
       r"config.rank_pattern\[0\]\[0\] = 'a\(' is not a valid regex"),
      ("alpha_pattern_regex", dict(alpha_pattern=(("*", 2.0),)),
       r"config.alpha_pattern\[0\]\[0\] = '\*' is not a valid regex"),
      ("rank_pattern_negative", dict(rank_pattern=(("a", -1),)),
       r"config.rank_pattern\[0\]\[1\] = -1 must be an integer >= 0"),
      ("rank_pattern_float", dict(rank_pattern=(("a", 2.5),)),
       r"config.rank_pattern\[0\]\[1\] = 2.5 must be an integer"),
      ("alpha_pattern_zero", dict(alpha_pattern=(("a", 0.0),)),
       r"config.alpha_pattern\[0\]\[1\] = 0.0 must be a finite number other than 0"),
      ("pattern_not_pairs", dict(alpha_pattern=(("a", 1.0, 2.0),)),
       r"config.alpha_pattern = .* must be \(regex, value\) pairs"),
      ("quantize_unknown", dict(quantize="nf8"),
       r"config.quantize = 'nf8' must be None \(full-precision base\) or one of "
       r"\('nf4', 'int8'\)"),
      ("quantize_upper_case", dict(quantize="NF4"), r"config.quantize = 'NF4' must be None"),
      ("quantize_block_not_power", dict(quantize="nf4", quantize_block=48),
       r"config.quantize_block = 48 must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"),
      ("quantize_block_zero", dict(quantize_block=0), r"config.quantize_block = 0 must be one of"),
      ("double_quant_int8", dict(quantize="int8", double_quant=True),
       r"config.double_quant = True applies to quantize='nf4' only \(quantize is 'int8'\)"),
      ("double_quant_alone", dict(double_quant=True),
       r"config.double_quant = True applies to quantize='nf4' only \(quantize is None\)"),
      ("quantize_frozen_without_scheme", dict(quantize_frozen=(".*/w",)),
       r"config.quantize_frozen = .* needs config.quantize \('nf4' or 'int8'\)"),
      ("quantize_frozen_regex", dict(quantize="nf4", quantize_frozen=("(",)),
       r"config.quantize_frozen\[0\] = '\(' is not a valid regex"),
  )
  def test_invalid_values(self, overrides, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      config_lib.validate(_config(**overrides))

  def test_all_problems_are_listed(self):
    with self.assertRaises(ValueError) as ctx:
      config_lib.validate(_config(rank=0, alpha=0.0, dtype="int8"))
    for field in ("config.rank", "config.alpha", "config.dtype"):
      self.assertIn(field, str(ctx.exception))

  def test_patterns_as_mapping(self):
    config = types.SimpleNamespace(**dict(_FIELDS, rank_pattern={"a/w": 5},
                                        alpha_pattern={"(": 2.0}))
    with self.assertRaisesRegex(ValueError, r"config.alpha_pattern\[0\]\[0\] = '\('"):
      config_lib.validate(config)


if __name__ == "__main__":
  absltest.main()
