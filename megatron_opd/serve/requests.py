"""What the embedded server accepts, checked before any work is done.

SGLang's own schema (:mod:`megatron_opd.wire.contract`) comes first; this layer adds what a
server on a shared network must not take on trust: strict JSON types (``true`` is not the id 1 and
``1.5`` is not a count), finite numbers (no ``NaN`` / ``Infinity``), ids inside the vocabulary,
every prompt plus ``max_new_tokens`` inside the model's context window (SGLang refuses the same), a
body-size limit and a per-request token budget. Each refusal is a :class:`ContractError` (HTTP 400;
:class:`BodyTooLarge`: 413) naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megatron_opd.wire.contract import ContractError, validate_request


class BodyTooLarge(ContractError):
    """The request body is over the server's size limit (HTTP 413)."""


class BodyTimeout(ContractError):
    """The request body did not arrive in full within ``Limits.body_timeout_s`` (HTTP 408)."""


@dataclass(frozen=True)
class Limits:
    context_len: int  # the model's max_position_embeddings: prompt + max_new_tokens must fit
    max_body_bytes: int = 16 << 20
    max_outputs: int = 4096  # prompts x n in one request
    max_request_tokens: int = 131_072  # sum over outputs of prompt tokens + max_new_tokens
    pause_wait_s: float = 120.0  # a /generate waits this long for a paused server, then 503
    group_timeout_s: float = 60.0  # joining a weight-update group: give up (and say so) after this
    max_waiting: int = 256  # /generate requests in progress (queued or running); more get a 503 at once
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (an unfinished one: HTTP 408)
    routed_experts: bool = False  # --enable-return-routed-experts: a request may ask for each token's experts


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class SamplingBody(_Strict):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    max_new_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    stop_token_ids: list[int] | None = None
    sampling_seed: int | None = Field(None, ge=0, lt=2**63)


class GenerateBody(_Strict):
    return_logprob: bool | None = None
    return_routed_experts: bool | None = None
    routed_experts_start_len: int | None = Field(None, ge=0)
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    stream: bool | None = None


class DiskUpdateBody(_Strict):
    model_path: str = Field(min_length=1)
    weight_version: str | None = None


class InitGroupBody(_Strict):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=0)
    world_size: int = Field(ge=2)
    backend: Literal["gloo", "nccl"] = "nccl"


class DistributedUpdateBody(_Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    weight_version: str | None = None
    load_format: str | None = None


class WeightByNameBody(_Strict):
    name: str
    truncate_size: int = Field(100, ge=0, le=1 << 20)


class VersionBody(_Strict):
    new_version: str = Field(min_length=1)


BODIES: dict[str, type[_Strict]] = {
    "/update_weights_from_disk": DiskUpdateBody, "/init_weights_update_group": InitGroupBody,
    "/update_weights_from_distributed": DistributedUpdateBody, "/get_weights_by_name": WeightByNameBody,
    "/update_weight_version": VersionBody,
}


def _no_constants(name: str) -> Any:
    raise ContractError(f"body: {name} is not a JSON number (finite numbers only)")


def parse_body(path: str, raw: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON body of a request to ``path``, schema-checked (SGLang's, then this server's types)."""
    if len(raw) > limits.max_body_bytes:
        raise BodyTooLarge(f"{path}: body of {len(raw)} bytes is over this server's limit of {limits.max_body_bytes}")
    try:
        body = json.loads(raw, parse_constant=_no_constants) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ContractError(f"{path}: body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ContractError(f"{path}: body: expected a JSON object, got {type(body).__name__}")
    validate_request(path, body)
    model = GenerateBody if path == "/generate" else BODIES.get(path)
    if model is not None:
        checked(path, model, body)
    if path == "/generate" and isinstance(body.get("sampling_params"), dict):
        checked(path, SamplingBody, body["sampling_params"], "sampling_params.")
    return body


def checked(path: str, model: type[_Strict], value: dict[str, Any], prefix: str = "") -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = prefix + ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "int", "float")))
        raise ContractError(f"{path}: {where.rstrip('.') or '<body>'}: {first['msg']} (got {first.get('input')!r})"[:500]) from None


def token_ids(value: Any, field: str, vocab: int) -> tuple[list[list[int]], bool]:
    """``value`` as one or several non-empty lists of ids in ``[0, vocab)``; True when it was one."""
    if not isinstance(value, list) or not value:
        raise ContractError(f"/generate: {field}: expected a non-empty list of token ids (or a list of them)")
    single = not isinstance(value[0], list)
    lists = [value] if single else value
    for i, ids in enumerate(lists):
        where = field if single else f"{field}[{i}]"
        if not isinstance(ids, list) or not ids:
            raise ContractError(f"/generate: {where}: expected a non-empty list of token ids")
        for j, t in enumerate(ids):
            if type(t) is not int:  # bool is an int subclass: true is not the id 1
                raise ContractError(f"/generate: {where}[{j}]: expected an integer token id, got {t!r}")
            if not 0 <= t < vocab:
                raise ContractError(f"/generate: {where}[{j}]: token ids must be in [0, {vocab}), got {t}")
    return lists, single


def check_cost(prompts: list[list[int]], n: int, max_new_tokens: int, limits: Limits) -> None:
    """Every prompt fits the context window with its completion; the request fits the budget."""
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > limits.context_len:
            raise ContractError(f"/generate: input_ids[{i}]: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} "
                                f"exceed the model's context window of {limits.context_len} tokens")
    outputs = len(prompts) * n
    if outputs > limits.max_outputs:
        raise ContractError(f"/generate: {len(prompts)} prompts x n {n} = {outputs} outputs is over this server's limit "
                            f"of {limits.max_outputs} per request; split the request")
    cost = sum(len(p) for p in prompts) * n + outputs * max_new_tokens
    if cost > limits.max_request_tokens:
        raise ContractError(f"/generate: {cost} tokens (prompts x n + outputs x max_new_tokens) is over this server's "
                            f"budget of {limits.max_request_tokens} per request; split the request")
