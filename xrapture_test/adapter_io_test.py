"""Tests for xrapture.save_adapter / xrapture.load_adapter (xrapture/_src/io/adapter.py)."""

import errno
import functools
import json
import os
from unittest import mock
import warnings

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
from xrapture._src.io import integrity

import test_utils

_X = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32)


def _net(x, hidden=6):
  h = jnp.tanh(hk.Conv1D(hidden, 3, name="conv")(x))
  h = hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(hidden, name="mid")(h)))(h)
  h = hk.LayerNorm(-1, True, True)(h)
  return hk.Linear(3, name="head")(h)


def _config(**overrides):
  config = xrapture.default_config()
  config.rank = 2
  config.alpha = 4.0
  config.full = ("head/w",)
  config.tune_vectors = True
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _trained(hidden=6, base_dtype=None, **overrides):
  """(model, base, trained, lora_spec): trained has random a, b and full leaves.

  Cached per arguments (tests share them; none mutates them in place).
  """
  return _trained_cached(hidden, base_dtype, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _trained_cached(hidden, base_dtype, overrides):
  model = xrapture.transform(lambda x: _net(x, hidden), _config(**dict(overrides)))
  base = model.init(jax.random.PRNGKey(0), _X)
  # lora_spec traces apply with float32 inputs: take it before the cast.
  lora_spec = model.lora_spec(base, _X)
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


def _assert_restored(test, loaded, trained, base):
  """Bit-identical a, b and full leaves; w the base's own array."""
  got, want, base_flat = _flat(loaded), _flat(trained), _flat(base)
  test.assertEqual(set(got), set(want))
  for key, value in want.items():
    if isinstance(value, xrapture.LoraWeight):
      restored = got[key]
      test.assertIsInstance(restored, xrapture.LoraWeight)
      test.assertIs(restored.w, base_flat[key])
      for field in ("a", "b"):
        x, y = getattr(restored, field), getattr(value, field)
        test.assertEqual(x.dtype, y.dtype, key + field)
        test.assertEqual(x.shape, y.shape, key + field)
        # Bit-identical (compare the raw bits, also for bfloat16).
        np.testing.assert_array_equal(
            np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), key + field)
      test.assertEqual((restored.alpha, restored.rslora, restored.layout),
                       (value.alpha, value.rslora, value.layout))
    else:
      test.assertEqual(got[key].dtype, value.dtype, key)
      np.testing.assert_array_equal(
          np.asarray(got[key]).view(np.uint8), np.asarray(value).view(np.uint8), key)


def _rewrite(path, edit=None, rechecksum=False):
  """Rewrites the adapter file at ``path`` after ``edit(header, tensors)``.

  Args:
    path: a file save_adapter wrote.
    edit: changes header and tensors in place.
    rechecksum: recompute the checksum after the edit (a consistent file
      with wrong content, as a buggy writer would make); else keep the saved
      one (as a damaged or hand-edited file has it).
  """
  with safetensors.safe_open(path, framework="numpy") as f:
    header = json.loads(f.metadata()["xrapture"])
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if edit is not None:
    edit(header, tensors)
  if rechecksum:
    header.pop(integrity.KEY, None)
    header[integrity.KEY] = integrity.record(header, tensors)
  with open(path, "wb") as f:
    f.write(safetensors.numpy.save(tensors, metadata={"xrapture": json.dumps(header)}))


def _without_checksum(header, tensors):
  del tensors
  header.pop(integrity.KEY)


