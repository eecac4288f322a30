"""``opd serve --role rollout|teacher``: the embedded engine behind SGLang's HTTP API (FastAPI/uvicorn).

Request bodies are validated against SGLang's own schema, then by :mod:`megatron_opd.serve.requests`
(strict types, finite numbers, the context window, size and token budgets): HTTP 400 naming the
field, 413 for a body over the limit. Responses have SGLang's shapes, so
:mod:`megatron_opd.wire.client` drives this server and a real SGLang server the same way. A
generation whose client has gone is cancelled; a request waiting on a paused server gives up with
503 after ``Limits.pause_wait_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from megatron_opd.rollout.embedded import EmbeddedEngine, EngineBusy
from megatron_opd.rollout.generation import GenerationCancelled
from megatron_opd.records import SamplingParams
from megatron_opd.wire import score_codec
from megatron_opd.serve.requests import BodyTooLarge, Limits, check_cost, parse_body, token_ids
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


def generate_response(engine: EmbeddedEngine, body: dict[str, Any], limits: Limits,
                      cancel: threading.Event | None = None) -> Any:
    """Answer a ``/generate`` body (already type-checked) with SGLang-shaped output."""
    prompts, single, sampling, starts, top_k = parse_generate(engine, body, limits)
    token_ids = parse_token_ids(engine, body, len(prompts))
    want_logprobs = bool(body.get("return_logprob"))
    rollouts = ([None] * (len(prompts) * sampling.n) if sampling.max_new_tokens == 0 else
                engine.generate(prompts, sampling, cancel=cancel, pause_wait_s=limits.pause_wait_s))
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
        out.append({"text": "", "output_ids": completion, "meta_info": meta})
    return out[0] if single and sampling.n == 1 else out


def parse_stream(engine: EmbeddedEngine, body: dict[str, Any], limits: Limits) -> tuple[list[list[int]], SamplingParams]:
    prompts, _, sampling, starts, top_k = parse_generate(engine, body, limits)
    if (sampling.max_new_tokens == 0 or top_k or body.get("token_ids_logprob") is not None
            or any(len(p) > s + 1 for p, s in zip(prompts, starts))):
        raise ContractError("/generate: stream: streams generation only (max_new_tokens > 0, no prompt log-probs: "
                            "set logprob_start_len to the prompt length and top_logprobs_num to 0)")
    return prompts, sampling


async def stream_outputs(engine: EmbeddedEngine, prompts: list[list[int]], sampling: SamplingParams, with_logprobs: bool,
                         limits: Limits):
    """SGLang's streaming form of a batch ``/generate``: server-sent events ``data: {...}``, one per
    output as soon as it has ended (its ``index`` says which), then ``data: [DONE]``. A client that
    leaves mid-stream cancels the rest of the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            engine.generate(prompts, sampling, on_rollout=lambda j, r: loop.call_soon_threadsafe(queue.put_nowait, (j, r)),
                            cancel=cancel, pause_wait_s=limits.pause_wait_s)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.run_in_executor(None, work)
    try:
        async for chunk in _stream_events(queue, with_logprobs):
            yield chunk
    finally:  # the client went away (or the stream ended): stop generating for it
        cancel.set()
    try:
        await task  # a failure mid-stream ends the stream without [DONE]: the client sees it short
    except (GenerationCancelled, EngineBusy):
        return
    yield "data: [DONE]\n\n"


async def _stream_events(queue: asyncio.Queue, with_logprobs: bool):
    while (item := await queue.get()) is not None:
        index, rollout = item
        meta = {"id": secrets.token_hex(8), "finish_reason": _finish_reason(rollout.finish_reason, rollout.completion_ids),
                "prompt_tokens": len(rollout.prompt_ids), "completion_tokens": len(rollout.completion_ids),
                "cached_tokens": 0, "weight_version": rollout.weight_version}
        if with_logprobs:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = _logprob_entries(rollout.logprobs, rollout.completion_ids)
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


WEIGHT_UPDATE_PATHS = {"/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
                       "/destroy_weights_update_group", "/update_weight_version"}


class _Gate:
    """The API key (401) and, on a teacher, read-only weights (403: a weight sync aimed at a teacher
    is a wiring mistake). A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would hide a
    client's disconnect from the handlers, and a generation whose client left must be cancelled."""

    def __init__(self, app: Any, api_key: str | None, read_only: bool) -> None:
        self.app, self.api_key, self.read_only = app, api_key, read_only

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = None
            if self.api_key:
                given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                if not secrets.compare_digest(given, f"Bearer {self.api_key}"):
                    refusal = JSONResponse({"error": "invalid or missing API key"}, status_code=401)
            if refusal is None and self.read_only and scope["path"] in WEIGHT_UPDATE_PATHS:
                refusal = JSONResponse({"error": f"{scope['path']}: this is a teacher server (read-only weights)"},
                                       status_code=403)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _watching_client(request: Request, work, *args) -> Any:
    """Run ``work(*args, cancel=event)`` in a worker thread; set the event when the client goes."""
    cancel = threading.Event()
    task = asyncio.ensure_future(run_in_threadpool(work, *args, cancel=cancel))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                cancel.set()
        return task.result()
    finally:
        cancel.set()  # also when this handler itself is cancelled (server shutdown)


