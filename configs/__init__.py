"""YAML configs and their loader into frozen dataclasses."""

from configs.loader import (  # noqa: F401
    MODES,
    Config,
    ConfigError,
    DevicePlacement,
    ModelConfig,
    load_config,
)
