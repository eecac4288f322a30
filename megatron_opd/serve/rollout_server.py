"""``opd serve --role rollout``: the embedded engine behind SGLang's HTTP API (FastAPI/uvicorn).

Request bodies are validated against SGLang's own schema (HTTP 400 with the offending field);
responses have SGLang's shapes, so :mod:`megatron_opd.rollout.http_client` drives this server and a
real SGLang server the same way.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.types import SamplingParams
from megatron_opd.serve.contract import ContractError, validate_request


def _finish_reason(reason: str, completion: list[int]) -> dict[str, Any]:
    if reason == "stop":
        return {"type": "stop", "matched": completion[-1] if completion else None}
    return {"type": "length", "length": len(completion)}


def _logprob_entries(values: list[float | None], ids: list[int]) -> list[list[Any]]:
    return [[v, t, None] for v, t in zip(values, ids)]


def generate_response(engine: EmbeddedEngine, body: dict[str, Any]) -> Any:
    """Answer a ``/generate`` body (already schema-valid) with SGLang-shaped output."""
    input_ids = body.get("input_ids")
    if input_ids is None:
        raise ContractError("/generate: input_ids: this server takes token ids (text prompts are not supported)")
    single = bool(input_ids) and isinstance(input_ids[0], int)
    prompts = [input_ids] if single else list(input_ids)
    if not prompts or any(not p or not all(isinstance(t, int) for t in p) for p in prompts):
        raise ContractError("/generate: input_ids: expected a non-empty list of token ids (or a list of them)")
    vocab = engine.config.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ContractError(f"/generate: input_ids: token ids must be in [0, {vocab})")
    params = body.get("sampling_params") or {}
    if isinstance(params, list):
        raise ContractError("/generate: sampling_params: per-prompt lists are not supported here; send one dict")
    try:
        sampling = SamplingParams.from_sglang(params)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"/generate: sampling_params: {exc}") from None
    want_logprobs = bool(body.get("return_logprob"))
    start, top_k = body.get("logprob_start_len"), body.get("top_logprobs_num") or 0
    if isinstance(start, list) or isinstance(top_k, list):
        raise ContractError("/generate: per-prompt lists for logprob_start_len/top_logprobs_num are not supported here")
    start = 0 if start is None else int(start)
    if start < 0:  # SGLang's -1: no input log-probs
        start = max(len(p) for p in prompts)
    if not 0 <= int(top_k) <= engine.config.vocab_size:
        raise ContractError(f"/generate: top_logprobs_num: expected 0..{engine.config.vocab_size}, got {top_k}")
    top_k = int(top_k)
    if sampling.max_new_tokens == 0:
        rollouts = [None] * (len(prompts) * sampling.n)
    else:
        rollouts = engine.generate(prompts, sampling)
    # prefill scoring only when some prompt has positions at or after `start` (rollouts skip it)
    needs_scores = want_logprobs and any(len(p) > max(start, 1) for p in prompts)
    scores = engine.score(prompts, [start] * len(prompts), top_k) if needs_scores else None
    out = []
    for index, rollout in enumerate(rollouts):
        prompt_index = index // sampling.n
        prompt = prompts[prompt_index]
        completion = rollout.completion_ids if rollout else []
        meta: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "finish_reason": _finish_reason(rollout.finish_reason if rollout else "length", completion),
            "prompt_tokens": len(prompt),
            "completion_tokens": len(completion),
            "cached_tokens": 0,
            "weight_version": rollout.weight_version if rollout else engine.weight_version,
        }
        if want_logprobs:
            # SGLang: entry for the first prompt position has logprob None
            first = [None] if start == 0 else []
            prompt_scores = scores[prompt_index] if scores else {"token_logprobs": [], "top_logprobs": [], "top_ids": []}
            meta["input_token_logprobs"] = _logprob_entries(first + prompt_scores["token_logprobs"], prompt[start:])
            meta["output_token_logprobs"] = _logprob_entries(rollout.logprobs if rollout else [], completion)
            if top_k:
                tops = prompt_scores
                first_top = [None] if start == 0 else []
                meta["input_top_logprobs"] = first_top + [
                    [[v, t, None] for v, t in zip(vs, ts)] for vs, ts in zip(tops["top_logprobs"], tops["top_ids"])]
        out.append({"text": "", "output_ids": completion, "meta_info": meta})
    return out[0] if single and sampling.n == 1 else out


def create_app(engine: EmbeddedEngine, api_key: str | None = None) -> Any:
    app = FastAPI(title="megatron-opd embedded rollout server (SGLang wire format)")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
            return JSONResponse({"error": "invalid or missing API key"}, status_code=401)
        return await call_next(request)

    async def body_of(request: Request, path: str) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise ContractError(f"{path}: body is not JSON ({exc})") from None
        validate_request(path, body)
        return body

    @app.exception_handler(ContractError)
    async def contract_error(_request: Request, exc: ContractError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        body = await body_of(request, "/generate")
        return await run_in_threadpool(generate_response, engine, body)

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
                                    body["rank_offset"], body["world_size"], body.get("backend", "nccl"))
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
        engine.pause()
        return {"success": True}

    @app.post("/continue_generation")
    async def resume(request: Request):
        await body_of(request, "/continue_generation")
        engine.resume()
        return {"success": True}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return {"success": True}  # no prefix cache to flush

    @app.get("/health")
    async def health():
        return {"status": "ok"} if engine.health() else JSONResponse({"status": "unhealthy"}, status_code=503)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(engine.model_dir), "tokenizer_path": str(engine.model_dir),
                "is_generation": True, "weight_version": engine.weight_version}

    return app
