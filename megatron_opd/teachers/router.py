"""Which teachers score a sample, and with what weight (per sample or per token).

Routes map a sample's domain tag to one or more teachers with weights; ``default`` catches tags
without a route (a sample with neither stops the run). Teachers that share an endpoint or a
checkpoint are scored once ("units") and their weights add up. Weights are normalised to sum to 1
per sample, so the combined advantage ``A_t = sum_k w_k,t (log p_Tk(y_t) - log p_S(y_t))`` stays on
the scale of a single teacher's (README, Architecture, "Teachers").

``weighting: confidence`` makes the weights per token: ``w_k,t ∝ w_k · exp(-H_k,t / tau)``, with
``H_k,t`` teacher k's entropy at position t, estimated from its top-k log-probs plus one tail
bucket for the remaining mass — a teacher that is unsure at a position gives way there to one
that is sure.
"""

from __future__ import annotations

import torch

from megatron_opd.config.teachers import RoutingSpec
from megatron_opd.records import TokenScores


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
