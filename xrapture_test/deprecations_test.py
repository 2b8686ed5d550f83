"""Tests for deprecated names (xrapture/_src/deprecations.py and their users)."""

import types
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import xrapture
from xrapture._src import deprecations
from xrapture._src.lora import dot_general


def _deprecation_messages(fn):
  """Returns (fn(), the DeprecationWarning messages it raised).

  Not assertWarns: it reads ``__warningregistry__`` of every loaded module,
  and haiku.experimental.flax raises ImportError on that without flax.
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fn()
  return result, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


class ModuleGetattrTest(absltest.TestCase):
  def _module(self):
    module = types.ModuleType("fake")
    module.kept = 1
    sentinel = object()
    module.__getattr__ = deprecations.module_getattr("fake", {"old": ("fake.kept", sentinel)})
    return module, sentinel

  def test_alias_warns_with_its_replacement_and_returns_the_object(self):
    module, sentinel = self._module()
    value, messages = _deprecation_messages(lambda: module.old)
    self.assertIs(value, sentinel)
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"^fake\.old is deprecated .*use fake\.kept\.$")

  def test_warning_points_at_the_caller(self):
    module, _ = self._module()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      _ = module.old
    self.assertLen(caught, 1)
    self.assertEqual(caught[0].filename, __file__)

  def test_defined_names_do_not_warn(self):
    module, _ = self._module()
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.assertEqual(module.kept, 1)

  def test_unknown_name_raises_attribute_error(self):
    module, _ = self._module()
    with self.assertRaisesRegex(AttributeError, "'fake' has no attribute 'nope'"):
      _ = module.nope
    self.assertFalse(hasattr(module, "nope"))


class _Model:
  def lora_spec(self, x):
    return ("lora_spec", x)

  spec = deprecations.method_alias(lora_spec, "_Model.spec")


@deprecations.renamed_kwargs(spec="config")
def _build(f, config=None):
  return (f, config)


class MethodAliasTest(absltest.TestCase):
  def test_old_name_warns_and_calls_the_new_method(self):
    value, messages = _deprecation_messages(lambda: _Model().spec(3))
    self.assertEqual(value, ("lora_spec", 3))
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"^_Model\.spec is deprecated .*use _Model\.lora_spec\.$")

  def test_new_name_does_not_warn(self):
    value, messages = _deprecation_messages(lambda: _Model().lora_spec(3))
    self.assertEqual(value, ("lora_spec", 3))
    self.assertEmpty(messages)


class RenamedKwargsTest(absltest.TestCase):
  def test_old_keyword_warns_and_is_passed_under_the_new_one(self):
    value, messages = _deprecation_messages(lambda: _build("f", spec=1))
    self.assertEqual(value, ("f", 1))
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"_build\(spec=\.\.\.\) is deprecated .*use config=\.$")

  def test_new_keyword_and_positional_do_not_warn(self):
    for call in (lambda: _build("f", config=1), lambda: _build("f", 1)):
      value, messages = _deprecation_messages(call)
      self.assertEqual(value, ("f", 1))
      self.assertEmpty(messages)

  def test_both_keywords_is_an_error_naming_them(self):
    with self.assertRaisesRegex(TypeError, r"both spec= \(deprecated\) and config="):
      _build("f", spec=1, config=2)


class XraptureAliasesTest(parameterized.TestCase):
  @parameterized.parameters("ArrayValue", "lora_matmul")
  def test_deprecated_names_are_not_public(self, name):
    self.assertNotIn(name, xrapture.__all__)
    self.assertNotIn(name, vars(xrapture))

  def test_array_value_is_jax_array(self):
    value, messages = _deprecation_messages(lambda: xrapture.ArrayValue)
    self.assertIs(value, jax.Array)
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"xrapture\.ArrayValue .*use jax\.Array\.")

  def test_from_import_still_works(self):
    def from_import():
      from xrapture import ArrayValue  # pylint: disable=g-import-not-at-top

      return ArrayValue

    value, messages = _deprecation_messages(from_import)
    self.assertIs(value, jax.Array)
    self.assertNotEmpty(messages)

  def test_lora_matmul_still_computes(self):
    lora_matmul, messages = _deprecation_messages(lambda: xrapture.lora_matmul)
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"xrapture\.lora_matmul .*use a LoraWeight")
    self.assertIs(lora_matmul, dot_general.lora_matmul)
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    a, b = rng.normal(size=(2, 5)), rng.normal(size=(4, 2))
    out = lora_matmul(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 0, 0.5, None, None
    )
    np.testing.assert_allclose(out, x @ (w + 0.5 * b @ a), rtol=1e-5, atol=1e-5)


class ImplicitNamespaceTest(parameterized.TestCase):
  @parameterized.parameters(*xrapture.implicit.__all__)
  def test_same_object_at_top_level_without_warning(self, name):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.assertIs(getattr(xrapture.implicit, name), getattr(xrapture, name))


if __name__ == "__main__":
  absltest.main()
