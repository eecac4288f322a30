"""Per-token advantages: OPD's sampled-token reverse KL, multi-teacher mixing, GRPO, and both combined.

Everything here is a stop-gradient quantity (computed under ``torch.no_grad`` semantics by the
caller's inputs: teacher and old-student log-probs carry no graph).
"""

from __future__ import annotations

import torch


def sampled_token_advantage(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor,
                            discount: float = 0.0, clamp: float | None = None) -> torch.Tensor:
    """``A_t = log p_T(y_t) - log p_S(y_t)`` on the student's own samples (Thinking Machines OPD;
    MiniLLM's per-token reward, Gu et al. 2024): the negated single-sample estimate of the
    per-token reverse KL. With ``discount`` gamma > 0 the advantage is the discounted sum of
    future per-token rewards ``sum_{t'>=t} gamma^(t'-t) r_t'`` (default 0: per token, as in
    slime/NeMo-RL/verl). ``clamp`` bounds each per-token log-ratio to [-c, c] first.
    Inputs [B, T]; positions where ``mask`` is 0 get 0."""
    reward = (teacher_logprobs - student_logprobs).detach()
    if clamp is not None:
        reward = reward.clamp(-clamp, clamp)
    reward = reward * mask
    if discount == 0.0:
        return reward
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = reward[:, t] + discount * running * mask[:, t]
        out[:, t] = running
    return out * mask


def mix_teacher_logprobs(teacher_logprobs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k w_k,t log p_Tk(y_t)``: with weights summing to 1 per token, the multi-teacher
    advantage ``sum_k w_k,t (log p_Tk - log p_S)`` equals this minus ``log p_S`` (the routing weights:
    README, Architecture, "Teachers"; ``teachers/router.py``)."""
    total = sum(w for w in weights)
    if not torch.allclose(total, torch.ones_like(total), atol=1e-5):
        raise ValueError("teacher weights must sum to 1 at every position")
    return sum(w * lp for w, lp in zip(weights, teacher_logprobs))


def grpo_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024 DeepSeekMath eq. 3): ``rewards`` [G, n]
    (n samples per prompt) -> ``(r - mean_group) / (std_group + eps)`` (or only centred). A group
    whose samples all got the same reward has zero advantage: no signal, not a fake one."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(-1, keepdim=True, unbiased=False) + eps)


def combined_advantage(task_advantage: torch.Tensor, opd_advantage: torch.Tensor,
                       lambda_opd: float | torch.Tensor) -> torch.Tensor:
    """Reward + distillation: ``A = A_task + lambda_opd * A_opd`` (task advantage broadcast over
    tokens when it is per sequence [B] and the OPD one per token [B, T]; ``lambda_opd`` a number or
    per sample [B, 1])."""
    if task_advantage.dim() == 1 and opd_advantage.dim() == 2:
        task_advantage = task_advantage[:, None]
    return task_advantage + lambda_opd * opd_advantage


def on_policy_prompts(count: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """GKD's mixture (Agarwal et al. 2024, Alg. 1: each trajectory is the student's own with
    probability ``lam``, else the dataset's), stratified per batch: exactly ``round(lam * count)``
    of the ``count`` prompts, drawn by ``generator``, are sampled by the student. Returns a bool
    mask [count]."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    mask = torch.zeros(count, dtype=torch.bool)
    mask[torch.randperm(count, generator=generator)[: round(lam * count)]] = True
    return mask
