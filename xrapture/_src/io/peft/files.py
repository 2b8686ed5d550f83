"""The adapter directory: ``adapter_model.safetensors`` and ``adapter_config.json``.

Their names, writing both (a new directory appears whole, an existing one is
updated file by file), and reading both back with errors that name the file.
"""

import json
import os
from typing import Any
import warnings

import numpy as np
import safetensors.numpy

from xrapture._src.io import atomic
from xrapture._src.io.peft import adapter_config


WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PICKLE_NAME = "adapter_model.bin"  # torch.save format, which we do not read


def _write_dir(path: str, tensors: dict[str, np.ndarray], config: dict) -> None:
  """Writes both files; a new directory appears whole, an existing one file by file."""
  config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
  path = os.path.abspath(path)
  if not os.path.exists(path):
    with atomic.atomic_new_dir(path) as tmp:
      safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_NAME),
                                  metadata={"format": "pt"})
      with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        f.write(config_text)
    return
  if not os.path.isdir(path):
    raise ValueError(f"{path} exists and is not a directory.")
  # Weights first: the config is what marks the directory as an adapter.
  with atomic.atomic_path(os.path.join(path, WEIGHTS_NAME)) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
  with atomic.atomic_path(os.path.join(path, CONFIG_NAME)) as tmp:
    with open(tmp, "w") as f:
      f.write(config_text)


def _read_files(path: str) -> tuple[str, dict[str, Any], str, dict[str, np.ndarray]]:
  """(config file, config, weights file, tensors) of a PEFT adapter directory."""
  config_file = os.path.join(path, CONFIG_NAME)
  weights_file = os.path.join(path, WEIGHTS_NAME)
  if (not os.path.exists(weights_file)
      and os.path.exists(os.path.join(path, _PICKLE_NAME))):
    raise ValueError(
        f"{path} holds {_PICKLE_NAME} (torch.save format) but no {WEIGHTS_NAME}: "
        f"only .safetensors adapters are supported. Convert it with torch: "
        f"safetensors.torch.save_file(torch.load('{_PICKLE_NAME}'), '{WEIGHTS_NAME}'), "
        "or save the PeftModel again with save_pretrained(dir, "
        "safe_serialization=True).")
  with open(config_file) as f:
    try:
      config = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"{config_file} is not valid JSON (truncated or corrupt?): "
                       f"{e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not a "
                     "PEFT config record.")
  unknown = sorted(k for k in set(config) - adapter_config._KNOWN_FIELDS
                   if not adapter_config._is_off(config[k]))
  if unknown:
    warnings.warn(
        f"{config_file} has fields xrapture does not know, written by a newer "
        f"PEFT?: {unknown}. They are ignored; if one changes what the adapter "
        "computes, the import will not reproduce the PEFT model.", UserWarning,
        stacklevel=3)
  try:
    tensors = safetensors.numpy.load_file(weights_file)
  except FileNotFoundError:
    raise
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{weights_file} is not a readable safetensors file "
                     f"(truncated or corrupt?): {e}") from e
  return config_file, config, weights_file, tensors
