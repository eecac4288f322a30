"""The tiny world's verifiable domains (seeded generators + exact verifiers)."""

from megatron_opd.data.domains.arithmetic import Arithmetic
from megatron_opd.data.domains.base import Domain, Problem, Verdict
from megatron_opd.data.domains.format import Format
from megatron_opd.data.domains.multiply import Multiply
from megatron_opd.data.domains.strings import Strings

DOMAINS: dict[str, Domain] = {d.name: d for d in (Arithmetic(), Strings(), Format(), Multiply())}
TINY_WORLD = ("arithmetic", "strings", "format")  # assets/tiny: short answers, each learned well by SFT
LONG_WORLD = ("multiply",)  # assets/tiny_long: long scratchpads where imitation compounds its slips


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise KeyError(f"unknown domain {name!r}; known: {sorted(DOMAINS)}")
    return DOMAINS[name]


__all__ = ["DOMAINS", "LONG_WORLD", "TINY_WORLD", "Domain", "Problem", "Verdict", "get_domain"]
