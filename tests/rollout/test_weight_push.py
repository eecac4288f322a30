"""Weights pushed in process (and the API key on the server's weight routes)."""
import pytest
import torch
from helpers import REPO

from megatron_opd.rollout.embedded import EmbeddedEngine, WeightUpdateError

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def test_in_process_push_and_api_key(tmp_path):
    from megatron_opd.rollout.weight_push import push_in_process

    engine = EmbeddedEngine(TEACHER)
    donor = EmbeddedEngine(REPO / "assets" / "tiny" / "original")
    report = push_in_process(engine, iter(donor.model.state_dict().items()), "3")
    assert engine.weight_version == "3" and not engine.paused and report.tensors > 0
    for name, tensor in donor.model.state_dict().items():
        assert torch.equal(engine.get_weight(name), tensor), name
    norm = "model.norm.weight"
    with pytest.raises(WeightUpdateError, match="does not exist"):  # checked before anything is copied
        engine.update_weights(iter([(norm, torch.zeros_like(engine.get_weight(norm))), ("model.nope.weight", torch.zeros(1))]), "4")
    assert torch.equal(engine.get_weight(norm), donor.get_weight(norm)) and engine.weight_version == "3"

    from fastapi.testclient import TestClient

    from megatron_opd.serve.rollout_server import create_app

    http = TestClient(create_app(engine, api_key="secret"))
    assert http.get("/health").status_code == 401
    assert http.get("/health", headers={"Authorization": "Bearer secret"}).status_code == 200

