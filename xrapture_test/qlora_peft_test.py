"""QLoRA adapters exchanged with HuggingFace PEFT on a bitsandbytes NF4 model.

The reference is the real thing on CPU: a torch model of
``bitsandbytes.nn.Linear4bit`` layers whose weights are the Haiku model's
(quantized by bitsandbytes itself on ``.to("cpu")``), with PEFT LoRA on top.
An adapter PEFT made imports onto xrapture's NF4 base with equal outputs, and
one trained here on the NF4 base loads into that PEFT model with equal
outputs. No network: the model is built here.
"""

import collections
import os

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import xrapture
from xrapture._src.testing import optional

import test_utils

# Every test here needs them: skipped as a module where they are missing.
torch, bnb, peft = optional.require("torch", "bitsandbytes", "peft")

D_IN, D_HID, D_OUT = 64, 128, 48    # input axes 64 and 128: multiples of the block (64)
RANK, ALPHA, BLOCK = 4, 8.0, 64
NAME_MAP = {"fc1/w": "fc1", "fc2/w": "fc2"}
ATOL = 2e-5


def mlp(x):
  h = jax.nn.gelu(hk.Linear(D_HID, name="fc1")(x), approximate=True)
  return hk.Linear(D_OUT, name="fc2")(h)


def _config(double_quant):
  config = xrapture.default_config()
  config.rank, config.alpha = RANK, ALPHA
  config.quantize, config.quantize_block, config.double_quant = "nf4", BLOCK, double_quant
  return config


def _inputs(seed, n=5):
  return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32)


def _base():
  return hk.transform(mlp).init(jax.random.PRNGKey(0), jnp.asarray(_inputs(0)))


def _torch_qlora_base(base, double_quant):
  """``nn.Sequential(fc1, GELU, fc2)`` of NF4 Linear4bit layers holding ``base``'s weights."""
  def layer(name):
    w, b = (np.asarray(base[name][k]) for k in ("w", "b"))
    linear = bnb.nn.Linear4bit(w.shape[0], w.shape[1], bias=True, quant_type="nf4",
                               compress_statistics=double_quant,
                               compute_dtype=torch.float32)
    linear.weight = bnb.nn.Params4bit(
        torch.from_numpy(w.T.copy()), requires_grad=False, quant_type="nf4",
        blocksize=BLOCK, compress_statistics=double_quant)
    linear.bias = torch.nn.Parameter(torch.from_numpy(b.copy()))
    # bitsandbytes (0.50 here) on an AVX512-BF16 CPU repacks the weight in place
    # at the first no-grad eval forward for an inference kernel that rounds
    # absmax to bfloat16 (and needs out_features % 32 == 0). The reference is
    # the exact NF4 path bitsandbytes takes on other CPUs: dequantize, then a float32 matmul.
    linear.support_avx512bf16_for_cpu = False
    return linear
  model = torch.nn.Sequential(collections.OrderedDict(
      fc1=layer("fc1"), act=torch.nn.GELU(approximate="tanh"), fc2=layer("fc2")))
  return model.to("cpu")   # bitsandbytes quantizes Params4bit here


def _torch_dequantized(linear):
  import bitsandbytes.functional as bnb_f  # pylint: disable=g-import-not-at-top
  return bnb_f.dequantize_4bit(linear.weight.data, linear.weight.quant_state).numpy()


def _torch_out(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x)).numpy()


class QloraPeftTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = test_utils.tmpdir(self)
    torch.manual_seed(0)

  def _check_same_base(self, params, torch_model, double_quant):
    """Our NF4 base is bitsandbytes': the same codes, the same dequantized weights."""
    for name in ("fc1", "fc2"):
      q = params[name]["w"].w
      linear = getattr(torch_model, name)
      ours = np.asarray(xrapture.dequantize(q)).T
      theirs = _torch_dequantized(linear)
      if double_quant:   # torch's mean of the absmax may differ by an ulp
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
      else:
        np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1),
                                      linear.weight.data.numpy().reshape(-1))
        np.testing.assert_array_equal(ours, theirs)

  @parameterized.parameters(False, True)
  def test_peft_adapter_imports_onto_our_nf4_base(self, double_quant):
    base = _base()
    torch_model = _torch_qlora_base(base, double_quant)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["fc1", "fc2"],
                             lora_dropout=0.0)
    peft_model = peft.get_peft_model(torch_model, config)
    with torch.no_grad():   # a trained adapter: both factors non-zero
      for name, p in peft_model.named_parameters():
        if "lora_" in name:
          p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(self.dir)
    x = _inputs(1)
    expected = _torch_out(peft_model.eval(), x)

    imported = xrapture.import_peft(self.dir, base, NAME_MAP)
    params = xrapture.quantize(imported, _config(double_quant))
    self._check_same_base(params, torch_model, double_quant)
    with xrapture.strict_mode():
      got = xrapture.use_implicit_args(hk.transform(mlp).apply)(params, None, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # Positive control: the adapter matters at this tolerance.
    base_only = _torch_out(_torch_qlora_base(base, double_quant), x)
    self.assertGreater(np.abs(base_only - expected).max(), 100 * ATOL)

  @parameterized.parameters(False, True)
  def test_adapter_trained_on_our_nf4_base_loads_into_peft(self, double_quant):
    base, config = _base(), _config(double_quant)
    model = xrapture.transform(mlp, config)
    params = model.adapt(jax.random.PRNGKey(1), base)
    tx = xrapture.wrap_optimizer(optax.adam(3e-2), model.lora_spec(base))
    opt_state = tx.init(params)
    x_train = jnp.asarray(_inputs(2, 16))
    target = jnp.sin(x_train[:, :D_OUT])

    @jax.jit
    def step(params, opt_state):
      loss = lambda p: jnp.mean((model.apply(p, None, x_train) - target) ** 2)
      grads = jax.grad(loss, allow_int=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    for _ in range(5):
      params, opt_state = step(params, opt_state)
    xrapture.export_peft(self.dir, params, config, NAME_MAP)

    torch_model = _torch_qlora_base(base, double_quant)
    self._check_same_base(params, torch_model, double_quant)
    peft_model = peft.PeftModel.from_pretrained(torch_model, self.dir).eval()
    x = _inputs(3)
    with xrapture.strict_mode():
      got = model.apply(params, None, jnp.asarray(x))
    np.testing.assert_allclose(got, _torch_out(peft_model, x), rtol=0, atol=ATOL)
    base_only = _torch_out(_torch_qlora_base(base, double_quant), x)
    self.assertGreater(np.abs(base_only - np.asarray(got)).max(), 100 * ATOL)
    self.assertTrue(os.path.exists(os.path.join(self.dir, "adapter_model.safetensors")))


if __name__ == "__main__":
  absltest.main()