class AdapterFileTest(parameterized.TestCase):

  def _path(self, name="adapter.safetensors"):
    return os.path.join(test_utils.tmpdir(self), name)

  def assert_restored(self, loaded, trained, base):
    _assert_restored(self, loaded, trained, base)

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
    config = _config(full=(), tune_vectors=False, targets=("all-linear",))
    model = xrapture.transform(fn, config)
    base = jax.tree.map(lambda p: p * 0.1, model.init(jax.random.PRNGKey(0), _X))
    params = model.adapt(jax.random.PRNGKey(1), base, _X)
    rng = np.random.default_rng(4)
    trained = xrapture.tree_map_with_implicit(
        lambda p: p.replace(a=jnp.asarray(rng.normal(size=p.a.shape), jnp.float32),
                            b=jnp.asarray(rng.normal(size=p.b.shape), jnp.float32)),
        params)
    self.assertEqual([trained["~"][k].layout for k in ("experts", "output_w", "query_w")],
                     ["sio", "iio", "ioo"])
    path = self._path()
    xrapture.save_adapter(path, trained, model.lora_spec(base, _X))
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

  def test_files_without_residual_stay_version_1(self):
    # Version 1 is what xrapture 0.1.0 reads; only PiSSA adapters need 2.
    path = self._path()
    model, base, trained, lora_spec = _trained()
    xrapture.save_adapter(path, trained, lora_spec)
    with safetensors.safe_open(path, framework="numpy") as f:
      header = json.loads(f.metadata()["xrapture"])
    self.assertEqual(header["format_version"], 1)
    self.assertFalse([n for n, e in header["entries"].items() if "residual" in e])
    # PiSSA adapters: version 2, a residual record for each kernel, and they
    # load onto the residual (their own w) only.
    model, base, trained, lora_spec = _trained(init="pissa")
    xrapture.save_adapter(path, trained, lora_spec)
    with safetensors.safe_open(path, framework="numpy") as f:
      header = json.loads(f.metadata()["xrapture"])
    self.assertEqual(header["format_version"], 2)
    self.assertEqual(sorted(n for n, e in header["entries"].items() if "residual" in e),
                     ["__layer_stack_no_per_layer/mid/w", "conv/w"])
    residual = jax.tree.map(lambda p: p.w if isinstance(p, xrapture.LoraWeight) else p,
                            trained, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))
    loaded = xrapture.load_adapter(path, residual)
    np.testing.assert_array_equal(model.apply(loaded, None, _X),
                                  model.apply(trained, None, _X))
    with self.assertRaisesRegex(ValueError, "PiSSA adapters .* at "
                                            "'__layer_stack_no_per_layer/mid/w', 'conv/w'"):
      xrapture.load_adapter(path, base)

  def test_load_into_adapted_params(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    fresh = xrapture.transform(_net, _config()).adapt(jax.random.PRNGKey(5), base, _X)
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
    # One tensor: safetensors 0.4.0 (the floor) cannot read back a file it
    # wrote without any.
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save({"x": np.zeros(1, np.float32)},
                                     metadata={"xrapture": json.dumps(header)}))
    with self.assertRaisesRegex(ValueError, "unsupported adapter format"):
      xrapture.load_adapter(path, {})

  def test_header_entry_without_tensors(self):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    _rewrite(path, lambda header, tensors: tensors.pop("conv/w::b"))
    with self.assertRaisesRegex(ValueError, r"'conv/w'.*conv/w::b.*missing"):
      xrapture.load_adapter(path, base)

  def test_lora_spec_of_another_tree(self):
    _, _, trained, lora_spec = _trained()
    lora_spec = {k: v for k, v in lora_spec.items() if k != "head"}
    with self.assertRaisesRegex(ValueError, r"model\.lora_spec\(base_params\)"):
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


