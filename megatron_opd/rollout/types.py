"""The records that cross the rollout boundary (shared by every engine, client and trainer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """A subset of SGLang's ``sampling_params`` (same names, same meaning)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled (SGLang's convention)
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0 or self.n < 1:
            raise ValueError("max_new_tokens must be >= 0 and n >= 1")

    def to_sglang(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if k not in ("seed", "stop_token_ids")}
        body["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            body["sampling_seed"] = self.seed
        return body

    @classmethod
    def from_sglang(cls, params: dict[str, Any]) -> "SamplingParams":
        known = {"temperature", "top_p", "top_k", "max_new_tokens", "n"}
        kwargs = {k: params[k] for k in known if params.get(k) is not None}
        return cls(**kwargs, stop_token_ids=tuple(params.get("stop_token_ids") or ()), seed=params.get("sampling_seed"))


@dataclass
class Rollout:
    """One sampled completion: what the trainer needs to score and learn from it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler log p(token) under the unmodified (T=1) distribution
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str
    prompt_index: int = 0
    sample_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]: ...

    def update_weights(self, named_tensors: Iterator[tuple[str, Any]], version: str) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def health(self) -> bool: ...
