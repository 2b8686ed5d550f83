"""Tests for xrapture.save_adapter / xrapture.load_adapter (xrapture/_src/io/adapter.py)."""

import functools
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import xrapture
from xrapture._src.io import adapter

_X = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32)


def _net(x, hidden=6):
  h = jnp.tanh(hk.Conv1D(hidden, 3, name="conv")(x))
  h = hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(hidden, name="mid")(h)))(h)
  h = hk.LayerNorm(-1, True, True)(h)
  return hk.Linear(3, name="head")(h)


def _spec(**overrides):
  spec = xrapture.default_spec()
  spec.rank = 2
  spec.alpha = 4.0
  spec.full = ("head/w",)
  spec.tune_vectors = True
  for k, v in overrides.items():
    setattr(spec, k, v)
  return spec


def _trained(hidden=6, base_dtype=None, **overrides):
  """(model, base, trained, lora_spec): trained has random a, b and full leaves.

  Cached per arguments (tests share them; none mutates them in place).
  """
  return _trained_cached(hidden, base_dtype, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _trained_cached(hidden, base_dtype, overrides):
  model = xrapture.transform(lambda x: _net(x, hidden), _spec(**dict(overrides)))
  base = model.init(jax.random.PRNGKey(0), _X)
  # spec() traces apply with init's (float32) inputs: take it before the cast.
  lora_spec = model.spec(base)
  if base_dtype is not None:
    base = jax.tree.map(lambda p: p.astype(base_dtype), base)
  x = _X if base_dtype is None else _X.astype(base_dtype)
  params = model.adapt(jax.random.PRNGKey(1), base, x)
  rng = np.random.default_rng(3)

  def train(rank, p):
    if isinstance(p, xrapture.LoraWeight):
      return p.replace(a=jnp.asarray(rng.normal(size=p.a.shape), p.a.dtype),
                       b=jnp.asarray(rng.normal(size=p.b.shape), p.b.dtype))
    if rank == xrapture.LORA_FULL:
      return jnp.asarray(rng.normal(size=p.shape), p.dtype)
    return p
  trained = jax.tree.map(train, lora_spec, params,
                         is_leaf=lambda p: isinstance(p, int))
  return model, base, trained, lora_spec


def _flat(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=xrapture.is_implicit)
  return {jax.tree_util.keystr(p): v for p, v in flat}


class AdapterFileTest(parameterized.TestCase):

  def _path(self, name="adapter.safetensors"):
    # Not self.create_tempdir(): that needs absl flags parsed, which pytest does not do.
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return os.path.join(tmp.name, name)

  def assert_restored(self, loaded, trained, base):
    got, want, base_flat = _flat(loaded), _flat(trained), _flat(base)
    self.assertEqual(set(got), set(want))
    for key, value in want.items():
      if isinstance(value, xrapture.LoraWeight):
        restored = got[key]
        self.assertIsInstance(restored, xrapture.LoraWeight)
        self.assertIs(restored.w, base_flat[key])
        for field in ("a", "b"):
          x, y = getattr(restored, field), getattr(value, field)
          self.assertEqual(x.dtype, y.dtype, key + field)
          self.assertEqual(x.shape, y.shape, key + field)
          # Bit-identical (compare the raw bits, also for bfloat16).
          np.testing.assert_array_equal(
              np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), key + field)
        self.assertEqual((restored.alpha, restored.rslora, restored.layout),
                         (value.alpha, value.rslora, value.layout))
      else:
        self.assertEqual(got[key].dtype, value.dtype, key)
        np.testing.assert_array_equal(
            np.asarray(got[key]).view(np.uint8), np.asarray(value).view(np.uint8), key)

  @parameterized.named_parameters(
      ("f32", {}, None),
      ("bf16_adapters", {"dtype": "bfloat16"}, None),
      ("bf16_base", {}, jnp.bfloat16),
      ("rslora_and_patterns", {"rslora": True, "rank_pattern": ((".*mid/w", 3),),
                               "alpha_pattern": (("conv/w", 7.0),)}, None))
  def test_save_load_is_exact(self, overrides, base_dtype):
    model, base, trained, lora_spec = _trained(base_dtype=base_dtype, **overrides)
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["adapter.safetensors"])
    loaded = xrapture.load_adapter(path, base)
    self.assert_restored(loaded, trained, base)
    x = _X if base_dtype is None else _X.astype(base_dtype)
    np.testing.assert_array_equal(model.apply(loaded, None, x), model.apply(trained, None, x))

  def test_frozen_leaves_come_from_the_base(self):
    _, base, trained, lora_spec = _trained(tune_vectors=False)
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    other_base = jax.tree.map(lambda x: x + 1.0, base)
    loaded = xrapture.load_adapter(path, other_base)
    self.assertIs(loaded["layer_norm"]["scale"], other_base["layer_norm"]["scale"])
    self.assertIs(loaded["conv"]["w"].w, other_base["conv"]["w"])
    np.testing.assert_array_equal(loaded["head"]["w"], trained["head"]["w"])

  def test_file_holds_only_what_training_changed(self):
    _, base, trained, lora_spec = _trained(tune_vectors=False)
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    with safetensors.safe_open(path, framework="numpy") as f:
      keys = set(f.keys())
      header = json.loads(f.metadata()["xrapture"])
    self.assertEqual(keys, {"conv/w::a", "conv/w::b",
                            "__layer_stack_no_per_layer/mid/w::a",
                            "__layer_stack_no_per_layer/mid/w::b", "head/w"})
    self.assertEqual(header["format"], "xrapture-adapter")
    self.assertEqual(header["xrapture_version"], xrapture.__version__)
    self.assertEqual(header["jax_version"], jax.__version__)
    entry = header["entries"]["conv/w"]
    self.assertEqual(entry["kind"], "lora")
    self.assertEqual(entry["rank"], 2)
    self.assertEqual(entry["alpha"], 4.0)
    self.assertEqual(entry["layout"], "iio")
    self.assertEqual(header["entries"]["__layer_stack_no_per_layer/mid/w"]["layout"], "sio")
    self.assertEqual(tuple(entry["base_shape"]), base["conv"]["w"].shape)
    self.assertEqual(header["entries"]["head/w"]["kind"], "full")
    # Size: adapters and the full head only, far smaller than the base.
    stored = sum(x.size for x in jax.tree.leaves(
        xrapture.split_lora_params(trained, lora_spec)))
    self.assertEqual(stored, xrapture.count_trainable(trained, lora_spec))
    self.assertLess(os.path.getsize(path), 4 * stored + 4096)

  def test_multi_axis_and_expert_layouts_round_trip(self):
    def fn(x):
      wq = hk.get_parameter("query_w", [4, 2, 3], init=jnp.ones)
      wo = hk.get_parameter("output_w", [2, 3, 4], init=jnp.ones)
      experts = hk.get_parameter("experts", [2, 4, 5], init=jnp.ones)
      h = jnp.einsum("bthk,hkd->btd", jnp.einsum("btd,dhk->bthk", x, wq), wo)
      return jnp.einsum("ebtd,edf->ebtf", jnp.stack([h, -h]), experts)
    spec = _spec(full=(), tune_vectors=False, targets=("all-linear",))
    model = xrapture.transform(fn, spec)
    base = jax.tree.map(lambda p: p * 0.1, model.init(jax.random.PRNGKey(0), _X))
    params = model.adapt(jax.random.PRNGKey(1), base)
    rng = np.random.default_rng(4)
    trained = xrapture.tree_map_with_implicit(
        lambda p: p.replace(a=jnp.asarray(rng.normal(size=p.a.shape), jnp.float32),
                            b=jnp.asarray(rng.normal(size=p.b.shape), jnp.float32)),
        params)
    self.assertEqual([trained["~"][k].layout for k in ("experts", "output_w", "query_w")],
                     ["sio", "iio", "ioo"])
    path = self._path()
    xrapture.save_adapter(path, trained, model.spec(base))
    loaded = xrapture.load_adapter(path, base)
    self.assert_restored(loaded, trained, base)
    np.testing.assert_array_equal(model.apply(loaded, None, _X),
                                  model.apply(trained, None, _X))

  def test_reads_a_v010_file(self):
    # 0.1.0 wrote no layout; its conv adapters had a [1, r, N] (a pointwise).
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 6)), jnp.float32)
    a = np.random.default_rng(1).normal(size=(1, 2, 6)).astype(np.float32)
    b = np.random.default_rng(2).normal(size=(3, 4, 2)).astype(np.float32)
    entry = dict(kind="lora", rank=2, alpha=4.0, rslora=False, base_shape=[3, 4, 6],
                 base_dtype="float32", a_dtype="float32", b_dtype="float32")
    header = dict(format="xrapture-adapter", format_version=1, xrapture_version="0.1.0",
                  jax_version="0.10.2", entries={"conv/w": entry})
    path = self._path()
    safetensors.numpy.save_file({"conv/w::a": a, "conv/w::b": b}, path,
                                metadata={"xrapture": json.dumps(header)})
    loaded = xrapture.load_adapter(path, {"conv": {"w": w}})["conv"]["w"]
    self.assertEqual(loaded.layout, "iio")
    # 0.1.0's value: w + alpha/r · b @ a, with a broadcast over the window.
    np.testing.assert_allclose(loaded.materialize(), np.asarray(w) + 2.0 * (b @ a),
                               rtol=1e-5, atol=1e-5)

  def test_load_into_adapted_params(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    fresh = xrapture.transform(_net, _spec()).adapt(jax.random.PRNGKey(5), base, _X)
    loaded = xrapture.load_adapter(path, fresh)
    self.assert_restored(loaded, trained, base)

  def test_another_base_names_path_and_shapes(self):
    _, _, trained, lora_spec = _trained(tune_vectors=False)
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    other = jax.eval_shape(hk.transform(lambda x: _net(x, hidden=5)).init,
                           jax.random.PRNGKey(0), _X)
    # Every mismatch is named with both shapes, the stacked kernel among them.
    with self.assertRaisesRegex(
        ValueError, r"(?s)another base \(\d+ mismatches\).*'__layer_stack_no_per_layer/mid/w' "
        r"was \(2, 6, 6\) float32 there and is \(2, 5, 5\) float32 here"):
      xrapture.load_adapter(path, other)

  def test_another_dtype_is_a_mismatch(self):
    _, base, trained, lora_spec = _trained(tune_vectors=False)
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    with self.assertRaisesRegex(ValueError, r"'__layer_stack_no_per_layer/mid/w' was "
                                r"\(2, 6, 6\) float32 there and is \(2, 6, 6\) bfloat16 here"):
      xrapture.load_adapter(path, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base))

  def test_missing_parameter_is_named(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    base = {k: v for k, v in base.items() if k != "head"}
    with self.assertRaisesRegex(ValueError, r"(?s)'head/\w+' is in the file but not in these base params.*conv/w"):
      xrapture.load_adapter(path, base)

  @parameterized.parameters(1, 8, 100, 0.5, -1)
  def test_truncated_file(self, cut):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    with open(path, "rb") as f:
      data = f.read()
    keep = int(len(data) * cut) if isinstance(cut, float) else (
        len(data) + cut if cut < 0 else cut)
    with open(path, "wb") as f:
      f.write(data[:keep])
    snapshot = jax.tree.map(np.array, base)
    with self.assertRaisesRegex(ValueError, "truncated or corrupt"):
      xrapture.load_adapter(path, base)
    # Nothing changed in what was passed in.
    jax.tree.map(np.testing.assert_array_equal, base, snapshot)

  def test_not_an_adapter_file(self):
    path = self._path()
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save({"x": np.zeros(3, np.float32)}))
    with self.assertRaisesRegex(ValueError, "without an xrapture header"):
      xrapture.load_adapter(path, {})
    with open(path, "wb") as f:
      f.write(b"not a safetensors file at all")
    with self.assertRaisesRegex(ValueError, "truncated or corrupt"):
      xrapture.load_adapter(path, {})
    with self.assertRaises(FileNotFoundError):
      xrapture.load_adapter(path + ".missing", {})

  def test_newer_format_version_is_refused(self):
    path = self._path()
    header = dict(format=adapter.FORMAT, format_version=adapter.FORMAT_VERSION + 1,
                  entries={})
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save({}, metadata={"xrapture": json.dumps(header)}))
    with self.assertRaisesRegex(ValueError, "unsupported adapter format"):
      xrapture.load_adapter(path, {})

  def test_header_entry_without_tensors(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    header, tensors = adapter.read_adapter(path)
    del tensors["conv/w::b"]
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={"xrapture": json.dumps(header)}))
    with self.assertRaisesRegex(ValueError, r"'conv/w'.*conv/w::b.*missing"):
      xrapture.load_adapter(path, base)

  def test_spec_of_another_tree(self):
    _, _, trained, lora_spec = _trained()
    lora_spec = {k: v for k, v in lora_spec.items() if k != "head"}
    with self.assertRaisesRegex(ValueError, "model.spec"):
      xrapture.save_adapter(self._path(), trained, lora_spec)

  def test_failed_save_keeps_the_old_file(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    with open(path, "rb") as f:
      old = f.read()
    changed = jax.tree.map(lambda x: x, trained)
    changed["head"]["w"] = changed["head"]["w"] + 1.0
    with mock.patch.object(adapter.atomic.os, "replace",
                                    side_effect=OSError("disk gone")):
      with self.assertRaisesRegex(OSError, "disk gone"):
        xrapture.save_adapter(path, changed, lora_spec)
    with open(path, "rb") as f:
      self.assertEqual(f.read(), old)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["adapter.safetensors"])
    self.assert_restored(xrapture.load_adapter(path, base), trained, base)


if __name__ == "__main__":
  absltest.main()
