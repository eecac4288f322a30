"""Batched generation and scoring on the embedded engine's :class:`~megatron_opd.rollout.decoder.Decoder`.

Generation: the whole batch in one decode loop over a pre-allocated KV cache; sampling, stop
checks and bookkeeping are tensor ops (no per-token Python over rows). Each sampled token carries
its log-prob under the model's unmodified distribution (temperature 1, no top-p / top-k), which is
what the trainer recomputes and compares against. Same inputs + seed -> same outputs.

Scoring: the log-prob of every continuation token of finished sequences, with each distinct prefix
(a prompt's n samples share one) run once and its KV cache shared by its continuations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_opd.records import expert_dtype
from megatron_opd.rollout.decoder import Decoder, prefill_mask

MAX_BATCH = 256  # rows per decode loop; a step's batch is one loop up to this ...
KV_CACHE_BYTES = 4 << 30  # ... and up to as many rows as fit this much KV cache (28-layer Qwen3-0.6B: ~3,600 tokens/GB)


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (hit EOS / a stop token) or "length"
    logprobs: list[float] = field(default_factory=list)
    # MoE, when asked: each layer's chosen experts [prompt + completion - 1, layers, top_k] at every token the
    # model ran (the last sampled token never ran)
    routed_experts: torch.Tensor | None = None


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on [b, V] logits; filtered entries -> -inf."""
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    return ids, valid


