"""From prompts to trainable micro-batches: prompt loading, the step batch built on rank 0 from the
rollouts and their scores (packed tensors: :class:`~megatron_opd.records.StepBatch`), and its
collation into padded micro-batches, sorted by length so padding stays small."""

from __future__ import annotations

import json
from typing import Any

import torch

from megatron_opd.algo.advantages import mix_teacher_logprobs
from megatron_opd.config.teachers import render_template
from megatron_opd.data.chat import DataError, load_rows
from megatron_opd.records import DATASET, Prompt, Rollout, SampleScores, StepBatch, TeacherTopK, version_number


def load_prompts(sources: list[str], tokenizer: Any, messages_field: str, domain_field: str,
                 max_prompt_length: int, contexts: dict[str, str | None] | None = None,
                 need_reference: bool = False,
                 tokenizers: dict[str, Any] | None = None) -> tuple[list[Prompt], dict[str, int], list[str]]:
    """Chat rows -> prompt ids (the conversation up to, not including, its last assistant turn, with
    the generation prompt) and the row's own response when it has one (the last assistant turn as
    the template renders it, through EOS). ``contexts``: teacher -> context template; each such
    teacher's prompt is the conversation with its last user turn replaced by the rendered template
    (a row without a field the template names stops the run here, naming both); ``tokenizers``:
    teacher -> its own tokenizer (cross-tokenizer teachers; template None: the plain prompt). Rows that cannot
    be used are counted and skipped; returns (prompts, skipped, problems)."""
    prompts: list[Prompt] = []
    skipped: dict[str, int] = {}
    problems: list[str] = []
    for source in sources:
        for i, row in enumerate(load_rows(source)):
            messages = row.get(messages_field)
            reason = None
            response = None
            meta = row.get("meta")
            if not isinstance(messages, list) or not messages:
                reason = f"no '{messages_field}' list"
            elif not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                         for m in messages):
                reason = f"'{messages_field}' entries must be {{role, content}} objects with string values"
            else:
                if messages[-1].get("role") == "assistant":
                    response, messages = messages[-1]["content"], messages[:-1]
                if not messages or messages[-1].get("role") != "user":
                    reason = "no user turn to answer"
            if reason is None and isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except json.JSONDecodeError:
                    reason = "'meta' is a string that is not JSON"
            if reason is None and meta is not None and not isinstance(meta, dict):
                reason = "'meta' must be an object (or its JSON text)"
            if reason is None and need_reference and response is None:
                reason = "no assistant turn (rollout.on_policy_fraction < 1 trains on the rows' own responses)"
            if reason is None:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if len(ids) > max_prompt_length:
                    reason = f"prompt longer than {max_prompt_length} tokens"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                if len(problems) < 5:
                    problems.append(f"{source} row {i}: {reason}")
                continue
            prompt = Prompt(list(ids), row.get(domain_field), meta, row=len(prompts))
            if response is not None:
                prompt.reference = _response_ids(tokenizer, messages, response, len(ids))
            fields = {"prompt": messages[-1]["content"], "response": response, "meta": meta}
            for teacher, template in (contexts or {}).items():
                try:
                    shown = render_template(template, fields) if template else messages[-1]["content"]
                except KeyError as exc:
                    raise DataError(f"teachers.teachers.{teacher}.context names {{{exc.args[0]}}}, which {source} row {i} "
                                    "does not have") from None
                teacher_messages = [*messages[:-1], {"role": "user", "content": shown}]
                own = (tokenizers or {}).get(teacher, tokenizer)
                prompt.contexts[teacher] = list(own.apply_chat_template(teacher_messages, add_generation_prompt=True,
                                                                        tokenize=True))
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"data.train: no usable prompts ({skipped}; first problems: {problems})")
    return prompts, skipped, problems


def _response_ids(tokenizer: Any, messages: list[dict[str, str]], response: str, prompt_len: int) -> list[int]:
    """The response's ids as the student would have written them: the templated conversation past
    the generation prompt, through the first EOS (where sampling stops)."""
    full = list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=True))
    out = full[prompt_len:]
    eos = tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


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


