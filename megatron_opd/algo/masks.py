"""Which positions of a packed [prompt + completion] batch a loss may touch."""

from __future__ import annotations

import torch


def completion_mask(prompt_lens: list[int], total_lens: list[int], width: int) -> torch.Tensor:
    """1 on completion tokens (prompt_len <= t < total_len), 0 on prompt and padding: [B, width]."""
    positions = torch.arange(width)[None]
    starts = torch.tensor(prompt_lens)[:, None]
    ends = torch.tensor(total_lens)[:, None]
    return ((positions >= starts) & (positions < ends)).float()


def mask_after_eos(token_ids: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Zero every masked position after the first EOS among masked positions (the EOS stays)."""
    is_eos = (token_ids == eos_id) & (mask > 0)
    seen_before = (torch.cumsum(is_eos.int(), -1) - is_eos.int()) > 0
    return mask * (~seen_before).to(mask.dtype)


def mask_special_tokens(token_ids: torch.Tensor, mask: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """Zero positions holding any of ``special_ids`` (e.g. tool or role markers a teacher never scores)."""
    if not special_ids:
        return mask
    hit = torch.isin(token_ids, torch.tensor(special_ids, dtype=token_ids.dtype))
    return mask * (~hit).to(mask.dtype)
