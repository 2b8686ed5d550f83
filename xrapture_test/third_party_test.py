"""Haiku models this project did not write, adapted as published.

Each model comes from a package on the registry (dm-haiku's ``haiku.nets``
and recurrent cores, jraph, haiku-geometric, AlphaFold's Haiku modules from
alphafold-colabfold), plus a small mixture-of-experts written here with
``lax.ragged_dot`` and an einsum expert layer. Each is adapted with
``targets=("all-linear",)`` under ``xrapture.strict_mode()`` with warnings as
errors, and checked without looking at how xrapture stores adapters:

* ``merged - base`` of every adapted kernel, reshaped to the matrix the model
  contracts (per stacked element), has rank at most ``r``;
* the adapter has ``r · (prod(in) + prod(out))`` numbers per stacked element;
* jitted ``apply`` equals ``hk.transform(f).apply`` on the merged params;
* a few optax steps lower a loss and leave every base kernel bit-identical.
"""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import optax
import xrapture
from xrapture._src.testing import optional

_RNG = np.random.default_rng(0)


def _normal(*shape):
  return _RNG.normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------
# The models.


def _resnet(images, is_training=False):
  """haiku.nets' ResNet18 (its blocks, strides and 7x7 stem), narrower; eval mode."""
  net = hk.nets.ResNet(
      blocks_per_group=(2, 2, 2, 2), num_classes=10, bottleneck=False,
      channels_per_group=(16, 16, 24, 32), use_projection=(False, True, True, True),
      initial_conv_config={"output_channels": 16}, name="res_net18")
  return net(images, is_training=is_training)


def _pretrained_resnet(images):
  """The same network in training mode: what made the (pretrained) params and state."""
  return _resnet(images, is_training=True)


def _gru(xs):
  """hk.GRU under hk.dynamic_unroll: it splits w_h into its gates."""
  core = hk.GRU(12)
  out, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]), time_major=True)
  return hk.Linear(3)(out[-1])


def _vqvae(x):
  """An MLP encoder and decoder around haiku.nets' VectorQuantizer."""
  z = hk.nets.MLP([16, 6], name="encoder")(x)
  vq = hk.nets.VectorQuantizer(embedding_dim=6, num_embeddings=7,
                               commitment_cost=0.25, name="vq")
  out = vq(z, is_training=False)
  return hk.nets.MLP([16, x.shape[-1]], name="decoder")(out["quantize"])


def _graph(n_nodes=7):
  senders = np.array([0, 1, 2, 3, 4, 5, 6, 0, 2], np.int32)
  receivers = np.array([1, 2, 3, 4, 5, 6, 0, 3, 5], np.int32)
  return senders, receivers


def _jraph_gat(nodes):
  """jraph's GAT layer and GraphConvolution with Haiku update functions."""
  import jraph  # pylint: disable=g-import-not-at-top
  senders, receivers = _graph()
  graph = jraph.GraphsTuple(
      nodes=nodes, edges=None, senders=senders, receivers=receivers,
      n_node=np.array([nodes.shape[0]]), n_edge=np.array([len(senders)]), globals=None)

  def logit(sent, received, edges):
    del edges
    return hk.Linear(1, name="attention_logit")(jnp.concatenate([sent, received], -1))
  graph = jraph.GAT(attention_query_fn=hk.Linear(10, name="attention_query"),
                    attention_logit_fn=logit)(graph)
  graph = jraph.GraphConvolution(update_node_fn=hk.Linear(6, name="gcn"))(
      graph._replace(nodes=jax.nn.relu(graph.nodes)))
  return graph.nodes


def _haiku_geometric(nodes):
  """haiku-geometric's GatedGraphConv (per-layer weights, hk.GRU) and GCNConv."""
  from haiku_geometric.nn import GatedGraphConv, GCNConv  # pylint: disable=g-import-not-at-top
  senders, receivers = _graph()
  h = GatedGraphConv(out_channels=9, num_layers=2)(nodes, senders, receivers)
  return GCNConv(4)(jax.nn.relu(h), senders, receivers)


def _alphafold_attention(q):
  """AlphaFold's gated multi-head attention: query_w [a, h, c], output_w [h, c, o]."""
  from alphafold.model import modules  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      {"num_head": 2, "gating": True, "key_dim": 8, "value_dim": 8})
  global_config = ml_collections.ConfigDict({"zero_init": False})
  bias = jnp.zeros((q.shape[0], 1, q.shape[1], q.shape[1]), q.dtype)
  attn = modules.Attention(config, global_config, output_dim=6)
  return attn(q, q, bias)


