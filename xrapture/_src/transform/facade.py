"""The seed API (fjformer's xrapture), for users coming from there.

``XRapTureConfig`` / ``XRapTure`` / ``apply_lora`` keep their names and
semantics, on top of xrapture's implicit arrays: parameters are chosen by
name (a path key equal to a listed name, or a regex fullmatching the
``"module/param"`` path), kernels with more than two dimensions get the
seed's conv layout (every axis but the last in the in group: ``b`` spans the
window, ``a`` is pointwise), and
``module`` may be a Haiku ``Transformed`` or any pure ``f(params, ...)``.
New code should prefer :func:`xrapture.transform`, which also tells
``hk.layer_stack`` kernels from conv kernels.
"""

import dataclasses
import re
from typing import Any, Callable

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import optax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.lora import lora_weight
from xrapture._src.optim import freeze
from xrapture._src.transform import adapters
from xrapture._src.transform import layout as layout_lib
from xrapture._src.transform import multi_adapter
from xrapture._src.transform import paths

LORA_FREEZE = lora_weight.LORA_FREEZE
LORA_FULL = lora_weight.LORA_FULL


@dataclasses.dataclass
class XRapTureConfig:
  """Which parameters the seed API adapts.

  Attributes:
    lora_dim: adapter rank for every LoRA-tuned parameter.
    fully_fine_tune_parameters: names of parameters trained in full.
    lora_fine_tune_parameters: names of parameters that get adapters.
    tune_vectors: kept for the seed's signature; as in the seed,
      :meth:`XRapTure.apply_lora` takes ``tune_vectors`` as an argument.
    verbose: log each parameter's decision (absl.logging.info).
    dtype: adapter dtype.
  """
  lora_dim: int
  fully_fine_tune_parameters: list[str] | None = None
  lora_fine_tune_parameters: list[str] | None = None
  tune_vectors: bool = True
  verbose: bool = True
  dtype: Any = jnp.float32


@dataclasses.dataclass
class XRapTureModule:
  """What :meth:`XRapTure.apply_lora` returns."""
  lora_opt_state: Any
  lora_parameters: Any
  lora_module: Any
  lora_specs: Any
  lora_tx: optax.GradientTransformation


class _LoraHaikuModule:
  """A Haiku ``Transformed`` whose ``apply`` accepts LoraWeights."""

  def __init__(self, module: hk.Transformed | hk.TransformedWithState):
    self.init = module.init
    self.apply = interpreter.use_implicit_args(module.apply)


def _names_match(names, path) -> bool:
  keys = [paths.key_str(k) for k in path]
  joined = "/".join(keys)
  return any(name in keys or re.fullmatch(name, joined) for name in names)


