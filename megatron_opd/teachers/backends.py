"""Scoring backends: SGLang's ``/generate`` (also the embedded ``opd serve --role teacher``, which
can answer in a compact binary format) and OpenAI-compatible ``/v1/completions`` (vLLM)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_opd.wire.client import ServerError, SGLangClient
from megatron_opd.wire import score_codec
from megatron_opd.records import TokenScores
from megatron_opd.teachers.scorer import TeacherError


def _check_starts(sequences: list[list[int]], starts: list[int]) -> None:
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} start positions")
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: start {start} must be in [1, {len(seq)}] (a prompt of >= 1 token)")


class SGLangScorer:
    """``/generate`` with ``max_new_tokens=0``, ``return_logprob=true`` and ``logprob_start_len =
    start - 1`` (SGLang's first entry is None, so this scores exactly the completion). With
    ``binary=True`` the request also accepts the embedded server's binary payload."""

    def __init__(self, url: str, name: str = "", api_key: str | None = None, timeout: float = 120.0,
                 binary: bool = True, top_dtype: str = "float16") -> None:
        self.client = SGLangClient(url, api_key=api_key, timeout=timeout)
        self.name = name or url
        self.url = self.client.base_url
        self.headers = {"Accept": score_codec.accept_header(top_dtype)} if binary else {}
        self.last_response_bytes = 0

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0,
              token_ids: list[list[int]] | None = None) -> list[TokenScores]:
        """``token_ids`` (one id list per sequence): also the log-probs of those ids at every scored
        position (SGLang's ``token_ids_logprob``; answered as JSON), in ``TokenScores.ids_logprobs``."""
        _check_starts(sequences, starts)
        body: dict[str, Any] = {"input_ids": sequences, "return_logprob": True,
                                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                                "logprob_start_len": [s - 1 for s in starts], "top_logprobs_num": top_k}
        if token_ids is not None:
            body["token_ids_logprob"] = [list(ids) for ids in token_ids]
        response = self.client.post_raw("/generate", body, self.headers if token_ids is None else {})
        self.last_response_bytes = len(response.content)
        if response.headers.get("content-type", "").startswith(score_codec.MEDIA_TYPE):
            records = score_codec.decode(response.content)
            scores = [TokenScores(r["logprobs"], r.get("top_ids"), r.get("top_logprobs"),
                                  r["computed_tokens"], r["cached_tokens"]) for r in records]
        else:
            outputs = response.json()
            outputs = [outputs] if isinstance(outputs, dict) else outputs
            scores = [self._from_json(out, top_k) for out in outputs]
            if token_ids is not None:
                for i, (sc, out, ids) in enumerate(zip(scores, outputs, token_ids)):
                    sc.ids_logprobs = self._ids_logprobs(out, ids, len(sc), i)
        return self._checked(scores, sequences, starts, top_k)

    def _ids_logprobs(self, out: dict[str, Any], ids: list[int], length: int, i: int) -> torch.Tensor:
        rows = (out["meta_info"].get("input_token_ids_logprobs") or [None])[1:]
        if len(rows) != length:
            raise TeacherError(f"teacher {self.name}: sequence {i}: {len(rows)} token_ids_logprob rows for {length} tokens")
        table = torch.empty(length, len(ids), dtype=torch.float32)
        for t, row in enumerate(rows):
            by_id = {int(e[1]): float(e[0]) for e in row}
            if any(token not in by_id for token in ids):
                raise TeacherError(f"teacher {self.name}: sequence {i}: position {t} lacks requested token ids")
            table[t] = torch.tensor([by_id[token] for token in ids])
        return table

    def _from_json(self, out: dict[str, Any], top_k: int) -> TokenScores:
        meta = out["meta_info"]
        entries = meta["input_token_logprobs"][1:]  # the first entry (position start - 1) is None
        scores = TokenScores(torch.tensor([e[0] for e in entries], dtype=torch.float32),
                             computed_tokens=int(meta["prompt_tokens"]) - int(meta.get("cached_tokens") or 0),
                             cached_tokens=int(meta.get("cached_tokens") or 0))
        scores.token_ids = [e[1] for e in entries]  # checked against the request below
        if top_k:
            tops = meta["input_top_logprobs"][1:]
            scores.top_logprobs = torch.tensor([[e[0] for e in row] for row in tops], dtype=torch.float32).view(-1, top_k)
            scores.top_ids = torch.tensor([[e[1] for e in row] for row in tops], dtype=torch.long).view(-1, top_k)
        return scores

    def _checked(self, scores: list[TokenScores], sequences, starts, top_k) -> list[TokenScores]:
        if len(scores) != len(sequences):
            raise TeacherError(f"teacher {self.name}: {len(scores)} results for {len(sequences)} sequences")
        for i, (sc, seq, start) in enumerate(zip(scores, sequences, starts)):
            if len(sc) != len(seq) - start:
                raise TeacherError(f"teacher {self.name}: sequence {i}: {len(sc)} log-probs for {len(seq) - start} completion tokens")
            ids = getattr(sc, "token_ids", None)
            if ids is not None and list(ids) != list(seq[start:]):
                raise TeacherError(f"teacher {self.name}: sequence {i}: the server scored different token ids")
            if top_k and (sc.top_ids is None or tuple(sc.top_ids.shape) != (len(sc), top_k)):
                raise TeacherError(f"teacher {self.name}: sequence {i}: top-k missing or of the wrong shape")
        return scores

    def health(self) -> bool:
        return self.client.health()

    def served_models(self) -> list[str]:
        """What the endpoint says it serves: ``/model_info``'s ``model_path`` (SGLang and embedded)."""
        return [str(self.client.model_info().get("model_path", ""))]


