"""``adapter_config.json``'s fields: those xrapture knows, and those it refuses.

Which fields exist in PEFT's ``LoraConfig``, which of them change what an
adapter computes in ways xrapture does not model (refused when set), and the
check :func:`~xrapture.import_peft` runs on a file's config.
"""

from typing import Any, Mapping


# adapter_config.json fields whose non-default values change what the adapter
# computes in ways xrapture does not model. Value: the default that is fine.
_UNSUPPORTED = {
    "lora_bias": False,            # a bias on lora_B
    "layer_replication": None,     # duplicated layers
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,  # activated LoRA: on only after a token
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "astra_config": None,          # ASTRA (init_lora_weights="astra")
}
# Every field of PEFT's LoraConfig (peft 0.22.0). Another field in a file
# comes from a newer PEFT: off (None, False, empty) it is ignored, as a feature
# left off changes nothing; set, it is ignored with a warning, as PEFT does.
_KNOWN_FIELDS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "astra_config",
    "auto_mapping",
    "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias",
    "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
    "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
})
# init_lora_weights values after which the file holds plain LoRA factors for
# the unmodified base model (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA change the
# base weights).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _is_off(value: Any) -> bool:
  """Whether a config value leaves its feature off (None, False, empty)."""
  return value is None or value is False or (
      isinstance(value, (list, dict, str)) and not value)


def _check_config(config: Mapping[str, Any], where: str) -> None:
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only "
                     "'LORA' adapters can be imported.")
  problems = []
  for field, fine in _UNSUPPORTED.items():
    value = config.get(field, fine)
    if not (_is_off(value) or value == fine):
      problems.append(f"{field}={value!r}")
  init = config.get("init_lora_weights", True)
  if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
    problems.append(f"init_lora_weights={init!r} (the adapter belongs to a "
                    "modified base model; convert it to plain LoRA first)")
  if problems:
    raise ValueError(f"{where} uses PEFT features xrapture does not support: "
                     + "; ".join(problems) + ". Importing it would not reproduce "
                     "the PEFT model.")
