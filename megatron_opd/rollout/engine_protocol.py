"""The rollout engine's protocol (its records live in :mod:`megatron_opd.records`)."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from megatron_opd.records import Rollout, SamplingParams


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]: ...

    def update_weights(self, named_tensors: Iterator[tuple[str, Any]], version: str) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def health(self) -> bool: ...
