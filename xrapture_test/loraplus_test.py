"""Tests for LoRA+ (xrapture/_src/optim/loraplus.py, wrap_optimizer's loraplus_lr_ratio).

Reference: real PEFT, ``create_loraplus_optimizer`` with torch's Adam, trained
side by side from the same factors; and plain SGD updates checked field by
field.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xrapture
from xrapture._src.lora import dora
from xrapture._src.testing import optional

import test_utils

torch, peft, peft_optimizers = optional.modules("torch", "peft", "peft.optimizers")
nn = torch.nn if torch is not None else None

IN, HIDDEN, OUT = 6, 9, 4
RATIO, LR = 8.0, 1e-2


def _forward(x):
  return hk.Linear(OUT, name="head")(jnp.tanh(hk.Linear(HIDDEN, name="up")(x)))


_NAME_MAP = {"up/w": "up", "head/w": "head"}


def _lora_spec(params):
  return jax.tree.map(lambda v: v.rank if dora.is_adapter(v) else xrapture.LORA_FREEZE,
                      params, is_leaf=dora.is_adapter)


class ScaleTest(absltest.TestCase):

  def test_scales_a_magnitude_and_vectors_only(self):
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    lora = xrapture.LoraWeight(r(5, 4), r(2, 4), r(5, 2))
    params = {"l": {"w": lora, "b": r(4)},
              "d": {"w": dora.from_lora(xrapture.LoraWeight(r(5, 4), r(2, 4), r(5, 2)))},
              "full": {"w": r(3, 3)}}
    lora_spec = {"l": {"w": 2, "b": xrapture.LORA_FULL}, "d": {"w": 2},
                 "full": {"w": xrapture.LORA_FULL}}
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    plain = xrapture.wrap_optimizer(optax.sgd(1.0), lora_spec)
    fast = xrapture.wrap_optimizer(optax.sgd(1.0), lora_spec, loraplus_lr_ratio=RATIO)
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = fast.update(grads, fast.init(params), params)
    for (path, x0), (_, x1) in zip(
        jax.tree_util.tree_flatten_with_path(u0)[0],
        jax.tree_util.tree_flatten_with_path(u1)[0]):
      name = jax.tree_util.keystr(path)
      scaled = (name.endswith(".a") or name.endswith(".magnitude")
                or name == "['l']['b']")
      np.testing.assert_array_equal(x1, x0 * (RATIO if scaled else 1.0), name)
    np.testing.assert_array_equal(u1["l"]["w"].w, 0.0)    # w stays frozen


@absltest.skipIf(peft is None, optional.MISSING)
class PeftLoraPlusTest(parameterized.TestCase):
  """Our LoRA+ Adam steps equal PEFT's create_loraplus_optimizer's."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(5, IN)).astype(np.float32)
    self.y = rng.normal(size=(5, OUT)).astype(np.float32)
    self.base = hk.transform(_forward).init(jax.random.PRNGKey(0), self.x)
    self.tmp = test_utils.tmpdir(self)

  def _torch(self):
    model = nn.Sequential()
    model.up, model.act, model.head = nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)
    b = self.base
    state = {"up.weight": b["up"]["w"].T, "up.bias": b["up"]["b"],
             "head.weight": b["head"]["w"].T, "head.bias": b["head"]["b"]}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model

  def _train_peft(self, use_dora, steps):
    model = peft.get_peft_model(self._torch(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["up", "head"], use_dora=use_dora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
          p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(self.tmp)            # the starting point, for xrapture
    opt = peft_optimizers.create_loraplus_optimizer(model, torch.optim.Adam, lr=LR,
                                    loraplus_lr_ratio=RATIO)
    x, y = torch.from_numpy(self.x), torch.from_numpy(self.y)
    for _ in range(steps):
      opt.zero_grad()
      loss = ((model(x) - y) ** 2).mean()
      loss.backward()
      opt.step()
    model.save_pretrained(os.path.join(self.tmp, "trained"))
    return xrapture.import_peft(os.path.join(self.tmp, "trained"), self.base, _NAME_MAP)

  def _train_ours(self, ratio, steps):
    params = xrapture.import_peft(self.tmp, self.base, _NAME_MAP)
    apply = xrapture.use_implicit_args(hk.transform(_forward).apply)
    tx = xrapture.wrap_optimizer(optax.adam(LR), _lora_spec(params),
                                 loraplus_lr_ratio=ratio)
    state = tx.init(params)
    loss = lambda p: jnp.mean((apply(p, None, self.x) - self.y) ** 2)
    for _ in range(steps):
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  @parameterized.parameters(False, True)
  def test_matches_peft(self, use_dora):
    want = self._train_peft(use_dora, steps=3)
    got = self._train_ours(RATIO, steps=3)
    fields = ("a", "b", "magnitude") if use_dora else ("a", "b")
    for module in ("up", "head"):
      for field in fields:
        np.testing.assert_allclose(getattr(got[module]["w"], field),
                                   getattr(want[module]["w"], field), atol=2e-5,
                                   err_msg=f"{module}.{field}")
    # Positive control: without LoRA+ the a factors end elsewhere.
    plain = self._train_ours(None, steps=3)
    self.assertGreater(np.abs(plain["up"]["w"].a - want["up"]["w"].a).max(), 1e-3)


if __name__ == "__main__":
  absltest.main()