def create_app(engine: EmbeddedEngine, api_key: str | None = None, role: str = "rollout",
               limits: Limits | None = None) -> Any:
    """The SGLang-compatible app. ``role="teacher"`` refuses weight updates (HTTP 403). ``limits``
    default to the model's context window and :class:`Limits`' budgets."""
    if role not in ("rollout", "teacher"):
        raise ValueError(f"role must be 'rollout' or 'teacher', got {role!r}")
    limits = limits or Limits(context_len=int(getattr(engine.config, "max_position_embeddings", 0) or 1 << 30))
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.shutdown()  # SIGTERM: whatever still generates ends at its next token

    app = FastAPI(title=f"megatron-opd embedded {role} server (SGLang wire format)", lifespan=lifespan)
    app.state.limits = limits
    load = {"waiting": 0}  # /generate requests in progress; the event loop is one thread, so no lock

    def admit() -> None:
        if load["waiting"] >= limits.max_waiting:
            raise EngineBusy(f"overloaded: {load['waiting']} requests in progress (the server's --max-waiting); retry later")

    async def counted(events):
        load["waiting"] += 1
        try:
            async for event in events:
                yield event
        finally:
            load["waiting"] -= 1

    app.add_middleware(_Gate, api_key=api_key, read_only=role == "teacher")

    async def body_of(request: Request, path: str) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise BodyTooLarge(f"{path}: body of {declared} bytes is over this server's limit of {limits.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():  # never more than the limit in memory
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise BodyTooLarge(f"{path}: body is over this server's limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_body(path, b"".join(chunks), limits)

    @app.exception_handler(ContractError)
    async def contract_error(_request: Request, exc: ContractError):
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, BodyTooLarge) else 400)

    @app.exception_handler(EngineBusy)
    async def busy(_request: Request, exc: EngineBusy):
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.exception_handler(GenerationCancelled)
    async def cancelled(request: Request, exc: GenerationCancelled):
        print(f"{request.url.path}: {exc} (its client left, or the server is stopping)", file=sys.stderr, flush=True)
        return JSONResponse({"error": str(exc)}, status_code=499)  # nginx's "client closed request"

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        admit()
        load["waiting"] += 1
        try:
            return await _generate(request)
        finally:
            load["waiting"] -= 1

    async def _generate(request: Request):
        body = await body_of(request, "/generate")
        try:
            top_dtype = score_codec.negotiated_top_dtype(request.headers.get("accept"))
        except ValueError as exc:
            raise ContractError(str(exc)) from None
        if top_dtype is not None:
            payload = await run_in_threadpool(binary_scores, engine, body, top_dtype, limits)
            return Response(payload, media_type=score_codec.MEDIA_TYPE)
        if body.get("stream"):
            prompts, sampling = parse_stream(engine, body, limits)  # a bad body is a 400 before the stream starts
            return StreamingResponse(counted(stream_outputs(engine, prompts, sampling, bool(body.get("return_logprob")), limits)),
                                     media_type="text/event-stream")
        return await _watching_client(request, generate_response, engine, body, limits)

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await body_of(request, "/update_weights_from_disk")
        version = body.get("weight_version") or engine.weight_version
        try:
            count = await run_in_threadpool(engine.update_weights_from_disk, body["model_path"], version)
        except Exception as exc:  # report any load failure to the trainer; the model is unchanged
            return {"success": False, "message": f"{type(exc).__name__}: {exc}"}
        return {"success": True, "message": f"loaded {count} tensors", "num_paused_requests": 0}

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await body_of(request, "/init_weights_update_group")
        try:
            await run_in_threadpool(engine.init_update_group, body["master_address"], body["master_port"],
                                    body["rank_offset"], body["world_size"], body.get("backend", "nccl"),
                                    limits.group_timeout_s)
        except (RuntimeError, ValueError) as exc:
            return {"success": False, "message": str(exc)}
        return {"success": True, "message": "joined weight update group"}

    @app.post("/update_weights_from_distributed")
    async def update_distributed(request: Request):
        body = await body_of(request, "/update_weights_from_distributed")
        try:
            count = await run_in_threadpool(engine.update_from_distributed, body["names"], body["dtypes"],
                                            body["shapes"], body.get("weight_version"), body.get("load_format"))
        except (RuntimeError, ValueError, KeyError) as exc:
            return {"success": False, "message": str(exc)}
        return {"success": True, "message": f"received {count} tensors"}

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        await body_of(request, "/destroy_weights_update_group")
        engine.destroy_update_group()
        return {"success": True, "message": "left weight update group"}

    @app.post("/get_weights_by_name")
    async def weights_by_name(request: Request):
        body = await body_of(request, "/get_weights_by_name")
        try:
            tensor = engine.get_weight(body["name"])
        except KeyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return tensor[: int(body.get("truncate_size", 100))].tolist()

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        body = await body_of(request, "/update_weight_version")
        engine.weight_version = body["new_version"]
        return {"success": True, "message": f"weight version {engine.weight_version}"}

    @app.post("/pause_generation")
    async def pause(request: Request):
        await body_of(request, "/pause_generation")
        await run_in_threadpool(engine.pause)  # waits for the running generation's lock: off the event loop
        return {"success": True}

    @app.post("/continue_generation")
    async def resume(request: Request):
        await body_of(request, "/continue_generation")
        await run_in_threadpool(engine.resume)  # commits a distributed sync received while paused
        return {"success": True}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return {"success": True}  # prefixes are shared within a request only: nothing kept to flush

    @app.get("/health")
    async def health():
        """Ready for work: 503 while stopping, paused (a weight update) or over ``max_waiting`` requests,
        so a router or the trainer's pool sends work elsewhere."""
        if not engine.health():
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        if engine.paused:
            return JSONResponse({"status": "paused", "weight_version": engine.weight_version}, status_code=503)
        if load["waiting"] >= limits.max_waiting:
            return JSONResponse({"status": "overloaded", "waiting": load["waiting"]}, status_code=503)
        return {"status": "ok"}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(engine.model_dir), "tokenizer_path": str(engine.model_dir),
                "is_generation": True, "weight_version": engine.weight_version}

    return app
