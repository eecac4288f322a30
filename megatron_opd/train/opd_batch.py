"""From prompts to trainable micro-batches: prompt loading, the per-step record rank 0 broadcasts
(rollouts + teacher scores), collation, and the OPD loss run on the last pipeline stage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_opd.algo.advantages import sampled_token_advantage
from megatron_opd.algo.divergences import generalized_jsd, topk_forward_kl_with_tail, topk_reverse_kl_support_matched
from megatron_opd.algo.policy_loss import policy_gradient_loss
from megatron_opd.data.chat import DataError, load_rows
from megatron_opd.model import gather_logits, real_vocab_logprobs


@dataclass
class Prompt:
    ids: list[int]
    domain: str | None
    meta: dict[str, Any] | None = None  # what the domain's verifier needs (GRPO rewards)


def load_prompts(sources: list[str], tokenizer: Any, messages_field: str, domain_field: str,
                 max_prompt_length: int) -> tuple[list[Prompt], dict[str, int], list[str]]:
    """Chat rows -> prompt ids (the conversation up to, not including, its last assistant turn, with
    the generation prompt). Bad rows are counted and skipped; returns (prompts, skipped, problems)."""
    prompts: list[Prompt] = []
    skipped: dict[str, int] = {}
    problems: list[str] = []
    for source in sources:
        for i, row in enumerate(load_rows(source)):
            messages = row.get(messages_field)
            reason = None
            if not isinstance(messages, list) or not messages:
                reason = f"no '{messages_field}' list"
            else:
                if messages[-1].get("role") == "assistant":
                    messages = messages[:-1]
                if not messages or messages[-1].get("role") != "user":
                    reason = "no user turn to answer"
            if reason is None:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if len(ids) > max_prompt_length:
                    reason = f"prompt longer than {max_prompt_length} tokens"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                if len(problems) < 5:
                    problems.append(f"{source} row {i}: {reason}")
                continue
            meta = row.get("meta")
            prompts.append(Prompt(list(ids), row.get(domain_field), json.loads(meta) if isinstance(meta, str) else meta))
    if not prompts:
        raise DataError(f"data.train: no usable prompts ({skipped}; first problems: {problems})")
    return prompts, skipped, problems


@dataclass
class StepRecord:
    """Everything a training step needs, built on rank 0 and broadcast (plain Python, picklable)."""

    sequences: list[list[int]]
    prompt_lens: list[int]
    sampler_logprobs: list[list[float]]  # per completion token
    teacher_logprobs: list[list[float]]  # routed, weighted: sum_k w_k,t log p_Tk(y_t)
    domains: list[str | None]
    # per sample, per routed unit: (weights [T], top ids [T, k], top log-probs [T, k]) for top-k losses
    tops: list[list[tuple[list[float], list[list[int]], list[list[float]]]]] = field(default_factory=list)
    task_advantages: list[float] = field(default_factory=list)  # GRPO: one per sample
    opd_weight: float = 1.0  # lambda on the teacher advantage (0: no teacher term)
    loss_weights: list[float] = field(default_factory=list)  # per sample; empty: all 1


def equal_share_weights(groups: list[Any], lengths: list[int]) -> list[float]:
    """Per-sample weights giving each group an equal share of a token-mean loss: a group with T_g of
    the step's T completion tokens gets w_g = T / (G * T_g), so sum_g w_g T_g = T. Groups are the
    samples' domains (``loss.normalize=domain``) or the samples themselves (``sequence``: w_i =
    T / (N * T_i), a per-sample mean)."""
    totals: dict[Any, int] = {}
    for group, n in zip(groups, lengths):
        totals[group] = totals.get(group, 0) + n
    total, present = sum(totals.values()), [g for g, n in totals.items() if n > 0]
    return [total / (len(present) * totals[g]) if totals[g] else 1.0 for g in groups]


def collate(record: StepRecord, indices: list[int], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """One micro-batch. Per-token values sit at the token's own position (the loss shifts)."""
    width = max(len(record.sequences[i]) for i in indices)
    b = len(indices)
    batch = {"input_ids": torch.full((b, width), pad_id, dtype=torch.long), "loss_mask": torch.zeros(b, width),
             "sampler_lp": torch.zeros(b, width), "teacher_lp": torch.zeros(b, width), "old_lp": torch.zeros(b, width),
             "task_adv": torch.tensor([record.task_advantages[i] if record.task_advantages else 0.0 for i in indices]),
             "opd_weight": torch.full((b,), record.opd_weight),
             "loss_w": torch.tensor([record.loss_weights[i] if record.loss_weights else 1.0 for i in indices])}
    units = max((len(record.tops[i]) for i in indices), default=0) if record.tops else 0
    if top_k and units:
        batch["top_ids"] = torch.zeros(b, units, width, top_k, dtype=torch.long)
        batch["top_lp"] = torch.zeros(b, units, width, top_k)
        batch["top_w"] = torch.zeros(b, units, width)
    for row, i in enumerate(indices):
        seq, start = record.sequences[i], record.prompt_lens[i]
        batch["input_ids"][row, : len(seq)] = torch.tensor(seq)
        batch["loss_mask"][row, start: len(seq)] = 1.0
        batch["sampler_lp"][row, start: len(seq)] = torch.tensor(record.sampler_logprobs[i])
        batch["teacher_lp"][row, start: len(seq)] = torch.tensor(record.teacher_logprobs[i])
        if "top_ids" in batch:
            for u, (weights, ids, lps) in enumerate(record.tops[i]):
                batch["top_w"][row, u, start: len(seq)] = torch.tensor(weights)
                batch["top_ids"][row, u, start: len(seq)] = torch.tensor(ids, dtype=torch.long).view(-1, top_k)
                batch["top_lp"][row, u, start: len(seq)] = torch.tensor(lps).view(-1, top_k)
    return batch


