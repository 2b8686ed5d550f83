"""xrapture.transform: hk.transform whose targeted kernels become LoraWeights."""

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src.implicit import interpreter
from xrapture._src.lora import dropout as dropout_lib
from xrapture._src.transform import adapters
from xrapture._src.transform import layout as layout_lib
from xrapture._src.transform import quantization
from xrapture._src.transform import spec as spec_lib


def _abstract(tree: Any) -> Any:
  """Arrays -> ShapeDtypeStructs; other leaves (flags, None) kept."""
  def one(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x
  return jax.tree.map(one, tree)


class LoraTransformed:
  """A Haiku function whose targeted kernels run as LoraWeights.

  Attributes:
    config: the spec (``ml_collections.ConfigDict``) this model was built with.
  """

  def __init__(self, f: Callable[..., Any], spec: ml_collections.ConfigDict | None,
               with_state: bool):
    self.config = spec_lib.default_spec() if spec is None else spec
    self._with_state = with_state
    self._hk = hk.transform_with_state(f) if with_state else hk.transform(f)
    self._apply = interpreter.use_implicit_args(self._hk.apply)
    self._example = None

  def init(self, rng: jax.Array | None, *args, **kwargs) -> Any:
    """Exactly ``hk.transform(f).init``; also records the inputs' shapes."""
    self._example = (_abstract(args), _abstract(kwargs))
    return self._hk.init(rng, *args, **kwargs)

  def spec(self, params: Any, *example_args, **example_kwargs) -> Any:
    """The lora spec tree of base ``params``.

    Args:
      params: base params.
      *example_args: optional inputs as for ``apply`` (arrays or
        ``jax.ShapeDtypeStruct``s); default: those of the last :meth:`init`.
      **example_kwargs: likewise.

    Returns:
      A tree like ``params``: the adapter rank of every adapted kernel,
      ``LORA_FULL`` for parameters trained in full, ``LORA_FREEZE`` for the
      rest. Pass it to :func:`xrapture.wrap_optimizer`. With example inputs,
      the ``[L, D]`` vectors of a layer stack count as vectors
      (``tune_vectors``); without, as 2-D parameters.

    Raises:
      ValueError: targets match no kernel (the message lists the parameters
        that exist), a rank exceeds a kernel's ``min(M, N)``, an integer
        parameter is targeted, or ``apply`` cannot be traced with the
        example inputs.
    """
    return self._spec_and_layouts(params, self._example_from(example_args, example_kwargs))[0]

  def _example_from(self, args, kwargs):
    if args or kwargs:
      return (_abstract(args), _abstract(kwargs))
    return self._example

  def _spec_and_layouts(self, params, example):
    """The lora spec tree and the layouts of all ≥2-D leaves (None: unknown).

    With example inputs one trace of ``apply`` tells, for each parameter,
    which leading axes a layer stack scans over (a ``[L, D]`` bias is a
    vector) and which are a conv window.
    """
    layouts = None
    if example is not None:
      wanted = [i for i, x in enumerate(jax.tree.leaves(params)) if np.ndim(x) >= 2]
      try:
        layouts = self._layouts(params, example, wanted) if wanted else {}
      except Exception as e:  # any error of the user's function while tracing
        raise ValueError(
            "xrapture traces apply once, with example inputs, to tell layer "
            "stacks and conv windows from kernel axes, and that trace failed "
            f"with these params and inputs {example}: {type(e).__name__}: {e}. "
            "Pass example inputs that fit these params: "
            "model.adapt(rng, params, *inputs) / model.spec(params, *inputs)."
        ) from e
    scanned = {i: l.scanned for i, l in (layouts or {}).items()}
    return adapters.lora_spec_from_config(params, self.config, scanned), layouts

  def adapt(self, rng: jax.Array, params: Any, *example_args, **example_kwargs) -> Any:
    """Wraps every targeted kernel of ``params`` in a fresh LoraWeight.

    ``b`` starts at zero and ``a`` at N(0, init_stddev²), so the adapted model
    computes exactly what the base does. Kernels with more than two
    dimensions are either conv kernels (one adapter pair spanning the window)
    or stacks of layers (one pair per layer); which one is read from how
    ``apply`` consumes them, so it needs example inputs: those given here, or
    those of the last :meth:`init` call.

    Args:
      rng: key for the adapters' initialization.
      params: base params (e.g. pretrained).
      *example_args: inputs as for ``apply`` (arrays or
        ``jax.ShapeDtypeStruct``s), needed only for kernels with more than
        two dimensions when :meth:`init` was not called.
      **example_kwargs: likewise.

    Returns:
      params with LoraWeights; every other leaf is the same object. With
      ``config.quantize`` set, each LoraWeight's ``w`` (and each frozen
      kernel ``config.quantize_frozen`` names) is stored quantized
      (:func:`xrapture.quantize`).
    """
    lora_spec, known = self._spec_and_layouts(
        params, self._example_from(example_args, example_kwargs))

    def layouts(wanted):
      if known is None:
        flat = jax.tree.leaves(params)
        names = [p for p, _ in adapters.paths.flatten_with_paths(params)[0]]
        raise ValueError(
            "Kernels with more than two dimensions ("
            + ", ".join(f"'{names[i]}' {tuple(np.shape(flat[i]))}" for i in wanted)
            + ") may be conv kernels or stacks of layers; xrapture reads which "
            "from how apply uses them. Pass example inputs: "
            "model.adapt(rng, params, *inputs), or call model.init first.")
      return {i: known[i] for i in wanted}

    adapted = adapters.adapt_params(rng, params, lora_spec, self.config, layouts)
    if self.config.quantize is not None:
      # Stacks of vectors (a layer stack's [L, D] biases) are never quantized.
      flat = adapters.paths.flatten_with_paths(params)[0]
      vectors = {flat[i][0] for i, l in (known or {}).items()
                 if np.ndim(flat[i][1]) - l.scanned < 2}
      adapted = quantization.quantize_except(adapted, self.config, vectors)
    return adapted

  def _layouts(self, params, example, wanted):
    args, kwargs = example
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    if self._with_state:
      # The state's shapes, from init; flags (is_training) stay Python values.
      call, dynamic = layout_lib.close_over_static(
          lambda r, *a, **k: self._hk.init(r, *a, **k)[1], (rng, *args), kwargs)
      state = jax.eval_shape(call, dynamic)
      args = (state, rng) + tuple(args)
    else:
      args = (rng,) + tuple(args)
    return layout_lib.kernel_layouts(self._hk.apply, params, args, kwargs, wanted)

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


def transform(f: Callable[..., Any],
              spec: ml_collections.ConfigDict | None = None) -> LoraTransformed:
  """Like ``hk.transform(f)``, with LoRA on the kernels ``spec`` targets.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> spec = xrapture.default_spec()
    >>> spec.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(4)(x), spec)
    >>> x = jnp.ones((1, 3))
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> params = model.adapt(jax.random.PRNGKey(1), base)
    >>> type(params["linear"]["w"]).__name__
    'LoraWeight'
    >>> bool(jnp.allclose(model.apply(params, None, x),
    ...                   hk.transform(lambda x: hk.Linear(4)(x)).apply(base, None, x)))
    True

  Args:
    f: a function using Haiku modules, as for ``hk.transform``.
    spec: from :func:`xrapture.default_spec`; None for the default (every
      kernel named ``w``, rank 8, alpha 16).

  Returns:
    An object with ``init``, ``adapt``, ``apply`` and ``spec``.
  """
  return LoraTransformed(f, spec, with_state=False)


def transform_with_state(f: Callable[..., Any],
                         spec: ml_collections.ConfigDict | None = None
                         ) -> LoraTransformed:
  """Like ``hk.transform_with_state(f)``, with LoRA (see :func:`transform`)."""
  return LoraTransformed(f, spec, with_state=True)
