"""Routing samples to teachers: domain tags, the default, missing and overlapping teachers, de-duplication, confidence weights."""
import pytest
import torch

from megatron_opd.config.teachers import RoutingSpec
from megatron_opd.records import TokenScores
from megatron_opd.teachers.router import Router, topk_entropy


def _scores(entropy_like: list[list[float]]) -> TokenScores:
    """Per position a top-2 distribution; returns TokenScores with those top log-probs."""
    top = torch.log(torch.tensor(entropy_like))
    return TokenScores(torch.zeros(len(entropy_like)), torch.zeros(len(entropy_like), 2, dtype=torch.long), top)


def test_router_tags_default_missing_overlap_dedupe_and_confidence():
    spec = RoutingSpec.model_validate({
        "teachers": {"math": {"urls": ["http://127.0.0.1:1"]}, "strings": {"urls": ["http://127.0.0.1:2"]},
                     "general": {"urls": ["http://127.0.0.1:3"]}, "general_alias": {"urls": ["http://127.0.0.1:3/"]}},
        "routes": {"arithmetic": "math", "mixed": [{"teacher": "math", "weight": 3}, {"teacher": "strings", "weight": 1}],
                   "dup": [{"teacher": "general", "weight": 1}, {"teacher": "general_alias", "weight": 1}]},
    })
    router = Router(spec)
    assert router.route("arithmetic") == {"math": 1.0}
    assert router.route("mixed") == {"math": 0.75, "strings": 0.25}
    assert router.route("dup") == {"general": 1.0} and router.units["general"] == ["general", "general_alias"]
    with pytest.raises(ValueError, match="no route for domain tag 'format'"):
        router.plan(["arithmetic", "format"])
    with_default = RoutingSpec.model_validate({**spec.model_dump(), "default": "general"})
    routes, work = Router(with_default).plan(["arithmetic", "format", None])
    assert routes[1] == {"general": 1.0} and work == {"math": [0], "general": [1, 2]}
    with pytest.raises(ValueError, match="unknown teacher 'nope'"):
        RoutingSpec.model_validate({"teachers": {"a": {"urls": ["http://x"]}}, "routes": {"t": "nope"}})
    with pytest.raises(ValueError, match="routes.t"):  # an empty route would leave samples unscored
        RoutingSpec.model_validate({"teachers": {"a": {"urls": ["http://x"]}}, "routes": {"t": []}})
    # one OpenAI server hosting two models is two teachers, not one
    two = Router(RoutingSpec.model_validate({"teachers": {
        m: {"urls": ["http://x"], "backend": "openai", "served_model_name": m} for m in ("a", "b")}, "default": "a"}))
    assert sorted(two.units) == ["a", "b"]

    # confidence: per-token weights sum to 1 and favour the teacher that is sure at that position
    conf = Router(RoutingSpec.model_validate({**spec.model_dump(), "weighting": "confidence"}))
    sure, unsure = _scores([[0.99, 0.01], [0.5, 0.5]]), _scores([[0.5, 0.5], [0.99, 0.01]])
    w = conf.token_weights({"math": 0.5, "strings": 0.5}, {"math": sure, "strings": unsure})
    assert torch.allclose(w["math"] + w["strings"], torch.ones(2))
    assert w["math"][0] > 0.5 > w["math"][1]
    # entropy with a tail bucket: top-2 covering 0.9 of the mass leaves 0.1 in one tail bucket
    # a -inf top-k entry (no mass) contributes 0, not NaN
    assert torch.isfinite(topk_entropy(_scores([[1.0, 0.0]]))).all()
    h = topk_entropy(_scores([[0.6, 0.3]]))
    expected = -(0.6 * torch.log(torch.tensor(0.6)) + 0.3 * torch.log(torch.tensor(0.3)) + 0.1 * torch.log(torch.tensor(0.1)))
    assert torch.allclose(h, expected[None], atol=1e-6)

