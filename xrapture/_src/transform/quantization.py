"""xrapture.quantize: the frozen base of adapted params stored as NF4 or int8 (QLoRA).

Each LoraWeight's ``w`` becomes a :class:`QuantizedArray` (and, with
``config.quantize_frozen``, so do the frozen kernels it names); adapters and
trained parameters stay as they are. Blocks run along a kernel's input axis:
the ``[in, out]`` kernel of ``hk.Linear`` is quantized as bitsandbytes
quantizes the torch weight ``[out, in]``; an embedding table (a parameter
named ``embeddings``) along its feature axis, so that a lookup dequantizes
only the rows it reads. Leading axes (stacked layers, a conv window) are
quantized one slice at a time.
"""

from typing import Any, Collection

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src import deprecations
from xrapture._src.implicit import implicit_array
from xrapture._src.lora import lora_weight
from xrapture._src.quant import quantize as quantize_lib
from xrapture._src.quant import quantized_array
from xrapture._src.transform import config as config_lib
from xrapture._src.transform import paths

LoraWeight = lora_weight.LoraWeight
IN = lora_weight.IN


def _blocked_axis(path: str, layout: str | None, shape: tuple[int, ...],
                  block: int) -> int:
  """``-2`` or ``-1``: the axis whose consecutive values share an absmax.

  An embedding table's last (feature) axis; else the input axis if it is one
  of the last two (``-2`` for a Haiku kernel ``[.., in, out]``); else (a
  multi-axis kernel such as ``[in, heads, head_dim]``) the last-but-one axis
  if the block size divides it, or the last.
  """
  if path.rsplit("/", 1)[-1] == "embeddings":
    return -1
  if layout is None or layout[-2] == IN:   # a frozen kernel is [.., in, out]
    return -2
  if layout[-1] == IN:
    return -1
  return -2 if shape[-2] % block == 0 else -1


def _quantize_one(path: str, x: Any, config: ml_collections.ConfigDict,
                  axis: int, what: str) -> Any:
  """``x`` quantized as ``config`` says; errors name the path and the field."""
  if implicit_array.is_implicit(x):
    raise ValueError(
        f"Cannot quantize {what} '{path}': it is already a {type(x).__name__}. "
        "xrapture.quantize quantizes full-precision kernels once; call it on "
        "params that hold dense kernels (or leave these params as they are).")
  dtype = np.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"Cannot quantize {what} '{path}' of dtype {dtype} (shape "
        f"{tuple(np.shape(x))}): config.quantize = {config.quantize!r} quantizes "
        "floating-point kernels only. Leave integer parameters out of "
        "config.targets / config.quantize_frozen.")
  try:
    return quantize_lib.quantize_array(
        x, config.quantize, block_size=config.quantize_block,
        double_quant=config.double_quant, axis=axis)
  except ValueError as e:
    raise ValueError(
        f"Cannot quantize {what} '{path}' of shape {tuple(np.shape(x))} with "
        f"config.quantize = {config.quantize!r}, config.quantize_block = "
        f"{config.quantize_block}: {e}") from e


@deprecations.renamed_kwargs(spec="config")
def quantize(params: Any, config: ml_collections.ConfigDict) -> Any:
  """Stores the frozen base of ``params`` quantized, as ``config`` says (QLoRA).

  ``model.adapt`` calls it when ``config.quantize`` is set; call it yourself on
  params that already hold LoraWeights from elsewhere
  (:func:`xrapture.import_peft`, :func:`xrapture.load_adapter`). A quantized
  ``w`` is dequantized per use inside the step, by the handlers of each
  product; it gets no gradient and no optimizer state. Its integer codes are
  pytree leaves, so differentiate the whole params tree with
  ``jax.grad(loss, allow_int=True)`` (their gradients are ``float0``, which
  take no memory) and update with :func:`xrapture.wrap_optimizer`, which
  gives them zero updates of their own dtype; or differentiate only the
  trainable part.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> config = xrapture.default_config()
    >>> config.rank, config.quantize = 2, "nf4"
    >>> model = xrapture.transform(lambda x: hk.Linear(4)(x), config)
    >>> x = jnp.ones((1, 64))
    >>> params = model.adapt(jax.random.PRNGKey(1), model.init(jax.random.PRNGKey(0), x))
    >>> type(params["linear"]["w"].w).__name__
    'QuantizedArray'
    >>> model.apply(params, None, x).shape
    (1, 4)

  Args:
    params: adapted params (with LoraWeights).
    config: a config whose ``quantize`` is ``"nf4"`` or ``"int8"``;
      ``quantize_block``, ``double_quant`` and ``quantize_frozen`` as in
      :func:`xrapture.default_config`.

  Returns:
    ``params`` with each LoraWeight's ``w`` (and each frozen kernel that
    ``config.quantize_frozen`` names) a :class:`xrapture.QuantizedArray` of the
    same shape and dtype; every other leaf is the same object.

  Raises:
    ValueError: naming the field and the allowed values: ``config.quantize`` is
      None or unknown (any invalid field, see ``config.validate``); naming the
      path: the block size does not divide a kernel's input axis (with the
      sizes that do), a kernel is integer or already quantized, a LoraWeight's
      adapter factor is quantized, ``config.quantize_frozen`` names a parameter
      that ``config.full`` trains.

  ``config.quantize_frozen`` patterns should name kernels (``r".*/w"``): here
  every matching parameter with two or more dimensions is one, including
  the ``[L, D]`` biases of a layer stack, which ``model.adapt`` (tracing the
  model) knows to be vectors and leaves alone.
  """
  return quantize_except(params, config, vectors=())


