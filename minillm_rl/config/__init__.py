"""One typed, validated run configuration: a YAML recipe plus ``key.sub=value`` overrides.

- :mod:`~minillm_rl.config.schema`: the sections and their fields, each with its default, range
  and one-line doc;
- :mod:`~minillm_rl.config.loading`: reading a recipe, applying overrides, converting and
  range-checking every field (:func:`load_config`);
- :mod:`~minillm_rl.config.checks`: rules across fields;
- :mod:`~minillm_rl.config.reference`: ``docs/config-reference.md``, generated from the schema
  (``python -m minillm_rl.config.reference > docs/config-reference.md``, or ``make docs``).
"""

from minillm_rl.config.loading import apply_override, build_config, load_config
from minillm_rl.config.schema import (
    PHASES,
    PHASES_USING_TEACHER,
    AdvantageConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    Phase,
    RunConfig,
    RuntimeConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
)

__all__ = ["PHASES", "PHASES_USING_TEACHER", "AdvantageConfig", "ConfigError", "DataConfig", "EvalConfig",
           "LossConfig", "ModelConfig", "OptimConfig", "OutputConfig", "Phase", "RunConfig", "RuntimeConfig",
           "SamplingConfig", "SFTConfig", "TrainConfig", "apply_override", "build_config", "load_config"]