class OpenAIScorer:
    """OpenAI-compatible ``/v1/completions`` with vLLM's ``prompt_logprobs``: the prompt is the whole
    sequence; ``prompt_logprobs[t]`` maps token id -> {logprob, rank} for the token at ``t`` (always
    present) plus the top-k. vLLM rejects ``max_tokens=0``, so one token is generated and ignored:
    the server's ``--max-model-len`` must exceed the longest prompt + completion by one."""

    def __init__(self, url: str, model: str, name: str = "", api_key: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.model = model
        self.name = name or url
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.last_response_bytes = 0

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0,
              token_ids: list[list[int]] | None = None) -> list[TokenScores]:
        import httpx

        if token_ids is not None:
            raise TeacherError(f"teacher {self.name}: an OpenAI-compatible endpoint returns only its own top-k "
                               "(prompt_logprobs); loss.token_set 'student' / 'union' needs an SGLang teacher")
        _check_starts(sequences, starts)
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k}
        try:
            response = self._http.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}/v1/completions: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.url}/v1/completions: HTTP {response.status_code}: {response.text[:500]}", response.status_code)
        self.last_response_bytes = len(response.content)
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise TeacherError(f"teacher {self.name}: {len(choices)} choices for {len(sequences)} sequences")
        return [parse_prompt_logprobs(c["prompt_logprobs"], seq, start, top_k, self.name)
                for c, seq, start in zip(choices, sequences, starts)]

    def health(self) -> bool:
        import httpx

        try:
            return self._http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def served_models(self) -> list[str]:
        """The model ids of ``/v1/models`` (OpenAI's list endpoint, served by vLLM)."""
        import httpx

        try:
            response = self._http.get("/v1/models", timeout=30)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}/v1/models: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.url}/v1/models: HTTP {response.status_code}: {response.text[:300]}", response.status_code)
        return [str(m.get("id")) for m in response.json().get("data", [])]


def parse_prompt_logprobs(rows: list[dict[str, Any] | None], seq: list[int], start: int, top_k: int,
                          name: str = "teacher") -> TokenScores:
    """vLLM's ``prompt_logprobs`` (one dict per prompt position, None first) -> TokenScores."""
    if len(rows) != len(seq):
        raise TeacherError(f"teacher {name}: {len(rows)} prompt_logprobs rows for {len(seq)} tokens")
    values, top_ids, top_values = [], [], []
    for pos in range(start, len(seq)):
        row = {int(k): v for k, v in rows[pos].items()}
        if seq[pos] not in row:
            raise TeacherError(f"teacher {name}: position {pos}: token {seq[pos]} missing from prompt_logprobs")
        values.append(float(row[seq[pos]]["logprob"]))
        if top_k:
            ranked = sorted(((v["rank"], t, v["logprob"]) for t, v in row.items() if v.get("rank") and v["rank"] <= top_k))
            if len(ranked) < top_k:
                raise TeacherError(f"teacher {name}: position {pos}: {len(ranked)} top entries, expected {top_k}")
            top_ids.append([t for _, t, _ in ranked[:top_k]])
            top_values.append([float(v) for _, _, v in ranked[:top_k]])
    scores = TokenScores(torch.tensor(values, dtype=torch.float32), computed_tokens=len(seq))
    if top_k:
        scores.top_ids = torch.tensor(top_ids, dtype=torch.long).view(-1, top_k)
        scores.top_logprobs = torch.tensor(top_values, dtype=torch.float32).view(-1, top_k)
    return scores
