"""The run configuration: one typed dataclass tree, loaded from YAML plus `key.sub=value` overrides.

Everything a run needs is here and validated once, at the edge (`load_config`). Modules receive the
sub-config they need (`cfg.model`, `cfg.mesh`, ...) and may trust it. `schema.py` holds the tree,
`loading.py` the YAML and overrides, `validation.py` the cross-field checks.
"""

from lmadapt.config.base import ConfigError
from lmadapt.config.continual import (
    AverageConfig,
    BudgetConfig,
    ContinualConfig,
    DistillConfig,
    FisherConfig,
    LoraConfig,
)
from lmadapt.config.loading import config_to_dict, load_config, section_from_dict
from lmadapt.config.schema import (
    DEFAULT_RULES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    GroupConfig,
    InitConfig,
    LineageConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    ReplayConfig,
    RopeScalingConfig,
    RunConfig,
    ScheduleConfig,
    SourceConfig,
    StageConfig,
    TaskConfig,
    TokenizerConfig,
    TrainConfig,
    VersionConfig,
)
from lmadapt.config.validation import validate

__all__ = [
    "DEFAULT_RULES",
    "AverageConfig",
    "BudgetConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ContinualConfig",
    "DataConfig",
    "DistillConfig",
    "DistributedConfig",
    "EvalConfig",
    "FisherConfig",
    "GroupConfig",
    "InitConfig",
    "LineageConfig",
    "LoggingConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "RopeScalingConfig",
    "OptimizerConfig",
    "ReplayConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceConfig",
    "StageConfig",
    "TaskConfig",
    "TokenizerConfig",
    "TrainConfig",
    "VersionConfig",
    "config_to_dict",
    "load_config",
    "section_from_dict",
    "validate",
]