class AdapterIntegrityTest(parameterized.TestCase):
  """Damaged or edited files are refused, naming the file and what differs."""

  def _saved(self, **overrides):
    path = os.path.join(test_utils.tmpdir(self), "adapter.safetensors")
    _, base, trained, lora_spec = _trained(**overrides)
    xrapture.save_adapter(path, trained, lora_spec)
    return path, base, trained

  def assert_refused(self, path, base, *patterns):
    with self.assertRaises(ValueError) as ctx:
      xrapture.load_adapter(path, base)
    message = str(ctx.exception)
    self.assertIn(path, message)
    for pattern in patterns:
      self.assertRegex(message, pattern)

  def test_saved_file_verifies_and_loads_silently(self):
    path, base, trained = self._saved()
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      loaded = xrapture.load_adapter(path, base)
    _assert_restored(self, loaded, trained, base)

  @parameterized.parameters("conv/w::a", "conv/w::b", "head/w", "layer_norm/scale")
  def test_changed_tensor_data(self, key):
    path, base, _ = self._saved()

    def flip(header, tensors):
      del header
      arr = tensors[key].copy()
      arr.reshape(-1).view(np.uint32)[0] ^= 1 << 3  # one low mantissa bit
      tensors[key] = arr
    _rewrite(path, flip)
    self.assert_refused(path, base, "does not match its checksum",
                        rf"tensors '{key}' differ")

  @parameterized.parameters(("alpha", 5.0), ("rslora", True), ("alpha", 4.000000001))
  def test_edited_header_field(self, field, value):
    # An entry whose numbers still make sense: only the checksum can tell.
    path, base, _ = self._saved()

    def edit(header, tensors):
      del tensors
      header["entries"]["conv/w"][field] = value
    _rewrite(path, edit)
    self.assert_refused(path, base, "does not match its checksum",
                        r"header entries 'conv/w' differ")

  def test_every_entry_field_is_covered_also_new_ones(self):
    # A field added to entries later is covered too.
    path, base, trained = self._saved()

    def add(header, tensors):
      del tensors
      header["entries"]["conv/w"]["future_field"] = "window"
    _rewrite(path, add, rechecksum=True)
    _assert_restored(self, xrapture.load_adapter(path, base), trained, base)

    def change(header, tensors):
      del tensors
      header["entries"]["conv/w"]["future_field"] = "stacked"
    _rewrite(path, change)
    self.assert_refused(path, base, r"header entries 'conv/w' differ")

  def test_header_fields_outside_entries_are_covered(self):
    path, base, _ = self._saved()
    _rewrite(path, lambda header, tensors: header.update(xrapture_version="9.9.9"))
    self.assert_refused(path, base, "header fields .*'xrapture_version'")

  def test_removed_entry_and_tensors(self):
    path, base, _ = self._saved()

    def remove(header, tensors):
      del header["entries"]["head/w"], tensors["head/w"]
    _rewrite(path, remove)
    self.assert_refused(path, base, r"entries 'head/w' were saved but are gone",
                        r"tensors 'head/w' were saved but are gone")

  def test_damaged_checksum_record(self):
    path, base, _ = self._saved()

    def damage(header, tensors):
      del tensors
      header[integrity.KEY]["algorithm"] = "md5"
    _rewrite(path, damage)
    self.assert_refused(path, base, "checksum record itself is damaged")

  @parameterized.named_parameters(
      ("full_leaf_as_float16", "head/w", lambda x: x.astype(np.float16),
       r"'head/w' is stored as float16, but its 'base_dtype' 'float32' needs float32"),
      ("full_leaf_too_short", "head/w", lambda x: x[:-1],
       r"'head/w' has shape \(5, 3\), the entry's base_shape is \(6, 3\)"),
      ("factor_of_another_rank", "conv/w::b", lambda x: x[..., :1],
       r"'conv/w': its factors do not fit base_shape"),
      ("factor_too_long", "conv/w::a", lambda x: np.concatenate([x, x], -1),
       r"'conv/w': its factors do not fit base_shape"),
  )
  def test_tensor_does_not_fit_its_entry(self, key, change, pattern):
    # Even with a matching checksum (a buggy writer), tensors must fit entries.
    path, base, _ = self._saved()

    def edit(header, tensors):
      del header
      tensors[key] = np.ascontiguousarray(change(tensors[key]))
    _rewrite(path, edit, rechecksum=True)
    self.assert_refused(path, base, pattern)

  def test_rank_field_must_match_the_factors(self):
    path, base, _ = self._saved()

    def edit(header, tensors):
      del tensors
      header["entries"]["conv/w"]["rank"] = 3
    _rewrite(path, edit, rechecksum=True)
    self.assert_refused(path, base, r"'conv/w': factors of rank 2, the entry's rank is 3")

  @parameterized.named_parameters(
      ("kind", "kind", "lorb", r"kind 'lorb'; expected one of \['dora', 'full', 'lora'\]"),
      ("alpha_nan", "alpha", float("nan"), r"field 'alpha' = nan is not a finite number"),
      ("rank_string", "rank", "2", r"field 'rank' = '2' is not an integer >= 1"),
      ("dtype", "a_dtype", "flaot32", r"field 'a_dtype' = 'flaot32' is not a floating"),
      ("shape", "base_shape", [3, "x"], r"field 'base_shape' .* is not a shape"),
      ("residual", "residual", [0.5], r"field 'residual' = \[0.5\] is not a residual record"),
      ("residual_values", "residual",
       dict(positions=[0, 1], values=[0.5, float("inf")], quantized=None),
       r"field 'residual' .* does not hold one finite value per position"),
      ("residual_quantized", "residual",
       dict(positions=[0], values=[0.5], quantized=dict(scheme="nf5")),
       r"field 'residual' .* has a 'quantized' field that is not a quantization record"),
  )
  def test_malformed_entry_field(self, field, value, pattern):
    path, base, _ = self._saved()

    def edit(header, tensors):
      del tensors
      header["entries"]["conv/w"][field] = value
    _rewrite(path, edit, rechecksum=True)
    self.assert_refused(path, base, "header entry 'conv/w'", pattern)

  def test_residual_positions_beyond_the_kernel(self):
    path, base, _ = self._saved()

    def edit(header, tensors):
      del tensors
      header["entries"]["conv/w"]["residual"] = dict(positions=[0, 72], values=[0.0, 0.0],
                                                     quantized=None)
    _rewrite(path, edit, rechecksum=True)
    self.assert_refused(path, base, r"'conv/w': its residual record samples positions "
                                    r"beyond the 72 values of base_shape \(3, 4, 6\)")

  def test_missing_entry_field(self):
    # Was a raw KeyError('alpha') without the path.
    path, base, _ = self._saved()
    _rewrite(path, lambda header, tensors: header["entries"]["conv/w"].pop("alpha"),
             rechecksum=True)
    self.assert_refused(path, base, r"'conv/w' lacks fields \['alpha'\]")

  @parameterized.named_parameters(
      ("not_json", "{\"format\": \"xrapture-adapter\", ", "not valid JSON"),
      ("not_a_record", "[1, 2]", "not a record"),
      ("no_entries", json.dumps({"format": "xrapture-adapter", "format_version": 1}),
       "no 'entries' record"),
      ("entry_not_a_record",
       json.dumps({"format": "xrapture-adapter", "format_version": 1, "entries": {"x": 3}}),
       "header entry 'x' is not a record"),
  )
  def test_unreadable_header(self, text, pattern):
    # Were raw JSONDecodeError / AttributeError / KeyError without the path.
    path, base, _ = self._saved()
    with safetensors.safe_open(path, framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={"xrapture": text}))
    self.assert_refused(path, base, pattern)

  def test_stray_tensor(self):
    path, base, _ = self._saved()
    _rewrite(path, lambda header, tensors: tensors.update(extra=np.zeros(2, np.float32)),
             rechecksum=True)
    self.assert_refused(path, base, r"tensors \['extra'\] that no header entry lists")

  def test_file_without_checksum_loads_with_a_warning(self):
    # Files from xrapture 0.1.0 have no checksum; they keep loading.
    path, base, trained = self._saved(dtype="bfloat16")
    _rewrite(path, _without_checksum)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      loaded = xrapture.load_adapter(path, base)
    _assert_restored(self, loaded, trained, base)
    messages = [str(w.message) for w in caught]
    self.assertLen(messages, 1)
    self.assertIn(path, messages[0])
    self.assertIn("no checksum", messages[0])

  def test_file_without_checksum_is_still_checked(self):
    path, base, _ = self._saved()

    def edit(header, tensors):
      header.pop(integrity.KEY)
      tensors["head/w"] = tensors["head/w"].astype(np.float16)
    _rewrite(path, edit)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      self.assert_refused(path, base, r"'head/w' is stored as float16")

  def test_version_2_file_without_checksum(self):
    # Only 0.1.0's files (version 1) may lack the checksum.
    path, base, _ = self._saved(init="pissa")
    _rewrite(path, _without_checksum)
    self.assert_refused(path, base, "a version 2 adapter file without its checksum record")

  @parameterized.parameters("checksun", "entries2")
  def test_unknown_field_without_checksum(self, name):
    # One flipped bit in "checksum" drops the record: the odd field tells.
    path, base, _ = self._saved()

    def edit(header, tensors):
      del tensors
      header[name] = header.pop(integrity.KEY)
    _rewrite(path, edit)
    self.assert_refused(path, base, rf"no checksum but header fields \['{name}'\]")


