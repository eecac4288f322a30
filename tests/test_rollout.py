"""Embedded engine and server: parity with transformers, SGLang contract, weight sync from TP2xPP2."""
import json
import threading
import time

import httpx
import pytest
import torch

from conftest import REPO, WORKERS, start_rollout_server, torchrun
from megatron_opd.rollout.embedded import EmbeddedEngine, WeightUpdateError
from megatron_opd.wire.client import SGLangClient
from megatron_opd.records import SamplingParams
from megatron_opd.wire.contract import ContractError, validate_request

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def _prompts(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
            for t in texts]


def test_greedy_equals_transformers_generate_and_sampling_is_seeded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = EmbeddedEngine(TEACHER)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    prompts = _prompts(tok, ["add 123 + 45", "add 99999 + 1", "add 5 + 5"])
    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40))
    reference = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    for prompt, rollout in zip(prompts, ours):
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert rollout.completion_ids == expected.tolist()
        # sampler log-probs are the model's own log-probs of those tokens
        with torch.no_grad():
            full = torch.tensor([prompt + rollout.completion_ids])
            lp = torch.log_softmax(reference(full).logits[0, len(prompt) - 1 : -1], -1)
        picked = lp.gather(-1, torch.tensor(rollout.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(rollout.logprobs), picked, atol=1e-5)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=30, n=3, seed=11)
    a, b = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [(r.prompt_index, r.sample_index) for r in a] == [(i, k) for i in range(3) for k in range(3)]
    c = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=30, n=3, seed=12))
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the disk syncs below write under pytest's temporary directory: the server may load from there
    url, proc = start_rollout_server(TEACHER, extra_args=["--weights-root", str(tmp_path_factory.getbasetemp())])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_server_speaks_sglang_shapes_and_rejects_invalid_bodies(server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    client = SGLangClient(server)
    prompts = _prompts(tok, ["add 1234 + 5678", "add 700 + 300"])
    rollouts = client.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=64))
    local = EmbeddedEngine(TEACHER).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=64))
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in local]
    assert all(r.finish_reason == "stop" and r.weight_version == "0" for r in rollouts)
    assert tok.decode(rollouts[0].completion_ids, skip_special_tokens=True).endswith("answer: 6912")
    # raw response shape of a single prompt with logprobs
    body = {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 5, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    validate_request("/generate", body)
    raw = httpx.post(server + "/generate", json=body).json()
    meta = raw["meta_info"]
    assert set(raw) == {"text", "output_ids", "meta_info"}
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["prompt_tokens"] == len(prompts[0]) and meta["completion_tokens"] == 5
    assert meta["input_token_logprobs"][0] == [None, prompts[0][0], None]
    assert len(meta["input_token_logprobs"]) == len(prompts[0]) and len(meta["output_token_logprobs"]) == 5
    assert len(meta["input_top_logprobs"][1]) == 2
    # prefill-only scoring returns the same numbers as the engine's own scoring
    scores = client.score([prompts[0] + rollouts[0].completion_ids], start=len(prompts[0]))
    assert len(scores[0]) == len(rollouts[0].completion_ids)
    assert torch.allclose(torch.tensor(scores[0]), torch.tensor(rollouts[0].logprobs), atol=1e-5)
    # schema-invalid bodies: 400 naming the field; the client refuses to send them at all
    bad = httpx.post(server + "/generate", json={"input_ids": [1, 2], "return_logprob": "yes"})
    assert bad.status_code == 400 and "return_logprob" in bad.json()["error"]
    bad = httpx.post(server + "/update_weights_from_disk", json={"weight_version": "1"})
    assert bad.status_code == 400 and "model_path" in bad.json()["error"]
    with pytest.raises(ContractError, match="model_path"):
        client._post("/update_weights_from_disk", {})
    info = client.model_info()
    assert info["is_generation"] and info["weight_version"] == "0"


@pytest.mark.parametrize("mode,version", [("disk", "7"), ("distributed", "8"), ("distributed_flat", "9")])
@pytest.mark.slow
def test_weight_sync_from_tp2pp2_student_is_exact(server, tmp_path, mode, version):
    torchrun(4, [str(WORKERS / "sync_worker.py"), "2", "2", str(TEACHER), server, str(tmp_path), mode])
    client = SGLangClient(server)
    assert client.model_info()["weight_version"] == version
    trainer = torch.load(tmp_path / "trainer_weights.pt", weights_only=True)
    for name, tensor in trainer.items():
        served = torch.tensor(client.get_weights_by_name(name, truncate_size=10**6), dtype=tensor.dtype)
        assert torch.equal(served, tensor), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tensors"] == len(trainer) and report["bytes"] > 0
    # weights are bit-identical (above); the probe compares two forwards of them, megatron TP2xPP2 vs the
    # server's single-process one, so only fp32 reduction order differs: ~1e-6 relative on log-probs of
    # magnitude up to ~20 (as in tests/test_teachers.py). Serving the unperturbed weights gives a mean of ~1.
    assert report["probe"]["mean_abs_diff"] <= 1e-5 and report["probe"]["max_abs_diff"] <= 5e-5, report["probe"]


@pytest.mark.slow
def test_pool_retries_a_killed_servers_share_exactly_once():
    from transformers import AutoTokenizer

    from megatron_opd.rollout.rollout_pool import RolloutPool

    tok = AutoTokenizer.from_pretrained(TEACHER)
    servers = [start_rollout_server(TEACHER) for _ in range(2)]
    try:
        pool = RolloutPool([SGLangClient(url) for url, _ in servers])
        prompts = _prompts(tok, [f"add {1000 + 37 * i} + {2000 + 91 * i}" for i in range(48)])  # each server busy for well over the 0.5 s before the kill
        sampling = SamplingParams(temperature=1.0, max_new_tokens=64, n=2, seed=5)
        victim = servers[1][1]
        killer = threading.Timer(0.5, victim.kill)  # mid-batch: the server is busy generating
        killer.start()
        started = time.time()
        rollouts = pool.generate(prompts, sampling)
        killer.join()
        assert time.time() - started > 0.5, "the batch finished before the kill; it did not test a retry"
        assert pool.retries == 1 and pool.dead == {1}
        assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, k) for i in range(48) for k in range(2)]
        assert all(r.prompt_ids == prompts[r.prompt_index] and r.completion_ids for r in rollouts)
        assert pool.health() and pool.dead == {1}
        from megatron_opd.wire.failover import PoolError

        with pytest.raises(PoolError, match="token ids must be in"):  # a bad request is not a dead server
            pool.generate([[1, 10**6]], SamplingParams(max_new_tokens=2))
        assert pool.dead == {1} and pool.retries == 1
        again = pool.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=8))
        assert [r.prompt_index for r in again] == [0, 1]
    finally:
        for _, proc in servers:
            proc.kill()
            proc.wait(timeout=30)


