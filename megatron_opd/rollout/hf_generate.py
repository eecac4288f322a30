"""Batched generation with a Hugging Face causal LM (KV cache), seeded and deterministic.

The CPU path for evaluation and the core of the embedded rollout engine. Each sampled token also
carries its log-prob under the model's unmodified distribution (temperature 1, no top-p/top-k),
which is what the trainer recomputes and compares against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (hit EOS / a stop token) or "length"
    logprobs: list[float] = field(default_factory=list)


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


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    top_k: int = -1,
    top_p: float = 1.0,
    stop_token_ids: tuple[int, ...] = (),
) -> list[Completion]:
    """Complete each prompt; temperature 0 is greedy. Same inputs + seed -> same outputs."""
    out: list[Completion] = []
    generator = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted({eos_token_id, *stop_token_ids}))
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        out += _generate_batch(model, batch, max_new_tokens, stops, pad_token_id,
                               (temperature, top_k, top_p), generator)
    return out


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    return ids, attention


def _generate_batch(model, prompts, max_new_tokens, stops, pad_id, sampling, generator) -> list[Completion]:
    temperature, top_k, top_p = sampling
    ids, attention = _left_padded(prompts, pad_id)  # next token of every row sits in the last column
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    past, step_input, step_pos = None, ids, positions
    done = torch.zeros(len(prompts), dtype=torch.bool)
    results = [Completion([], "length") for _ in prompts]
    for _ in range(max_new_tokens):
        output = model(input_ids=step_input, attention_mask=attention, position_ids=step_pos,
                       past_key_values=past, use_cache=True)
        past = output.past_key_values
        logits = output.logits[:, -1, : model.config.vocab_size].float()
        if temperature > 0:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_ids = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1).gather(-1, next_ids[:, None])[:, 0]
        for i in (~done).nonzero()[:, 0].tolist():
            results[i].token_ids.append(int(next_ids[i]))
            results[i].logprobs.append(float(logprobs[i]))
        stopped = torch.isin(next_ids, stops) & ~done
        for i in stopped.nonzero()[:, 0].tolist():
            results[i].finish_reason = "stop"
        done |= stopped
        if bool(done.all()):
            break
        step_input = next_ids.masked_fill(done, pad_id)[:, None]
        step_pos = step_pos[:, -1:] + 1
        attention = torch.cat([attention, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
    return results