class SaveAdapterErrorsTest(parameterized.TestCase):

  def _path(self):
    return os.path.join(test_utils.tmpdir(self), "adapter.safetensors")

  def test_base_params_are_refused(self):
    _, base, _, lora_spec = _trained()
    path = self._path()
    with self.assertRaisesRegex(ValueError, r"(?s)'conv/w'.*plain arrays.*model.adapt"):
      xrapture.save_adapter(path, base, lora_spec)
    self.assertFalse(os.path.exists(path))

  def test_nothing_to_save_is_refused(self):
    _, base, _, _ = _trained(full=(), tune_vectors=False)
    frozen = jax.tree.map(lambda _: xrapture.LORA_FREEZE, base)
    path = self._path()
    with self.assertRaisesRegex(ValueError, "would be empty"):
      xrapture.save_adapter(path, base, frozen)
    self.assertFalse(os.path.exists(path))

  @parameterized.parameters(errno.ENOSPC, errno.EACCES, errno.EROFS)
  def test_write_errors_name_the_file(self, code):
    _, base, trained, lora_spec = _trained()
    path = self._path()
    xrapture.save_adapter(path, trained, lora_spec)
    with open(path, "rb") as f:
      old = f.read()

    class Failing:
      def __init__(self, *args, **kwargs):
        del args, kwargs

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        return False

      def write(self, data):
        raise OSError(code, os.strerror(code))

    with mock.patch.object(adapter.atomic, "open", Failing, create=True):
      with self.assertRaises(OSError) as ctx:
        xrapture.save_adapter(path, trained, lora_spec)
    self.assertEqual(ctx.exception.errno, code)
    self.assertIn(path, str(ctx.exception))
    self.assertIn(os.strerror(code), str(ctx.exception))
    with open(path, "rb") as f:
      self.assertEqual(f.read(), old)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["adapter.safetensors"])


if __name__ == "__main__":
  absltest.main()