class XRapTure:
  """The seed's LoRA entry point."""

  def __init__(self, config: XRapTureConfig):
    self.config = config

  @staticmethod
  def merge_parameters(lora_parameters: Any, destructive: bool = True) -> Any:
    """Dense params: every LoraWeight becomes ``w + scale · b @ a``."""
    return adapters.merge_params(lora_parameters, destructive=destructive)

  # Several adapters over one base: the functional API of xrapture.AdapterSet.
  # `XRapTure.add_adapter(multi_adapter.AdapterSet(base), "fr", lora_parameters)`.
  add_adapter = staticmethod(multi_adapter.add_adapter)
  set_adapter = staticmethod(multi_adapter.set_adapter)
  disable_adapters = staticmethod(multi_adapter.disable_adapters)
  delete_adapter = staticmethod(multi_adapter.delete_adapter)
  adapter_params = staticmethod(multi_adapter.adapter_params)
  add_weighted_adapter = staticmethod(multi_adapter.add_weighted_adapter)
  merge_adapter = staticmethod(multi_adapter.merge_adapter)
  unmerge_adapter = staticmethod(multi_adapter.unmerge_adapter)

  def base_decision_function(self, path, params: Any = None) -> int:
    """``LORA_FULL``, ``lora_dim`` or ``LORA_FREEZE`` for the parameter at ``path``.

    Args:
      path: a ``jax.tree_util`` key path.
      params: unused (kept for the seed's signature).
    """
    del params
    if self.config.fully_fine_tune_parameters and _names_match(
        self.config.fully_fine_tune_parameters, path):
      return LORA_FULL
    if self.config.lora_fine_tune_parameters and _names_match(
        self.config.lora_fine_tune_parameters, path):
      return self.config.lora_dim
    return LORA_FREEZE

  def make_lora_specs(self, parameters: Any, decision_fn: Callable | None = None,
                      tune_vectors: bool = False) -> Any:
    """A lora spec tree: vectors full or frozen, the rest as ``decision_fn`` says."""
    decision_fn = decision_fn or self.base_decision_function

    def decide(path, arr):
      if len(arr.shape) < 2:
        value = LORA_FULL if tune_vectors else LORA_FREEZE
      else:
        value = decision_fn(path, arr)
      if self.config.verbose:
        logging.info("xrapture: %s %s -> %s", paths.path_str(path), tuple(arr.shape),
                     {LORA_FULL: "full", LORA_FREEZE: "frozen"}.get(value, f"rank {value}"))
      return value
    return jax.tree_util.tree_map_with_path(decide, parameters)

  @staticmethod
  def init_lora_parameters(param_tree: Any, lora_spec: Any, dtype: Any = jnp.float32,
                           rng: jax.Array | None = None, stddev: float = 0.01,
                           alpha: float = 1.0, is_leaf: Callable | None = None) -> Any:
    """LoraWeights (``b = 0``, ``a ~ N(0, stddev²)``) where the lora spec holds a rank.

    Raises:
      ValueError: a 1-D parameter has a rank in the lora spec.
    """
    if rng is None:  # the seed's default; made here, not at import
      rng = jax.random.PRNGKey(0)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_tree, is_leaf=is_leaf)
    specs = treedef.flatten_up_to(lora_spec)
    keys = iter(jax.random.split(rng, max(len(flat), 1)))
    out = []
    for (path, param), spec_val in zip(flat, specs):
      if spec_val in (LORA_FREEZE, LORA_FULL):
        out.append(param)
        continue
      if len(param.shape) < 2:
        raise ValueError(
            f"Vectors must either be frozen or fully tuned, but got lora_spec "
            f"value {spec_val} for param with path {paths.path_str(path)}")
      # The seed's layout: every axis but the last is in (b spans the window).
      out.append(adapters.init_lora_weight(
          next(keys), param, int(spec_val), alpha,
          "i" * (len(param.shape) - 1) + "o", stddev, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  @staticmethod
  def wrap_tx(tx: optax.GradientTransformation, lora_spec: Any,
              scalar_frozen_grads: bool = False) -> optax.GradientTransformation:
    """Freezes ``LORA_FREEZE`` leaves and every LoraWeight's ``w``."""
    frozen = jax.tree.map(lambda x: x == LORA_FREEZE, lora_spec)
    return freeze.freeze_keys(
        freeze.freeze_subtrees(tx, frozen, use_scalar_zeros=scalar_frozen_grads),
        lora_weight.LoraWeight, "w", use_scalar_zeros=scalar_frozen_grads)

  def apply_lora(self, module: Any, parameters: Any, tx: optax.GradientTransformation,
                 decision_fn: Callable | None = None, tune_vectors: bool = False,
                 rng: jax.Array | None = None, stddev: float = 0.01,
                 alpha: float = 1.0, is_leaf: Callable | None = None) -> XRapTureModule:
    """Adapts ``parameters`` and wraps ``module`` and ``tx`` for LoRA training.

    Args:
      module: a Haiku ``Transformed`` (its ``apply`` gets LoraWeights) or any
        pure function ``f(params, *args)``.
      parameters: base params.
      tx: the optimizer for the trainable leaves.
      decision_fn: ``(path, param) -> rank | LORA_FULL | LORA_FREEZE``;
        default :meth:`base_decision_function`.
      tune_vectors: train 1-D parameters in full.
      rng, stddev, alpha, is_leaf: as :meth:`init_lora_parameters`.

    Returns:
      The adapted parameters, their lora spec, the wrapped optimizer and its
      state, and the module that runs them.
    """
    lora_spec = self.make_lora_specs(parameters, decision_fn, tune_vectors)
    lora_parameters = self.init_lora_parameters(
        parameters, lora_spec, self.config.dtype, rng, stddev, alpha, is_leaf)
    lora_tx = self.wrap_tx(tx, lora_spec)
    if isinstance(module, (hk.Transformed, hk.TransformedWithState)):
      lora_module = _LoraHaikuModule(module)
    else:
      lora_module = interpreter.use_implicit_args(module)
    return XRapTureModule(
        lora_opt_state=lora_tx.init(lora_parameters), lora_parameters=lora_parameters,
        lora_module=lora_module, lora_specs=lora_spec, lora_tx=lora_tx)
