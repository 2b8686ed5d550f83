"""xrapture.transform: hk.transform whose targeted kernels become LoraWeights."""

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src import deprecations
from xrapture._src import pytypes
from xrapture._src.implicit import interpreter
from xrapture._src.lora import dropout as dropout_lib
from xrapture._src.transform import adapters
from xrapture._src.transform import config as config_lib
from xrapture._src.transform import layout as layout_lib
from xrapture._src.transform import quantization


def _abstract(tree: Any) -> Any:
  """Arrays -> ShapeDtypeStructs; other leaves (flags, None) kept."""
  def one(x):
    if pytypes.is_array(x):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x
  return jax.tree.map(one, tree)


def _example(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
  """``(args, kwargs)`` as shapes, or None when there are no example inputs."""
  if args or kwargs:
    return (_abstract(args), _abstract(kwargs))
  return None


class LoraTransformed:
  """A Haiku function whose targeted kernels run as LoraWeights.

  It holds the function and its config and remembers nothing between calls:
  ``lora_spec`` and ``adapt`` answer from their arguments alone.

  Attributes:
    config: the ``ml_collections.ConfigDict`` this model was built with
      (:func:`xrapture.default_config`).
  """

  def __init__(self, f: Callable[..., Any], config: ml_collections.ConfigDict | None,
               with_state: bool):
    self.config = config_lib.default_config() if config is None else config
    self._with_state = with_state
    self._hk = hk.transform_with_state(f) if with_state else hk.transform(f)
    self._apply = interpreter.use_implicit_args(self._hk.apply)

  def init(self, rng: jax.Array | None, *args, **kwargs) -> Any:
    """Exactly ``hk.transform(f).init`` (``hk.transform_with_state(f).init``)."""
    return self._hk.init(rng, *args, **kwargs)

  def lora_spec(self, params: Any, *example_args, state: Any = None,
                **example_kwargs) -> Any:
    """The lora spec tree of base ``params``: what trains, and how.

    Args:
      params: base params.
      *example_args: inputs as for ``apply`` (arrays or
        ``jax.ShapeDtypeStruct`` values). Needed unless every parameter the
        answer depends on is a 2-D kernel, taken as ``[in, out]``; see
        Raises.
      state: with :func:`transform_with_state`, the state to trace ``apply``
        with (default: its shapes from tracing ``init``).
      **example_kwargs: likewise.

    Returns:
      A tree like ``params``: the adapter rank of every adapted kernel,
      ``LORA_FULL`` for parameters trained in full, ``LORA_FREEZE`` for the
      rest. Pass it to :func:`xrapture.wrap_optimizer`. The ``[L, D]``
      vectors of a layer stack count as vectors (``tune_vectors``).

    Raises:
      ValueError: no example inputs, and a targeted kernel has more than two
        dimensions (a conv, a layer stack, a multi-axis kernel: its layout
        shows only in use), ``targets`` hold ``"all-linear"``, or with
        ``tune_vectors`` a parameter with two or more dimensions is not
        targeted (it may be a layer stack's vectors); targets match no
        kernel (the message lists the parameters that exist), a rank
        exceeds a kernel's ``min(prod(in), prod(out))``, an integer
        parameter is targeted, a targeted kernel is a grouped conv's or is
        used in two incompatible ways, or ``apply`` (or, with state,
        ``init``) cannot be traced with the example inputs.
    """
    example = _example(example_args, example_kwargs)
    if example is None:
      self._check_layouts_not_needed(params, "model.lora_spec(params, *inputs)",
                                     vectors=True, quantized=False)
    return self._lora_spec_and_layouts(params, example, state)[0]

  spec = deprecations.method_alias(lora_spec, "LoraTransformed.spec")

  def _check_layouts_not_needed(self, params, fix, vectors, quantized):
    """Raises unless every answer without example inputs is the one with them."""
    config_lib.validate(self.config)
    if config_lib.all_linear(self.config.targets):
      raise ValueError(
          'targets=("all-linear",) adapts the kernels apply contracts, which '
          "shows only in a trace of apply with example inputs, and none were "
          f"given. Pass the example inputs: {fix}.")
    needed = adapters.layouts_needed(params, self.config, vectors=vectors,
                                     quantized=quantized)
    if needed:
      raise ValueError(
          "xrapture reads how apply uses each parameter from a trace of apply "
          "with example inputs, and none were given. Taken by its shape alone "
          "(a 2-D kernel as [in, out]), each of these would be a guess:\n  "
          + "\n  ".join(needed) + f"\nPass the example inputs: {fix}.")

  def _lora_spec_and_layouts(self, params, example, state=None):
    """The lora spec tree and the layouts of all ≥2-D leaves (None: no inputs).

    With example inputs one trace of ``apply`` tells, for each parameter,
    how it is contracted (its adapter layout) and which leading axes a layer
    stack scans over (a ``[L, D]`` bias is a vector).
    """
    layouts = None
    if example is not None:
      wanted = [i for i, x in enumerate(jax.tree.leaves(params)) if np.ndim(x) >= 2]
      layouts = self._layouts(params, example, wanted, state) if wanted else {}
    return adapters.lora_spec_from_config(params, self.config, layouts), layouts

  def adapt(self, rng: jax.Array, params: Any, *example_args, state: Any = None,
            **example_kwargs) -> Any:
    """Wraps every targeted kernel of ``params`` in a fresh LoraWeight.

    ``b`` starts at zero and ``a`` at N(0, init_stddev²), so the adapted model
    computes exactly what the base does. Each adapter's layout is read from
    how ``apply`` contracts the kernel (see :class:`xrapture.LoraWeight`):
    a matmul's contracted axes are its in group and its free axes its out
    group, batch axes and axes a layer stack scans over get one adapter per
    index, and a conv's window joins its input channels. That needs the
    example inputs; without them 2-D kernels are taken as ``[in, out]`` and
    larger targeted ones are an error.

    Args:
      rng: key for the adapters' initialization.
      params: base params (e.g. pretrained).
      *example_args: inputs as for ``apply`` (arrays or
        ``jax.ShapeDtypeStruct`` values).
      state: with :func:`transform_with_state`, the state ``apply`` runs with
        (e.g. a pretrained model's batch-norm averages). Without it the
        state's shapes come from tracing ``init``, which fails for models
        that cannot initialize in the given mode (an eval-mode
        ``hk.BatchNorm``).
      **example_kwargs: likewise.

    Returns:
      params with LoraWeights; every other leaf is the same object. With
      ``config.quantize`` set, each LoraWeight's ``w`` (and each frozen
      kernel ``config.quantize_frozen`` names) is stored quantized
      (:func:`xrapture.quantize`).

    Raises:
      ValueError: as :meth:`lora_spec` (without example inputs: a targeted
        kernel with more than two dimensions, ``"all-linear"``, or a
        parameter with two or more dimensions ``quantize_frozen`` names
        that may be a layer stack's vectors).
      MaterializationError: in ``xrapture.strict_mode()``, when ``apply``
        uses an adapted kernel in a way that has no low-rank form (outside
        strict mode: a ``MaterializationWarning`` per kernel).
    """
    example = _example(example_args, example_kwargs)
    if example is None:
      self._check_layouts_not_needed(params, "model.adapt(rng, params, *inputs)",
                                     vectors=False, quantized=True)
    lora_spec, known = self._lora_spec_and_layouts(params, example, state)
    known = known or {}
    if known:
      adapters.report_uses(params, lora_spec, known)
    adapted = adapters.adapt_params(
        rng, params, lora_spec, self.config,
        lambda wanted: {i: known[i] for i in wanted if i in known})
    if self.config.quantize is not None:
      # Stacks of vectors (a layer stack's [L, D] biases) are never quantized.
      flat = adapters.paths.flatten_with_paths(params)[0]
      vectors = {flat[i][0] for i, l in known.items()
                 if np.ndim(flat[i][1]) - l.scanned < 2}
      adapted = quantization.quantize_except(adapted, self.config, vectors)
    return adapted

  def _layouts(self, params, example, wanted, state=None):
    args, kwargs = example
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    if self._with_state:
      if state is None:
        # The state's shapes, from init; flags (is_training) stay Python values.
        call, dynamic = layout_lib.close_over_static(
            lambda r, *a, **k: self._hk.init(r, *a, **k)[1], (rng, *args), kwargs)
        try:
          state = jax.eval_shape(call, dynamic)
        except Exception as e:  # any error of the user's init while tracing
          raise ValueError(
              "xrapture traces apply once to read how each kernel is used, and "
              "with transform_with_state it first traces init for the state's "
              f"shapes; init failed with these inputs {example}: "
              f"{type(e).__name__}: {e}. A model that cannot initialize in this "
              "mode (an eval-mode hk.BatchNorm) needs its state: "
              "model.adapt(rng, params, *inputs, state=state)."
          ) from e
      args = (_abstract(state), rng) + tuple(args)
    else:
      args = (rng,) + tuple(args)
    try:
      return layout_lib.kernel_layouts(self._hk.apply, params, args, kwargs, wanted)
    except Exception as e:  # any error of the user's function while tracing
      raise ValueError(
          "xrapture traces apply once, with example inputs, to read how each "
          "kernel is used, and that trace failed with these params and inputs "
          f"{example}{' and the given state' if state is not None else ''}: "
          f"{type(e).__name__}: {e}. Pass example inputs that fit these params"
          + (" and state" if self._with_state else "") + ": "
          "model.adapt(rng, params, *inputs) / model.lora_spec(params, *inputs)."
      ) from e

  def apply(self, params: Any, *args, **kwargs) -> Any:
    """Runs the unmodified function with implicit (LoRA) weights.

    Signature as ``hk.transform(f).apply``: ``apply(params, rng, *inputs)``,
    or with state ``apply(params, state, rng, *inputs)`` returning
    ``(out, state)``. With ``config.dropout > 0`` and an rng, the rng is
    split: one key for the model, one for LoRA dropout.
    """
    rng_pos = 1 if self._with_state else 0
    positional = len(args) > rng_pos  # else maybe apply(params, rng=..., ...)
    rng = args[rng_pos] if positional else kwargs.get("rng")
    rate = float(self.config.dropout)
    if rate > 0.0 and rng is not None:
      rng, dropout_rng = jax.random.split(rng)
      if positional:
        args = args[:rng_pos] + (rng,) + args[rng_pos + 1:]
      else:
        kwargs = dict(kwargs, rng=rng)
      with dropout_lib.lora_dropout(rate, dropout_rng):
        return self._apply(params, *args, **kwargs)
    return self._apply(params, *args, **kwargs)


@deprecations.renamed_kwargs(spec="config")
def transform(f: Callable[..., Any],
              config: ml_collections.ConfigDict | None = None) -> LoraTransformed:
  """Like ``hk.transform(f)``, with LoRA on the kernels ``config`` targets.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> config = xrapture.default_config()
    >>> config.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(4)(x), config)
    >>> x = jnp.ones((1, 3))
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> params = model.adapt(jax.random.PRNGKey(1), base, x)
    >>> type(params["linear"]["w"]).__name__
    'LoraWeight'
    >>> bool(jnp.allclose(model.apply(params, None, x),
    ...                   hk.transform(lambda x: hk.Linear(4)(x)).apply(base, None, x)))
    True

  Args:
    f: a function using Haiku modules, as for ``hk.transform``.
    config: from :func:`xrapture.default_config`; None for the default
      (every kernel named ``w``, rank 8, alpha 16).

  Returns:
    An object with ``init``, ``adapt``, ``apply`` and ``lora_spec``.
  """
  return LoraTransformed(f, config, with_state=False)


@deprecations.renamed_kwargs(spec="config")
def transform_with_state(f: Callable[..., Any],
                         config: ml_collections.ConfigDict | None = None
                         ) -> LoraTransformed:
  """Like ``hk.transform_with_state(f)``, with LoRA (see :func:`transform`)."""
  return LoraTransformed(f, config, with_state=True)
