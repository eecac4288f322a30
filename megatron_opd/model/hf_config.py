"""What can be checked of an HF checkpoint from its ``config.json`` alone, without torch or
transformers: the CLI runs these checks before it starts any process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# HF architecture -> mbridge registry key.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class UnsupportedArchitectureError(ValueError):
    """The HF checkpoint's architecture has no bridge."""


def check_architecture(architectures: list[str] | None, model_type: str | None, where: str = "") -> str:
    """The mbridge registry key of a config's first architecture, or an error naming what is supported."""
    archs = list(architectures or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(f"{f'{where}: ' if where else ''}architecture {archs or model_type!r} is not "
                                           f"supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return SUPPORTED_ARCHITECTURES[archs[0]]


def read_config_json(path: str | Path) -> SimpleNamespace:
    """``config.json`` as attributes, its architecture checked; ``num_key_value_heads`` defaults to
    ``num_attention_heads`` as in the transformers configs of the supported models."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not an HF checkpoint directory (no config.json)")
    try:
        raw: dict[str, Any] = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    check_architecture(raw.get("architectures"), raw.get("model_type"), where=str(path))
    for key in ("num_attention_heads", "num_hidden_layers"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise ValueError(f"{file}: {key} must be a positive integer, got {raw.get(key)!r}")
    raw.setdefault("num_key_value_heads", raw["num_attention_heads"])
    rope_arguments(raw, where=str(path))
    return SimpleNamespace(**raw)


def num_experts(hf_config: Any) -> int:
    """Routed experts of a mixture-of-experts config (0 for a dense model). transformers 5 writes Qwen3-MoE's
    count as ``num_local_experts``; 4 reads ``num_experts``."""
    for key in ("num_experts", "num_local_experts"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check_moe_layout(hf_config: Any, where: str = "") -> None:
    """The MoE layouts megatron-core builds from one layer spec: every layer an MoE layer."""
    prefix = f"{where}: " if where else ""
    if not num_experts(hf_config):
        return
    dense_layers = list(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1)
    if dense_layers or step != 1:
        raise UnsupportedArchitectureError(f"{prefix}an MoE model with dense layers (mlp_only_layers={dense_layers}, "
                                           f"decoder_sparse_step={step}) is not supported; every layer must be MoE "
                                           "(mlp_only_layers: [], decoder_sparse_step: 1)")
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts(hf_config):
        raise ValueError(f"{prefix}num_experts_per_tok must be an integer in [1, {num_experts(hf_config)}], got {top_k!r}")


def check_parallel_fit(hf_config: Any, tp: int, pp: int, where: str = "", ep: int = 1) -> None:
    """Heads must split over TP ranks, layers over PP stages and experts over EP ranks (needs only the HF config)."""
    prefix = f"{where}: " if where else ""
    experts = num_experts(hf_config)
    if experts:
        check_moe_layout(hf_config, where)
        if experts % ep:
            raise ValueError(f"{prefix}num_experts ({experts}) must be divisible by ep={ep}")
    elif ep > 1:
        raise ValueError(f"{prefix}ep={ep} needs an MoE model; this one has no experts")
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp or groups % tp:
        raise ValueError(f"{prefix}num_attention_heads ({heads}) and num_key_value_heads ({groups}) "
                         f"must be divisible by tp={tp}")
    if hf_config.num_hidden_layers % pp:
        raise ValueError(f"{prefix}num_hidden_layers ({hf_config.num_hidden_layers}) must be divisible by pp={pp}")


# megatron-core's Llama 3 RoPE scaling has these fixed (RotaryEmbedding._apply_scaling); Llama 3.1 / 3.2 use them.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_arguments(config: dict[str, Any], where: str = "") -> dict[str, Any]:
    """megatron-core ``GPTModel`` RoPE arguments from an HF config dict, written by transformers 4
    (``rope_theta`` + ``rope_scaling``) or 5 (both inside ``rope_parameters``).

    RoPE types: default; ``linear`` (positions divided by ``factor``: ``seq_len_interpolation_factor``);
    ``llama3`` (Llama 3.1's frequency-band scaling, megatron-core's ``rope_scaling``). Any other type
    (yarn, dynamic, longrope, ...) is refused rather than built as something else."""
    prefix = f"{where}: " if where else ""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    args: dict[str, Any] = {"rotary_base": float(theta)}
    if kind == "default":
        return args
    if kind == "linear":
        return {**args, "seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3":
        other = {k: scaling.get(k) for k in _LLAMA3_FIXED if scaling.get(k) != _LLAMA3_FIXED[k]}
        if other:
            raise UnsupportedArchitectureError(f"{prefix}llama3 RoPE scaling with {other}: megatron-core fixes "
                                               f"{_LLAMA3_FIXED}")
        return {**args, "rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}
    raise UnsupportedArchitectureError(f"{prefix}RoPE type {kind!r} is not supported; supported: default, linear, llama3")