def test_every_client_request_matches_sglangs_schema(server, tmp_path):
    """Record the bodies the client really sends and check them with jsonschema against the
    vendored SGLang OpenAPI document (independently of the client's own pre-send check)."""
    import jsonschema

    from megatron_opd.wire.contract import CONTRACT

    doc = json.loads(CONTRACT.read_text())
    sent = []
    client = SGLangClient(server)
    client._http.event_hooks["request"].append(lambda req: sent.append((req.url.path, req.read())))
    client.generate([[2, 90, 88, 74, 87, 4]], SamplingParams(max_new_tokens=3, seed=1, n=2, stop_token_ids=(3,)))
    client.score([[2, 90, 88, 74]], start=1)
    client.pause()
    client.resume()
    client.update_weight_version("v-schema")
    client.get_weights_by_name("model.norm.weight")
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in EmbeddedEngine(TEACHER).model.state_dict().items()}, str(tmp_path / "w.safetensors"))  # a full update
    client.update_weights_from_disk(str(tmp_path), "v-disk")
    posted = [(path, json.loads(body)) for path, body in sent if body]
    assert {p for p, _ in posted} >= {"/generate", "/pause_generation", "/continue_generation",
                                       "/update_weight_version", "/get_weights_by_name", "/update_weights_from_disk"}
    for path, body in posted:
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        jsonschema.validate(body, {**schema, "components": doc["components"]})
    assert client.model_info()["weight_version"] == "v-disk"


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
