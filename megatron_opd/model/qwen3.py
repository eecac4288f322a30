"""Qwen3 dense models at their published shapes, random-initialised with a seed.

No weights can be downloaded here, so the real shapes are exercised with random weights:
``assets/qwen3/configs/<name>.json`` are the published ``config.json`` files of Qwen3-0.6B and
Qwen3-1.7B (28 layers, hidden 1024 / 2048, 16 query heads and 8 KV heads of head_dim 128, q/k norm,
tied embeddings, rope theta 1e6, vocabulary 151,936), and :func:`make_random_qwen3` saves a model of
one of them — optionally with fewer layers, every width kept — beside Qwen3's real tokenizer
(:mod:`megatron_opd.data.qwen`). A random Qwen3 spreads its probability almost evenly over the
vocabulary, so it practically never samples EOS: its completions run to ``max_new_tokens``, which
makes the lengths a benchmark asks for exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_opd.data.qwen import ASSETS, TOKENIZER_DIR
from megatron_opd.model.bridge import copy_tokenizer_files

CONFIG_DIR = ASSETS / "configs"


def published_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def published_config(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no published config {name!r}; known: {', '.join(published_names())}")
    return json.loads(path.read_text())


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a dense Qwen3 from its config (tied embeddings counted once)."""
    hidden, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn + 2 * hidden + 2 * config["head_dim"]
    embeddings = config["vocab_size"] * hidden * (1 if config["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + hidden


def make_random_qwen3(out_dir: str | Path, name: str = "Qwen3-0.6B", seed: int = 0, num_layers: int | None = None,
                      tokenizer_dir: str | Path = TOKENIZER_DIR) -> Path:
    """Save a randomly initialised (``seed``) fp32 model of the published config ``name`` to ``out_dir``,
    with ``num_layers`` layers instead of the published number if given, and the tokenizer files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    values = published_config(name)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        values.update(num_hidden_layers=num_layers, max_window_layers=num_layers)
    values.pop("transformers_version", None)
    values["torch_dtype"] = "float32"
    config = Qwen3Config(**values)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="100GB")
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
