"""The student model of a training stage: its checkpoint, dtype, recomputation and (mixture of experts) router
losses."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict


class MoEConfig(Strict):
    load_balancing: Literal["none", "aux_loss", "seq_aux_loss", "global_aux_loss"] = Field(
        "none", description="megatron-core's load-balancing loss (moe_router_load_balancing_type): aux_loss = the Switch "
        "Transformer's E * sum_e f_e P_e over a micro-batch's tokens, seq_aux_loss per sequence, global_aux_loss over "
        "the data-parallel ranks' tokens; none: no balancing term")
    aux_loss_coeff: float = Field(0.0, ge=0, description="weight of the load-balancing loss (moe_aux_loss_coeff; "
                                  "1e-3 to 1e-2 is usual); needs load_balancing other than none")
    z_loss_coeff: float = Field(0.0, ge=0, description="router z-loss weight (moe_z_loss_coeff, ST-MoE: the mean "
                                "squared log-sum-exp of the router logits; 1e-3 is usual); 0: off")

    @model_validator(mode="after")
    def _balancing(self) -> "MoEConfig":
        if (self.load_balancing == "none") != (self.aux_loss_coeff == 0):
            raise ValueError(f"model.moe: load_balancing {self.load_balancing!r} with aux_loss_coeff "
                             f"{self.aux_loss_coeff}: a load-balancing loss needs both a type and a positive weight")
        return self

    def overrides(self) -> dict:
        """megatron-core's TransformerConfig fields for these settings."""
        return dict(moe_router_load_balancing_type=self.load_balancing, moe_aux_loss_coeff=self.aux_loss_coeff,
                    moe_z_loss_coeff=self.z_loss_coeff or None)


class ModelConfig(Strict):
    hf_path: Path = Field(description="HF checkpoint directory (config, safetensors, tokenizer) to start from")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the student's parameter dtype (bfloat16: megatron's mixed-precision optimizer, Adam "
        "on fp32 main copies); also the dtype of the SGLang servers `opd launch` places")
    vocab_divisible_by: int = Field(128, ge=1, description="pad the vocabulary to a multiple of this")
    recompute: Literal["none", "full"] = Field(
        "none", description="activation recomputation (megatron's recompute_granularity 'full', one layer at a time): "
        "keep only each layer's input and recompute the layer in the backward pass — ~1/3 more compute, and the "
        "activations of a long sequence no longer grow with the layer count")
    moe: MoEConfig = Field(MoEConfig(), description="mixture-of-experts students: the "
                             "router's auxiliary losses (ignored for a dense model)")
