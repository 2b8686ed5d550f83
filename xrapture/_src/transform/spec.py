"""The ml_collections spec that says which parameters get adapters."""

import re
from typing import Any

import ml_collections

# Every kernel named `w` with two or more dimensions: hk.Linear, attention
# projections, convolutions (the analogue of PEFT's "all-linear").
ALL_KERNELS = (r".*/w",)


def default_spec() -> ml_collections.ConfigDict:
  """Returns the default LoRA spec, locked: an unknown field is an error.

  Fields:
    rank: adapter rank ``r`` (8).
    alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (16.0).
    targets: regexes, ``re.fullmatch``-ed against ``"module/param"`` Haiku
      paths such as ``"mlp/~/linear_0/w"``; each matching parameter with two
      or more dimensions gets an adapter. A matching 1-D parameter is
      skipped: only ``full`` and ``tune_vectors`` decide about vectors.
      Default: every kernel named ``w``. Embeddings (``embeddings``) only
      when named.
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
  """
  spec = ml_collections.ConfigDict()
  spec.rank = 8
  spec.alpha = 16.0
  spec.targets = ALL_KERNELS
  spec.full = ()
  spec.tune_vectors = False
  spec.rslora = False
  spec.init_stddev = 0.01
  spec.dtype = ml_collections.config_dict.placeholder(str)
  spec.rank_pattern = ()
  spec.alpha_pattern = ()
  spec.dropout = 0.0
  spec.init = "default"
  spec.use_dora = False
  spec.lock()
  return spec


def _pairs(patterns: Any) -> list[tuple[str, Any]]:
  if hasattr(patterns, "items"):
    return list(patterns.items())
  return [tuple(p) for p in patterns]


def _first_match(patterns: Any, path: str, default: Any) -> Any:
  for pattern, value in _pairs(patterns):
    if re.fullmatch(pattern, path):
      return value
  return default


def rank_for(spec: ml_collections.ConfigDict, path: str) -> int:
  """The adapter rank of parameter ``path`` under ``spec``."""
  return int(_first_match(spec.rank_pattern, path, spec.rank))


def alpha_for(spec: ml_collections.ConfigDict, path: str) -> float:
  """The LoRA alpha of parameter ``path`` under ``spec``."""
  return float(_first_match(spec.alpha_pattern, path, spec.alpha))


def matches_any(patterns, path: str) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)
