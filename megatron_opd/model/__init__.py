"""The student model: megatron-core GPTModel built from a Hugging Face config, via mbridge.

The names below load on first use (PEP 562): ``model.hf_config``'s checks need neither torch nor
megatron-core, and the CLI runs them before it starts any worker."""

import importlib

_HOMES = {
    "SUPPORTED_ARCHITECTURES": "megatron_opd.model.hf_config",
    "UnsupportedArchitectureError": "megatron_opd.model.hf_config",
    "ModelBundle": "megatron_opd.model.bridge",
    "build_model": "megatron_opd.model.bridge",
    "export_hf_weights": "megatron_opd.model.bridge",
    "load_hf_config": "megatron_opd.model.bridge",
    "load_hf_weights": "megatron_opd.model.bridge",
    "save_hf_checkpoint": "megatron_opd.model.bridge",
    "gather_logits": "megatron_opd.model.logits",
    "real_vocab_logprobs": "megatron_opd.model.logits",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