def quantize_except(params: Any, config: ml_collections.ConfigDict,
                    vectors: Collection[str]) -> Any:
  """:func:`quantize`, leaving the parameters at paths ``vectors`` alone.

  ``vectors``: paths of parameters with two or more dimensions that are
  stacks of vectors (a layer stack's biases), never quantized.
  """
  config_lib.validate(config)
  if config.quantize is None:
    raise ValueError(
        "config.quantize = None: nothing to quantize with. Set config.quantize to one "
        f"of {quantize_lib.SCHEMES} (e.g. config.quantize = 'nf4').")
  flat, treedef = paths.flatten_with_paths(params)
  out = []
  for path, value in flat:
    if isinstance(value, LoraWeight):
      for name in ("a", "b"):
        if implicit_array.is_implicit(getattr(value, name)):
          raise ValueError(
              f"LoraWeight '{path}' has a quantized adapter factor {name!r}: "
              "adapters are trained and stay in full precision; only the base "
              "kernel w is quantized.")
      axis = _blocked_axis(path, lora_weight.layout_of(value), value.shape,
                          config.quantize_block)
      out.append(value.replace(w=_quantize_one(path, value.w, config, axis,
                                                "the base kernel of LoraWeight")))
    elif (config.quantize_frozen and config_lib.matches_any(config.quantize_frozen, path)
          and np.ndim(value) >= 2 and path not in vectors):
      if config_lib.matches_any(config.full, path):
        raise ValueError(
            f"config.quantize_frozen matches '{path}', which config.full trains: "
            "only frozen parameters can be quantized (a gradient step cannot "
            "update 4- or 8-bit codes). Narrow config.quantize_frozen or config.full.")
      axis = _blocked_axis(path, None, np.shape(value), config.quantize_block)
      out.append(_quantize_one(path, value, config, axis, "frozen parameter"))
    else:
      out.append(value)
  return treedef.unflatten(out)


def _stats(merged: np.ndarray, requantized: np.ndarray, update: np.ndarray
           ) -> dict[str, float]:
  err = requantized.astype(np.float64) - merged.astype(np.float64)
  rms = lambda x: float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))
  return dict(max_abs=float(np.abs(err).max()), rms=rms(err),
              relative_rms=rms(err) / max(rms(merged), np.finfo(np.float64).tiny),
              update_rms=rms(update))


def merge_and_requantize(params: Any) -> tuple[Any, dict[str, dict[str, float]]]:
  """Merges each LoraWeight on a quantized base into a new quantized kernel.

  Dequantize, add ``scale · b @ a``, quantize again with the base's own
  scheme, block size, double quantization and blocked axis: the deployable
  QLoRA model, at the cost of a new rounding of every weight. (For
  full-precision merged params use :func:`xrapture.merge_params`, which
  dequantizes.) Run the result with :func:`xrapture.use_implicit_args` (a
  :func:`xrapture.transform` model's ``apply`` does).

  Args:
    params: adapted params whose LoraWeights hold quantized ``w``.

  Returns:
    ``(merged, errors)``: ``merged`` has a :class:`xrapture.QuantizedArray`
    in place of each such LoraWeight (a LoraWeight on a dense base becomes
    its dense merged kernel; other leaves are the same objects), and
    ``errors`` maps each requantized path to what the new rounding did to
    the merged kernel: ``max_abs`` and ``rms`` of ``requantized - merged``,
    ``relative_rms`` (over the RMS of the merged kernel) and, for scale,
    ``update_rms`` (the RMS of ``scale · b @ a``).
  """
  flat, treedef = paths.flatten_with_paths(params)
  merge = jax.jit(implicit_array.materialize_nested)
  delta = jax.jit(LoraWeight.delta)
  out, errors = [], {}
  for path, value in flat:
    if not (isinstance(value, LoraWeight) and isinstance(value.w, quantized_array.QuantizedArray)):
      out.append(merge(value) if isinstance(value, LoraWeight) else value)
      continue
    q = value.w
    merged = np.asarray(jax.device_get(merge(value)))
    update = np.asarray(jax.device_get(delta(value)))
    new = quantize_lib.quantize_array(merged, q.scheme, block_size=q.block_size,
                                      double_quant=q.double_quant, axis=q.axis)
    requantized = np.asarray(jax.device_get(quantized_array.dequantize(new)))
    errors[path] = _stats(merged, requantized, update)
    out.append(new)
  return treedef.unflatten(out), errors
