"""The ml_collections config that says which parameters get adapters."""

import math
import re
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src.quant import quantize as quantize_lib

# Every kernel named `w` with two or more dimensions: hk.Linear, attention
# projections, convolutions.
ALL_KERNELS = (r".*/w",)
# PEFT's name: every kernel apply contracts (dot_general, conv, ragged_dot),
# whatever it is called; read from a trace of apply.
ALL_LINEAR = "all-linear"


def default_config() -> ml_collections.ConfigDict:
  """Returns the default LoRA config, locked: an unknown field is an error.

  Fields:
    rank: adapter rank ``r`` (8).
    alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (16.0).
    targets: regexes, ``re.fullmatch``-ed against ``"module/param"`` Haiku
      paths such as ``"mlp/~/linear_0/w"``; each matching parameter with two
      or more dimensions gets an adapter. A matching 1-D parameter is
      skipped: only ``full`` and ``tune_vectors`` decide about vectors.
      Default: every kernel named ``w``. Embeddings (``embeddings``) only
      when named. The entry ``"all-linear"`` (PEFT's name) targets every
      kernel ``apply`` uses through a matmul (``dot_general``), a conv or a
      ``ragged_dot``, whatever its name, skipping kernels whose grouped in
      or out size is below the rank (a ``[2F, 1]`` attention logit) and
      kernels with a use that cannot stay low-rank (a grouped conv, an
      elementwise use); it needs the example inputs passed to
      ``adapt``/``lora_spec``.
    full: regexes of parameters trained in full (no adapter) (``()``).
    tune_vectors: train every floating-point 1-D parameter (biases, norms) in
      full (False); integer ones stay frozen.
    rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA) (False).
    init_stddev: ``a`` starts as N(0, init_stddev²); ``b`` starts at zero, so
      an adapted model starts equal to its base (0.01).
    dtype: adapter dtype name, or None for each kernel's own dtype (None).
    rank_pattern: ``(regex, rank)`` pairs overriding ``rank`` where the
      regex fullmatches the path; the first match wins (``()``). Pairs, not
      a dict: ConfigDict keys cannot hold the dots of a regex.
    alpha_pattern: ``(regex, alpha)`` pairs, likewise (``()``).
    dropout: dropout on the LoRA path's input, drawn from the ``rng`` given
      to ``apply``; off when that rng is None (0.0).
    init: how adapters start: ``"default"`` (``b = 0``, ``a`` as
      ``init_stddev`` says) or ``"pissa"`` (PEFT's PiSSA: the adapter holds
      the top-``rank`` singular directions of each kernel's grouped matrix,
      the kernel keeps the residual; export with
      ``export_peft(..., initial=<params adapt returned>)``) (``"default"``).
    use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each
      adapted kernel becomes a :class:`xrapture.DoraWeight`, a trainable
      magnitude per output feature times the kernel ``w + s·b@a``
      normalized per output feature over its in group; the magnitude starts
      at the base kernel's norms, so the model starts equal to its base
      (False).

    quantize: QLoRA: ``model.adapt`` stores the frozen base kernel of every
      LoraWeight quantized, dequantized per use inside the step: None (full
      precision), ``"nf4"`` (4-bit NormalFloat in blocks along the kernel's
      input axis, as bitsandbytes) or ``"int8"`` (one absmax per output
      channel) (None). See :func:`xrapture.quantize`.
    quantize_block: NF4 values per absmax along a kernel's input axis: one of
      32, 64, ..., 4096, dividing that axis (64).
    double_quant: NF4 only: quantize the block absmax values too
      (bitsandbytes' ``compress_statistics``: 0.37 fewer bits per parameter
      at block 64) (False).
    quantize_frozen: regexes of frozen parameters (neither adapted nor in
      ``full``) with two or more dimensions to quantize too, e.g.
      ``(r".*/w",)`` for every frozen kernel: QLoRA's whole base (``()``).

  Examples:
    >>> import xrapture
    >>> config = xrapture.default_config()
    >>> config.rank, config.alpha, config.targets
    (8, 16.0, ('.*/w',))
    >>> config.rank = 4
    >>> config.rnak = 4
    Traceback (most recent call last):
      ...
    AttributeError: ...Key "rnak" does not exist and cannot be added since the config is locked...
  """
  config = ml_collections.ConfigDict()
  config.rank = 8
  config.alpha = 16.0
  config.targets = ALL_KERNELS
  config.full = ()
  config.tune_vectors = False
  config.rslora = False
  config.init_stddev = 0.01
  config.dtype = ml_collections.config_dict.placeholder(str)
  config.rank_pattern = ()
  config.alpha_pattern = ()
  config.dropout = 0.0
  config.init = "default"
  config.use_dora = False
  config.quantize = ml_collections.config_dict.placeholder(str)
  config.quantize_block = 64
  config.double_quant = False
  config.quantize_frozen = ()
  config.lock()
  return config


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
      x, (bool, np.bool_))


def _rank_problem(x: Any, minimum: int) -> str | None:
  if _is_int(x) and x >= minimum:
    return None
  if minimum == 0:
    return "must be an integer >= 0 (0 freezes the parameter)"
  return ("must be an integer >= 1 (the adapter rank r; to give no parameter "
          "an adapter, set config.targets = ())")


def _alpha_problem(x: Any) -> str | None:
  if _is_number(x) and math.isfinite(x) and x != 0:
    return None
  return ("must be a finite number other than 0 (the update is scaled by "
          "alpha / rank: 0 trains nothing, NaN or inf breaks training)")


def _regex_problem(x: Any) -> str | None:
  if not isinstance(x, str):
    return f"must be a regex string, not {type(x).__name__}"
  try:
    re.compile(x)
  except re.error as e:
    return f"is not a valid regex: {e}"
  return None


