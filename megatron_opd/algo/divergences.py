"""Divergences between a student and a teacher over the vocabulary, as differentiable losses.

All inputs are log-probabilities with the vocabulary (or the teacher's top-k) in the last
dimension; every function returns per-position values ``[...]`` so the caller masks and reduces.
"""

from __future__ import annotations

import math

import torch


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v) over the last dimension (0 log 0 = 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def reverse_kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """KL(S || T): mode-seeking; the objective OPD's sampled-token advantage estimates
    (Agarwal et al. 2024 GKD; Gu et al. 2024 MiniLLM; Thinking Machines, "On-Policy Distillation")."""
    return kl(student_log, teacher_log)


def topk_forward_kl_with_tail(student_log: torch.Tensor, top_ids: torch.Tensor, top_teacher_log: torch.Tensor,
                              min_tail: float = 1e-6) -> torch.Tensor:
    """KL(T || S) over the teacher's top-k plus one tail bucket holding the remaining mass of
    each distribution (GKD-style top-k distillation when only the teacher's top-k is known).

    ``student_log`` [..., V] full student log-probs; ``top_ids`` / ``top_teacher_log`` [..., k].
    The student's tail is summed exactly over the ids outside the top-k; a teacher tail below
    ``min_tail`` (top-k covering the distribution) contributes nothing, so a full-vocabulary top-k
    gives the exact forward KL with finite gradients.
    """
    s_top = student_log.gather(-1, top_ids)
    if top_ids.shape[-1] >= student_log.shape[-1]:
        return topk_forward_kl_from_parts(s_top, None, top_teacher_log, min_tail)
    s_tail_log = torch.logsumexp(student_log.scatter(-1, top_ids, float("-inf")), -1)
    return topk_forward_kl_from_parts(s_top, s_tail_log, top_teacher_log, min_tail)


def topk_forward_kl_from_parts(s_top: torch.Tensor, s_tail_log: torch.Tensor | None, top_teacher_log: torch.Tensor,
                               min_tail: float = 1e-6) -> torch.Tensor:
    """``topk_forward_kl_with_tail`` from the student's log-probs at the teacher's top-k ``s_top``
    [..., k] and the log of its mass outside them ``s_tail_log`` [...] (None: the top-k is the whole
    vocabulary), as a vocabulary-parallel student provides them."""
    top_kl = kl(top_teacher_log, s_top)
    if s_tail_log is None:
        return top_kl
    t_tail = (1.0 - top_teacher_log.exp().sum(-1)).clamp_min(0.0)
    keep = t_tail > min_tail
    safe_t = torch.where(keep, t_tail, torch.ones_like(t_tail))
    safe_s = torch.where(keep, s_tail_log, torch.zeros_like(s_tail_log))
    return top_kl + torch.where(keep, safe_t * (safe_t.log() - safe_s), torch.zeros_like(t_tail))


def generalized_jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 3):
    ``beta KL(T || M) + (1 - beta) KL(S || M)`` with ``M = beta T + (1 - beta) S``.
    Bounded by the binary entropy H(beta) (ln 2 at beta = 0.5); beta -> 0 / 1 vanish, so GKD's
    limits (forward / reverse KL) are the scaled derivatives, not these endpoints."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    mix = torch.logsumexp(torch.stack([teacher_log + math.log(beta), student_log + math.log1p(-beta)]), 0)
    return beta * kl(teacher_log, mix) + (1 - beta) * kl(student_log, mix)

