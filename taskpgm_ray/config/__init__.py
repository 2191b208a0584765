"""Typed configuration: YAML in, validated dataclasses out, every problem reported at once.

Importable without Ray, torch or DeepSpeed. Each field carries a one-line doc in its metadata; the
README's configuration reference is generated from the same text (`taskpgm config-doc`).

``sections`` holds the dataclasses, ``build`` turns YAML values into them (and writes the reference),
``checks`` has the cross-field rules, ``load`` puts the three together; every name is importable from here.
"""

from taskpgm_ray.config.build import reference_markdown
from taskpgm_ray.config.checks import config_warnings
from taskpgm_ray.config.load import config_from_dict, load_config
from taskpgm_ray.config.sections import (
    ACTIVE_AUTO_MIN_TASKS,
    BUILTIN_MODEL_NAMES,
    PAPER_ENERGY,
    SHIPPED_CONFIGS,
    TEST_CONFIG,
    Config,
    ConfigError,
    ConfigWarning,
    EnergyConfig,
    EstimationConfig,
    ModelConfig,
    ProbeConfig,
    SplitConfig,
    StableConfig,
    SyntheticConfig,
    TaskConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    active_estimation,
    doc,
    resolve_path,
)

__all__ = [
    "ACTIVE_AUTO_MIN_TASKS", "BUILTIN_MODEL_NAMES", "PAPER_ENERGY", "SHIPPED_CONFIGS", "TEST_CONFIG", "Config",
    "ConfigError", "ConfigWarning", "EnergyConfig", "EstimationConfig", "ModelConfig", "ProbeConfig", "SplitConfig",
    "StableConfig", "SyntheticConfig", "TaskConfig", "TinyModelConfig", "TrackingConfig", "TrainConfig", "TuneConfig",
    "active_estimation", "config_from_dict", "config_warnings", "doc", "load_config", "reference_markdown",
    "resolve_path",
]
