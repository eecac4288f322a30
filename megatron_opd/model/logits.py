"""Turn vocab-parallel logits into full logits / token log-probs over the *real* vocabulary.

Megatron pads the vocabulary so it splits evenly over TP ranks; the padded rows of the output
layer are zero, so their logits are exactly 0.0 (not -inf) and would leak probability mass into
any softmax. Everything that reads logits goes through these two functions.
"""

from __future__ import annotations

import torch


def _mask_padded_vocab(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state

    shard = logits_shard.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits_shard
    column = torch.arange(start, start + shard, device=logits_shard.device)
    return logits_shard.masked_fill(column >= vocab_size, torch.finfo(logits_shard.dtype).min)


def gather_logits(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, s, V_pad/tp] vocab shard -> [b, s, V] full logits on every TP rank (no grad path)."""
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits_shard)
    return full[..., :vocab_size]


def real_vocab_logprobs(
    logits_shard: torch.Tensor, target_ids: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """log p(target) per position, [b, s], differentiable, computed without gathering the vocab.

    ``target_ids`` must be in ``[0, vocab_size)``.
    """
    from megatron.core import tensor_parallel

    masked = _mask_padded_vocab(logits_shard.float(), vocab_size)
    # megatron's vocab-parallel CE expects [s, b, v] / [s, b] and returns the NLL.
    nll = tensor_parallel.vocab_parallel_cross_entropy(
        masked.transpose(0, 1).contiguous(), target_ids.transpose(0, 1).contiguous()
    )
    return -nll.transpose(0, 1)
