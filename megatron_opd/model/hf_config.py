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
    return SimpleNamespace(**raw)


def check_parallel_fit(hf_config: Any, tp: int, pp: int, where: str = "") -> None:
    """Heads must split over TP ranks and layers over PP stages (needs only the HF config)."""
    prefix = f"{where}: " if where else ""
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp or groups % tp:
        raise ValueError(f"{prefix}num_attention_heads ({heads}) and num_key_value_heads ({groups}) "
                         f"must be divisible by tp={tp}")
    if hf_config.num_hidden_layers % pp:
        raise ValueError(f"{prefix}num_hidden_layers ({hf_config.num_hidden_layers}) must be divisible by pp={pp}")
