"""Tests for xrapture/_src/io/peft/ against real HuggingFace PEFT.

A torch model and a Haiku model of the same architecture share base weights;
adapters made on one side must give the same outputs on the other.
"""

import json
import os
import re
import warnings

# PEFT and transformers must never reach the Hub; read before they import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

import xrapture
from xrapture._src.io import peft as peft_io
from xrapture._src.transform import config as config_lib

from xrapture._src.testing import optional

import test_utils

# None where the `peft` extra is not installed (an error in the test command's
# full leg, which sets XRAPTURE_REQUIRE_TORCH=1).
peft, torch, nn = optional.modules("peft", "torch", "torch.nn")

_NEEDS_PEFT = optional.MISSING

VOCAB, DIM, HIDDEN, OUT, LAYERS, SEQ = 13, 8, 12, 5, 2, 6
ATTN = ("q", "k", "v", "o")
MLP = ("up", "down")


# ----------------------------------------------------------------------------
# The same transformer-ish model in Haiku and in torch.


def hk_forward(ids):
  h = hk.Embed(VOCAB, DIM, name="embed")(ids)
  for i in range(LAYERS):
    with hk.name_scope(f"layer_{i}"):
      with hk.name_scope("attn"):
        q, k, v = (hk.Linear(DIM, name=n)(h) for n in ("q", "k", "v"))
        weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(DIM))
        h = h + hk.Linear(DIM, name="o")(weights @ v)
      with hk.name_scope("mlp"):
        h = h + hk.Linear(DIM, name="down")(jnp.tanh(hk.Linear(HIDDEN, name="up")(h)))
  return hk.Linear(OUT, name="head")(h)


def name_map(path):
  """Haiku "layer_0/attn/q/w" -> torch "layers.0.attn.q"; None for the rest."""
  if path == "embed/embeddings":
    return "embed"
  if path == "head/w":
    return "head"
  m = re.fullmatch(r"layer_(\d+)/(attn|mlp)/(\w+)/w", path)
  return None if m is None else f"layers.{m[1]}.{m[2]}.{m[3]}"


def hk_conv_forward(x):  # x [B, H, W, C]
  h = jnp.tanh(hk.Conv2D(4, 3, padding="SAME", name="conv")(x))
  h = jnp.tanh(hk.Conv2D(5, 1, name="pointwise")(h))
  return hk.Linear(OUT, name="head")(h.reshape(h.shape[0], -1))


CONV_NAME_MAP = {"conv/w": "conv", "pointwise/w": "pointwise", "head/w": "head"}


def hk_stacked_forward(x):
  def layer(h):
    return jnp.tanh(hk.Linear(DIM, name="dense")(h))
  return hk.layer_stack(3)(layer)(x)


HEADS, HEAD_DIM, EXPERTS, FF = 2, 3, 3, 7


def hk_einsum_forward(x):
  """Attention-style multi-axis kernels: [d, heads, head_dim] and [heads, head_dim, d]."""
  init = hk.initializers.VarianceScaling(1.0)
  with hk.name_scope("query"):
    wq = hk.get_parameter("w", [DIM, HEADS, HEAD_DIM], init=init)
  with hk.name_scope("out"):
    wo = hk.get_parameter("w", [HEADS, HEAD_DIM, DIM], init=init)
  return jnp.einsum("bthk,hkd->btd", jnp.tanh(jnp.einsum("btd,dhk->bthk", x, wq)), wo)


EINSUM_NAME_MAP = {"query/w": "query", "out/w": "out"}


def hk_experts_forward(x):  # x [experts, tokens, DIM]
  init = hk.initializers.VarianceScaling(1.0)
  with hk.name_scope("experts"):
    w = hk.get_parameter("w", [EXPERTS, DIM, FF], init=init)
  return jnp.einsum("ecd,edf->ecf", x, w)


STACKED_PATH = "__layer_stack_no_per_layer/dense/w"
STACKED_NAME_MAP = {STACKED_PATH: [f"layers.{i}" for i in range(3)]}

if torch is not None:

  class TorchBlock(nn.Module):

    def __init__(self):
      super().__init__()
      self.attn = nn.ModuleDict({n: nn.Linear(DIM, DIM) for n in ATTN})
      self.mlp = nn.ModuleDict({"up": nn.Linear(DIM, HIDDEN), "down": nn.Linear(HIDDEN, DIM)})

    def forward(self, h):
      a = self.attn
      weights = torch.softmax(a["q"](h) @ a["k"](h).transpose(-1, -2) / np.sqrt(DIM), -1)
      h = h + a["o"](weights @ a["v"](h))
      return h + self.mlp["down"](torch.tanh(self.mlp["up"](h)))

  class TorchNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, DIM)
      self.layers = nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
      self.head = nn.Linear(DIM, OUT)

    def forward(self, ids):
      h = self.embed(ids)
      for layer in self.layers:
        h = layer(h)
      return self.head(h)

  class TorchConvNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 4, 3, padding=1)
      self.pointwise = nn.Conv2d(4, 5, 1)
      self.head = nn.Linear(5 * 4 * 4, OUT)

    def forward(self, x):  # x [B, C, H, W]
      h = torch.tanh(self.pointwise(torch.tanh(self.conv(x))))
      return self.head(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))

  class TorchStacked(nn.Module):

    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleList([nn.Linear(DIM, DIM) for _ in range(3)])

    def forward(self, h):
      for layer in self.layers:
        h = torch.tanh(layer(h))
      return h


  class TorchEinsum(nn.Module):

    def __init__(self):
      super().__init__()
      self.query = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
      self.out = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x):
      return self.out(torch.tanh(self.query(x)))

  class ExpertWeights(nn.Module):
    """A raw [experts, in, out] (or [experts, out, in]) nn.Parameter, as MoE code has."""

    def __init__(self, transposed):
      super().__init__()
      self.is_transposed = transposed  # PEFT reads it: the parameter is [E, in, out]
      shape = (EXPERTS, DIM, FF) if transposed else (EXPERTS, FF, DIM)
      self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
      if self.is_transposed:
        return torch.einsum("ecd,edf->ecf", x, self.weight)
      return torch.einsum("ecd,efd->ecf", x, self.weight)

  class TorchExperts(nn.Module):

    def __init__(self, transposed):
      super().__init__()
      self.experts = ExpertWeights(transposed)

    def forward(self, x):
      return self.experts(x)


