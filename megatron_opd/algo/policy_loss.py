"""The policy-gradient loss OPD and GRPO share: PPO ratio clipping (optionally dual clip) with
truncated importance sampling for the trainer/sampler mismatch."""

from __future__ import annotations

import torch


def policy_gradient_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                         dual_clip: float | None = None, sampler_logprobs: torch.Tensor | None = None,
                         tis_cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip loss (Schulman et al. 2017, eq. 7; asymmetric bounds as in DAPO):
    ``-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)`` with ``rho = exp(logprobs - old_logprobs)``.

    ``dual_clip`` c > 1 bounds the loss of negative-advantage tokens by ``-c A`` (Ye et al. 2020).
    Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL"): with ``sampler_logprobs`` (the rollout engine's) each token is weighted
    by ``min(exp(old_logprobs - sampler_logprobs), tis_cap)``, a constant.

    Returns the masked per-token loss [B, T] (sum it and divide by the token count) and metrics
    (sums over masked tokens: clipped tokens, TIS weight).
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    loss = -objective
    weight = torch.ones_like(loss)
    if sampler_logprobs is not None and tis_cap is not None:
        weight = torch.exp(old_logprobs.detach() - sampler_logprobs.detach()).clamp(max=tis_cap)
        loss = loss * weight
    mask = mask.to(loss.dtype)
    metrics = {"clipped_tokens": ((unclipped != clipped).to(loss.dtype) * mask).sum().detach(),
               "tis_weight_sum": (weight * mask).sum().detach()}
    return loss * mask, metrics