class GenerationCancelled(RuntimeError):
    """The caller stopped a generation (its client went away, or the server is shutting down)."""


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = MAX_BATCH,
    top_k: int = -1,
    top_p: float = 1.0,
    stop_token_ids: tuple[int, ...] = (),
    decoder: Decoder | None = None,
    on_complete: Callable[[int, Completion], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    kv_cache_bytes: int = KV_CACHE_BYTES,
    routed_experts: bool = False,
) -> list[Completion]:
    """Complete each prompt (an HF model or its ``decoder``); temperature 0 is greedy.
    ``on_complete(i, completion)`` is called as soon as prompt i's completion has ended (streaming);
    ``cancelled()`` is asked before every token: True raises :class:`GenerationCancelled`. A decode
    loop runs at most ``batch_size`` rows, and no more than fit ``kv_cache_bytes`` of KV cache at the
    longest prompt plus ``max_new_tokens`` (at least one). ``routed_experts`` (an MoE model): each completion
    also carries the experts every layer chose at its tokens (routing replay)."""
    decoder = decoder or Decoder(model)
    generator = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted({eos_token_id, *stop_token_ids}))
    width = max((len(p) for p in prompts), default=0) + max_new_tokens
    batch_size = max(1, min(batch_size, kv_cache_bytes // max(1, decoder.kv_bytes_per_token() * width)))
    out: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        finished = None
        if on_complete is not None:
            def finished(rows, ids, logprobs, lengths, stopped, routes, offset=start, chunk=chunk):
                for r in rows:
                    on_complete(offset + r, _completion(ids, logprobs, lengths, stopped, routes, r, len(chunk[r])))
        ids, logprobs, lengths, stopped, routes = decode_batch(
            decoder, chunk, max_new_tokens, stops, pad_token_id, (temperature, top_k, top_p), generator, finished,
            cancelled, routed_experts)
        out += [_completion(ids, logprobs, lengths, stopped, routes, r, len(p)) for r, p in enumerate(chunk)]
    return out


def _completion(ids: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor,
                routes: torch.Tensor | None, row: int, prompt_len: int) -> Completion:
    n = int(lengths[row])
    routed = None
    if routes is not None:  # the row's prompt ends at the block's prompt width (left padding)
        prompt_width = routes.shape[1] - ids.shape[1]
        routed = routes[row, prompt_width - prompt_len: prompt_width + n - 1].clone()
    return Completion(ids[row, :n].tolist(), "stop" if bool(stopped[row]) else "length", logprobs[row, :n].tolist(), routed)


def decode_batch(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int, stops: torch.Tensor, pad_id: int,
                 sampling: tuple[float, int, float], generator: torch.Generator, finished: Callable | None = None,
                 cancelled: Callable[[], bool] | None = None, routed_experts: bool = False):
    """One decode loop: returns ids / log-probs [B, max_new] (valid up to ``lengths`` [B]),
    ``stopped`` [B] (True: ended on a stop token; False: hit max_new_tokens) and, with ``routed_experts``
    (an MoE model), the experts each layer chose at every column the model ran [B, prompt width + max_new,
    layers, top_k] (else None). Finished rows leave the running batch once they are half of it (their
    cache rows are dropped), so a long tail of a few long samples runs at the cost of a few rows.
    ``finished(rows, ids, logprobs, lengths, stopped, routes)`` hears of rows (original indices) as soon
    as they end."""
    temperature, top_k, top_p = sampling
    batch = len(prompts)
    ids, valid_prompt = _left_padded(prompts, pad_id)  # every row's next token goes to the same column
    width = ids.shape[1]
    routes = routed = None
    if routed_experts:
        if not decoder.experts:
            raise ValueError("routed experts were asked of a model without experts (a dense model)")
        routes = torch.zeros(batch, width + max_new_tokens, len(decoder.layers), decoder.top_k, dtype=expert_dtype(decoder.experts))
        routed = []
    if max_new_tokens == 0:
        empty = (torch.zeros(batch, 0, dtype=torch.long), torch.zeros(batch, 0), torch.zeros(batch, dtype=torch.long),
                 torch.zeros(batch, dtype=torch.bool), routes)
        if finished is not None:
            finished(list(range(batch)), *empty)
        return empty
    valid = torch.zeros(batch, width + max_new_tokens, dtype=torch.bool)
    valid[:, :width] = valid_prompt
    cache = decoder.new_cache(batch, width + max_new_tokens)
    positions = (valid_prompt.long().cumsum(-1) - 1).clamp(min=0)
    logits = decoder.logits(decoder.forward(ids, positions, cache, 0, prefill_mask(valid_prompt), routed=routed)[:, -1])
    if routes is not None:
        routes[:, :width] = torch.stack(routed, 2).to(device="cpu", dtype=routes.dtype)
    position = positions[:, -1:]
    out_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    out_lp = torch.zeros(batch, max_new_tokens)
    stopped = torch.zeros(batch, dtype=torch.bool)
    rows = torch.arange(batch)  # original index of each row still in the batch
    alive = torch.ones(batch, dtype=torch.bool)  # per row in the batch: not stopped yet
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long)
    for t in range(max_new_tokens):
        if cancelled is not None and cancelled():
            raise GenerationCancelled(f"generation cancelled after {t} of {max_new_tokens} tokens")
        if temperature > 0:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_ids = logits.argmax(-1)
        # stopped rows write past their length here: ignored, outputs are read up to `lengths`
        out_ids[rows, t] = next_ids
        out_lp[rows, t] = torch.log_softmax(logits, -1).gather(-1, next_ids[:, None])[:, 0]
        hit = torch.isin(next_ids, stops) & alive
        if bool(hit.any()):
            stopped[rows[hit]] = True
            lengths[rows[hit]] = t + 1
            alive &= ~hit
            if finished is not None:
                finished(rows[hit].tolist(), out_ids, out_lp, lengths, stopped, routes)
            if not bool(alive.any()):
                break
            if 2 * int(alive.sum()) <= len(rows):  # compact: drop the stopped rows and their cache
                keep = alive.nonzero()[:, 0]
                cache, valid, position, rows = cache.take(keep), valid[keep], position[keep], rows[keep]
                next_ids, alive = next_ids[keep], alive[keep]
        if t == max_new_tokens - 1:
            if finished is not None:  # the rest ran to the length limit
                finished(rows[alive].tolist(), out_ids, out_lp, lengths, stopped, routes)
            break
        column = width + t
        valid[:, column] = True
        position = position + 1
        step_routes = [] if routes is not None else None
        hidden = decoder.forward(next_ids[:, None], position, cache, column, valid[:, None, None, :column + 1], routed=step_routes)
        if routes is not None:
            routes[rows, column] = torch.stack(step_routes, 2)[:, 0].to(device="cpu", dtype=routes.dtype)
        logits = decoder.logits(hidden[:, 0])
    return out_ids, out_lp, lengths, stopped, routes


@torch.no_grad()
def continuation_hidden(decoder: Decoder, prefixes: list[list[int]], group: list[int], continuations: list[list[int]],
                        pad_id: int) -> torch.Tensor:
    """Final hidden states [B, longest, hidden] of continuations b = 0..B-1, each after the prefix
    ``prefixes[group[b]]``: every prefix is run once (left-padded, one batch) and its KV cache shared
    by the continuations that follow it; the continuations then run as one block that keeps no
    keys/values of its own beyond the layer computing them. Row b is valid up to
    ``len(continuations[b])``: entry t predicts ``continuations[b][t]``."""
    ids, valid = _left_padded(prefixes, pad_id)
    width = ids.shape[1]
    longest = max(len(c) for c in continuations)
    cache = decoder.new_cache(len(prefixes), width)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder.forward(ids, positions, cache, 0, prefill_mask(valid))
    rows = torch.tensor(group, dtype=torch.long)
    first = hidden[rows, -1:]  # [B, 1, H]: predicts each continuation's first token
    if longest <= 1:  # nothing after the first token (or no continuation at all)
        return first[:, :longest]
    batch, span = len(continuations), longest - 1
    block_ids = torch.full((batch, span), pad_id, dtype=torch.long)
    block_valid = torch.zeros(batch, span, dtype=torch.bool)
    for b, cont in enumerate(continuations):
        block_ids[b, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
        block_valid[b, : len(cont) - 1] = True
    attend = torch.cat([valid[rows][:, None, None, :].expand(-1, 1, span, -1), prefill_mask(block_valid)], dim=-1)
    block_positions = positions[rows, -1:] + 1 + torch.arange(span)[None]
    rest = decoder.forward(block_ids, block_positions, cache.take(rows), width, attend, store=False)
    return torch.cat([first, rest], 1)


@dataclass
class TokenScores:
    """Per scored position (all continuations' positions, concatenated in order): the log-prob of
    its token [N], the top-k log-probs and ids [N, k], and the log-probs at requested ids."""

    logprobs: torch.Tensor
    top_logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    ids_logprobs: list[torch.Tensor] | None  # per continuation: [its length, len(its ids)]


LOGITS_CHUNK_BYTES = 128 << 20  # fp32 logits held at once while scoring: memory does not grow with the length


@torch.no_grad()
def score_tokens(decoder: Decoder, hidden: torch.Tensor, continuations: list[list[int]], top_k: int = 0,
                 token_ids: list[list[int]] | None = None) -> TokenScores:
    """Log-probs of every continuation token from ``hidden`` [B, longest, H] (:func:`continuation_hidden`),
    the vocabulary's logits computed for a chunk of positions at a time (at most
    ``LOGITS_CHUNK_BYTES`` of them), never for the whole batch at once."""
    lengths = [len(c) for c in continuations]
    flat = torch.cat([hidden[b, :n] for b, n in enumerate(lengths)] + [hidden.new_empty(0, hidden.shape[-1])])
    targets = torch.tensor([t for c in continuations for t in c], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    logprobs = torch.empty(len(targets))
    top_values = torch.empty(len(targets), top_k) if top_k else None
    top_ids = torch.empty(len(targets), top_k, dtype=torch.long) if top_k else None
    wanted = [torch.tensor(ids, dtype=torch.long) for ids in token_ids] if token_ids is not None else None
    picked: list[list[torch.Tensor]] = [[] for _ in lengths]
    step = max(1, LOGITS_CHUNK_BYTES // (4 * decoder.vocab_size))
    for lo in range(0, len(targets), step):
        hi = min(len(targets), lo + step)
        logits = decoder.logits(flat[lo:hi])  # [n, V]
        normalizer = torch.logsumexp(logits, -1)
        logprobs[lo:hi] = logits.gather(-1, targets[lo:hi, None])[:, 0] - normalizer
        if top_k:
            values, indices = torch.topk(logits, top_k, dim=-1)
            top_values[lo:hi], top_ids[lo:hi] = values - normalizer[:, None], indices
        if wanted is not None:
            for b in owner[lo:hi].unique().tolist():
                here = (owner[lo:hi] == b).nonzero()[:, 0]
                picked[b].append(logits[here].index_select(-1, wanted[b]) - normalizer[here, None])
    ids_logprobs = None
    if wanted is not None:
        ids_logprobs = [torch.cat(p) if p else torch.empty(0, len(wanted[b])) for b, p in enumerate(picked)]
    return TokenScores(logprobs, top_values, top_ids, ids_logprobs)
