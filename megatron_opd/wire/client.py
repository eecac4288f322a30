"""HTTP client for SGLang servers and the embedded server (same wire format).

Every body is checked against SGLang's schema before it is sent, so a request that would fail on
a real SGLang server fails here first, with the field named.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from megatron_opd.records import Rollout, SamplingParams, expert_dtype
from megatron_opd.wire.contract import validate_request


class ServerError(RuntimeError):
    """A server answered with an error (``status``) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Worth another try, possibly elsewhere: unreachable, rate-limited or a server-side error."""
        return self.status is None or self.status == 429 or self.status >= 500


class NotHealthy(RuntimeError):
    """Servers that did not answer ``GET /health`` with 200 in time (``pending``), or whose process
    exited first (``exit_code``)."""

    def __init__(self, message: str, pending: list[str], waited_s: float, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.pending, self.waited_s, self.exit_code = pending, waited_s, exit_code


def wait_healthy(urls: str | Sequence[str], timeout: float, headers: dict[str, str] | None = None,
                 proc: subprocess.Popen | None = None, interval: float = 0.5, request_timeout: float = 5.0) -> None:
    """Poll ``GET {url}/health`` of every server until each has answered 200 once; :class:`NotHealthy`
    naming the servers still pending after ``timeout`` seconds, or at once when ``proc`` (the
    servers' process) exits first."""
    import httpx

    pending = [urls] if isinstance(urls, str) else list(urls)
    began = time.monotonic()
    deadline = began + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            waited = time.monotonic() - began
            raise NotHealthy(f"{', '.join(pending)}: the server process exited with {proc.returncode} after {waited:.0f}s, "
                             "before GET /health answered 200", pending, waited, proc.returncode)
        still = []
        for url in pending:
            try:
                ok = httpx.get(f"{url.rstrip('/')}/health", timeout=request_timeout, headers=headers).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                still.append(url)
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            waited = time.monotonic() - began
            raise NotHealthy(f"{', '.join(pending)}: GET /health did not answer 200 in {waited:.0f}s "
                             f"(timeout {timeout:.0f}s)", pending, waited)
        time.sleep(interval)


def encode_routed_experts(experts: torch.Tensor) -> str:
    """SGLang's ``meta_info["routed_experts"]``: the int32 bytes of [tokens, layers, top_k], base64."""
    return base64.b64encode(experts.to(torch.int32).contiguous().numpy().tobytes()).decode()


def decode_routed_experts(text: str, shape: "RoutedShape", tokens: int) -> torch.Tensor:
    """[tokens, layers, top_k] in the compact dtype from SGLang's base64 int32 form; a clear error on a
    wrong size or an expert id out of range."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ServerError(f"meta_info.routed_experts: not base64 ({exc})") from None
    want = tokens * shape.layers * shape.top_k
    if len(raw) != 4 * want:
        raise ServerError(f"meta_info.routed_experts: {len(raw) // 4} values, expected {want} ({tokens} tokens x "
                          f"{shape.layers} layers x top-{shape.top_k}: prompt + completion - 1 tokens)")
    if not want:
        return torch.zeros(0, shape.layers, shape.top_k, dtype=expert_dtype(shape.experts))
    values = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(tokens, shape.layers, shape.top_k)
    if (int(values.min()) < 0 or int(values.max()) >= shape.experts):
        raise ServerError(f"meta_info.routed_experts: expert ids {int(values.min())}..{int(values.max())} outside "
                          f"0..{shape.experts - 1}")
    return values.to(expert_dtype(shape.experts))


# SGLang's server flag (and opd serve's) that lets a /generate ask for each token's experts (routing replay)
ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"


@dataclass(frozen=True)
class RoutedShape:
    """What a rollout's routed experts look like (from the student's config): asked with every request."""

    layers: int
    top_k: int
    experts: int


def _rollout(out: dict[str, Any], index: int, prompts: list[list[int]], n: int,
             routed: RoutedShape | None = None) -> Rollout:
    meta = out["meta_info"]
    entries = meta.get("output_token_logprobs") or []
    prompt, completion = list(prompts[index // n]), list(out["output_ids"])
    experts = None
    if routed is not None:
        if not isinstance(meta.get("routed_experts"), str):
            raise ServerError("the server returned no meta_info.routed_experts though the request asked for them "
                              "(return_routed_experts): start SGLang with --enable-return-routed-experts")
        experts = decode_routed_experts(meta["routed_experts"], routed, len(prompt) + len(completion) - 1)
    return Rollout(prompt_ids=prompt, completion_ids=completion,
                   logprobs=[float(e[0]) for e in entries],
                   finish_reason=meta["finish_reason"]["type"] if meta.get("finish_reason") else "abort",
                   weight_version=str(meta.get("weight_version", "")), prompt_index=index // n, sample_index=index % n,
                   routed_experts=experts)


def _merge_stream_event(part: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Fold one streamed event into an output: ids and log-prob entries either restate the whole
    output so far (``completion_tokens`` equals their count) or are the new increment."""
    meta = event.get("meta_info", {})
    ids = list(event.get("output_ids") or [])
    entries = list(meta.get("output_token_logprobs") or [])
    whole = int(meta.get("completion_tokens", -1)) == len(ids)
    part["output_ids"] = ids if whole else part["output_ids"] + ids
    part["entries"] = entries if whole else part["entries"] + entries
    return {"output_ids": part["output_ids"], "meta_info": {**meta, "output_token_logprobs": part["entries"]}}


class SGLangClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0,
                 routed_experts: RoutedShape | None = None) -> None:
        """``routed_experts``: ask every generation for the experts each layer chose (routing replay)."""
        import httpx

        self.routed_experts = routed_experts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def post_raw(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        """POST a schema-checked body; the ``httpx.Response`` (status 200) or a ``ServerError``."""
        import httpx

        validate_request(path, body)
        try:
            response = self._http.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.base_url}{path}: HTTP {response.status_code}: {response.text[:500]}", response.status_code)
        return response

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self.post_raw(path, body).json()

    def _get(self, path: str, timeout: float | None = None) -> Any:
        import httpx

        try:
            response = self._http.get(path, timeout=timeout) if timeout else self._http.get(path)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.base_url}{path}: HTTP {response.status_code}: {response.text[:500]}", response.status_code)
        return response.json()

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt. With ``on_rollout`` the request streams (SGLang's
        ``stream: true``) and ``on_rollout(j, rollout)`` hears of output j as soon as it has ended."""
        body = {"input_ids": prompts, "sampling_params": sampling.to_sglang(), "return_logprob": True,
                "logprob_start_len": max(len(p) for p in prompts) if prompts else 0}
        if self.routed_experts is not None:
            body["return_routed_experts"] = True
        expected = len(prompts) * sampling.n
        if on_rollout is not None:
            return self._generate_stream(body, prompts, sampling.n, on_rollout)
        outputs = self._post("/generate", body)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != expected:
            raise ServerError(f"{self.base_url}/generate: expected {expected} outputs, got {len(outputs)}")
        return [_rollout(out, index, prompts, sampling.n, self.routed_experts) for index, out in enumerate(outputs)]

    def _generate_stream(self, body: dict[str, Any], prompts: list[list[int]], n: int,
                         on_rollout: Callable[[int, Rollout], None]) -> list[Rollout]:
        """Read the server-sent events; an output counts once its ``finish_reason`` is set. A server
        that sends each output whole (the embedded one) or in increments (SGLang) both work."""
        import httpx

        body = {**body, "stream": True}
        validate_request("/generate", body)
        parts: dict[int, dict[str, Any]] = {}
        done: dict[int, Rollout] = {}
        finished = False
        try:
            with self._http.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    raise ServerError(f"{self.base_url}/generate: HTTP {response.status_code}: {response.read()[:500]!r}",
                                      response.status_code)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    event = json.loads(data)
                    index = int(event.get("index", 0))
                    merged = _merge_stream_event(parts.setdefault(index, {"output_ids": [], "entries": []}), event)
                    if merged["meta_info"].get("finish_reason") and index not in done:
                        done[index] = _rollout(merged, index, prompts, n, self.routed_experts)
                        on_rollout(index, done[index])
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.base_url}/generate (stream): {type(exc).__name__}: {exc}") from exc
        expected = len(prompts) * n
        if not finished or len(done) != expected:
            raise ServerError(f"{self.base_url}/generate (stream): ended after {len(done)} of {expected} outputs")
        return [done[i] for i in range(expected)]

    def score(self, sequences: list[list[int]], start: int) -> list[list[float]]:
        """Log-prob of every token of each sequence at positions >= ``start`` >= 1 (prefill only).
        SGLang's entries begin at ``logprob_start_len`` with a None, hence ``start - 1``."""
        if start < 1:
            raise ValueError(f"start must be >= 1 (position 0 has no log-prob), got {start}")
        body = {"input_ids": sequences, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": start - 1}
        outputs = self._post("/generate", body)
        outputs = [outputs] if isinstance(outputs, dict) else outputs
        return [[e[0] for e in out["meta_info"]["input_token_logprobs"] if e[0] is not None] for out in outputs]

    # -- weights and control --------------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, weight_version: str) -> dict[str, Any]:
        result = self._post("/update_weights_from_disk", {"model_path": model_path, "weight_version": weight_version})
        if not result.get("success"):
            raise ServerError(f"{self.base_url}/update_weights_from_disk: {result.get('message')}")
        return result

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, backend: str, group_name: str = "weight_update_group") -> None:
        result = self._post("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})
        if not result.get("success"):
            raise ServerError(f"{self.base_url}/init_weights_update_group: {result.get('message')}")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        weight_version: str, group_name: str = "weight_update_group",
                                        load_format: str | None = None) -> None:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": True, "weight_version": weight_version}
        if load_format is not None:
            body["load_format"] = load_format
        result = self._post("/update_weights_from_distributed", body)
        if not result.get("success"):
            raise ServerError(f"{self.base_url}/update_weights_from_distributed: {result.get('message')}")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._post("/destroy_weights_update_group", {"group_name": group_name})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def update_weight_version(self, version: str) -> None:
        self._post("/update_weight_version", {"new_version": version, "abort_all_requests": False})

    def pause(self) -> None:
        self._post("/pause_generation", {"mode": "in_place"})

    def resume(self) -> None:
        self._post("/continue_generation", {})

    def health(self, timeout: float = 10.0) -> bool:
        """Answers ``/health`` within ``timeout`` (a hung server must not stall the pool's probes)."""
        try:
            self._get("/health", timeout)
            return True
        except ServerError:
            return False

    def model_info(self) -> dict[str, Any]:
        return self._get("/model_info")
