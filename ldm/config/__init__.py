"""LDM configs: the schema (typed frozen dataclasses), the preset registry, YAML io and key=value overrides."""
from ldm.config.schema import (DOMAINS, AutoencoderConfig, ConditioningConfig, ConfigError, DiffusionConfig,
                               FirstStageLossConfig, LDMConfig, UNetConfig, check_domains)
from ldm.config.presets import PRESETS, get_preset, register_preset
from ldm.config.io import (apply_overrides, config_hash, flatten, format_config, from_dict, load_config, load_yaml,
                           save_yaml, to_dict)

__all__ = ["DOMAINS", "AutoencoderConfig", "ConditioningConfig", "ConfigError", "DiffusionConfig",
           "FirstStageLossConfig", "LDMConfig", "UNetConfig", "check_domains", "PRESETS", "get_preset",
           "register_preset", "apply_overrides", "config_hash", "flatten", "format_config", "from_dict", "load_config",
           "load_yaml", "save_yaml", "to_dict"]
