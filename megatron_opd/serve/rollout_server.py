"""``opd serve --role rollout|teacher``: the embedded engine behind SGLang's HTTP API (FastAPI/uvicorn).

Request bodies are validated against SGLang's own schema, then by :mod:`megatron_opd.serve.requests`
(strict types, finite numbers, the context window, size and token budgets): HTTP 400 naming the
field, 413 for a body over the limit. Responses have SGLang's shapes (:mod:`megatron_opd.serve.generate`
builds the ``/generate`` ones), so :mod:`megatron_opd.wire.client` drives this server and a real
SGLang server the same way. A generation whose client has gone is cancelled; a request waiting on a
paused server gives up with 503 after ``Limits.pause_wait_s``.

The handlers are module-level routers; each reads what it needs from ``request.app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import threading
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from megatron_opd.rollout.embedded import EmbeddedEngine, EngineBusy
from megatron_opd.rollout.generation import GenerationCancelled
from megatron_opd.serve.generate import binary_scores, generate_response, parse_stream, stream_outputs
from megatron_opd.serve.requests import BodyTimeout, BodyTooLarge, Limits, parse_body
from megatron_opd.wire import score_codec
from megatron_opd.wire.contract import ContractError

# The handlers read ``request.app.state`` (set by :func:`create_app`): ``engine``, ``limits`` and ``waiting``,
# the /generate requests in progress (the event loop is one thread, so no lock).

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
            headers = scope.get("headers") or []
            refusal = _framing_refusal(headers)
            if refusal is None and self.api_key:
                given = dict(headers).get(b"authorization", b"")  # bytes as sent: any byte compares, none raises
                if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    refusal = JSONResponse({"error": "invalid or missing API key"}, status_code=401)
            if refusal is None and self.read_only and scope["path"] in WEIGHT_UPDATE_PATHS:
                refusal = JSONResponse({"error": f"{scope['path']}: this is a teacher server (read-only weights)"},
                                       status_code=403)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _framing_refusal(headers: list[tuple[bytes, bytes]]) -> JSONResponse | None:
    """A body framed two ways (RFC 9112 6.3: Content-Length and Transfer-Encoding both, or several
    Content-Lengths that differ) is refused: a proxy in front may read it the other way (request smuggling)."""
    lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    problem = ("both Content-Length and Transfer-Encoding" if lengths and chunked else
               "Content-Length headers that disagree" if len(lengths) > 1 else None)
    if problem is None:
        return None
    return JSONResponse({"error": f"request body framed two ways: {problem}"}, status_code=400,
                        headers={"Connection": "close"})


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


def _admit(state: Any) -> None:
    if state.waiting >= state.limits.max_waiting:
        raise EngineBusy(f"overloaded: {state.waiting} requests in progress (the server's --max-waiting); retry later")


async def _counted(state: Any, events):
    state.waiting += 1
    try:
        async for event in events:
            yield event
    finally:
        state.waiting -= 1


async def _body_of(request: Request, path: str) -> dict[str, Any]:
    limits = request.app.state.limits
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BodyTooLarge(f"{path}: body of {declared} bytes is over this server's limit of {limits.max_body_bytes}")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    stream = request.stream().__aiter__()
    while True:  # never more than the limit in memory, never longer than the body timeout
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise BodyTimeout(f"{path}: the request body did not arrive in full within {limits.body_timeout_s:.0f} s "
                              f"({size} bytes received)") from None
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise BodyTooLarge(f"{path}: body is over this server's limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return parse_body(path, b"".join(chunks), limits)


# -- errors ------------------------------------------------------------------------------------
async def _contract_error(_request: Request, exc: ContractError):
    if isinstance(exc, BodyTimeout):  # the rest of the body may never come: the connection is not reused
        return JSONResponse({"error": str(exc)}, status_code=408, headers={"Connection": "close"})
    return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, BodyTooLarge) else 400)


async def _client_left(request: Request, _exc: ClientDisconnect):
    print(f"{request.method} {request.url.path}: the client disconnected before its request body arrived in full",
          file=sys.stderr, flush=True)
    return Response(status_code=499)  # nobody reads it


async def _busy(_request: Request, exc: EngineBusy):
    return JSONResponse({"error": str(exc)}, status_code=503)


async def _cancelled(request: Request, exc: GenerationCancelled):
    print(f"{request.url.path}: {exc} (its client left, or the server is stopping)", file=sys.stderr, flush=True)
    return JSONResponse({"error": str(exc)}, status_code=499)  # nginx's "client closed request"


ERROR_HANDLERS = {ContractError: _contract_error, EngineBusy: _busy, GenerationCancelled: _cancelled,
                  ClientDisconnect: _client_left}

# -- /generate: generation and scoring -----------------------------------------------------------
generation = APIRouter()


@generation.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    state = request.app.state
    _admit(state)
    state.waiting += 1
    try:
        return await _generate(request)
    finally:
        state.waiting -= 1


async def _generate(request: Request):
    state = request.app.state
    engine, limits = state.engine, state.limits
    body = await _body_of(request, "/generate")
    try:
        top_dtype = score_codec.negotiated_top_dtype(request.headers.get("accept"))
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    if top_dtype is not None:
        payload = await run_in_threadpool(binary_scores, engine, body, top_dtype, limits)
        return Response(payload, media_type=score_codec.MEDIA_TYPE)
    if body.get("stream"):
        prompts, sampling, routed_from = parse_stream(engine, body, limits)  # a bad body is a 400 before the stream starts
        return StreamingResponse(_counted(state, stream_outputs(engine, prompts, sampling, bool(body.get("return_logprob")), limits,
                                                                routed_from)),
                                 media_type="text/event-stream")
    return await _watching_client(request, generate_response, engine, body, limits)


# -- weight updates (refused on a teacher by _Gate) ------------------------------------------------
weights = APIRouter()


@weights.post("/update_weights_from_disk")
async def update_from_disk(request: Request):
    engine = request.app.state.engine
    body = await _body_of(request, "/update_weights_from_disk")
    version = body.get("weight_version") or engine.weight_version
    try:
        count = await run_in_threadpool(engine.update_weights_from_disk, body["model_path"], version)
    except Exception as exc:  # report any load failure to the trainer; the model is unchanged
        return {"success": False, "message": f"{type(exc).__name__}: {exc}"}
    return {"success": True, "message": f"loaded {count} tensors", "num_paused_requests": 0}


@weights.post("/init_weights_update_group")
async def init_group(request: Request):
    state = request.app.state
    body = await _body_of(request, "/init_weights_update_group")
    try:
        await run_in_threadpool(state.engine.init_update_group, body["master_address"], body["master_port"],
                                body["rank_offset"], body["world_size"], body.get("backend", "nccl"),
                                state.limits.group_timeout_s)
    except (RuntimeError, ValueError) as exc:
        return {"success": False, "message": str(exc)}
    return {"success": True, "message": "joined weight update group"}


@weights.post("/update_weights_from_distributed")
async def update_distributed(request: Request):
    engine = request.app.state.engine
    body = await _body_of(request, "/update_weights_from_distributed")
    try:
        count = await run_in_threadpool(engine.update_from_distributed, body["names"], body["dtypes"],
                                        body["shapes"], body.get("weight_version"), body.get("load_format"))
    except (RuntimeError, ValueError, KeyError) as exc:
        return {"success": False, "message": str(exc)}
    return {"success": True, "message": f"received {count} tensors"}


@weights.post("/destroy_weights_update_group")
async def destroy_group(request: Request):
    await _body_of(request, "/destroy_weights_update_group")
    request.app.state.engine.destroy_update_group()
    return {"success": True, "message": "left weight update group"}


@weights.post("/get_weights_by_name")
async def weights_by_name(request: Request):
    body = await _body_of(request, "/get_weights_by_name")
    try:
        tensor = request.app.state.engine.get_weight(body["name"])
    except KeyError as exc:  # its message, not str(KeyError) (which quotes it)
        return JSONResponse({"error": exc.args[0] if exc.args else "unknown weight"}, status_code=400)
    return tensor[: int(body.get("truncate_size", 100))].tolist()


@weights.post("/update_weight_version")
async def update_version(request: Request):
    engine = request.app.state.engine
    body = await _body_of(request, "/update_weight_version")
    engine.weight_version = body["new_version"]
    return {"success": True, "message": f"weight version {engine.weight_version}"}


# -- control and status ------------------------------------------------------------------------------
control = APIRouter()


@control.post("/pause_generation")
async def pause(request: Request):
    await _body_of(request, "/pause_generation")
    await run_in_threadpool(request.app.state.engine.pause)  # waits for the running generation's lock: off the event loop
    return {"success": True}


@control.post("/continue_generation")
async def resume(request: Request):
    await _body_of(request, "/continue_generation")
    await run_in_threadpool(request.app.state.engine.resume)  # commits a distributed sync received while paused
    return {"success": True}


@control.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache():
    return {"success": True}  # prefixes are shared within a request only: nothing kept to flush


@control.get("/health")
async def health(request: Request):
    """Ready for work: 503 while stopping, paused (a weight update) or over ``max_waiting`` requests,
    so a router or the trainer's pool sends work elsewhere."""
    state = request.app.state
    engine = state.engine
    if not engine.health():
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    if engine.paused:
        return JSONResponse({"status": "paused", "weight_version": engine.weight_version}, status_code=503)
    if state.waiting >= state.limits.max_waiting:
        return JSONResponse({"status": "overloaded", "waiting": state.waiting}, status_code=503)
    return {"status": "ok"}


