"""Which teachers score a sample, and with what weight (per sample or per token).

Routes map a sample's domain tag to one or more teachers with weights; ``default`` catches tags
without a route (a sample with neither stops the run). Teachers that share an endpoint or a
checkpoint are scored once ("units") and their weights add up. Weights are normalised to sum to 1
per sample, so the combined advantage ``A_t = sum_k w_k,t (log p_Tk(y_t) - log p_S(y_t))`` stays on
the scale of a single teacher's (DESIGN.md, multi-teacher).

``weighting: confidence`` makes the weights per token: ``w_k,t ∝ w_k · exp(-H_k,t / tau)``, with
``H_k,t`` teacher k's entropy at position t, estimated from its top-k log-probs plus one tail
bucket for the remaining mass — a teacher that is unsure at a position gives way there to one
that is sure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from megatron_opd.teachers.types import TokenScores


class TeacherSpec(BaseModel):
    """One teacher: running endpoints (``urls``) or a checkpoint served by embedded teacher servers."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list, description="running SGLang / embedded / OpenAI-compatible servers")
    model: Path | None = Field(None, description="HF checkpoint: launched as `opd serve --role teacher` when urls is empty")
    backend: Literal["sglang", "openai"] = "sglang"
    served_model_name: str | None = Field(None, description="the `model` field for OpenAI-compatible servers")
    tokenizer: Path | None = Field(None, description="local tokenizer for the parity check (default: model)")
    replicas: int = Field(1, ge=1, description="embedded servers to launch (model only)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    batch_size: int = Field(32, ge=1, description="sequences per scoring request")
    max_concurrency: int = Field(4, ge=1, description="requests in flight per teacher")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)
    binary: bool = Field(True, description="accept the embedded server's binary score payload")

    @model_validator(mode="after")
    def _endpoint(self) -> "TeacherSpec":
        if not self.urls and self.model is None:
            raise ValueError("give `urls` (running servers) or `model` (a checkpoint to serve)")
        if self.backend == "openai" and not self.urls:
            raise ValueError("backend 'openai' needs `urls` (this project launches only embedded teacher servers)")
        if self.backend == "openai" and not self.served_model_name:
            raise ValueError("backend 'openai' needs `served_model_name` (the OpenAI `model` field)")
        return self

    def endpoint_key(self) -> tuple[str, ...]:
        """Teachers with equal keys are one scoring unit (same servers, or same checkpoint)."""
        if self.urls:
            return (self.backend, self.served_model_name or "", *sorted(u.rstrip("/").lower() for u in self.urls))
        return ("model", str(Path(self.model).resolve()))


class RouteTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str
    weight: float = Field(1.0, gt=0)


Route = Annotated[list[RouteTarget], Field(min_length=1)]


class RoutingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teachers: dict[str, TeacherSpec]
    routes: dict[str, Route] = Field(default_factory=dict, description="domain tag -> teachers with weights")
    default: Route | None = Field(None, description="teachers for samples whose tag has no route")
    weighting: Literal["fixed", "confidence"] = "fixed"
    confidence_temperature: float = Field(1.0, gt=0)
    allow_tokenizer_mismatch: bool = False

    @field_validator("routes", "default", mode="before")
    @classmethod
    def _shorthand(cls, value):
        """``math: arithmetic`` is short for ``math: [{teacher: arithmetic, weight: 1}]``."""
        def expand(route):
            if isinstance(route, str):
                return [{"teacher": route}]
            return route
        if isinstance(value, dict):
            return {tag: expand(route) for tag, route in value.items()}
        return expand(value)

    @model_validator(mode="after")
    def _known_teachers(self) -> "RoutingSpec":
        if not self.teachers:
            raise ValueError("teachers: at least one teacher is needed")
        named = [("default", r) for r in self.default or []] + [(f"routes.{tag}", r) for tag, rs in self.routes.items() for r in rs]
        for where, target in named:
            if target.teacher not in self.teachers:
                raise ValueError(f"{where}: unknown teacher {target.teacher!r}; defined: {sorted(self.teachers)}")
        if not self.routes and not self.default:
            raise ValueError("give `routes` (domain tag -> teachers) and/or a `default`")
        return self


class NoRouteError(ValueError):
    pass


class Router:
    def __init__(self, spec: RoutingSpec) -> None:
        self.spec = spec
        units: dict[tuple[str, ...], list[str]] = {}
        for name, teacher in spec.teachers.items():
            units.setdefault(teacher.endpoint_key(), []).append(name)
        # a unit is named after its first teacher; every teacher maps to its unit
        self.units = {names[0]: names for names in units.values()}
        self.unit_of = {name: names[0] for names in units.values() for name in names}

    def route(self, tag: str | None) -> dict[str, float]:
        """Unit name -> normalised weight for a sample with this domain tag."""
        targets = self.spec.routes.get(tag) if tag is not None else None
        if targets is None:
            targets = self.spec.default
        if targets is None:
            raise NoRouteError(f"no route for domain tag {tag!r} and no default teacher; routes exist for {sorted(self.spec.routes)}")
        weights: dict[str, float] = {}
        for target in targets:
            unit = self.unit_of[target.teacher]
            weights[unit] = weights.get(unit, 0.0) + target.weight
        total = sum(weights.values())
        if not weights or total <= 0:
            raise NoRouteError(f"domain tag {tag!r}: its route has no teacher")
        return {unit: w / total for unit, w in weights.items()}

    def plan(self, tags: list[str | None]) -> tuple[list[dict[str, float]], dict[str, list[int]]]:
        """Per-sample unit weights, and per unit the samples it must score. Every sample is
        checked before any request is sent, so a missing route stops the run up front."""
        routes = [self.route(tag) for tag in tags]
        work: dict[str, list[int]] = {}
        for i, weights in enumerate(routes):
            for unit in weights:
                work.setdefault(unit, []).append(i)
        return routes, work

    def token_weights(self, weights: dict[str, float], scores: dict[str, TokenScores]) -> dict[str, torch.Tensor]:
        """Per-token weights [T] per unit for one sample; they sum to 1 at every position."""
        length = len(next(iter(scores.values())))
        if self.spec.weighting == "fixed":
            return {unit: torch.full((length,), w) for unit, w in weights.items()}
        units = list(weights)
        entropy = torch.stack([topk_entropy(scores[u]) for u in units])  # [K, T]
        prior = torch.tensor([weights[u] for u in units])[:, None]
        logits = torch.log(prior) - entropy / self.spec.confidence_temperature
        mixed = torch.softmax(logits, dim=0)
        return {u: mixed[k] for k, u in enumerate(units)}


def topk_entropy(scores: TokenScores) -> torch.Tensor:
    """Entropy estimate [T] from the top-k log-probs plus a tail bucket holding the rest of the mass
    (a lower bound on the true entropy; exact when the top-k covers the distribution)."""
    if scores.top_logprobs is None:
        raise ValueError("confidence weighting needs the teachers' top-k log-probs (set top_k >= 1)")
    top = scores.top_logprobs.double()
    p = top.exp()
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    h = -torch.where(p > 0, p * top, torch.zeros_like(p)).sum(-1)  # a -inf entry adds 0, not NaN
    h = h - torch.where(tail > 0, tail * torch.log(tail.clamp_min(1e-30)), torch.zeros_like(tail))
    return h.float()