def _dtype_problem(x: Any) -> str | None:
  allowed = ("must be None (each kernel's own dtype) or a floating-point dtype "
             "name: 'float32', 'bfloat16', 'float16' or 'float64'")
  if x is None:
    return None
  try:
    dtype = jnp.dtype(x)
  except TypeError:
    return allowed
  if not jnp.issubdtype(dtype, jnp.floating):
    return allowed + " (adapters are trained by gradients)"
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of ``config`` for a value that trains nothing or breaks.

  Called once where a config is first used (``model.lora_spec`` / ``model.adapt``),
  so a bad value fails there and not at the first training step, or never.

  Raises:
    ValueError: naming each bad field, its value and the allowed values:
      ``rank`` < 1 (with ``targets``); ``alpha`` 0, NaN or inf; ``init_stddev`` not a finite
      number > 0; ``dropout`` outside [0, 1); ``dtype`` not a floating-point
      dtype name; a ``targets`` / ``full`` / ``rank_pattern`` /
      ``alpha_pattern`` regex that does not compile; a ``rank_pattern`` rank
      < 0 or an ``alpha_pattern`` alpha as for ``alpha``; ``tune_vectors``,
      ``rslora`` or ``double_quant`` not a bool; ``quantize`` not None,
      ``"nf4"`` or ``"int8"``; ``quantize_block`` not a bitsandbytes block
      size; ``double_quant`` without ``"nf4"``; ``quantize_frozen`` not
      regexes, or given without ``quantize``.
  """
  problems = []

  def check(field, value, problem):
    if problem:
      problems.append(f"config.{field} = {value!r} {problem}")

  if config.targets:  # without targets the rank is never used
    check("rank", config.rank, _rank_problem(config.rank, 1))
  check("alpha", config.alpha, _alpha_problem(config.alpha))
  stddev = config.init_stddev
  check("init_stddev", stddev, None if (
      _is_number(stddev) and math.isfinite(stddev) and stddev > 0) else (
          "must be a finite number > 0 (a starts as N(0, init_stddev^2) and b "
          "at 0: with 0 both stay 0, their gradients being 0)"))
  dropout = config.dropout
  check("dropout", dropout, None if (
      _is_number(dropout) and 0 <= dropout < 1) else "must be a number in [0, 1)")
  check("dtype", config.dtype, _dtype_problem(config.dtype))
  for field in ("tune_vectors", "rslora", "double_quant"):
    value = getattr(config, field)
    check(field, value, None if isinstance(value, bool) else "must be True or False")
  _check_quantization(config, check)
  for field in ("targets", "full", "quantize_frozen"):
    patterns = getattr(config, field)
    if isinstance(patterns, str):
      check(field, patterns, "must be a sequence of regexes, e.g. (r'.*/w',)")
      continue
    for i, pattern in enumerate(patterns):
      check(f"{field}[{i}]", pattern, _regex_problem(pattern))
  for field, value_problem in (("rank_pattern", lambda x: _rank_problem(x, 0)),
                               ("alpha_pattern", _alpha_problem)):
    try:
      pairs = _pairs(getattr(config, field))
    except TypeError:
      pairs = None
    if pairs is None or any(len(p) != 2 for p in pairs):
      check(field, getattr(config, field), "must be (regex, value) pairs")
      continue
    for i, (pattern, value) in enumerate(pairs):
      check(f"{field}[{i}][0]", pattern, _regex_problem(pattern))
      check(f"{field}[{i}][1]", value, value_problem(value))
  if problems:
    raise ValueError("Invalid LoRA config:\n  " + "\n  ".join(problems))


def _check_quantization(config: ml_collections.ConfigDict, check) -> None:
  """The quantization fields, reported through ``check(field, value, problem)``."""
  schemes = quantize_lib.SCHEMES
  scheme = config.quantize
  check("quantize", scheme, None if scheme is None or scheme in schemes else (
      f"must be None (full-precision base) or one of {schemes}"))
  block = config.quantize_block
  check("quantize_block", block, None if _is_int(block) and block in quantize_lib.BLOCK_SIZES
        else f"must be one of {quantize_lib.BLOCK_SIZES} (bitsandbytes' NF4 block sizes)")
  if config.double_quant is True and scheme != "nf4":
    check("double_quant", True, f"applies to quantize='nf4' only (quantize is {scheme!r})")
  if config.quantize_frozen and not isinstance(config.quantize_frozen, str) and scheme is None:
    check("quantize_frozen", config.quantize_frozen,
          "needs config.quantize ('nf4' or 'int8'), the scheme they are stored in")


def _pairs(patterns: Any) -> list[tuple[str, Any]]:
  if hasattr(patterns, "items"):
    return list(patterns.items())
  return [tuple(p) for p in patterns]


def _first_match(patterns: Any, path: str, default: Any) -> Any:
  for pattern, value in _pairs(patterns):
    if re.fullmatch(pattern, path):
      return value
  return default


def rank_for(config: ml_collections.ConfigDict, path: str) -> int:
  """The adapter rank of parameter ``path`` under ``config``."""
  return int(_first_match(config.rank_pattern, path, config.rank))


def alpha_for(config: ml_collections.ConfigDict, path: str) -> float:
  """The LoRA alpha of parameter ``path`` under ``config``."""
  return float(_first_match(config.alpha_pattern, path, config.alpha))


def matches_any(patterns, path: str) -> bool:
  """Whether a regex among ``patterns`` fullmatches ``path`` ("all-linear" never does)."""
  return any(p != ALL_LINEAR and re.fullmatch(p, path) for p in patterns)


def all_linear(patterns) -> bool:
  """Whether ``patterns`` hold ``"all-linear"``."""
  return ALL_LINEAR in tuple(patterns)
