"""HF safetensors directory <-> megatron-opd checkpoint (the ``opd convert``/``export-hf`` work).

Both functions are collective: run them on tp*pp processes (any layout: the checkpoint reshards).
"""

from __future__ import annotations

from pathlib import Path

from megatron_opd.model.bridge import build_model, load_hf_config, load_hf_weights, save_hf_checkpoint
from megatron_opd.model.checkpoint import load_checkpoint, read_meta, resolve, save_checkpoint


def hf_to_megatron(src: str | Path, dst: str | Path, vocab_divisible_by: int = 128) -> Path:
    bundle = build_model(load_hf_config(src), vocab_divisible_by=vocab_divisible_by, initialize=False)
    load_hf_weights(bundle, src)
    return save_checkpoint(dst, 0, bundle, tokenizer_src=src)


def megatron_to_hf(src: str | Path, dst: str | Path, shard_bytes: int = 2 << 30) -> Path:
    step_dir = resolve(src)
    meta = read_meta(step_dir)
    hf_dir = step_dir / "hf"
    bundle = build_model(
        load_hf_config(hf_dir),
        vocab_divisible_by=_divisor_for(meta["vocab_size"], meta["padded_vocab_size"]),
        initialize=False,
    )
    load_checkpoint(step_dir, bundle)
    save_hf_checkpoint(bundle, dst, tokenizer_src=hf_dir, shard_bytes=shard_bytes)
    return Path(dst)


def _divisor_for(vocab: int, padded: int) -> int:
    """A divisor that reproduces the saved padding (the padded size itself always does)."""
    return padded if padded > vocab else 1
