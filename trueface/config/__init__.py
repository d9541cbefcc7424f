"""Typed, frozen configuration: schema (dataclasses, paper defaults) and strict loading."""

from trueface.config.loading import (
    ConfigError,
    apply_values,
    flatten,
    from_dict,
    load_config,
    parse_overrides,
    preset_names,
    to_dict,
    to_yaml,
    validate,
)
from trueface.config.schema import (
    AugmentConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ScalingConfig,
    StageConfig,
)

__all__ = [
    "AugmentConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig",
    "ScalingConfig", "StageConfig", "apply_values", "flatten", "from_dict", "load_config", "parse_overrides",
    "preset_names", "to_dict", "to_yaml", "validate",
]
