"""The tiny world's verifiable domains (seeded generators + exact verifiers)."""

from megatron_opd.data.domains.arithmetic import Arithmetic
from megatron_opd.data.domains.base import Domain, Problem, Verdict
from megatron_opd.data.domains.format import Format
from megatron_opd.data.domains.strings import Strings

DOMAINS: dict[str, Domain] = {d.name: d for d in (Arithmetic(), Strings(), Format())}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise KeyError(f"unknown domain {name!r}; known: {sorted(DOMAINS)}")
    return DOMAINS[name]


__all__ = ["DOMAINS", "Domain", "Problem", "Verdict", "get_domain"]
