"""Typed recipe configuration: YAML + dotted CLI overrides -> validated pydantic models.

Every user-facing default lives here, once. Unknown keys are errors (with a "did you mean").
``stages``: SFT and OPD/MOPD/GRPO stages; ``cascade``: chains of them; ``placement``: the
``launch`` section (Slurm placement); ``loading``: reading recipes and overrides.
"""

from megatron_opd.config.base import ConfigError, Strict
from megatron_opd.config.cascade import CascadeConfig, CascadeStage, CompareSpec, SelectSpec, SpecialistsSpec
from megatron_opd.config.placement import LaunchConfig, ServerGroup, SlurmConfig, TrainerGroup
from megatron_opd.config.loading import (STAGE_KINDS, apply_overrides, dump_config, load_recipe, load_stage_recipe,
                                         parse_stage, stage_recipe_path)
from megatron_opd.config.model import ModelConfig, MoEConfig
from megatron_opd.config.stages import (ChatDataConfig, EvalConfig, GuardConfig, LossConfig, OPDStageConfig,
                                        OPDTrainConfig, OptimConfig, ParallelConfig, PromptDataConfig, RewardConfig,
                                        RolloutConfig, RunConfig, SFTStageConfig, StageBase, StageConfig, TrainConfig)

__all__ = [
    "CascadeConfig", "CascadeStage", "ChatDataConfig", "CompareSpec", "ConfigError", "EvalConfig", "GuardConfig", "LaunchConfig",
    "LossConfig", "ModelConfig", "MoEConfig", "OPDStageConfig", "OPDTrainConfig", "OptimConfig", "ParallelConfig", "PromptDataConfig",
    "RewardConfig", "RolloutConfig", "RunConfig", "STAGE_KINDS", "SFTStageConfig", "SelectSpec", "ServerGroup",
    "SlurmConfig", "SpecialistsSpec", "StageBase", "StageConfig", "Strict", "TrainConfig", "TrainerGroup", "apply_overrides",
    "dump_config", "load_recipe", "load_stage_recipe", "parse_stage", "stage_recipe_path",
]
