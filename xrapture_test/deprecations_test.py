"""Tests for deprecated names (xrapture/_src/deprecations.py and their users)."""

import functools
import json
import os
import tempfile
import types
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

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
  @parameterized.parameters("ArrayValue", "default_spec", "lora_matmul")
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


def _mlp(x):
  return hk.nets.MLP([16, 10])(x)


def _stack(x):
  """A layer stack: its kernel is [L, in, out], its bias [L, out]."""
  return hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(6)(h)))(x)


_X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)


def _config(**fields):
  config = xrapture.default_config()
  config.rank, config.alpha = 2, 4.0
  for name, value in fields.items():
    setattr(config, name, value)
  return config


def _assert_same_tree(test, x, y):
  """Same structure (LoraWeight layouts and all) and bit-equal leaves."""
  flat_x, tree_x = jax.tree_util.tree_flatten(x)
  flat_y, tree_y = jax.tree_util.tree_flatten(y)
  test.assertEqual(tree_x, tree_y)
  for u, v in zip(flat_x, flat_y):
    np.testing.assert_array_equal(u, v)


class SpecToConfigTest(parameterized.TestCase):
  """0.1.0's spellings: the ConfigDict was the "spec", as was the lora spec tree."""

  def test_default_spec_is_default_config(self):
    value, messages = _deprecation_messages(lambda: xrapture.default_spec)
    self.assertIs(value, xrapture.default_config)
    self.assertLen(messages, 1)
    self.assertRegex(
      messages[0], r"^xrapture\.default_spec is deprecated .*use xrapture\.default_config\.$"
    )
    self.assertEqual(value().to_dict(), xrapture.default_config().to_dict())

  @parameterized.parameters(xrapture.transform, xrapture.transform_with_state)
  def test_spec_keyword_of_transform(self, transform):
    config = _config()
    model, messages = _deprecation_messages(lambda: transform(_mlp, spec=config))
    self.assertLen(messages, 1)
    self.assertRegex(
      messages[0], rf"{transform.__name__}\(spec=\.\.\.\) is deprecated .*use config=\.$"
    )
    self.assertIs(model.config, config)
    new = transform(_mlp, config=config)
    init = lambda m: m.init(jax.random.PRNGKey(0), _X)
    base = init(model) if transform is xrapture.transform else init(model)[0]
    _assert_same_tree(
      self, model.adapt(jax.random.PRNGKey(1), base, _X), new.adapt(jax.random.PRNGKey(1), base, _X)
    )
    with self.assertRaisesRegex(TypeError, r"both spec= \(deprecated\) and config="):
      transform(_mlp, spec=config, config=config)

  def test_spec_method_is_lora_spec(self):
    model = xrapture.transform(_stack, _config(tune_vectors=True))
    base = model.init(jax.random.PRNGKey(0), _X)
    for inputs, kwargs in (((_X,), {}), ((), {"x": _X})):
      value, messages = _deprecation_messages(
        functools.partial(model.spec, base, *inputs, **kwargs)
      )
      self.assertLen(messages, 1)
      self.assertRegex(
        messages[0], r"^LoraTransformed\.spec is deprecated .*use LoraTransformed\.lora_spec\.$"
      )
      self.assertEqual(value, model.lora_spec(base, *inputs, **kwargs))
    # Independent of both: the stacked kernel adapted, its [L, 6] bias a vector.
    stack = "__layer_stack_no_per_layer/linear"
    self.assertEqual(value, {stack: {"w": 2, "b": xrapture.LORA_FULL}})
    # The old name raises as the new one does, without inputs.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      with self.assertRaisesRegex(ValueError, r"model\.lora_spec\(params, \*inputs\)"):
        model.spec(base)

  def test_spec_keyword_of_quantize(self):
    config = _config(quantize="nf4", quantize_block=32)
    model = xrapture.transform(lambda x: hk.Linear(4)(x), config)
    x = jnp.ones((1, 64))
    params = xrapture.transform(lambda x: hk.Linear(4)(x), _config()).adapt(
      jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x), x
    )
    old, messages = _deprecation_messages(lambda: xrapture.quantize(params, spec=config))
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"quantize\(spec=\.\.\.\) is deprecated .*use config=\.$")
    self.assertIsInstance(old["linear"]["w"].w, xrapture.QuantizedArray)
    _assert_same_tree(self, old, xrapture.quantize(params, config=config))

  def test_spec_keyword_of_export_peft(self):
    config = _config()
    model = xrapture.transform(_mlp, config)
    base = model.init(jax.random.PRNGKey(0), _X)
    params = model.adapt(jax.random.PRNGKey(1), base, _X)
    name_map = {"mlp/~/linear_0/w": "0", "mlp/~/linear_1/w": "2"}
    files, warned = [], []
    with tempfile.TemporaryDirectory() as tmp:
      for name, kwargs in (("old", {"spec": config}), ("new", {"config": config})):
        path = os.path.join(tmp, name)
        _, messages = _deprecation_messages(
          functools.partial(xrapture.export_peft, path, params, name_map=name_map, **kwargs)
        )
        warned.append(messages)
        with open(os.path.join(path, "adapter_config.json")) as f:
          written = json.load(f)
        tensors = safetensors.numpy.load_file(os.path.join(path, "adapter_model.safetensors"))
        files.append((written, tensors))
    self.assertLen(warned[0], 1)
    self.assertRegex(warned[0][0], r"export_peft\(spec=\.\.\.\) is deprecated .*use config=\.$")
    self.assertEmpty(warned[1])
    (old_config, old_tensors), (new_config, new_tensors) = files
    self.assertEqual(old_config, new_config)
    self.assertEqual((old_config["r"], old_config["lora_alpha"]), (2, 4.0))
    self.assertEqual(sorted(old_tensors), sorted(new_tensors))
    for key, value in old_tensors.items():
      np.testing.assert_array_equal(value, new_tensors[key])

  def test_the_0_1_0_readme_example_still_runs(self):
    """0.1.0's README, spellings and all; it warns and trains as the new one."""

    def train(old):
      rng = jax.random.PRNGKey(0)
      y = jnp.arange(4)
      if old:
        spec = xrapture.default_spec()
        spec.rank, spec.alpha = 4, 8.0
        spec.targets = (r"mlp/~/linear_\d/w",)
        model = xrapture.transform(_mlp, spec)
        base = model.init(rng, _X)
        params = model.adapt(rng, base)
        lora_spec = model.spec(base)
      else:
        config = xrapture.default_config()
        config.rank, config.alpha = 4, 8.0
        config.targets = (r"mlp/~/linear_\d/w",)
        model = xrapture.transform(_mlp, config)
        base = model.init(rng, _X)
        params = model.adapt(rng, base, _X)
        lora_spec = model.lora_spec(base, _X)
      tx = xrapture.wrap_optimizer(optax.adamw(1e-3), lora_spec)
      opt_state = tx.init(params)
      loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, None, _X), y
      ).mean()
      updates, _ = tx.update(jax.grad(loss)(params), opt_state, params)
      return base, optax.apply_updates(params, updates), lora_spec

    (old_base, old, old_spec), messages = _deprecation_messages(lambda: train(old=True))
    self.assertLen(messages, 2)  # default_spec, model.spec
    (new_base, new, new_spec), fresh = _deprecation_messages(lambda: train(old=False))
    self.assertEmpty(fresh)
    self.assertEqual(old_spec, new_spec)
    _assert_same_tree(self, old, new)
    # Positive control: the step moved the adapters.
    self.assertFalse(np.array_equal(old["mlp/~/linear_0"]["w"].b, 0.0))
    _assert_same_tree(self, old_base, new_base)


class ImplicitNamespaceTest(parameterized.TestCase):
  @parameterized.parameters(*xrapture.implicit.__all__)
  def test_same_object_at_top_level_without_warning(self, name):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.assertIs(getattr(xrapture.implicit, name), getattr(xrapture, name))


if __name__ == "__main__":
  absltest.main()