def _load_base(torch_model, params, name_map_fn):
  """Copies Haiku base params into ``torch_model`` (kernels transposed)."""
  state = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for key_path, value in flat:
    module, param = key_path[0].key, key_path[1].key
    value = np.asarray(value)
    mapped = name_map_fn(f"{module}/{'w' if param == 'b' else param}")
    targets = [mapped] if isinstance(mapped, str) else list(mapped)
    values = [value] if isinstance(mapped, str) else list(value)
    for tpath, v in zip(targets, values):
      if param == "embeddings":
        state[f"{tpath}.weight"] = v
      elif param == "b":
        state[f"{tpath}.bias"] = v
      elif v.ndim == 2:
        state[f"{tpath}.weight"] = v.T
      else:  # conv HWIO -> OIHW
        state[f"{tpath}.weight"] = np.transpose(v, (3, 2, 0, 1))
  result = torch_model.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  assert not result.missing_keys and not result.unexpected_keys, result
  return torch_model


def _lookup(mapping, path):
  return mapping(path) if callable(mapping) else mapping.get(path)


def _random_adapters(params, ranks, alphas, rslora, seed=0):
  """Wraps every kernel in a LoraWeight with random (non-zero) a and b."""
  rng = np.random.default_rng(seed)
  def wrap(path, w):
    if path.rsplit("/", 1)[-1] not in ("w", "embeddings"):
      return w
    r, alpha = ranks(path), alphas(path)
    lead = w.shape[:-2]
    if np.ndim(w) == 4:      # conv: b spans the window, a is pointwise
      a_lead, b_lead = (1,) * len(lead), lead
    else:                    # stacked layers: one pair per layer
      a_lead = b_lead = lead
    a = rng.normal(0, 0.1, a_lead + (r, w.shape[-1])).astype(np.float32)
    b = rng.normal(0, 0.1, b_lead + (w.shape[-2], r)).astype(np.float32)
    return xrapture.LoraWeight(w, jnp.asarray(a), jnp.asarray(b), alpha=alpha,
                               rslora=rslora)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(
      treedef, [wrap(f"{p[0].key}/{p[1].key}", v) for p, v in flat])


def _config(rank=2, alpha=3.0, rslora=False, rank_pattern=(), alpha_pattern=()):
  config = xrapture.default_config()
  config.rank, config.alpha, config.rslora = rank, alpha, rslora
  config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
  config.targets = (r".*/w", r".*/embeddings")
  return config


# The cases: (name, config kwargs). Patterns are xrapture regexes on Haiku paths.
_CASES = (
    ("plain", {}),
    ("rslora", dict(rslora=True, alpha=5.0)),
    ("patterns", dict(rank_pattern=((r"layer_1/.*", 3), (r"head/w", 4)),
                      alpha_pattern=((r".*/mlp/.*", 7.5), (r"embed/.*", 1.0)))),
)


def _peft_config(config, torch_names):
  """The LoraConfig PEFT users would write for the same adapters."""
  rank_pattern, alpha_pattern = {}, {}
  for tname in torch_names:
    hpath = name_map_inverse(tname)
    if config_lib.rank_for(config, hpath) != config.rank:
      rank_pattern[tname] = config_lib.rank_for(config, hpath)
    if config_lib.alpha_for(config, hpath) != config.alpha:
      alpha_pattern[tname] = config_lib.alpha_for(config, hpath)
  return peft.LoraConfig(
      r=config.rank, lora_alpha=config.alpha, use_rslora=config.rslora,
      target_modules=sorted(torch_names), rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern)


def _all_torch_names():
  names = ["embed", "head"]
  for i in range(LAYERS):
    names += [f"layers.{i}.attn.{n}" for n in ATTN]
    names += [f"layers.{i}.mlp.{n}" for n in MLP]
  return names


def full_name_map(path):
  """name_map plus the biases: "layer_0/attn/q/b" -> "layers.0.attn.q" too."""
  if path.endswith("/b"):
    return name_map(path[:-1] + "w")
  return name_map(path)


def name_map_inverse(tname):
  if tname in ("embed", "head"):
    return {"embed": "embed/embeddings", "head": "head/w"}[tname]
  _, i, group, n = tname.split(".")
  return f"layer_{i}/{group}/{n}/w"