def student_token_logprobs(vocab_size: int, logits_shard: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Forward-only collector: the student's log p(token_t) at every position t >= 1 ([B, L-1])."""
    lp = real_vocab_logprobs(logits_shard[:, :-1], batch["input_ids"][:, 1:], vocab_size)
    return lp.sum() * 0, torch.tensor(1), {"logprobs": lp.detach()}


def opd_loss(loss_cfg: Any, vocab_size: int, with_entropy: bool, logits_shard: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Sum of per-token losses over completion tokens, their count, and metric sums."""
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    old, teacher, sampler = batch["old_lp"][:, 1:], batch["teacher_lp"][:, 1:], batch["sampler_lp"][:, 1:]
    opd = sampled_token_advantage(teacher, old, mask, loss_cfg.kl_discount, loss_cfg.logratio_clamp)
    # A = A_task + lambda * A_opd (OPD: A_task = 0, lambda = 1; GRPO: lambda = 0 without teachers)
    advantage = (batch["task_adv"][:, None] * mask + batch["opd_weight"][:, None] * opd).detach()
    metrics: dict[str, torch.Tensor] = {}
    full = None
    if loss_cfg.kind != "sampled_token" or with_entropy:
        full = torch.log_softmax(gather_logits(logits_shard[:, :-1], vocab_size).float(), -1)
    if loss_cfg.kind == "sampled_token":
        logprobs = real_vocab_logprobs(logits_shard[:, :-1], targets, vocab_size)
        per_token, pg = policy_gradient_loss(logprobs, old, advantage, mask, loss_cfg.clip_low, loss_cfg.clip_high,
                                             loss_cfg.dual_clip, sampler, loss_cfg.tis_cap)
        metrics["clipped_tokens"] = pg["clipped_tokens"]
    else:
        top_ids, top_lp, top_w = batch["top_ids"][:, :, 1:], batch["top_lp"][:, :, 1:], batch["top_w"][:, :, 1:]
        per_unit = []
        for u in range(top_ids.shape[1]):
            if loss_cfg.kind == "topk_forward_kl":
                d = topk_forward_kl_with_tail(full, top_ids[:, u], top_lp[:, u])
            elif loss_cfg.kind == "topk_reverse_kl":
                d = topk_reverse_kl_support_matched(full, top_ids[:, u], top_lp[:, u])
            else:  # jsd over the teacher's top-k support (both renormalised there)
                s = torch.log_softmax(full.gather(-1, top_ids[:, u]), -1)
                d = generalized_jsd(s, torch.log_softmax(top_lp[:, u], -1), loss_cfg.jsd_beta)
            per_unit.append(top_w[:, u] * d)
        per_token = torch.stack(per_unit).sum(0) * mask
        student_top = torch.topk(full.detach(), top_ids.shape[-1], -1).indices
        overlap = (student_top[..., :, None] == top_ids[:, 0][..., None, :]).any(-1).float().mean(-1)
        metrics["topk_overlap_sum"] = (overlap * mask).sum()
    if full is not None:
        metrics["entropy_sum"] = (-(full.exp() * full).sum(-1) * mask).sum().detach()
    per_token = per_token * batch["loss_w"][:, None]
    tokens = mask.sum()
    metrics.update({
        "loss_sum": per_token.sum().detach(), "tokens": tokens.detach(),
        "adv_sum": advantage.sum(), "adv_abs_sum": advantage.abs().sum(), "adv_sq_sum": (advantage ** 2).sum(),
        "kl_sum": ((old - teacher) * mask).sum(), "mismatch_abs_sum": ((old - sampler).abs() * mask).sum(),
    })
    return per_token.sum(), tokens, metrics
