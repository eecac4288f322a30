"""The student model: megatron-core GPTModel built from a Hugging Face config, via mbridge."""

from megatron_opd.model.bridge import (
    SUPPORTED_ARCHITECTURES,
    ModelBundle,
    UnsupportedArchitectureError,
    build_model,
    export_hf_weights,
    load_hf_config,
    load_hf_weights,
    save_hf_checkpoint,
)
from megatron_opd.model.logits import gather_logits, real_vocab_logprobs

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelBundle",
    "UnsupportedArchitectureError",
    "build_model",
    "export_hf_weights",
    "gather_logits",
    "load_hf_config",
    "load_hf_weights",
    "real_vocab_logprobs",
    "save_hf_checkpoint",
]