def _randomize_lora(torch_model, seed=0):
  """Perturbs what PEFT trains (LoRA factors, modules_to_save, biases).

  PEFT zero-inits lora_B (and lora_embedding_A); this makes all non-zero.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
      elif p.requires_grad:
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


class _Base(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)
    self.ids = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    self.base = hk.transform(hk_forward).init(jax.random.PRNGKey(0), self.ids)
    self.apply = xrapture.use_implicit_args(hk.transform(hk_forward).apply)


@absltest.skipIf(peft is None, _NEEDS_PEFT)
class PeftCompatTest(_Base):
  """Outputs agree between xrapture and real PEFT, both directions."""

  def _torch(self):
    torch.manual_seed(0)
    return _load_base(TorchNet(), self.base, name_map).eval()

  def test_base_models_agree(self):
    with torch.no_grad():
      want = self._torch()(torch.from_numpy(self.ids).long()).numpy()
    got = hk.transform(hk_forward).apply(self.base, None, self.ids)
    np.testing.assert_allclose(got, want, atol=1e-5)

  @parameterized.named_parameters(*_CASES)
  def test_export_loads_in_peft(self, kw):
    config = _config(**kw)
    params = _random_adapters(
        self.base, lambda p: config_lib.rank_for(config, p),
        lambda p: config_lib.alpha_for(config, p), config.rslora)
    want = np.asarray(self.apply(params, None, self.ids))
    base_out = np.asarray(self.apply(self.base, None, self.ids))
    self.assertGreater(np.abs(want - base_out).max(), 1e-2)  # adapters matter

    path = os.path.join(self.tmp, "adapter")
    xrapture.export_peft(path, params, config, name_map)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      model = peft.PeftModel.from_pretrained(self._torch(), path).eval()
    self.assertEmpty([str(w.message) for w in caught
                      if "missing" in str(w.message).lower()
                      or "unexpected" in str(w.message).lower()])
    with torch.no_grad():
      got = model(torch.from_numpy(self.ids).long()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    # PEFT built each module with the rank and scale the LoraWeight has.
    lora_modules = {n: m for n, m in model.base_model.model.named_modules()
                    if hasattr(m, "scaling") and "default" in m.scaling}
    self.assertCountEqual(lora_modules, _all_torch_names())
    for tname, module in lora_modules.items():
      hpath = name_map_inverse(tname)
      module_name, param = hpath.rsplit("/", 1)
      lora = params[module_name][param]
      self.assertEqual(module.r["default"], lora.rank, tname)
      self.assertAlmostEqual(module.scaling["default"], lora.get_scale(), places=6)
      # The layout itself: lora_A = bᵀ, lora_B = aᵀ (lora_embedding_* alike).
      if tname == "embed":
        A, B = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
      else:
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
      np.testing.assert_array_equal(A.detach().numpy(), np.asarray(lora.b).T)
      np.testing.assert_array_equal(B.detach().numpy(), np.asarray(lora.a).T)

  @parameterized.named_parameters(
      ("transformer", hk_forward, "ids", name_map),
      ("conv", hk_conv_forward, "images", CONV_NAME_MAP))
  def test_trained_with_transform(self, forward, inputs, mapping):
    """xrapture.transform + adapt + a few optimizer steps, then PEFT."""
    if inputs == "ids":
      x, x_torch, net = self.ids, torch.from_numpy(self.ids).long(), TorchNet
    else:
      x = np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype(np.float32)
      x_torch, net = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), TorchConvNet
    config = _config(rank=2, alpha=4.0, rank_pattern=((r"head/w", 3),))
    model = xrapture.transform(forward, config)
    base = model.init(jax.random.PRNGKey(0), x)
    params = model.adapt(jax.random.PRNGKey(1), base, x)
    tx = xrapture.wrap_optimizer(optax.sgd(0.3), model.lora_spec(base, x))
    opt_state = tx.init(params)
    loss = lambda p: jnp.mean((model.apply(p, None, x) - 1.0) ** 2)

    @jax.jit
    def step(params, opt_state):
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
      params, opt_state = step(params, opt_state)
    want = np.asarray(model.apply(params, None, x))
    self.assertGreater(np.abs(want - model.apply(base, None, x)).max(), 1e-3)

    path = os.path.join(self.tmp, "trained")
    xrapture.export_peft(path, params, model.config, mapping)
    get = mapping if callable(mapping) else mapping.get
    torch_model = _load_base(net(), base, get).eval()
    peft_model = peft.PeftModel.from_pretrained(torch_model, path).eval()
    with torch.no_grad():
      np.testing.assert_allclose(peft_model(x_torch).numpy(), want, atol=1e-5)

  @parameterized.named_parameters(*_CASES)
  def test_peft_adapter_imports(self, kw):
    config = _config(**kw)
    model = peft.get_peft_model(self._torch(), _peft_config(config, _all_torch_names()))
    _randomize_lora(model)
    model.eval()
    with torch.no_grad():
      want = model(torch.from_numpy(self.ids).long()).numpy()
      base_out = self._torch()(torch.from_numpy(self.ids).long()).numpy()
    self.assertGreater(np.abs(want - base_out).max(), 1e-2)
    path = os.path.join(self.tmp, "from_peft")
    model.save_pretrained(path)

    params = xrapture.import_peft(path, self.base, name_map)
    got = np.asarray(self.apply(params, None, self.ids))
    np.testing.assert_allclose(got, want, atol=1e-5)
    for tname in _all_torch_names():
      module_name, param = name_map_inverse(tname).rsplit("/", 1)
      lora = params[module_name][param]
      self.assertIsInstance(lora, xrapture.LoraWeight)
      self.assertEqual(lora.rank, config_lib.rank_for(config, name_map_inverse(tname)))
      self.assertEqual(lora.rslora, config.rslora)
    # Untouched leaves are the very same objects.
    self.assertIs(params["head"]["b"], self.base["head"]["b"])

  def test_peft_subset_of_modules(self):
    """Adapters on some modules only (q and v); the rest stay plain arrays."""
    torch_names = [f"layers.{i}.attn.{n}" for i in range(LAYERS) for n in ("q", "v")]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"])
    model = peft.get_peft_model(self._torch(), config)
    _randomize_lora(model)
    model.eval()
    with torch.no_grad():
      want = model(torch.from_numpy(self.ids).long()).numpy()
    path = os.path.join(self.tmp, "qv")
    model.save_pretrained(path)
    params = xrapture.import_peft(path, self.base, name_map)
    np.testing.assert_allclose(self.apply(params, None, self.ids), want, atol=1e-5)
    adapted = [p for p, v in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))[0]
               if isinstance(v, xrapture.LoraWeight)]
    self.assertLen(adapted, len(torch_names))

  def test_conv_both_directions(self):
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype(np.float32)
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    base = hk.transform(hk_conv_forward).init(jax.random.PRNGKey(0), x)
    apply = xrapture.use_implicit_args(hk.transform(hk_conv_forward).apply)
    fresh = lambda: _load_base(TorchConvNet(), base, CONV_NAME_MAP.get).eval()
    with torch.no_grad():
      np.testing.assert_allclose(fresh()(x_torch).numpy(),
                                 hk.transform(hk_conv_forward).apply(base, None, x),
                                 atol=1e-5)
    # xrapture -> PEFT.
    params = _random_adapters(base, lambda p: 2, lambda p: 3.0, False)
    xrapture.export_peft(os.path.join(self.tmp, "conv"), params, None, CONV_NAME_MAP)
    model = peft.PeftModel.from_pretrained(fresh(), os.path.join(self.tmp, "conv")).eval()
    with torch.no_grad():
      np.testing.assert_allclose(model(x_torch).numpy(), apply(params, None, x),
                                 atol=1e-5)
    # PEFT -> xrapture.
    model = peft.get_peft_model(fresh(), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["conv", "pointwise", "head"]))
    _randomize_lora(model, seed=3)
    model.eval()
    model.save_pretrained(os.path.join(self.tmp, "conv_peft"))
    params = xrapture.import_peft(os.path.join(self.tmp, "conv_peft"), base, CONV_NAME_MAP)
    # Layout 'iiio': a is [r, out] (0.1.0 kept size-1 window axes: (1, 1, 2, 4)).
    self.assertEqual(params["conv"]["w"].layout, "iiio")
    self.assertEqual(params["conv"]["w"].a.shape, (2, 4))
    self.assertEqual(params["conv"]["w"].b.shape, (3, 3, 3, 2))
    with torch.no_grad():
      np.testing.assert_allclose(apply(params, None, x), model(x_torch).numpy(),
                                 atol=1e-5)

  def test_stacked_layers_both_directions(self):
    x = np.random.default_rng(4).normal(size=(3, DIM)).astype(np.float32)
    base = hk.transform(hk_stacked_forward).init(jax.random.PRNGKey(0), x)
    apply = xrapture.use_implicit_args(hk.transform(hk_stacked_forward).apply)
    mapping = lambda p: STACKED_NAME_MAP.get(p) or STACKED_NAME_MAP.get(p[:-1] + "w")
    fresh = lambda: _load_base(TorchStacked(), base, mapping).eval()
    params = _random_adapters(base, lambda p: 2, lambda p: 3.0, False)
    xrapture.export_peft(os.path.join(self.tmp, "st"), params, None, STACKED_NAME_MAP)
    model = peft.PeftModel.from_pretrained(fresh(), os.path.join(self.tmp, "st")).eval()
    with torch.no_grad():
      np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(),
                                 apply(params, None, x), atol=1e-5)
    model = peft.get_peft_model(fresh(), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["0", "1", "2"]))
    _randomize_lora(model, seed=5)
    model.eval()
    model.save_pretrained(os.path.join(self.tmp, "st_peft"))
    params = xrapture.import_peft(os.path.join(self.tmp, "st_peft"), base,
                                  STACKED_NAME_MAP)
    self.assertEqual(params["__layer_stack_no_per_layer/dense"]["w"].a.shape,
                     (3, 2, DIM))
    with torch.no_grad():
      np.testing.assert_allclose(apply(params, None, x),
                                 model(torch.from_numpy(x)).numpy(), atol=1e-5)

  @parameterized.named_parameters(("all", "all"), ("lora_only", "lora_only"))
  def test_modules_to_save_and_biases(self, bias):
    """Whole modules and biases PEFT trained land on the Haiku params."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "embed"],
                             modules_to_save=["head"], bias=bias)
    model = peft.get_peft_model(self._torch(), config)
    _randomize_lora(model)
    model.eval()
    with torch.no_grad():
      want = model(torch.from_numpy(self.ids).long()).numpy()
    path = os.path.join(self.tmp, "mts")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers"
      model.save_pretrained(path)
    with self.assertRaisesRegex(ValueError, r"head\.bias"):  # biases unmapped
      xrapture.import_peft(path, self.base, name_map)
    params = xrapture.import_peft(path, self.base, full_name_map)
    np.testing.assert_allclose(self.apply(params, None, self.ids), want, atol=1e-5)
    head = model.base_model.model.head.modules_to_save["default"]
    np.testing.assert_array_equal(params["head"]["w"], head.weight.detach().numpy().T)
    changed = params["layer_0/attn/q"]["b"] is not self.base["layer_0/attn/q"]["b"]
    self.assertTrue(changed)  # a LoRA layer's bias: trained in both modes
    changed = params["layer_0/attn/k"]["b"] is not self.base["layer_0/attn/k"]["b"]
    self.assertEqual(changed, bias == "all")

  @parameterized.named_parameters(
      ("lora_bias", dict(lora_bias=True), "lora_bias"),
      ("pissa", dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
  )
  def test_unsupported_peft_features(self, overrides, named):
    kw = dict(r=2, lora_alpha=4, target_modules=["q", "v"])
    kw.update(overrides)
    model = peft.get_peft_model(self._torch(), peft.LoraConfig(**kw))
    path = os.path.join(self.tmp, "unsupported")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PEFT on lora_bias's 1-D tensors
      model.save_pretrained(path)
    with self.assertRaisesRegex(ValueError, re.escape(named)):
      xrapture.import_peft(path, self.base, name_map)


@absltest.skipIf(peft is None, _NEEDS_PEFT)
class PeftLayoutTest(parameterized.TestCase):
  """Multi-axis kernels and expert stacks against real PEFT, both directions."""

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)

  def _random(self, params, seed=0):
    rng = np.random.default_rng(seed)
    return xrapture.tree_map_with_implicit(
        lambda p: p.replace(a=jnp.asarray(rng.normal(0, 0.3, p.a.shape), jnp.float32),
                            b=jnp.asarray(rng.normal(0, 0.3, p.b.shape), jnp.float32))
        if isinstance(p, xrapture.LoraWeight) else p, params)

  def test_multi_axis_kernels_are_the_linear_they_equal(self):
    x = np.random.default_rng(0).normal(size=(2, 4, DIM)).astype(np.float32)
    config = _config(rank=2, alpha=3.0)
    config.targets = ("all-linear",)
    model = xrapture.transform(hk_einsum_forward, config)
    base = model.init(jax.random.PRNGKey(0), x)
    params = self._random(model.adapt(jax.random.PRNGKey(1), base, x))
    self.assertEqual((params["query"]["w"].layout, params["out"]["w"].layout),
                     ("ioo", "iio"))
    torch_model = TorchEinsum()
    with torch.no_grad():  # nn.Linear(d, heads·head_dim) holds the flattened kernel
      torch_model.query.weight.copy_(torch.from_numpy(
          np.asarray(base["query"]["w"]).reshape(DIM, -1).T.copy()))
      torch_model.out.weight.copy_(torch.from_numpy(
          np.asarray(base["out"]["w"]).reshape(-1, DIM).T.copy()))
    want = np.asarray(model.apply(params, None, x))
    # 'iio' is also a Conv1D's layout: by default it is written as a conv
    # adapter (0.1.0's rule for kernels with more than two axes) ...
    xrapture.export_peft(os.path.join(self.tmp, "conv"), params, config, EINSUM_NAME_MAP)
    tensors = safetensors.numpy.load_file(
        os.path.join(self.tmp, "conv", peft_io.WEIGHTS_NAME))
    self.assertEqual(tensors["base_model.model.out.lora_A.weight"].shape,
                     (2, HEAD_DIM, HEADS))
    # ... and linear= says it is an nn.Linear.
    path = os.path.join(self.tmp, "einsum")
    xrapture.export_peft(path, params, config, EINSUM_NAME_MAP, linear=("out/w",))
    peft_model = peft.PeftModel.from_pretrained(torch_model, path).eval()
    with torch.no_grad():
      got = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # And back: PEFT's factors onto the adapted params (their layouts) or
    # onto plain params with layouts=.
    _randomize_lora(peft_model, seed=2)
    peft_model.save_pretrained(os.path.join(self.tmp, "back"))
    with torch.no_grad():
      want = peft_model(torch.from_numpy(x)).numpy()
    for onto, kw in ((params, {}), (base, {"layouts": {"query/w": "ioo",
                                                        "out/w": "iio"}})):
      loaded = xrapture.import_peft(os.path.join(self.tmp, "back"), onto,
                                    EINSUM_NAME_MAP, **kw)
      np.testing.assert_allclose(model.apply(loaded, None, x), want, atol=1e-5)
    with self.assertRaisesRegex(ValueError, r"(?s)'(query|out)/w'.*layouts="):
      xrapture.import_peft(os.path.join(self.tmp, "back"), base, EINSUM_NAME_MAP)

  @parameterized.named_parameters(("in_out", True), ("out_in", False))
  def test_expert_stack_is_a_target_parameter(self, transposed):
    x = np.random.default_rng(0).normal(size=(EXPERTS, 4, DIM)).astype(np.float32)
    config = _config(rank=2, alpha=3.0)
    model = xrapture.transform(hk_experts_forward, config)
    base = model.init(jax.random.PRNGKey(0), x)
    params = self._random(model.adapt(jax.random.PRNGKey(1), base, x))
    self.assertEqual(params["experts"]["w"].layout, "sio")

    def fresh():
      torch_model = TorchExperts(transposed)
      w = np.asarray(base["experts"]["w"])
      with torch.no_grad():
        torch_model.experts.weight.copy_(torch.from_numpy(
            w if transposed else w.transpose(0, 2, 1).copy()))
      return torch_model.eval()
    with torch.no_grad():
      np.testing.assert_allclose(fresh()(torch.from_numpy(x)).numpy(),
                                 hk.transform(hk_experts_forward).apply(base, None, x),
                                 atol=1e-5)
    name_map = {"experts/w": "experts.weight"}
    path = os.path.join(self.tmp, "experts")
    xrapture.export_peft(path, params, config, name_map)
    with open(os.path.join(path, peft_io.CONFIG_NAME)) as f:
      self.assertEqual(json.load(f)["target_parameters"], ["experts.weight"])
    peft_model = peft.PeftModel.from_pretrained(fresh(), path).eval()
    with torch.no_grad():
      got = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, model.apply(params, None, x), atol=1e-5)
    # PEFT -> xrapture.
    peft_model = peft.get_peft_model(fresh(), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=[], target_parameters=["experts.weight"]))
    _randomize_lora(peft_model, seed=4)
    peft_model.eval()
    peft_model.save_pretrained(os.path.join(self.tmp, "experts_peft"))
    loaded = xrapture.import_peft(os.path.join(self.tmp, "experts_peft"), base, name_map)
    self.assertEqual(loaded["experts"]["w"].layout, "sio")
    with torch.no_grad():
      want = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.apply(loaded, None, x), want, atol=1e-5)

  def test_expert_stack_refuses_dropout(self):
    x = np.zeros((EXPERTS, 4, DIM), np.float32)
    config = _config(rank=2)
    config.dropout = 0.1
    model = xrapture.transform(hk_experts_forward, config)
    params = model.adapt(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x), x)
    with self.assertRaisesRegex(ValueError, "target_parameters.*lora_dropout"):
      xrapture.export_peft(os.path.join(self.tmp, "x"), params, config,
                           {"experts/w": "experts.weight"})


