"""YAML configs and their loader into frozen dataclasses."""

from configs.loader import (  # noqa: F401
    Config,
    ConfigError,
    DevicePlacement,
    ModelConfig,
    load_config,
)
from configs.modes import MODE_NAMES, MODES, Mode, mode_of  # noqa: F401