@control.get("/model_info")
@control.get("/get_model_info")
async def model_info(request: Request):
    engine = request.app.state.engine
    return {"model_path": str(engine.model_dir), "tokenizer_path": str(engine.model_dir),
            "is_generation": True, "weight_version": engine.weight_version}


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.engine.shutdown()  # SIGTERM: whatever still generates ends at its next token


def create_app(engine: EmbeddedEngine, api_key: str | None = None, role: str = "rollout",
               limits: Limits | None = None) -> Any:
    """The SGLang-compatible app. ``role="teacher"`` refuses weight updates (HTTP 403). ``limits``
    default to the model's context window and :class:`Limits`' budgets."""
    if role not in ("rollout", "teacher"):
        raise ValueError(f"role must be 'rollout' or 'teacher', got {role!r}")
    limits = limits or Limits(context_len=int(getattr(engine.config, "max_position_embeddings", 0) or 1 << 30))
    app = FastAPI(title=f"megatron-opd embedded {role} server (SGLang wire format)", lifespan=_lifespan,
                  exception_handlers=ERROR_HANDLERS)
    app.state.engine, app.state.limits, app.state.waiting = engine, limits, 0
    app.add_middleware(_Gate, api_key=api_key, read_only=role == "teacher")
    for router in (generation, weights, control):
        app.include_router(router)
    return app