def _moe(x):
  """Top-1 routed experts through lax.ragged_dot, then an einsum expert layer."""
  n_experts, d, f = 3, x.shape[-1], 10
  init = hk.initializers.VarianceScaling(1.0)
  gate = hk.Linear(n_experts, name="router")(x)
  expert = jnp.argmax(gate, -1)
  order = jnp.argsort(expert)
  group_sizes = jnp.bincount(expert, length=n_experts).astype(jnp.int32)
  w_in = hk.get_parameter("w_in", [n_experts, d, f], init=init)
  w_out = hk.get_parameter("w_out", [n_experts, f, d], init=init)
  h = jax.nn.gelu(lax.ragged_dot(x[order], w_in, group_sizes))
  y = lax.ragged_dot(h, w_out, group_sizes)
  y = jnp.zeros_like(y).at[order].set(y) * jax.nn.sigmoid(jnp.max(gate, -1, keepdims=True))
  # Dense dispatch: every expert sees every token, combined by the router.
  w_dense = hk.get_parameter("w_dense", [n_experts, d, 5], init=init)
  per_expert = jnp.einsum("ecd,edf->ecf", jnp.broadcast_to(y, (n_experts,) + y.shape),
                          w_dense)
  return jnp.einsum("ecf,ce->cf", per_expert, jax.nn.softmax(gate, -1))


# name, fn, inputs, stateful, rank, adapted kernels -> layout
_MODELS = (
    ("haiku_nets_resnet18", _resnet, (_normal(2, 16, 16, 3),), True, 8, {
        "res_net18/~/initial_conv/w": "iiio",
        "res_net18/~/block_group_1/~/block_0/~/shortcut_conv/w": "iiio",
        "res_net18/~/logits/w": "io"}),
    ("haiku_gru_dynamic_unroll", _gru, (_normal(4, 2, 5),), False, 3, {
        "gru/w_i": "io", "gru/w_h": "io", "linear/w": "io"}),
    ("haiku_nets_vector_quantizer", _vqvae, (_normal(5, 11),), True, 2, {
        "encoder/~/linear_0/w": "io", "decoder/~/linear_1/w": "io"}),
    ("jraph_gat_and_gcn", _jraph_gat, (_normal(7, 5),), False, 2, {
        "attention_query/w": "io", "gcn/w": "io"}),
    ("haiku_geometric_gated_graph_conv", _haiku_geometric, (_normal(7, 5),), False, 2, {
        "gated_graph_conv/weights": "sio", "gated_graph_conv/~/gru/w_h": "io"}),
    ("alphafold_attention", _alphafold_attention, (_normal(2, 3, 5),), False, 2, {
        "attention/query_w": "ioo", "attention/key_w": "ioo",
        "attention/value_w": "ioo", "attention/gating_w": "ioo",
        "attention/output_w": "iio"}),
    ("mixture_of_experts", _moe, (_normal(9, 4),), False, 2, {
        "~/w_in": "sio", "~/w_out": "sio", "~/w_dense": "sio", "router/w": "io"}),
)


def _paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=xrapture.is_implicit)
  return {"/".join(str(k.key) for k in p): v for p, v in flat}


def _groups(shape, layout):
  """(stacked, in, out) sizes and the axes of each, from the layout string."""
  axes = {c: [d for d, ch in enumerate(layout) if ch == c] for c in "sio"}
  size = {c: int(np.prod([shape[d] for d in axes[c]])) for c in "sio"}
  return axes, size


# Models from packages of the `models` extra (beyond dm-haiku's own nets).
_PACKAGES = {
    _jraph_gat: "jraph",
    _haiku_geometric: "haiku_geometric",
    _alphafold_attention: "alphafold.model.modules",
}


