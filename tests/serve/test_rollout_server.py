"""The rollout server (opd serve): it speaks SGLang's shapes and schema, refuses invalid bodies, and takes weights from a TP2 x PP2 student exactly."""
import json

import httpx
import pytest
import torch
from helpers import REPO, WORKERS, start_rollout_server, torchrun

from megatron_opd.data.chat import chat_ids
from megatron_opd.records import SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.wire.client import SGLangClient
from megatron_opd.wire.contract import ContractError, validate_request

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def _prompts(tokenizer, texts):
    return [chat_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts]


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
    # magnitude up to ~20 (as in tests/teachers/test_scoring.py). Serving the unperturbed weights gives a mean of ~1.
    assert report["probe"]["mean_abs_diff"] <= 1e-5 and report["probe"]["max_abs_diff"] <= 5e-5, report["probe"]


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

