"""The answers to ``/generate`` in SGLang's shapes: a body checked against what this server does and
what it costs, then generated and/or scored by the embedded engine — as JSON, as server-sent events
(``stream: true``) or in the compact binary scoring format (:mod:`megatron_opd.wire.score_codec`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from typing import Any

from megatron_opd.records import SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine, EngineBusy
from megatron_opd.rollout.generation import GenerationCancelled
from megatron_opd.serve.requests import Limits, check_cost, token_ids
from megatron_opd.wire import score_codec
from megatron_opd.wire.client import encode_routed_experts
from megatron_opd.wire.contract import ContractError


def _finish_reason(reason: str, completion: list[int]) -> dict[str, Any]:
    if reason == "stop":
        return {"type": "stop", "matched": completion[-1] if completion else None}
    return {"type": "length", "length": len(completion)}


def _logprob_entries(values: list[float | None], ids: list[int]) -> list[list[Any]]:
    return [[v, t, None] for v, t in zip(values, ids)]


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise ContractError(f"/generate: {name}: {len(value)} values for {count} prompts")
        return value
    return [value] * count


def parse_generate(engine: EmbeddedEngine, body: dict[str, Any], limits: Limits) -> tuple[list[list[int]], bool, SamplingParams, list[int], int]:
    """Check a type-checked ``/generate`` body (:func:`parse_body`) against what this server does and
    what it costs; returns (prompts, single, sampling, logprob_start_len per prompt, top_logprobs_num)."""
    input_ids = body.get("input_ids")
    if input_ids is None:
        raise ContractError("/generate: input_ids: this server takes token ids (text prompts are not supported)")
    vocab = engine.config.vocab_size
    prompts, single = token_ids(input_ids, "input_ids", vocab)
    params = body.get("sampling_params") or {}
    if isinstance(params, list):
        raise ContractError("/generate: sampling_params: per-prompt lists are not supported here; send one dict")
    try:
        sampling = SamplingParams.from_sglang(params)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"/generate: sampling_params: {exc}") from None
    bad_stop = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
    if bad_stop:
        raise ContractError(f"/generate: sampling_params.stop_token_ids: {bad_stop} outside the vocabulary [0, {vocab})")
    check_cost(prompts, sampling.n, sampling.max_new_tokens, limits)
    starts = []
    for prompt, start in zip(prompts, _per_prompt(body.get("logprob_start_len"), len(prompts), "logprob_start_len")):
        start = 0 if start is None else start
        if type(start) is not int:
            raise ContractError(f"/generate: logprob_start_len: expected integers, got {start!r}")
        starts.append(len(prompt) if start < 0 else min(start, len(prompt)))  # SGLang's -1: no input log-probs
    tops = {k or 0 for k in _per_prompt(body.get("top_logprobs_num"), len(prompts), "top_logprobs_num")}
    if any(type(k) is not int for k in tops):
        raise ContractError(f"/generate: top_logprobs_num: expected integers, got {sorted(map(repr, tops))}")
    if len(tops) > 1:
        raise ContractError("/generate: top_logprobs_num: one value for all prompts is supported here")
    top_k = tops.pop()
    if not 0 <= top_k <= vocab:
        raise ContractError(f"/generate: top_logprobs_num: expected 0..{vocab}, got {top_k}")
    return prompts, single, sampling, starts, top_k


def parse_token_ids(engine: EmbeddedEngine, body: dict[str, Any], count: int) -> list[list[int]] | None:
    """SGLang's ``token_ids_logprob``: ids whose log-probs every scored position reports — one list
    for all prompts or one per prompt."""
    value = body.get("token_ids_logprob")
    if value is None:
        return None
    lists, single = token_ids(value, "token_ids_logprob", engine.config.vocab_size)
    if single:
        lists = lists * count
    if len(lists) != count:
        raise ContractError(f"/generate: token_ids_logprob: {len(lists)} lists for {count} prompts "
                            "(one list for all prompts, or one per prompt)")
    return [list(ids) for ids in lists]


def score_prompts(engine: EmbeddedEngine, prompts: list[list[int]], starts: list[int], top_k: int,
                  token_ids: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """SGLang's input log-probs: for ``logprob_start_len = L`` the entries are the tokens
    ``prompt[L:]``, the first one's value is None, the rest are log p(token | before) — so
    ``L = prompt_len - 1`` scores exactly the completion of a finished sequence."""
    return engine.score(prompts, [min(s + 1, len(p)) for p, s in zip(prompts, starts)], top_k, token_ids)


def routed_experts_start(engine: EmbeddedEngine, body: dict[str, Any], prompts: list[list[int]],
                         sampling: SamplingParams, limits: Limits) -> int | None:
    """SGLang's ``return_routed_experts``: None when not asked; else ``routed_experts_start_len``, the first
    position whose experts are returned (they cover ``[start, prompt + completion - 1)``)."""
    if not body.get("return_routed_experts"):
        return None
    if not limits.routed_experts:
        raise ContractError("/generate: return_routed_experts: this server was started without "
                            "--enable-return-routed-experts")
    if not engine.decoder.experts:
        raise ContractError("/generate: return_routed_experts: the served model has no experts (a dense model)")
    if sampling.max_new_tokens == 0:
        raise ContractError("/generate: return_routed_experts: needs max_new_tokens > 0 here (generation)")
    start = body.get("routed_experts_start_len") or 0
    too_long = [len(p) for p in prompts if start > len(p)]
    if too_long:
        raise ContractError(f"/generate: routed_experts_start_len {start}: expected 0 .. the prompt's length "
                            f"({min(too_long)} tokens)")
    return start


def generate_response(engine: EmbeddedEngine, body: dict[str, Any], limits: Limits,
                      cancel: threading.Event | None = None) -> Any:
    """Answer a ``/generate`` body (already type-checked) with SGLang-shaped output."""
    prompts, single, sampling, starts, top_k = parse_generate(engine, body, limits)
    token_ids = parse_token_ids(engine, body, len(prompts))
    routed_from = routed_experts_start(engine, body, prompts, sampling, limits)
    want_logprobs = bool(body.get("return_logprob"))
    rollouts = ([None] * (len(prompts) * sampling.n) if sampling.max_new_tokens == 0 else
                engine.generate(prompts, sampling, cancel=cancel, pause_wait_s=limits.pause_wait_s,
                                routed_experts=routed_from is not None))
    needs_scores = want_logprobs and any(len(p) > s + 1 for p, s in zip(prompts, starts))
    scores = score_prompts(engine, prompts, starts, top_k, token_ids) if needs_scores else None
    out = []
    for index, rollout in enumerate(rollouts):
        prompt_index = index // sampling.n
        prompt, start = prompts[prompt_index], starts[prompt_index]
        completion = rollout.completion_ids if rollout else []
        record = scores[prompt_index] if scores else None
        meta: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "finish_reason": _finish_reason(rollout.finish_reason if rollout else "length", completion),
            "prompt_tokens": len(prompt),
            "completion_tokens": len(completion),
            "cached_tokens": record["cached_tokens"] if record and index % sampling.n == 0 else 0,
            "weight_version": rollout.weight_version if rollout else engine.weight_version,
        }
        if want_logprobs:
            values = ([None] + record["logprobs"].tolist()) if record else [None] * len(prompt[start:])
            meta["input_token_logprobs"] = _logprob_entries(values[: len(prompt[start:])], prompt[start:])
            meta["output_token_logprobs"] = _logprob_entries(rollout.logprobs if rollout else [], completion)
            if top_k:
                rows = zip(record["top_logprobs"].tolist(), record["top_ids"].tolist()) if record else []
                meta["input_top_logprobs"] = ([None] + [[[v, t, None] for v, t in zip(vs, ts)] for vs, ts in rows])[: len(prompt[start:])]
            if token_ids is not None:
                ids = token_ids[prompt_index]
                rows = record["ids_logprobs"].tolist() if record else []
                meta["input_token_ids_logprobs"] = ([None] + [[[v, t, None] for v, t in zip(vs, ids)] for vs in rows])[: len(prompt[start:])]
        if routed_from is not None:
            meta["routed_experts"] = encode_routed_experts(rollout.routed_experts[routed_from:])
        out.append({"text": "", "output_ids": completion, "meta_info": meta})
    return out[0] if single and sampling.n == 1 else out


def parse_stream(engine: EmbeddedEngine, body: dict[str, Any], limits: Limits) -> tuple[list[list[int]], SamplingParams, int | None]:
    """(prompts, sampling, the routed experts' start or None) of a streamed generation."""
    prompts, _, sampling, starts, top_k = parse_generate(engine, body, limits)
    if (sampling.max_new_tokens == 0 or top_k or body.get("token_ids_logprob") is not None
            or any(len(p) > s + 1 for p, s in zip(prompts, starts))):
        raise ContractError("/generate: stream: streams generation only (max_new_tokens > 0, no prompt log-probs: "
                            "set logprob_start_len to the prompt length and top_logprobs_num to 0)")
    return prompts, sampling, routed_experts_start(engine, body, prompts, sampling, limits)


async def stream_outputs(engine: EmbeddedEngine, prompts: list[list[int]], sampling: SamplingParams, with_logprobs: bool,
                         limits: Limits, routed_from: int | None = None):
    """SGLang's streaming form of a batch ``/generate``: server-sent events ``data: {...}``, one per
    output as soon as it has ended (its ``index`` says which), then ``data: [DONE]``. A client that
    leaves mid-stream cancels the rest of the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            engine.generate(prompts, sampling, on_rollout=lambda j, r: loop.call_soon_threadsafe(queue.put_nowait, (j, r)),
                            cancel=cancel, pause_wait_s=limits.pause_wait_s, routed_experts=routed_from is not None)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.run_in_executor(None, work)
    try:
        async for chunk in _stream_events(queue, with_logprobs, routed_from):
            yield chunk
    finally:  # the client went away (or the stream ended): stop generating for it
        cancel.set()
    try:
        await task  # a failure mid-stream ends the stream without [DONE]: the client sees it short
    except (GenerationCancelled, EngineBusy):
        return
    yield "data: [DONE]\n\n"


async def _stream_events(queue: asyncio.Queue, with_logprobs: bool, routed_from: int | None):
    while (item := await queue.get()) is not None:
        index, rollout = item
        meta = {"id": secrets.token_hex(8), "finish_reason": _finish_reason(rollout.finish_reason, rollout.completion_ids),
                "prompt_tokens": len(rollout.prompt_ids), "completion_tokens": len(rollout.completion_ids),
                "cached_tokens": 0, "weight_version": rollout.weight_version}
        if with_logprobs:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = _logprob_entries(rollout.logprobs, rollout.completion_ids)
        if routed_from is not None:
            meta["routed_experts"] = encode_routed_experts(rollout.routed_experts[routed_from:])
        yield f"data: {json.dumps({'text': '', 'output_ids': rollout.completion_ids, 'meta_info': meta, 'index': index})}\n\n"


def binary_scores(engine: EmbeddedEngine, body: dict[str, Any], top_dtype: str, limits: Limits) -> bytes:
    """A scoring request (``max_new_tokens=0``) answered in the compact binary format: for each
    prompt the same numbers as the JSON ``input_token_logprobs`` minus the leading None."""
    prompts, _, sampling, starts, top_k = parse_generate(engine, body, limits)
    if sampling.max_new_tokens != 0 or sampling.n != 1 or not body.get("return_logprob"):
        raise ContractError(f"{score_codec.MEDIA_TYPE} answers scoring requests only "
                            "(max_new_tokens=0, n=1, return_logprob=true)")
    if body.get("token_ids_logprob") is not None:
        raise ContractError(f"{score_codec.MEDIA_TYPE} carries top-k only: ask for token_ids_logprob as JSON")
    return score_codec.encode(score_prompts(engine, prompts, starts, top_k), top_k, engine.config.vocab_size, top_dtype)
