"""Tests for xrapture.wrap_optimizer."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import xrapture
from xrapture._src.optim import wrap

_RANK = 2
_X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)


def _net(x):
  h = jax.nn.gelu(hk.Linear(8, name="up")(x))
  h = hk.LayerNorm(-1, True, True)(h)
  h = hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(8, name="mid")(h)))(h)
  return hk.Linear(3, name="head")(h)


def _setup(**overrides):
  """(model, base, params, lora_spec), cached: tests do not mutate them."""
  return _setup_cached(tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _setup_cached(overrides):
  overrides = dict(overrides)
  config = xrapture.default_config()
  config.rank = _RANK
  config.alpha = 4.0
  config.full = ("head/w",)
  for k, v in overrides.items():
    setattr(config, k, v)
  model = xrapture.transform(_net, config)
  base = jax.jit(model.init)(jax.random.PRNGKey(0), _X)
  params = model.adapt(jax.random.PRNGKey(1), base, _X)
  return model, base, params, model.lora_spec(base, _X)


def _leaves_with_paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): v for p, v in flat}


def _trainable_paths(params):
  """Flat paths (as keystr) of a, b and the head kernel, chosen by name here."""
  out = set()
  for path in _leaves_with_paths(params):
    if path.endswith(".a") or path.endswith(".b") or path == "['head']['w']":
      out.add(path)
  return out


class WrapOptimizerTest(parameterized.TestCase):

  def test_training_step_changes_only_adapters_and_full_params(self):
    model, _, params, lora_spec = _setup()
    tx = xrapture.wrap_optimizer(optax.adam(3e-2), lora_spec)
    opt_state = tx.init(params)
    # A target the adapters can reach: the same model with other adapters.
    rng = np.random.default_rng(2)
    teacher = xrapture.tree_map_with_implicit(
        lambda x: x.replace(a=jnp.asarray(rng.normal(0, 0.3, x.a.shape), x.a.dtype),
                            b=jnp.asarray(rng.normal(0, 0.3, x.b.shape), x.b.dtype))
        if isinstance(x, xrapture.LoraWeight) else x, params)
    target = model.apply(teacher, None, _X)

    def loss_fn(p):
      return jnp.mean((model.apply(p, None, _X) - target) ** 2)

    @jax.jit
    def step(p, s):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    with xrapture.strict_mode():
      losses = []
      new = params
      for _ in range(20):
        new, opt_state, loss = step(new, opt_state)
        losses.append(float(loss))
    self.assertLess(losses[-1], 0.2 * losses[0])
    self.assertEqual(jax.tree.structure(new), jax.tree.structure(params))

    before, after = _leaves_with_paths(params), _leaves_with_paths(new)
    trainable = _trainable_paths(params)
    self.assertLen(trainable, 5)  # a and b of up and mid, and head's full kernel
    for path, old in before.items():
      if path in trainable:
        self.assertFalse(np.array_equal(old, after[path]), f"{path} did not change")
      else:
        np.testing.assert_array_equal(old, after[path], err_msg=path)
        self.assertEqual(old.dtype, after[path].dtype)

  def test_optimizer_state_only_for_trainable_leaves(self):
    _, base, params, lora_spec = _setup()
    tx = xrapture.wrap_optimizer(optax.adam(1e-3), lora_spec)
    state = tx.init(params)
    # Expected from the shapes alone: Adam keeps two moments per trainable number.
    up, mid, head = base["up"]["w"].shape, base["__layer_stack_no_per_layer/mid"]["w"].shape, \
        base["head"]["w"].shape
    trainable = (_RANK * (up[0] + up[1]) + mid[0] * _RANK * (mid[1] + mid[2])
                 + int(np.prod(head)))
    self.assertEqual(xrapture.count_trainable(params, lora_spec), trainable)
    float_leaves = [x for x in jax.tree.leaves(state)
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    self.assertEqual(sum(x.size for x in float_leaves), 2 * trainable)
    self.assertEqual(sum(x.nbytes for x in float_leaves), 2 * 4 * trainable)
    # None of the moments has the shape of a frozen base kernel.
    shapes = {tuple(x.shape) for x in float_leaves}
    self.assertNotIn(tuple(up), shapes)
    self.assertNotIn(tuple(mid), shapes)

  def test_flattened_inner_optimizer(self):
    # optax.flatten inside wrap_optimizer (the README's CPU tip): one vector per
    # Adam moment over exactly the trainable leaves, and the same training.
    model, _, params, lora_spec = _setup()
    trainable = xrapture.count_trainable(params, lora_spec)
    flat = xrapture.wrap_optimizer(optax.flatten(optax.adam(1e-2)), lora_spec)
    plain = xrapture.wrap_optimizer(optax.adam(1e-2), lora_spec)
    moments = [x for x in jax.tree.leaves(flat.init(params))
               if jnp.issubdtype(x.dtype, jnp.floating)]
    self.assertEqual([x.shape for x in moments], [(trainable,), (trainable,)])

    def train(tx):
      p, state = params, tx.init(params)
      loss = lambda p: jnp.sum(model.apply(p, None, _X) ** 2)
      for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
      return _leaves_with_paths(p)
    got, want = train(flat), train(plain)
    self.assertEqual(got.keys(), want.keys())
    for path in want:
      np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    before = _leaves_with_paths(params)
    for path in set(want) - _trainable_paths(params):
      np.testing.assert_array_equal(got[path], before[path], err_msg=path)

  def test_state_is_smaller_than_full_fine_tuning(self):
    _, base, params, lora_spec = _setup(full=())
    lora_state = xrapture.wrap_optimizer(optax.adam(1e-3), lora_spec).init(params)
    full_state = optax.adam(1e-3).init(base)
    def nbytes(tree):
      return sum(x.nbytes for x in jax.tree.leaves(tree))
    self.assertLess(nbytes(lora_state), nbytes(full_state) / 2)

  @parameterized.parameters(False, True)
  def test_frozen_updates_are_zero(self, use_scalar_zeros):
    model, _, params, lora_spec = _setup()
    tx = xrapture.wrap_optimizer(optax.sgd(0.1), lora_spec, use_scalar_zeros=use_scalar_zeros)
    state = tx.init(params)
    perturbed = jax.tree.map(lambda x: x + 0.1, params)  # non-zero b: w would get grads
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, None, _X) ** 2)))(perturbed)
    updates, _ = jax.jit(tx.update)(grads, state, perturbed)
    trainable = _trainable_paths(params)
    for path, u in _leaves_with_paths(updates).items():
      if path in trainable:
        self.assertGreater(float(jnp.abs(u).max()), 0.0, path)
      else:
        full_shape = _leaves_with_paths(params)[path].shape
        self.assertEqual(u.shape, () if use_scalar_zeros else full_shape, path)
        np.testing.assert_array_equal(u, 0.0, err_msg=path)
    new = optax.apply_updates(perturbed, updates)
    before, after = _leaves_with_paths(perturbed), _leaves_with_paths(new)
    for path in before:
      self.assertEqual(after[path].shape, before[path].shape)
      if path not in trainable:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)

  def test_frozen_flags(self):
    _, _, params, lora_spec = _setup(tune_vectors=True)
    flags = _leaves_with_paths(wrap.frozen_flags(lora_spec, params))
    self.assertIs(flags["['up']['w'].w"], True)
    self.assertIs(flags["['up']['w'].a"], False)
    self.assertIs(flags["['up']['w'].b"], False)
    self.assertIs(flags["['up']['b']"], False)  # tune_vectors
    self.assertIs(flags["['head']['w']"], False)  # full
    self.assertIs(flags["['layer_norm']['scale']"], False)
    _, _, params, lora_spec = _setup()
    flags = _leaves_with_paths(wrap.frozen_flags(lora_spec, params))
    self.assertIs(flags["['up']['b']"], True)
    self.assertIs(flags["['layer_norm']['scale']"], True)

  @parameterized.parameters(
      ("float16", 2e-2), ("bfloat16", 5e-2))
  def test_low_precision_adapters_with_adam_track_float32(self, dtype, tol):
    # b starts at 0, so a's first gradient is exactly 0; Adam's eps = 1e-8
    # underflows in float16 and 0 / 0 made every step after the first NaN.
    def train(adapter_dtype):
      model, _, params, lora_spec = _setup(dtype=adapter_dtype)
      tx = xrapture.wrap_optimizer(optax.adam(3e-2), lora_spec)
      state = tx.init(params)
      target = jnp.asarray(np.random.default_rng(3).normal(size=(16, 3)), jnp.float32)
      loss_fn = lambda p: jnp.mean((model.apply(p, None, _X) - target) ** 2)

      @jax.jit
      def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

      losses = []
      for _ in range(8):
        params, state, loss = step(params, state)
        losses.append(float(loss))
      return params, state, np.array(losses)

    low_params, low_state, low = train(dtype)
    _, _, reference_losses = train(None)  # the kernels' own dtype: float32
    self.assertTrue(np.all(np.isfinite(low)), low)
    self.assertLess(reference_losses[-1], reference_losses[0])  # it does train
    np.testing.assert_allclose(low, reference_losses, rtol=tol)
    adapter = low_params["up"]["w"]
    self.assertEqual((adapter.a.dtype, adapter.b.dtype), (jnp.dtype(dtype),) * 2)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(x, np.float32)))
                        for x in jax.tree.leaves(low_params)))
    moments = [x for x in jax.tree.leaves(low_state) if x.ndim > 0]
    self.assertNotEmpty(moments)
    self.assertEqual({x.dtype for x in moments}, {jnp.dtype(jnp.float32)})

  def test_tune_vectors_with_integer_params(self):
    def net(x):
      count = hk.get_parameter("count", [3], jnp.int32, init=jnp.zeros)
      return hk.Linear(4)(x) + count.sum()

    config = xrapture.default_config()
    config.rank, config.tune_vectors = 2, True
    model = xrapture.transform(net, config)
    base = model.init(jax.random.PRNGKey(0), _X)
    params = model.adapt(jax.random.PRNGKey(1), base)
    tx = xrapture.wrap_optimizer(optax.adam(1e-2), model.lora_spec(base))
    state = tx.init(params)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, None, _X) ** 2),
                             allow_int=True))(params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)  # raised on float0 before
    np.testing.assert_array_equal(new["~"]["count"], base["~"]["count"])
    self.assertEqual(new["~"]["count"].dtype, jnp.int32)
    self.assertFalse(np.array_equal(new["linear"]["b"], base["linear"]["b"]))

  def test_lora_spec_of_another_tree_is_an_error(self):
    _, _, params, lora_spec = _setup()
    lora_spec = {k: v for k, v in lora_spec.items() if k != "up"}
    tx = xrapture.wrap_optimizer(optax.sgd(0.1), lora_spec)
    with self.assertRaises(ValueError):
      tx.init(params)


if __name__ == "__main__":
  absltest.main()