def build_step_batch(prompts: list[Prompt], rollouts: list[Rollout], scored: list[SampleScores] | None,
                     normalize: str, top_k: int, task_advantages: list[float] | None = None,
                     opd_weight: float = 1.0) -> StepBatch:
    """Tensorize one step: ``prompts[r.prompt_index]`` is each rollout's prompt; ``scored`` the
    teachers' scores per rollout (None: no teacher — the sampler's own log-probs stand in, so the
    teacher advantage is 0); ``top_k`` > 0 keeps the routed teachers' top-k for the top-k losses."""
    lengths = [len(r.completion_ids) for r in rollouts]
    tags = [prompts[r.prompt_index].domain for r in rollouts]
    names = sorted({t for t in tags if t is not None})
    if normalize == "token":
        weights = [1.0] * len(rollouts)
    else:  # equal shares per domain, or per sample (each its own group)
        weights = equal_share_weights(tags if normalize == "domain" else list(range(len(rollouts))), lengths)
    sampler = torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float32)
    teacher = torch.cat([_mixed_teacher_logprobs(sc).float() for sc in scored]) if scored else sampler.clone()
    token_mask = torch.cat([sc.valid_tokens().float() for sc in scored]) if scored else torch.ones_like(sampler)
    return StepBatch(
        tokens=torch.tensor([t for r in rollouts for t in (*r.prompt_ids, *r.completion_ids)], dtype=torch.int32),
        sample_lens=torch.tensor([len(r.prompt_ids) + n for r, n in zip(rollouts, lengths)], dtype=torch.int32),
        prompt_lens=torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.int32),
        sampler_logprobs=sampler, teacher_logprobs=teacher.reshape(-1),
        task_advantages=torch.tensor(task_advantages if task_advantages else [0.0] * len(rollouts), dtype=torch.float32),
        loss_weights=torch.tensor(weights, dtype=torch.float32),
        weight_versions=torch.tensor([version_number(r.weight_version) for r in rollouts], dtype=torch.int64),
        prompt_rows=torch.tensor([prompts[r.prompt_index].row for r in rollouts], dtype=torch.int64),
        domains=torch.tensor([names.index(t) if t is not None else -1 for t in tags], dtype=torch.int32),
        token_mask=token_mask.reshape(-1),
        on_policy=torch.tensor([r.finish_reason != DATASET for r in rollouts], dtype=torch.uint8),
        domain_names=names, topk=_topk_slots(scored, lengths, top_k) if scored and top_k else None, opd_weight=opd_weight)


def _mixed_teacher_logprobs(scored: SampleScores) -> torch.Tensor:
    """``sum_k w_k,t log p_Tk(y_t)`` [T] over a sample's routed teachers: with the weights summing to 1,
    the combined advantage is this minus the student's log-prob."""
    units = list(scored.scores)
    return mix_teacher_logprobs([scored.scores[u].logprobs for u in units], [scored.weights[u] for u in units])


def _topk_slots(scored: list[SampleScores], lengths: list[int], top_k: int) -> TeacherTopK:
    slots = max(len(sc.scores) for sc in scored)
    ids, lps, weights = [], [], []
    for sc, n in zip(scored, lengths):
        units = list(sc.scores)
        ids.append(torch.zeros(n, slots, top_k, dtype=torch.int32))
        lps.append(torch.zeros(n, slots, top_k))
        weights.append(torch.zeros(n, slots))
        for s, unit in enumerate(units):
            ids[-1][:, s] = sc.scores[unit].top_ids
            lps[-1][:, s] = sc.scores[unit].top_logprobs
            weights[-1][:, s] = sc.weights[unit]
    return TeacherTopK(torch.cat(ids), torch.cat(lps), torch.cat(weights))


def micro_batches(batch: StepBatch, micro_batch_size: int, pad_id: int,
                  max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The share's samples, longest first, in micro-batches of ``micro_batch_size`` rows — or, with
    ``max_tokens``, as many rows as fit ``rows x longest row <= max_tokens`` — each padded to its own
    longest sample. Per-token values sit at the token's own position (the loss shifts); ``seq_len``
    holds each row's real length (the rest is padding)."""
    order = torch.argsort(batch.sample_lens, descending=True, stable=True).tolist()
    seq_start = _offsets(batch.sample_lens)
    comp_start = _offsets(batch.completion_lens)
    out = []
    for rows in group_rows(order, batch.sample_lens.tolist(), micro_batch_size, max_tokens):
        width = int(batch.sample_lens[rows].max())
        b = len(rows)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : int(batch.sample_lens[i])] = batch.tokens[seq_start[i]: seq_start[i + 1]]
        positions = torch.arange(width)[None]
        mask = (positions >= batch.prompt_lens[rows, None]) & (positions < batch.sample_lens[rows, None])
        # completion values of these rows, in the row-major order of `mask`'s True entries
        take = torch.cat([torch.arange(comp_start[i], comp_start[i + 1]) for i in rows])
        micro = {"input_ids": input_ids, "loss_mask": _scatter(mask, batch.token_mask[take]),
                 "sampler_lp": _scatter(mask, batch.sampler_logprobs[take]),
                 "teacher_lp": _scatter(mask, batch.teacher_logprobs[take]),
                 "task_adv": batch.task_advantages[rows], "loss_w": batch.loss_weights[rows],
                 "opd_weight": torch.full((b,), batch.opd_weight), "seq_len": batch.sample_lens[rows].long(),
                 "on_policy": batch.on_policy[rows]}
        if batch.topk is not None:
            micro["top_ids"] = _scatter(mask, batch.topk.ids[take].long())
            micro["top_lp"] = _scatter(mask, batch.topk.logprobs[take])
            micro["top_w"] = _scatter(mask, batch.topk.weights[take])
        out.append(micro)
    return out


def group_rows(order: list[int], lengths: "list[int] | dict[int, int]", rows: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive groups of ``order``: ``rows`` each, or (``order`` longest first) as many as fit
    ``group size x its first (longest) length <= max_tokens``; ``lengths`` is indexed by the entries."""
    if max_tokens is None:
        return [order[lo:lo + rows] for lo in range(0, len(order), rows)]
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _offsets(lengths: torch.Tensor) -> list[int]:
    return [0] + lengths.long().cumsum(0).tolist()


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[b, L, ...] zeros with ``values`` [n, ...] written where ``mask`` [b, L] is True."""
    out = torch.zeros(*mask.shape, *values.shape[1:], dtype=values.dtype)
    out[mask] = values
    return out