class PeftFileTest(_Base):
  """Round trips and errors that need no torch."""

  def _export(self, config=None, **kw):
    config = config or _config(**kw)
    params = _random_adapters(
        self.base, lambda p: config_lib.rank_for(config, p),
        lambda p: config_lib.alpha_for(config, p), config.rslora)
    path = os.path.join(self.tmp, "adapter")
    xrapture.export_peft(path, params, config, name_map)
    return path, params

  @parameterized.named_parameters(*_CASES)
  def test_round_trip(self, kw):
    path, params = self._export(**kw)
    back = xrapture.import_peft(path, self.base, name_map)
    flat = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))
    flat_back = jax.tree_util.tree_leaves(back, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))
    for x, y in zip(flat, flat_back):
      self.assertEqual(type(x), type(y))
      if isinstance(x, xrapture.LoraWeight):
        np.testing.assert_array_equal(x.a, y.a)
        np.testing.assert_array_equal(x.b, y.b)
        self.assertEqual((x.alpha, x.rslora), (y.alpha, y.rslora))

  def test_config_and_keys(self):
    path, _ = self._export(rank_pattern=((r"layer_1/.*", 3),))
    with open(os.path.join(path, peft_io.CONFIG_NAME)) as f:
      config = json.load(f)
    self.assertEqual(config["peft_type"], "LORA")
    self.assertEqual((config["r"], config["lora_alpha"]), (2, 3))
    self.assertEqual(config["rank_pattern"],
                     {f"layers.1.{g}.{n}": 3 for g, ns in (("attn", ATTN), ("mlp", MLP))
                      for n in ns})
    self.assertEqual(config["target_modules"], sorted(_all_torch_names()))
    tensors = safetensors.numpy.load_file(os.path.join(path, peft_io.WEIGHTS_NAME))
    self.assertEqual(tensors["base_model.model.layers.0.mlp.up.lora_A.weight"].shape,
                     (2, DIM))       # [r, in]
    self.assertEqual(tensors["base_model.model.layers.0.mlp.up.lora_B.weight"].shape,
                     (HIDDEN, 2))    # [out, r]
    self.assertEqual(tensors["base_model.model.embed.lora_embedding_A"].shape,
                     (2, VOCAB))     # [r, vocab]
    self.assertEqual(tensors["base_model.model.embed.lora_embedding_B"].shape,
                     (DIM, 2))       # [dim, r]
    self.assertEqual(os.listdir(self.tmp), ["adapter"])  # no temporary left

  def test_patterns_resolve_like_peft(self):
    # "lin" would also claim "block.lin" through PEFT's suffix match.
    pattern = peft_io._patterns({"lin": 4, "block.lin": 2, "x": 2}, 2)
    for key, want in (("lin", 4), ("block.lin", 2), ("x", 2)):
      self.assertEqual(peft_io._pattern_value(pattern, key, 2), want, key)

  def _rewrite(self, path, config=None, tensors=None):
    if config is not None:
      with open(os.path.join(path, peft_io.CONFIG_NAME), "w") as f:
        json.dump(config, f)
    if tensors is not None:
      safetensors.numpy.save_file(tensors, os.path.join(path, peft_io.WEIGHTS_NAME))

  def _files(self, path):
    with open(os.path.join(path, peft_io.CONFIG_NAME)) as f:
      config = json.load(f)
    return config, dict(safetensors.numpy.load_file(os.path.join(path, peft_io.WEIGHTS_NAME)))

  @parameterized.named_parameters(
      ("dora", {"use_dora": True}, "use_dora=True"),
      ("lora_bias", {"lora_bias": True}, "lora_bias=True"),
      ("replication", {"layer_replication": [[0, 2]]}, "layer_replication"),
      ("olora", {"init_lora_weights": "olora"}, "olora"),
      ("not_lora", {"peft_type": "IA3"}, "only 'LORA'"),
  )
  def test_unsupported_config(self, change, named):
    path, _ = self._export()
    config, _ = self._files(path)
    config.update(change)
    self._rewrite(path, config=config)
    with self.assertRaisesRegex(ValueError, re.escape(named)):
      xrapture.import_peft(path, self.base, name_map)

  def test_extra_key(self):
    path, _ = self._export()
    _, tensors = self._files(path)
    tensors["base_model.model.head.lora_magnitude_vector"] = np.ones(OUT, np.float32)
    self._rewrite(path, tensors=tensors)
    with self.assertRaisesRegex(ValueError, "head.lora_magnitude_vector"):
      xrapture.import_peft(path, self.base, name_map)

  def test_embedding_weights_saved_alongside(self):
    """PEFT saves a targeted embedding's base weights (resized vocabularies)."""
    path, _ = self._export()
    _, tensors = self._files(path)
    new = np.asarray(self.base["embed"]["embeddings"]) + 1.0
    tensors["base_model.model.embed.base_layer.weight"] = new
    self._rewrite(path, tensors=tensors)
    params = xrapture.import_peft(path, self.base, name_map)
    np.testing.assert_array_equal(params["embed"]["embeddings"].w, new)
    # `embed.weight` is where PEFT's adapted Embedding does not look.
    del tensors["base_model.model.embed.base_layer.weight"]
    tensors["base_model.model.embed.weight"] = new
    self._rewrite(path, tensors=tensors)
    with self.assertRaisesRegex(ValueError, r"\['base_model\.model\.embed\.weight'\]"):
      xrapture.import_peft(path, self.base, name_map)

  def test_missing_half(self):
    path, _ = self._export()
    _, tensors = self._files(path)
    del tensors["base_model.model.layers.1.attn.k.lora_B.weight"]
    self._rewrite(path, tensors=tensors)
    with self.assertRaisesRegex(ValueError, r"layers\.1\.attn\.k \(only A\)"):
      xrapture.import_peft(path, self.base, name_map)

  def test_unmapped_module(self):
    path, _ = self._export()
    partial = lambda p: None if p == "head/w" else name_map(p)
    with self.assertRaisesRegex(ValueError, r"gives no Haiku kernel: \['head'\]"):
      xrapture.import_peft(path, self.base, partial)

  def test_untargeted_module(self):
    path, _ = self._export()
    config, _ = self._files(path)
    config["target_modules"] = ["q", "k", "v", "o", "up", "down", "embed"]
    self._rewrite(path, config=config)
    with self.assertRaisesRegex(ValueError, r"do not target.*\['head'\]"):
      xrapture.import_peft(path, self.base, name_map)

  def test_shape_mismatch(self):
    path, _ = self._export()
    other = hk.transform(lambda ids: hk_forward(ids)).init(jax.random.PRNGKey(0), self.ids)
    other = dict(other)
    other["head"] = {"w": jnp.zeros((DIM, OUT + 1)), "b": jnp.zeros(OUT + 1)}
    with self.assertRaisesRegex(
        ValueError, re.escape(f"'head' (lora_A (2, {DIM}), lora_B ({OUT}, 2)) do not "
                              f"fit Haiku 'head/w' of shape ({DIM}, {OUT + 1})")):
      xrapture.import_peft(path, other, name_map)

  def test_rank_disagrees_with_config(self):
    path, _ = self._export()
    config, _ = self._files(path)
    config["rank_pattern"] = {"head": 5}
    self._rewrite(path, config=config)
    with self.assertRaisesRegex(ValueError, "'head' has rank 2 in the file but 5"):
      xrapture.import_peft(path, self.base, name_map)

  @parameterized.parameters(
      (peft_io.CONFIG_NAME, 0.5), (peft_io.CONFIG_NAME, 0.0),
      (peft_io.WEIGHTS_NAME, 0.5), (peft_io.WEIGHTS_NAME, 0.01))
  def test_truncated_file_names_the_file(self, name, keep):
    # Were a raw JSONDecodeError / SafetensorError without the path.
    path, _ = self._export()
    file = os.path.join(path, name)
    with open(file, "rb") as f:
      data = f.read()
    with open(file, "wb") as f:
      f.write(data[:int(len(data) * keep)])
    with self.assertRaisesRegex(ValueError, re.escape(file) + ".*truncated or corrupt"):
      xrapture.import_peft(path, self.base, name_map)

  def test_config_not_a_record(self):
    path, _ = self._export()
    self._rewrite(path, config=[1, 2])
    with self.assertRaisesRegex(ValueError, re.escape(os.path.join(path, peft_io.CONFIG_NAME))
                                + ".* not a PEFT config"):
      xrapture.import_peft(path, self.base, name_map)

  def test_pickle_only_directory(self):
    # Was "No such file or directory: .../adapter_model.safetensors".
    path, _ = self._export()
    os.rename(os.path.join(path, peft_io.WEIGHTS_NAME), os.path.join(path, "adapter_model.bin"))
    with self.assertRaises(ValueError) as ctx:
      xrapture.import_peft(path, self.base, name_map)
    message = str(ctx.exception)
    self.assertIn(path, message)
    self.assertIn("only .safetensors adapters are supported", message)
    self.assertIn("safetensors.torch.save_file", message)  # how to convert
    self.assertIn("safe_serialization=True", message)

  def test_missing_weights_file(self):
    path, _ = self._export()
    os.remove(os.path.join(path, peft_io.WEIGHTS_NAME))
    with self.assertRaisesRegex(FileNotFoundError, peft_io.WEIGHTS_NAME):
      xrapture.import_peft(path, self.base, name_map)

  def test_unknown_config_fields_warn(self):
    path, params = self._export()
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # what export_peft writes is all known
      xrapture.import_peft(path, self.base, name_map)
    config, _ = self._files(path)
    # A newer PEFT's feature left off (None, False, empty) changes nothing:
    # no warning. One that is set is named.
    config.update(use_future_trick=True, future_config={"k": 1},
                  future_off=None, future_flag=False, future_list=[])
    self._rewrite(path, config=config)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      back = xrapture.import_peft(path, self.base, name_map)
    messages = [str(w.message) for w in caught]
    self.assertLen(messages, 1)
    self.assertIn(os.path.join(path, peft_io.CONFIG_NAME), messages[0])
    self.assertIn("['future_config', 'use_future_trick']", messages[0])
    np.testing.assert_array_equal(back["head"]["w"].a, params["head"]["w"].a)

  @absltest.skipIf(peft is None, _NEEDS_PEFT)
  def test_known_fields_are_peft_lora_config_fields(self):
    # Files PEFT writes must not warn. A newer PEFT's new field is silent
    # only while off (its default None, False or empty); one whose default is
    # set fails here first: add it (after checking it changes nothing, or to
    # _UNSUPPORTED). Known fields a newer PEFT dropped stay known (old files).
    import dataclasses  # pylint: disable=g-import-not-at-top
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    for name in set(fields) - peft_io._KNOWN_FIELDS:
      field = fields[name]
      default = (field.default_factory() if field.default is dataclasses.MISSING
                 else field.default)
      with self.subTest(new_field=name):
        self.assertTrue(peft_io._is_off(default),
                        f"peft {peft.__version__} adds {name}={default!r}")
    self.assertContainsSubset(set(peft_io._UNSUPPORTED), peft_io._KNOWN_FIELDS)

  def test_export_unmapped(self):
    params = _random_adapters(self.base, lambda p: 2, lambda p: 1.0, False)
    partial = lambda p: None if p.startswith("layer_1/mlp") else name_map(p)
    with self.assertRaisesRegex(ValueError, "layer_1/mlp/down/w"):
      xrapture.export_peft(os.path.join(self.tmp, "x"), params, None, partial)
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "x")))

  def test_export_refuses_full_training(self):
    config = _config()
    config.tune_vectors = True
    params = _random_adapters(self.base, lambda p: 2, lambda p: 3.0, False)
    with self.assertRaisesRegex(ValueError, "head/b"):
      xrapture.export_peft(os.path.join(self.tmp, "x"), params, config, name_map)

  def test_export_refuses_window_on_a(self):
    x = np.zeros((1, 4, 4, 3), np.float32)
    base = hk.transform(hk_conv_forward).init(jax.random.PRNGKey(0), x)
    w = base["conv"]["w"]
    bad = dict(base)
    bad["conv"] = dict(base["conv"], w=xrapture.LoraWeight(
        w, jnp.ones((3, 3, 2, 4)), jnp.ones((1, 1, 3, 2))))
    with self.assertRaisesRegex(ValueError, "b to span the window"):
      xrapture.export_peft(os.path.join(self.tmp, "x"), bad, None, CONV_NAME_MAP)

  def test_export_overwrites_existing_directory(self):
    path, _ = self._export()
    with open(os.path.join(path, "README.md"), "w") as f:
      f.write("kept")
    config = _config(rank=3)
    params = _random_adapters(self.base, lambda p: 3, lambda p: 3.0, False, seed=7)
    xrapture.export_peft(path, params, config, name_map)
    back = xrapture.import_peft(path, self.base, name_map)
    self.assertEqual(back["head"]["w"].rank, 3)
    self.assertCountEqual(os.listdir(path), ["README.md", peft_io.CONFIG_NAME,
                                             peft_io.WEIGHTS_NAME])


if __name__ == "__main__":
  absltest.main()