class ThirdPartyModelsTest(parameterized.TestCase):

  @parameterized.named_parameters(*_MODELS)
  def test_adapt_merge_and_train(self, fn, inputs, stateful, rank, expected):
    if fn in _PACKAGES:
      # Required (an ImportError) where XRAPTURE_REQUIRE_TORCH=1: the test
      # command's Python 3.11 leg, which installs the `models` extra.
      (package,) = optional.modules(_PACKAGES[fn])
      if package is None:
        self.skipTest(f"needs {_PACKAGES[fn]} (pip install 'xrapture[models]'; "
                      "the test command's Python 3.11 leg)")
    hk_model = hk.transform_with_state(fn) if stateful else hk.transform(fn)
    if fn is _resnet:
      # An eval-mode BatchNorm cannot init: the training-mode model makes the
      # params; its moving averages stand for a pretrained state (variance 1).
      base, state = hk.transform_with_state(_pretrained_resnet).init(
          jax.random.PRNGKey(0), *inputs)
      state = {k: dict(v, average=jnp.ones_like(v["average"]) if k.endswith("var_ema")
                       else v["average"]) for k, v in state.items()}
    else:
      base_init = hk_model.init(jax.random.PRNGKey(0), *inputs)
      base, state = base_init if stateful else (base_init, None)
    config = xrapture.default_config()
    config.rank, config.alpha, config.targets = rank, 2.0 * rank, ("all-linear",)
    make = xrapture.transform_with_state if stateful else xrapture.transform
    model = make(fn, config)
    extra = {"state": state} if stateful else {}
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      params = model.adapt(jax.random.PRNGKey(1), base, *inputs, **extra)
      lora_spec = model.lora_spec(base, *inputs, **extra)

    found = {p: v for p, v in _paths(params).items() if isinstance(v, xrapture.LoraWeight)}
    for path, layout in expected.items():
      self.assertIn(path, found)
      self.assertEqual(found[path].layout, layout, path)

    # Adapter numbers: r·(prod(in) + prod(out)) per stacked element.
    for path, lw in found.items():
      _, size = _groups(lw.shape, lw.layout)
      self.assertEqual(lw.a.size + lw.b.size, size["s"] * rank * (size["i"] + size["o"]),
                       path)

    # Random adapters: merged - base has rank <= r as the contracted matrix.
    rng = np.random.default_rng(2)
    perturbed = xrapture.tree_map_with_implicit(
        lambda p: p.replace(a=jnp.asarray(rng.normal(0, 0.3, p.a.shape), p.a.dtype),
                            b=jnp.asarray(rng.normal(0, 0.3, p.b.shape), p.b.dtype))
        if isinstance(p, xrapture.LoraWeight) else p, params)
    merged = xrapture.merge_params(perturbed)
    base_paths, merged_paths = _paths(base), _paths(merged)
    for path, lw in found.items():
      axes, size = _groups(lw.shape, lw.layout)
      delta = (np.asarray(merged_paths[path], np.float64)
               - np.asarray(base_paths[path], np.float64))
      grouped = np.transpose(delta, axes["s"] + axes["i"] + axes["o"]).reshape(
          size["s"], size["i"], size["o"])
      ranks = [np.linalg.matrix_rank(m, tol=1e-6 * max(1.0, np.abs(m).max()))
               for m in grouped]
      self.assertLessEqual(max(ranks), rank, path)
      self.assertGreater(min(ranks), 0, path)  # the adapters do change it

    # Jitted apply on the LoraWeights == Haiku's apply on the merged params.
    call = lambda p: (model.apply(p, state, None, *inputs)[0] if stateful
                      else model.apply(p, None, *inputs))
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      y = jax.jit(call)(perturbed)
    y_merged = (hk_model.apply(merged, state, None, *inputs)[0] if stateful
                else hk_model.apply(merged, None, *inputs))
    y_base = (hk_model.apply(base, state, None, *inputs)[0] if stateful
              else hk_model.apply(base, None, *inputs))
    self.assertGreater(float(jnp.abs(y_merged - y_base).max()), 1e-4)
    np.testing.assert_allclose(y, y_merged, rtol=2e-4,
                               atol=2e-4 * float(jnp.abs(y_merged).max()))

    # A few optimizer steps lower the loss; the base kernels do not move.
    target = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), y.dtype)
    loss = lambda p: jnp.mean((call(p) - target) ** 2)
    tx = xrapture.wrap_optimizer(optax.adam(3e-3), lora_spec)

    @jax.jit
    def step(p, opt_state):
      value, grads = jax.value_and_grad(loss)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, value

    p, opt_state = params, tx.init(params)
    losses = []
    with xrapture.strict_mode(), warnings.catch_warnings():
      warnings.simplefilter("error")
      for _ in range(4):
        p, opt_state, value = step(p, opt_state)
        losses.append(float(value))
    self.assertLess(losses[-1], losses[0], losses)
    trained = _paths(p)
    for path, lw in found.items():
      np.testing.assert_array_equal(np.asarray(trained[path].w), np.asarray(lw.w), path)

  def test_vector_quantizer_codebook_cannot_stay_low_rank(self):
    # Its distances square the codebook: targeting it by name is refused in
    # strict mode at adapt, naming the path and the primitive.
    hk_model = hk.transform_with_state(_vqvae)
    x = _normal(5, 11)
    base, state = hk_model.init(jax.random.PRNGKey(0), x)
    config = xrapture.default_config()
    config.rank, config.targets = 2, (r"vq/embeddings",)
    model = xrapture.transform_with_state(_vqvae, config)
    with xrapture.strict_mode():
      with self.assertRaisesRegex(xrapture.MaterializationError,
                                  r"'vq/embeddings'.*(square|integer_pow|mul)"):
        model.adapt(jax.random.PRNGKey(1), base, x, state=state)

  def test_resnet_eval_mode_needs_the_state(self):
    base, state = hk.transform_with_state(_pretrained_resnet).init(
        jax.random.PRNGKey(0), _normal(2, 16, 16, 3))
    del state
    model = xrapture.transform_with_state(_resnet, xrapture.default_config())
    with self.assertRaisesRegex(ValueError, r"(?s)init failed.*No value for 'average'"
                                r".*state=state"):
      model.adapt(jax.random.PRNGKey(1), base, _normal(2, 16, 16, 3))


if __name__ == "__main__":
  absltest.main()
